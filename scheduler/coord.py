"""ZooKeeper coordination: the only module that imports kazoo.

kazoo is threaded; this module adapts it to asyncio once. Every callback from kazoo's
threads is handed to the owning event loop with `call_soon_threadsafe`; coroutine
methods wrap kazoo's `*_async` calls in loop futures.

Connect strings take kazoo's form `host:port[,host:port...][/chroot]`. The chroot
(default `/ringstore`) is applied by this module as a path prefix rather than by kazoo,
so it is created on first use and never needs to exist beforehand.

Connection states and what they permit (kazoo's rule, made ours):
- CONNECTED: ephemeral nodes and elections are valid.
- SUSPENDED: the session may still be alive but we cannot know; a process makes no
  leadership decisions (callers gate on `coord.connected`).
- LOST: the session expired; ephemeral nodes and elections are gone. kazoo reconnects
  with a new session; listeners registered with `on_session_restart` re-register.

Retries are one policy (`RETRY`), applied to reads and idempotent calls only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.retry import KazooRetry

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/ringstore"
T = TypeVar("T")


class CoordError(Exception):
    """A ZooKeeper operation failed."""

    retriable = False


class NoNode(CoordError):
    pass


class NodeExists(CoordError):
    pass


class VersionConflict(CoordError):
    """A versioned (compare-and-set) write found another version."""


class NotEmpty(CoordError):
    pass


class CoordUnavailable(CoordError):
    """No ZooKeeper session right now; the operation may or may not have happened."""

    retriable = True


_TRANSLATE: dict[type[Exception], type[CoordError]] = {
    NoNodeError: NoNode,
    NodeExistsError: NodeExists,
    BadVersionError: VersionConflict,
    NotEmptyError: NotEmpty,
    ConnectionLoss: CoordUnavailable,
    SessionExpiredError: CoordUnavailable,
    OperationTimeoutError: CoordUnavailable,
}


def _translate(exc: BaseException) -> BaseException:
    for kazoo_type, ours in _TRANSLATE.items():
        if isinstance(exc, kazoo_type):
            return ours(f"{type(exc).__name__}: {exc}")
    return exc


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy for ZooKeeper calls: capped exponential backoff with jitter."""

    tries: int = 8
    delay: float = 0.05
    max_delay: float = 1.0

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        delay = self.delay
        for attempt in range(self.tries):
            try:
                return await call()
            except CoordUnavailable:
                if attempt == self.tries - 1:
                    raise
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.max_delay)
        raise AssertionError("unreachable")


RETRY = RetryPolicy()


def split_connect_string(zk: str) -> tuple[str, str]:
    """`"h1:1,h2:2/chroot"` -> `("h1:1,h2:2", "/chroot")`; the root defaults to /ringstore."""
    hosts, slash, chroot = zk.partition("/")
    root = "/" + chroot.strip("/") if slash and chroot.strip("/") else DEFAULT_ROOT
    return hosts, root


@dataclass(frozen=True)
class Stat:
    version: int
    ephemeral_owner: int
    created_ms: int


class Coordinator:
    """An asyncio facade over one kazoo session.

    Paths given to methods are relative to the chroot (`"a/b"` or `"/a/b"` both mean
    `<chroot>/a/b`). Must be started and used from one event loop.
    """

    def __init__(self, zk: str, *, session_timeout: float = 10.0, name: str = "") -> None:
        self.hosts, self.root = split_connect_string(zk)
        self.name = name or "coord"
        self._client = KazooClient(
            hosts=self.hosts,
            timeout=session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "LOST"
        self._listeners: list[Callable[[str], None]] = []
        self._restart_listeners: list[Callable[[], None]] = []
        self._lost = False
        self._client.add_listener(self._on_kazoo_state)

    # -- lifecycle -------------------------------------------------------------

    async def start(self, timeout: float = 15.0) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._client.start, timeout)
        except Exception as exc:  # kazoo raises its own timeout type here
            raise CoordUnavailable(f"cannot reach ZooKeeper at {self.hosts}: {exc}") from exc
        self._state = "CONNECTED"
        log.info(
            "zookeeper connected name=%s hosts=%s root=%s negotiated_session_timeout_ms=%s",
            self.name, self.hosts, self.root, self.session_timeout_ms,
        )
        await self.ensure("")

    async def close(self) -> None:
        """Close the session (its ephemeral nodes go at once). Idempotent."""
        if self._client.state == KazooState.LOST and not self._client.connected:
            self._client.close()
            return
        await asyncio.to_thread(self._client.stop)
        await asyncio.to_thread(self._client.close)

    @property
    def session_timeout_ms(self) -> int:
        return int(getattr(self._client, "_session_timeout", 0) or 0)

    @property
    def session_id(self) -> int:
        sid = self._client.client_id
        return int(sid[0]) if sid else 0

    @property
    def state(self) -> str:
        return self._state

    @property
    def connected(self) -> bool:
        """True only while the session is known to be alive (not SUSPENDED, not LOST)."""
        return self._state == "CONNECTED"

    def on_state(self, callback: Callable[[str], None]) -> None:
        """Call `callback(state)` on the loop at every CONNECTED/SUSPENDED/LOST change."""
        self._listeners.append(callback)

    def on_session_restart(self, callback: Callable[[], None]) -> None:
        """Call `callback()` on the loop when a new session replaced a lost one."""
        self._restart_listeners.append(callback)

    def _on_kazoo_state(self, state: str) -> None:
        # kazoo's thread: never block, never call kazoo from here.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._set_state, str(state))
        except RuntimeError:
            pass

    def _set_state(self, state: str) -> None:
        previous, self._state = self._state, state
        if state == "LOST":
            self._lost = True
        log.info("zookeeper state name=%s %s -> %s", self.name, previous, state)
        for callback in list(self._listeners):
            callback(state)
        if state == "CONNECTED" and self._lost:
            self._lost = False
            for restart in list(self._restart_listeners):
                restart()

    # -- paths -----------------------------------------------------------------

    def abspath(self, path: str) -> str:
        rel = path.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    # -- async plumbing ---------------------------------------------------------

    async def _call(self, start: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any) -> None:
            try:
                value = result.get_nowait()
            except Exception as exc:
                loop.call_soon_threadsafe(_set_exception, future, _translate(exc))
            else:
                loop.call_soon_threadsafe(_set_result, future, value)

        try:
            start().rawlink(settle)
        except Exception as exc:
            raise _translate(exc) from exc
        return await future

    # -- operations -------------------------------------------------------------

    async def get(self, path: str) -> tuple[bytes, Stat] | None:
        full = self.abspath(path)
        try:
            data, zstat = await RETRY.run(lambda: self._call(lambda: self._client.get_async(full)))
        except NoNode:
            return None
        return data, Stat(zstat.version, zstat.ephemeralOwner, zstat.ctime)

    async def get_json(self, path: str) -> tuple[dict[str, Any], int] | None:
        found = await self.get(path)
        if found is None:
            return None
        data, zstat = found
        return (json.loads(data) if data else {}), zstat.version

    async def children(self, path: str) -> list[str]:
        full = self.abspath(path)
        try:
            names: list[str] = await RETRY.run(
                lambda: self._call(lambda: self._client.get_children_async(full))
            )
        except NoNode:
            return []
        return sorted(names)

    async def exists(self, path: str) -> Stat | None:
        full = self.abspath(path)
        zstat = await RETRY.run(lambda: self._call(lambda: self._client.exists_async(full)))
        return None if zstat is None else Stat(zstat.version, zstat.ephemeralOwner, zstat.ctime)

    async def ensure(self, path: str) -> None:
        full = self.abspath(path)
        await RETRY.run(lambda: self._call(lambda: self._client.ensure_path_async(full)))

    async def create(
        self,
        path: str,
        data: bytes = b"",
        *,
        ephemeral: bool = False,
        sequence: bool = False,
        makepath: bool = False,
    ) -> str:
        """Create a node; returns its path relative to the root. Not retried."""
        full = self.abspath(path)
        created: str = await self._call(
            lambda: self._client.create_async(
                full, data, ephemeral=ephemeral, sequence=sequence, makepath=makepath
            )
        )
        return created[len(self.root):].lstrip("/")

    async def create_json(self, path: str, value: Any, **kwargs: Any) -> str:
        return await self.create(path, json.dumps(value, sort_keys=True).encode(), **kwargs)

    async def set(self, path: str, data: bytes, version: int = -1) -> int:
        """Write data; with `version` >= 0 only if the node is at that version (else
        VersionConflict). Returns the new version. Not retried."""
        full = self.abspath(path)
        zstat = await self._call(lambda: self._client.set_async(full, data, version))
        return int(zstat.version)

    async def set_json(self, path: str, value: Any, version: int = -1) -> int:
        return await self.set(path, json.dumps(value, sort_keys=True).encode(), version)

    async def delete(self, path: str, version: int = -1, *, recursive: bool = False) -> None:
        full = self.abspath(path)
        if recursive:
            await asyncio.to_thread(self._client.delete, full, version, True)
            return
        try:
            await self._call(lambda: self._client.delete_async(full, version))
        except NoNode:
            return

    # -- watches ----------------------------------------------------------------

    def watch_data(self, path: str, callback: Callable[[bytes | None, Stat | None], None]) -> None:
        """Call `callback(data, stat)` on the loop now and at every change (None: no node).

        The watch survives reconnections and session loss (kazoo re-arms it)."""
        loop = asyncio.get_running_loop()

        def fire(data: bytes | None, zstat: Any) -> None:
            stat = None if zstat is None else Stat(zstat.version, zstat.ephemeralOwner, zstat.ctime)
            loop.call_soon_threadsafe(callback, data, stat)

        self._client.DataWatch(self.abspath(path), fire)

    def watch_children(self, path: str, callback: Callable[[list[str]], None]) -> None:
        """Call `callback(sorted children)` on the loop now and at every change."""
        loop = asyncio.get_running_loop()

        def fire(children: list[str] | None) -> None:
            loop.call_soon_threadsafe(callback, sorted(children or []))

        self._client.ensure_path(self.abspath(path))
        self._client.ChildrenWatch(self.abspath(path), fire)

    def wait_change(self, path: str) -> asyncio.Event:
        """An event set once when `path`'s existence or data next changes."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def fire(_event: Any) -> None:
            loop.call_soon_threadsafe(event.set)

        try:
            self._client.exists(self.abspath(path), watch=fire)
        except Exception:
            event.set()
        return event


class Election:
    """Leader election on `<path>/n_<seq>` ephemeral sequential nodes (lowest leads).

    `campaign()` returns once this contender leads. Leadership ends with the session:
    callers watch `coord.on_state` and stop acting as leader on SUSPENDED/LOST, and call
    `campaign()` again after a session restart. The leader's data (e.g. its gRPC
    address) is readable by anyone through `leader_data()`.
    """

    PREFIX = "n_"

    def __init__(self, coord: Coordinator, path: str, data: bytes) -> None:
        self.coord = coord
        self.path = path.strip("/")
        self.data = data
        self.node: str | None = None

    async def campaign(self, stop: asyncio.Event | None = None) -> bool:
        """Contend until leading (True) or until `stop` is set (False)."""
        await self.coord.ensure(self.path)
        if self.node is None or await self.coord.exists(f"{self.path}/{self.node}") is None:
            created = await self.coord.create(
                f"{self.path}/{self.PREFIX}", self.data, ephemeral=True, sequence=True
            )
            self.node = created.rsplit("/", 1)[-1]
        while stop is None or not stop.is_set():
            contenders = [c for c in await self.coord.children(self.path)
                          if c.startswith(self.PREFIX)]
            contenders.sort(key=lambda c: c[len(self.PREFIX):])
            if self.node not in contenders:
                self.node = None
                return await self.campaign(stop)
            position = contenders.index(self.node)
            if position == 0:
                return True
            ahead = f"{self.path}/{contenders[position - 1]}"
            changed = self.coord.wait_change(ahead)
            if await self.coord.exists(ahead) is None:
                continue
            waiters = [asyncio.ensure_future(changed.wait())]
            if stop is not None:
                waiters.append(asyncio.ensure_future(stop.wait()))
            _, pending = await asyncio.wait(
                waiters, timeout=5.0, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
        return False

    async def resign(self) -> None:
        if self.node is not None:
            await self.coord.delete(f"{self.path}/{self.node}")
            self.node = None

    async def leader_data(self) -> bytes | None:
        contenders = [c for c in await self.coord.children(self.path) if c.startswith(self.PREFIX)]
        for name in sorted(contenders, key=lambda c: c[len(self.PREFIX):]):
            found = await self.coord.get(f"{self.path}/{name}")
            if found is not None:
                return found[0]
        return None


def read_tree(zk: str, path: str, *, timeout: float = 5.0) -> dict[str, bytes]:
    """Synchronously read the data of every child of `path` (for short-lived callers
    such as a CLI bootstrapping a client). Returns {} when the path does not exist."""
    hosts, root = split_connect_string(zk)
    client = KazooClient(hosts=hosts, timeout=timeout)
    try:
        client.start(timeout)
    except Exception as exc:
        raise CoordUnavailable(f"cannot reach ZooKeeper at {hosts}: {exc}") from exc
    try:
        full = f"{root}/{path.strip('/')}"
        try:
            names = client.get_children(full)
        except NoNodeError:
            return {}
        out: dict[str, bytes] = {}
        for name in names:
            try:
                out[name] = client.get(f"{full}/{name}")[0]
            except NoNodeError:
                continue
        return out
    finally:
        client.stop()
        client.close()


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
