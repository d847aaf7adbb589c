"""The blocking Ringstore client (DESIGN §10): an `AsyncClient` on a loop in a daemon thread.

Role: give scripts, the CLI and the tests blocking calls with the AsyncClient's semantics.
`storage.client` re-exports `Client`: `from storage.client import Client` is the one import.

Invariants:
- Every blocking wait is bounded: the coroutine by its own deadline, the wait for it by a
  backstop; a call from the client's own loop thread is refused rather than deadlocking.
- `close()` closes the AsyncClient on its loop, stops the loop and joins the thread;
  an unclosed Client is reported (ResourceWarning) and released without blocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from storage.errors import DeadlineExceeded, StorageError, Unavailable, Version

if TYPE_CHECKING:
    from storage.client import Item, KeyLike
    from storage.v1 import kv_pb2

__all__ = ["SCAN_CHUNK", "Client"]

SCAN_CHUNK = 256  # items handed across threads at a time by Client.scan

T = TypeVar("T")


class Client:
    """Blocking Ringstore client: an AsyncClient on an event loop in a daemon thread.

    Methods block with the AsyncClient's semantics; `close()` stops the loop and thread.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str | None = None,
        *,
        zk: str | None = None,
        cluster: str = "default",
        coalesce: bool = True,
        timeout: float = 5.0,
        client_id: bytes | None = None,
        max_in_flight: int = 1,
        attempt_timeout: float = 1.0,
    ) -> None:
        # Deferred: storage.client imports this module to re-export Client.
        from storage.client import AsyncClient

        self._closed = True  # until the thread runs; __del__ reads it
        self._async = AsyncClient(
            endpoints, zk=zk, cluster=cluster, coalesce=coalesce, timeout=timeout,
            client_id=client_id, max_in_flight=max_in_flight, attempt_timeout=attempt_timeout,
        )
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ringstore-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Client {self._async!r}>"

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)
        self._closed = True
        loop = self._loop
        try:  # release the channels on the loop, then stop it; never block in __del__
            closing = asyncio.run_coroutine_threadsafe(self._async.close(), loop)
            closing.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
        except RuntimeError:
            pass  # the loop is already closed

    def __enter__(self) -> Client:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(
        self, coro: Coroutine[Any, Any, T], timeout: float | None = None, backstop: bool = True
    ) -> T:
        if self._closed:
            coro.close()
            raise Unavailable("the client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking Client must not be called from its own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        # The coroutine is bounded by its own deadline (plus a bootstrap); this is a backstop.
        wait = 2 * (self._timeout if timeout is None else timeout) + 5.0 if backstop else None
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"no answer within {wait:.1f}s") from None

    def start(self) -> None:
        self._run(self._async.start())

    def close(self) -> None:
        """Close the AsyncClient, stop the loop and join the thread. Idempotent."""
        if self._closed:
            return
        try:
            self._run(self._async.close(), 5.0)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
            if not self._thread.is_alive():
                self._loop.close()

    @property
    def partition_map(self) -> kv_pb2.PartitionMap:
        return self._async.partition_map

    def get_map(self, *, timeout: float | None = None) -> kv_pb2.PartitionMap:
        return self._run(self._async.get_map(timeout=timeout), timeout)

    def put(
        self, key: KeyLike, value: KeyLike, *, ttl: float | None = None,
        timeout: float | None = None,
    ) -> Version:
        return self._run(self._async.put(key, value, ttl=ttl, timeout=timeout), timeout)

    def get(
        self, key: KeyLike, *, consistency: str = "linearizable", timeout: float | None = None
    ) -> Item | None:
        return self._run(self._async.get(key, consistency=consistency, timeout=timeout), timeout)

    def delete(self, key: KeyLike, *, timeout: float | None = None) -> bool:
        return self._run(self._async.delete(key, timeout=timeout), timeout)

    def cas(
        self, key: KeyLike, value: KeyLike | None, *, expected: Version | None,
        delete: bool = False, ttl: float | None = None, timeout: float | None = None,
    ) -> Version:
        return self._run(
            self._async.cas(key, value, expected=expected, delete=delete, ttl=ttl,
                            timeout=timeout),
            timeout,
        )

    def batch_put(
        self, items: Sequence[tuple[KeyLike, KeyLike]], *, ttl: float | None = None,
        timeout: float | None = None,
    ) -> list[Version | StorageError]:
        return self._run(self._async.batch_put(items, ttl=ttl, timeout=timeout), timeout)

    def batch_get(
        self, keys: Sequence[KeyLike], *, consistency: str = "linearizable",
        timeout: float | None = None,
    ) -> list[Item | StorageError | None]:
        return self._run(
            self._async.batch_get(keys, consistency=consistency, timeout=timeout), timeout
        )

    def scan(
        self, *, partition: int | None = None, start: KeyLike = b"", end: KeyLike | None = None,
        limit: int = 0, consistency: str = "linearizable", page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[Item]:
        """An iterator over the scan; items cross from the loop thread in chunks."""
        stream = self._async.scan(
            partition=partition, start=start, end=end, limit=limit, consistency=consistency,
            page_size=page_size, timeout=timeout,
        )
        try:
            while True:
                # A chunk may span many partitions' streams, each bounded by `timeout`, so
                # only a single-partition chunk gets the backstop.
                chunk = self._run(_take(stream, SCAN_CHUNK), timeout, partition is not None)
                if not chunk:
                    return
                yield from chunk
        finally:
            if not self._closed and isinstance(stream, AsyncGenerator):
                self._run(stream.aclose(), 5.0)


async def _take(stream: AsyncIterator[Item], n: int) -> list[Item]:
    out: list[Item] = []
    async for item in stream:
        out.append(item)
        if len(out) >= n:
            break
    return out
