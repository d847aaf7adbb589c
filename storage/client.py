"""The public Ringstore client (DESIGN §10): `AsyncClient` on grpc.aio and a blocking `Client`.

Role: route every key to its partition's leader using a cached partition map, follow
NOT_LEADER hints, retry UNAVAILABLE with exponential backoff inside the caller's deadline,
and coalesce concurrent calls to one leader into `Batch` RPCs.

This is the shell: it owns the channels and the protobuf messages, and the retry loops.
Beside it, each with one role: `storage.discovery` (the cached partition map: bootstrap and
refresh), `storage.batcher` (coalesced calls' futures, timers and Batch RPCs) and
`storage.sync_client` (the blocking `Client`, re-exported here). The decisions are pure:
`storage.routing` (where a call goes, backoff, which error it reports), `storage.coalescing`
(which calls leave together); `storage.wire_errors` reads failed statuses into `storage.errors`.

Invariants:
- Every call has a deadline; every RPC is sent with `timeout=` what is left of it.
- A logical write gets one `RequestId` when it is built and keeps it across its retries,
  so a retry after UNAVAILABLE is applied at most once by the server.
- A definite error (NOT_LEADER, CAS mismatch, INVALID_ARGUMENT) is raised as definite only
  if no earlier attempt of the same call had an unknown outcome.
- Coalescing: per leader address at most `max_in_flight` Batch RPCs are in flight; calls
  behind them queue and leave together (<= MAX_BATCH_ITEMS ops and the byte budget).
- `close()` releases the channels and fails the calls still queued.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from storage import limits
from storage.batcher import Batcher, Expiry, Pending
from storage.coalescing import (
    BATCH_BYTES_BUDGET,
    OP_OVERHEAD_BYTES,
    Lane,
    chunk_by_limits,
    take_batch,
)
from storage.discovery import MapCache
from storage.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotLeader,
    StaleEpoch,
    StorageError,
    Unavailable,
    Version,
)
from storage.routing import Backoff, RoutingTable, final_error
from storage.sync_client import Client
from storage.v1 import kv_pb2, kv_pb2_grpc
from storage.wire_errors import (
    ERROR_METADATA_KEY,
    call_cancelled,
    error_from_status,
    item_error,
    rpc_error,
)

if TYPE_CHECKING:
    from storage.v1.kv_pb2_grpc import KVAsyncStub

# The parts beside it are re-exported: `storage.client` stays the one import for client users.
__all__ = [
    "BATCH_BYTES_BUDGET",
    "CHANNEL_OPTIONS",
    "ERROR_METADATA_KEY",
    "OP_OVERHEAD_BYTES",
    "AsyncClient",
    "Backoff",
    "Client",
    "Expiry",
    "Item",
    "Lane",
    "Pending",
    "RoutingTable",
    "Version",
    "chunk_by_limits",
    "error_from_status",
    "item_error",
    "rpc_error",
    "take_batch",
]

log = logging.getLogger(__name__)

FAST_REDIRECTS = 2  # NOT_LEADER hints followed at once; after that, with backoff

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # A restarted node should be reachable within a second, not after gRPC's 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]

_CONSISTENCY: dict[str, kv_pb2.Consistency.ValueType] = {
    "linearizable": kv_pb2.LINEARIZABLE,
    "lease": kv_pb2.LEASE,
    "follower": kv_pb2.FOLLOWER,
}

KeyLike = bytes | str


@dataclass(frozen=True, slots=True)
class Item:
    """A stored value and the version `(epoch, index)` of the write that produced it."""

    key: bytes
    value: bytes
    version: Version


# ---------------------------------------------------------------------------------------
# Input conversion and validation (fail fast; the server validates again).


def _to_bytes(value: KeyLike, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgument(f"{what} must be bytes or str, not {type(value).__name__}")


def _key(key: KeyLike) -> bytes:
    k = _to_bytes(key, "key")
    limits.check_key(k)
    return k


def _value(value: KeyLike) -> bytes:
    v = _to_bytes(value, "value")
    limits.check_value(v)
    return v


def _ttl_ms(ttl: float | None) -> int:
    if ttl is None:
        return 0
    if ttl <= 0:
        raise InvalidArgument(f"ttl must be positive seconds, got {ttl}; omit it for no expiry")
    ms = max(1, round(ttl * 1000))
    limits.check_ttl(ms)
    return ms


def _consistency(name: str) -> kv_pb2.Consistency.ValueType:
    try:
        return _CONSISTENCY[name.lower()]
    except (KeyError, AttributeError):
        raise InvalidArgument(
            f"unknown consistency {name!r}: use linearizable, lease or follower"
        ) from None


def _version(v: kv_pb2.Version) -> Version:
    return Version(v.epoch, v.index)


def _split_endpoints(endpoints: Sequence[str] | str | None) -> list[str]:
    if endpoints is None:
        return []
    parts = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    return [p.strip() for p in parts if p.strip()]


# ---------------------------------------------------------------------------------------
# The asyncio client.


class AsyncClient:
    """Ringstore client on grpc.aio. Bound to the event loop it is first used on."""

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
        self._closed = False
        self._channels: dict[str, grpc.aio.Channel] = {}
        seeds = _split_endpoints(endpoints)
        if not seeds and not zk:
            raise ValueError("give endpoints (HOST:PORT[,...]) or zk (HOST:PORT[,...][/chroot])")
        if timeout <= 0 or max_in_flight < 1:
            raise ValueError("timeout must be positive and max_in_flight at least 1")
        self._coalesce = coalesce
        self._timeout = timeout
        # One attempt gets at most this long before the call re-reads the map and tries
        # again (same request id): a frozen leader must not eat the whole deadline.
        self._attempt_timeout = attempt_timeout
        self._client_id = client_id if client_id is not None else os.urandom(16)
        limits.check_client_id(self._client_id)
        # Time-based start: a reused client_id never replays an old (client, seq) pair.
        self._seq = itertools.count(time.time_ns() // 1000)
        self._stubs: dict[str, KVAsyncStub] = {}
        stub = _weak_stub(self)
        self._map = MapCache(seeds, zk=zk, cluster=cluster, timeout=timeout, stub=stub)
        self._batcher = Batcher(
            stub=stub, saw_header=self._map.saw_header, max_in_flight=max_in_flight
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock = asyncio.Lock()

    def __repr__(self) -> str:
        where = ",".join(self._map.endpoints) or f"zk={self._map.zk}"
        return f"<AsyncClient {where} cluster={self._map.cluster} closed={self._closed}>"

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_channels", None):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)

    async def __aenter__(self) -> AsyncClient:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bootstrap the partition map from any node that answers, within `timeout`."""
        if self._map.routes is not None:
            return
        async with self._start_lock:
            if self._map.routes is not None:
                return
            self._check_open()
            loop = self._loop = asyncio.get_running_loop()
            self._batcher.bind(loop)
            await self._map.bootstrap(loop)

    async def close(self) -> None:
        """Release channels and fail queued calls. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._batcher.close(), *self._map.close()]
        await asyncio.gather(*tasks, return_exceptions=True)
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)

    @property
    def partition_map(self) -> kv_pb2.PartitionMap:
        """The cached partition map (call `start()` or any operation first)."""
        if self._map.routes is None:
            raise RuntimeError("the client has no partition map yet: call start() first")
        return self._map.routes.map

    async def get_map(self, *, timeout: float | None = None) -> kv_pb2.PartitionMap:
        """Fetch the partition map afresh from a node and return the newest one known."""
        await self.start()
        deadline = self._deadline(timeout)
        task = self._map.refresh()
        try:
            await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - self._now()))
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while fetching the partition map") from None
        except asyncio.CancelledError:
            if not call_cancelled():
                raise
            raise Unavailable("the client was closed") from None
        return self.partition_map

    # -- public operations --------------------------------------------------------------

    async def put(
        self, key: KeyLike, value: KeyLike, *, ttl: float | None = None,
        timeout: float | None = None,
    ) -> Version:
        """Store `value` under `key`; return the version of the write."""
        k = _key(key)
        v = _value(value)
        op = kv_pb2.Op()
        req = op.put
        req.key = k
        req.value = v
        if ttl is not None:
            req.ttl_ms = _ttl_ms(ttl)
        rid = req.request_id
        rid.client_id = self._client_id
        rid.seq = next(self._seq)
        reply = await self._execute(op, "put", k, len(k) + len(v), timeout, False)
        return Version(reply.version.epoch, reply.version.index)

    async def get(
        self, key: KeyLike, *, consistency: str = "linearizable", timeout: float | None = None
    ) -> Item | None:
        """The key's value and version, or None if absent."""
        k = _key(key)
        level = _consistency(consistency)
        op = kv_pb2.Op()
        op.get.key = k
        op.get.consistency = level
        reply = await self._execute(op, "get", k, len(k), timeout, level == kv_pb2.FOLLOWER)
        if not reply.found:
            return None
        return Item(k, reply.value, Version(reply.version.epoch, reply.version.index))

    async def delete(self, key: KeyLike, *, timeout: float | None = None) -> bool:
        """Delete the key; return whether it existed."""
        k = _key(key)
        op = kv_pb2.Op()
        op.delete.key = k
        rid = op.delete.request_id
        rid.client_id = self._client_id
        rid.seq = next(self._seq)
        reply = await self._execute(op, "delete", k, len(k), timeout, False)
        return bool(reply.existed)

    async def cas(
        self, key: KeyLike, value: KeyLike | None, *, expected: Version | None,
        delete: bool = False, ttl: float | None = None, timeout: float | None = None,
    ) -> Version:
        """Write `value` (or delete) only if the key is at `expected` (None: absent).

        Raises CasMismatch (with `.current`, None if absent) when it is not.
        """
        k = _key(key)
        op = kv_pb2.Op()
        req = op.cas
        req.key = k
        size = len(k)
        if delete:
            if value:
                raise InvalidArgument("a compare-and-set delete takes no value")
            req.delete = True
        else:
            if value is None:
                raise InvalidArgument("compare-and-set needs a value (or delete=True)")
            req.value = v = _value(value)
            size += len(v)
        if expected is None:
            req.expect_absent = True
        else:
            if expected.epoch < 1 or expected.index < 1:
                raise InvalidArgument(
                    f"malformed expected version {expected}: versions start at 1.1; "
                    "use expected=None for an absent key"
                )
            req.expected_version.epoch = expected.epoch
            req.expected_version.index = expected.index
        if ttl is not None:
            req.ttl_ms = _ttl_ms(ttl)
        rid = req.request_id
        rid.client_id = self._client_id
        rid.seq = next(self._seq)
        reply = await self._execute(op, "cas", k, size, timeout, False)
        return Version(reply.version.epoch, reply.version.index)

    async def batch_put(
        self, items: Sequence[tuple[KeyLike, KeyLike]], *, ttl: float | None = None,
        timeout: float | None = None,
    ) -> list[Version | StorageError]:
        """Put many items, grouped by leader into Batch RPCs; answered per item, in order."""
        ttl_ms = _ttl_ms(ttl)
        ops: list[kv_pb2.Op] = []
        keys: list[bytes] = []
        sizes: list[int] = []
        for key, value in items:
            k, v = _key(key), _value(value)
            op = kv_pb2.Op()
            req = op.put
            req.key, req.value, req.ttl_ms = k, v, ttl_ms
            req.request_id.client_id = self._client_id
            req.request_id.seq = next(self._seq)
            ops.append(op)
            keys.append(k)
            sizes.append(len(k) + len(v) + OP_OVERHEAD_BYTES)
        replies = await self._run_batch(ops, "put", keys, sizes, timeout, False)
        return [r if isinstance(r, StorageError) else _version(r.version) for r in replies]

    async def batch_get(
        self, keys: Sequence[KeyLike], *, consistency: str = "linearizable",
        timeout: float | None = None,
    ) -> list[Item | StorageError | None]:
        """Get many keys, grouped by leader into Batch RPCs; answered per key, in order."""
        level = _consistency(consistency)
        ops: list[kv_pb2.Op] = []
        raw: list[bytes] = []
        for key in keys:
            k = _key(key)
            op = kv_pb2.Op()
            op.get.key = k
            op.get.consistency = level
            ops.append(op)
            raw.append(k)
        sizes = [len(k) + OP_OVERHEAD_BYTES for k in raw]
        replies = await self._run_batch(ops, "get", raw, sizes, timeout, level == kv_pb2.FOLLOWER)
        out: list[Item | StorageError | None] = []
        for k, r in zip(raw, replies, strict=True):
            if isinstance(r, StorageError):
                out.append(r)
            else:
                out.append(Item(k, r.value, _version(r.version)) if r.found else None)
        return out

    async def scan(
        self, *, partition: int | None = None, start: KeyLike = b"", end: KeyLike | None = None,
        limit: int = 0, consistency: str = "linearizable", page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[Item]:
        """Items of one partition, or of every partition in turn (key order within each).

        `start` is inclusive, `end` exclusive; `limit` 0 means no limit. `timeout` bounds
        each stream between pages, so a long scan proceeds as long as pages keep coming.
        """
        lo = _to_bytes(start, "start") if start else b""
        hi = _to_bytes(end, "end") if end else b""
        for bound in (lo, hi):
            if bound:
                limits.check_key(bound)
        if hi and hi <= lo:
            raise InvalidArgument("scan end must be after start")
        if limit < 0 or not 0 <= page_size <= limits.MAX_SCAN_PAGE:
            raise InvalidArgument(
                f"limit must be >= 0 and page_size within 0..{limits.MAX_SCAN_PAGE}"
            )
        level = _consistency(consistency)
        await self.start()
        routes = await self._map.ready_routes(self._deadline(timeout))
        if partition is not None and not 0 <= partition < routes.partitions:
            raise InvalidArgument(
                f"partition {partition} does not exist: the ring has {routes.partitions}"
            )
        wanted = [partition] if partition is not None else range(routes.partitions)
        seen = 0
        for p in wanted:
            left = limit - seen if limit else 0
            async for item in self._scan_partition(p, lo, hi, left, level, page_size, timeout):
                yield item
                seen += 1
                if limit and seen >= limit:
                    return

    # -- routing, retries ---------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _deadline(self, timeout: float | None) -> float:
        t = self._timeout if timeout is None else timeout
        if t <= 0:
            raise InvalidArgument(f"timeout must be positive seconds, got {t}")
        return self._now() + t

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the client is closed")

    async def _execute(
        self, op: kv_pb2.Op, kind: str, key: bytes, size: int, timeout: float | None,
        follower: bool,
    ) -> Any:
        """Send one operation to its leader until it succeeds, fails definitely or the
        deadline passes. Returns the typed reply (PutResponse, GetResponse, ...)."""
        if self._map.routes is None:
            await self.start()
        deadline = self._deadline(timeout)
        routes = self._map.routes
        assert routes is not None
        if not routes.partitions:
            routes = await self._map.ready_routes(deadline)
        partition = routes.partition(key)  # Q is fixed when the cluster is created
        backoff: Backoff | None = None
        redirects = 0
        uncertain = False
        last: StorageError
        while True:
            self._check_open()
            routes = self._map.routes
            assert routes is not None
            address = routes.route(partition, follower)
            refresh = True
            if address is None:
                last = Unavailable(
                    f"partition {partition} has no known leader", partition=partition
                )
            else:
                attempt = min(deadline, self._now() + self._attempt_timeout)
                try:
                    if self._coalesce:
                        return await self._batcher.send(address, op, kind, size, attempt)
                    return await self._send_unary(address, op, kind, attempt)
                except DeadlineExceeded as err:
                    # The leader did not answer: whatever happens to this call, the next
                    # one should route with a fresh map.
                    self._map.refresh()
                    if self._now() >= deadline - 0.001:
                        raise final_error(err, uncertain) from None
                    # Only this attempt ran out: its leader may be frozen or gone.
                    last = Unavailable(f"no answer from {address} within "
                                       f"{self._attempt_timeout}s; the write may or may not "
                                       "have been applied", partition=partition)
                    uncertain = True
                    log.debug("attempt timed out partition=%s at=%s", partition, address)
                except NotLeader as err:
                    last = err
                    hinted = routes.apply_hint(partition, err)
                    log.debug("not leader partition=%s at=%s hint=%s", partition, address, hinted)
                    if hinted is not None and hinted != address:
                        refresh = False
                        redirects += 1
                        if redirects <= FAST_REDIRECTS:
                            continue
                except (Unavailable, StaleEpoch) as err:
                    last = err
                    uncertain = uncertain or not err.definite
                    log.debug("retrying partition=%s at=%s: %s", partition, address, err)
                except StorageError as err:  # definite, or DEADLINE_EXCEEDED: no retry
                    raise final_error(err, uncertain) from None
            if backoff is None:
                backoff = Backoff()
            if refresh:
                await self._map.await_refresh(deadline)
            delay = backoff.delay_within(deadline - self._now())
            if delay is None:
                raise final_error(last, uncertain)
            await asyncio.sleep(delay)

    async def _send_unary(
        self, address: str, op: kv_pb2.Op, kind: str, deadline: float
    ) -> Any:
        timeout = deadline - self._now()
        if timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the request was sent")
        stub = self._stub(address)
        try:
            if kind == "put":
                reply: Any = await stub.Put(op.put, timeout=timeout)
            elif kind == "get":
                reply = await stub.Get(op.get, timeout=timeout)
            elif kind == "delete":
                reply = await stub.Delete(op.delete, timeout=timeout)
            else:
                reply = await stub.CompareAndSet(op.cas, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, address) from None
        except asyncio.CancelledError:
            if not call_cancelled():
                raise
            raise Unavailable("the client was closed") from None
        self._map.saw_header(reply.header, address)
        return reply

    async def _run_batch(
        self, ops: list[kv_pb2.Op], kind: str, keys: list[bytes], sizes: list[int],
        timeout: float | None, follower: bool,
    ) -> list[Any]:
        """Send ops grouped by leader (Batch RPCs in parallel), retrying retriable items."""
        if not ops:
            return []
        if self._map.routes is None:
            await self.start()
        deadline = self._deadline(timeout)
        routes = await self._map.ready_routes(deadline)
        partitions = [routes.partition(k) for k in keys]
        results: list[Any] = [None] * len(ops)
        uncertain = [False] * len(ops)
        todo = list(range(len(ops)))
        backoff = Backoff()
        fast = True
        while True:
            self._check_open()
            routes = self._map.routes or routes
            groups: dict[str, list[int]] = {}
            retry: list[int] = []
            for i in todo:
                address = routes.route(partitions[i], follower)
                if address is None:
                    results[i] = Unavailable(
                        f"partition {partitions[i]} has no known leader", partition=partitions[i]
                    )
                    retry.append(i)
                else:
                    groups.setdefault(address, []).append(i)
            sends = [
                (address, chunk)
                for address, members in groups.items()
                for chunk in chunk_by_limits(members, sizes)
            ]
            outcomes = await asyncio.gather(
                *(self._batch_outcome(a, [ops[i] for i in c], deadline) for a, c in sends)
            )
            redirected = False
            for (address, chunk), outcome in zip(sends, outcomes, strict=True):
                for n, i in enumerate(chunk):
                    if isinstance(outcome, StorageError):
                        err: StorageError | None = copy.copy(outcome)
                    elif outcome[n].status.code:
                        err = item_error(outcome[n].status)
                    else:
                        err = None
                        results[i] = getattr(outcome[n], kind)
                    if err is None:
                        continue
                    uncertain[i] = uncertain[i] or not err.definite
                    results[i] = final_error(err, uncertain[i])
                    if isinstance(err, NotLeader):
                        hinted = routes.apply_hint(partitions[i], err)
                        redirected = redirected or (hinted is not None and hinted != address)
                        retry.append(i)
                    elif isinstance(err, (Unavailable, StaleEpoch)):
                        retry.append(i)
            todo = retry
            if not todo:
                return results
            if fast and redirected:
                fast = False
                continue
            await self._map.await_refresh(deadline)
            delay = backoff.delay_within(deadline - self._now())
            if delay is None:
                return results
            await asyncio.sleep(delay)

    async def _batch_outcome(
        self, address: str, ops: Sequence[kv_pb2.Op], deadline: float
    ) -> Sequence[kv_pb2.OpResult] | StorageError:
        try:
            return await self._batcher.batch_rpc(address, ops, deadline)
        except StorageError as err:
            return err

    async def _scan_partition(
        self, partition: int, start: bytes, end: bytes, limit: int,
        level: kv_pb2.Consistency.ValueType, page_size: int, timeout: float | None,
    ) -> AsyncIterator[Item]:
        resume = start
        seen = 0
        redirects = 0
        backoff = Backoff()
        deadline = self._deadline(timeout)
        follower = level == kv_pb2.FOLLOWER
        while True:
            self._check_open()
            routes = self._map.routes
            assert routes is not None
            address = routes.route(partition, follower)
            err: StorageError
            if address is None:
                err = Unavailable(f"partition {partition} has no known leader", partition=partition)
            else:
                request = kv_pb2.ScanRequest(
                    partition=partition, start_key=resume, end_key=end,
                    limit=limit - seen if limit else 0, page_size=page_size, consistency=level,
                )
                call = self._stub(address).Scan(
                    request, timeout=max(0.001, deadline - self._now())
                )
                progressed = False
                try:
                    async for page in call:
                        self._map.saw_header(page.header, address)
                        for kv in page.items:
                            yield Item(kv.key, kv.value, _version(kv.version))
                            seen += 1
                        if not page.next_key:
                            return
                        resume = page.next_key
                        progressed = True
                        deadline = self._deadline(timeout)
                        backoff = Backoff()
                    return
                except grpc.aio.AioRpcError as exc:
                    err = rpc_error(exc, address)
                except asyncio.CancelledError:
                    if not call_cancelled():
                        raise
                    raise Unavailable("the client was closed") from None
                finally:
                    call.cancel()
                if isinstance(err, DeadlineExceeded) and progressed:
                    continue  # the stream outlived its deadline while making progress: resume
                if isinstance(err, NotLeader):
                    hinted = routes.apply_hint(partition, err)
                    redirects += 1
                    if hinted is not None and hinted != address and redirects <= FAST_REDIRECTS:
                        continue
                elif not isinstance(err, (Unavailable, StaleEpoch)):
                    raise err
            await self._map.await_refresh(deadline)
            delay = backoff.delay_within(deadline - self._now())
            if delay is None:
                raise err
            await asyncio.sleep(delay)

    # -- channels -----------------------------------------------------------------------

    def _stub(self, address: str) -> KVAsyncStub:
        stub = self._stubs.get(address)
        if stub is None:
            self._check_open()
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = kv_pb2_grpc.KVStub(channel)
        return stub


def _weak_stub(client: AsyncClient) -> Callable[[str], KVAsyncStub]:
    """`client._stub` for the parts the client owns, without a reference back to it: a
    cycle would delay a leaked client's ResourceWarning until the next garbage collection."""
    method = weakref.WeakMethod(client._stub)

    def stub(address: str) -> KVAsyncStub:
        bound = method()
        if bound is None:
            raise Unavailable("the client was closed")
        return bound(address)

    return stub
