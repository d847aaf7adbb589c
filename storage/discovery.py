"""The client's partition map: fetched at start-up, refreshed when a node shows a newer one.

Role: `MapCache` holds the client's `RoutingTable` and keeps it current. It bootstraps the
first map from any node that answers (reading live node addresses from ZooKeeper when no
endpoints are given), refreshes it in the background when a reply's header carries a newer
map version, and lets callers join that refresh for at most their own deadline.
`storage.client.AsyncClient` owns one and asks it where to send; the routing decisions
themselves are `storage.routing`'s.

Not pure: it owns the refresh task and sends GetMap RPCs over the client's channels (the
client hands it `stub(address)`; the channels stay the client's).

Invariants:
- At most one refresh is in flight; a header triggers one refresh per newer map version.
- A map older than the cached one is never installed (a lagging node's answer).
- GetMap rotates through the known nodes, live ones first, and starts next time at the
  node that answered; every GetMap has a timeout within the caller's deadline.
- After `close()` no caller waits for a refresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from storage.errors import StorageError, Unavailable
from storage.routing import Backoff, RoutingTable
from storage.v1 import kv_pb2
from storage.wire_errors import call_cancelled

if TYPE_CHECKING:
    from storage.v1.kv_pb2_grpc import KVAsyncStub

__all__ = ["GETMAP_TRY_TIMEOUT", "MapCache"]

log = logging.getLogger(__name__)

GETMAP_TRY_TIMEOUT = 0.5  # per-node GetMap timeout while rotating through several nodes
REFRESH_BUDGET = 5.0  # a background refresh may outlive the call that started it


class MapCache:
    """The cached partition map as a `RoutingTable` (`routes`, None until `bootstrap`)."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        zk: str | None,
        cluster: str,
        timeout: float,
        stub: Callable[[str], KVAsyncStub],
    ) -> None:
        self.endpoints = endpoints
        self.zk = zk
        self.cluster = cluster
        self._timeout = timeout
        self._stub = stub
        self._zk_nodes: list[str] = []  # live node addresses last read from ZooKeeper
        self.routes: RoutingTable[kv_pb2.PartitionMap] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_target = 0
        self._rotation = 0
        self._closed = False

    async def bootstrap(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fetch the first map from any node that answers, within `timeout`."""
        self._loop = loop
        deadline = loop.time() + self._timeout
        backoff = Backoff()
        while True:
            try:
                if self.zk and not self.endpoints and not self._zk_nodes:
                    self._zk_nodes = await self._zk_addresses(deadline)
                self._install(await self._fetch_map(deadline))
                return
            except Unavailable as err:
                delay = backoff.delay_within(deadline - loop.time())
                if delay is None:
                    raise
                log.debug("bootstrap retry in %.3fs: %s", delay, err)
                await asyncio.sleep(delay)
                self._zk_nodes = []  # re-read ZooKeeper: the nodes may have moved

    def close(self) -> list[asyncio.Task[None]]:
        """Stop refreshing: cancel the refresh in flight and return it for the owner to await."""
        self._closed = True
        task = self._refresh_task
        if task is None:
            return []
        task.cancel()
        return [task]

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _install(self, pmap: kv_pb2.PartitionMap) -> None:
        current = self.routes
        if current is not None and pmap.version < current.version:
            return  # a lagging node's older map
        self.routes = RoutingTable(pmap, previous=current)
        if current is None or pmap.version != current.version:
            log.info("partition map version=%s partitions=%s nodes=%s",
                     pmap.version, pmap.partitions, len(pmap.nodes))

    def saw_header(self, header: kv_pb2.ResponseHeader, address: str) -> None:
        """A node has a newer map than ours: refresh in the background, once per version."""
        version = header.map_version
        routes = self.routes
        if routes is not None and version > routes.version and version > self._refresh_target:
            self._refresh_target = version
            self.refresh(prefer=address)

    def refresh(self, prefer: str | None = None) -> asyncio.Task[None]:
        """The one refresh in flight, started now (asking `prefer` first) if there is none."""
        task = self._refresh_task
        if task is None or task.done():
            assert self._loop is not None
            task = self._loop.create_task(self._refresh(prefer))
            task.add_done_callback(_log_refresh_failure)
            self._refresh_task = task
        return task

    async def _refresh(self, prefer: str | None) -> None:
        # Not bounded by one call's deadline: a frozen node first in line must not make
        # every refresh fail (each call would then start the same doomed refresh again).
        deadline = self._now() + max(self._timeout, REFRESH_BUDGET)
        try:
            pmap = await self._fetch_map(deadline, prefer)
        except Unavailable:
            if not self.zk:
                raise
            # Every known node failed: ask ZooKeeper who is alive now.
            self._zk_nodes = await self._zk_addresses(deadline)
            pmap = await self._fetch_map(deadline)
        self._install(pmap)

    async def await_refresh(self, deadline: float) -> None:
        """Join (or start) the one map refresh in progress, for at most until `deadline`."""
        remaining = deadline - self._now()
        if remaining <= 0 or self._closed:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.refresh()), remaining)
        except (StorageError, TimeoutError):
            pass  # the caller's retry loop decides what the failure means
        except asyncio.CancelledError:
            if not call_cancelled():
                raise  # our caller is being cancelled
            # else the refresh itself was cancelled by close(): the retry loop sees it

    async def ready_routes(self, deadline: float) -> RoutingTable[kv_pb2.PartitionMap]:
        """The routing table, waiting within `deadline` while the map has no partitions yet
        (a node answering before the controller wrote the first map). After `bootstrap`."""
        backoff = Backoff()
        while True:
            routes = self.routes
            assert routes is not None
            if routes.partitions:
                return routes
            await self.await_refresh(deadline)
            if self.routes is not routes:
                continue
            delay = backoff.delay_within(deadline - self._now())
            if delay is None:
                raise Unavailable("the partition map is empty: the cluster has no partitions yet")
            await asyncio.sleep(delay)

    async def _fetch_map(
        self, deadline: float, prefer: str | None = None
    ) -> kv_pb2.PartitionMap:
        """GetMap from the first node that answers, rotating through the known ones."""
        seeds = [*self.endpoints, *self._zk_nodes]
        candidates = self.routes.candidates(seeds) if self.routes is not None else list(seeds)
        if prefer is not None:
            candidates = [prefer, *(c for c in candidates if c != prefer)]
        if not candidates:
            raise Unavailable("no storage node address is known")
        start = 0 if prefer is not None else self._rotation % len(candidates)
        last = ""
        for n in range(len(candidates)):
            address = candidates[(start + n) % len(candidates)]
            remaining = deadline - self._now()
            if remaining <= 0:
                break
            per_try = remaining if len(candidates) == 1 else min(remaining, GETMAP_TRY_TIMEOUT)
            try:
                pmap = await self._stub(address).GetMap(kv_pb2.GetMapRequest(), timeout=per_try)
            except grpc.aio.AioRpcError as exc:
                last = exc.details() or exc.code().name
                log.debug("GetMap failed at=%s: %s", address, last)
                self._rotation = start + n + 1  # a node that failed is not asked first again
                continue
            except asyncio.CancelledError:
                if not call_cancelled():
                    raise
                raise Unavailable("the client was closed") from None
            self._rotation = start + n  # start at a node that answers next time
            return pmap
        raise Unavailable(
            f"no storage node answered (tried {', '.join(candidates)}); "
            f"last error: {last or 'deadline passed'}"
        )

    async def _zk_addresses(self, deadline: float) -> list[str]:
        assert self.zk is not None
        try:
            from storage.directory import node_addresses
        except ImportError as exc:
            raise Unavailable(
                f"ZooKeeper discovery is not available ({exc}); give endpoints"
            ) from exc
        remaining = max(0.1, deadline - self._now())
        try:
            addresses = await asyncio.wait_for(
                asyncio.to_thread(node_addresses, self.zk, self.cluster, remaining),
                remaining + 1.0,
            )
        except Exception as exc:
            raise Unavailable(f"cannot read live nodes from ZooKeeper {self.zk}: {exc}") from exc
        if not addresses:
            raise Unavailable(
                f"no live storage nodes in ZooKeeper {self.zk} for cluster {self.cluster!r}"
            )
        return addresses


def _log_refresh_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("partition map refresh failed: %s", exc)
