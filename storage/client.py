"""The public Ringstore client (DESIGN §10): `AsyncClient` on grpc.aio and a blocking `Client`.

Role: route every key to its partition's leader using a cached partition map, follow
NOT_LEADER hints, retry UNAVAILABLE with exponential backoff inside the caller's deadline,
and coalesce concurrent calls to one leader into `Batch` RPCs.

Invariants:
- Every call has a deadline; every RPC is sent with `timeout=` what is left of it.
- A logical write gets one `RequestId` when it is built and keeps it across its retries,
  so a retry after UNAVAILABLE is applied at most once by the server.
- A definite error (NOT_LEADER, CAS mismatch, INVALID_ARGUMENT) is raised as definite only
  if no earlier attempt of the same call had an unknown outcome.
- Coalescing: per leader address at most `max_in_flight` Batch RPCs are in flight; calls
  behind them queue and leave together (<= MAX_BATCH_ITEMS ops and the byte budget).
- The routing table, backoff schedule and batching queue below are pure (no I/O); the
  client classes own the channels, which `close()` releases.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import logging
import os
import random
import threading
import time
import warnings
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from storage import limits
from storage.errors import (
    CasMismatch,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotLeader,
    StaleEpoch,
    StorageError,
    Unavailable,
    Version,
)
from storage.partition import partition_of
from storage.v1 import kv_pb2, kv_pb2_grpc

if TYPE_CHECKING:
    from storage.v1.kv_pb2_grpc import KVAsyncStub

__all__ = [
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
    "rpc_error",
    "take_batch",
]

log = logging.getLogger(__name__)

ERROR_METADATA_KEY = "ringstore-error-bin"
OP_OVERHEAD_BYTES = 64  # request id, tags and framing of one Op, estimated generously
# What a coalesced batch may carry: the server's 2 MiB batch limit minus headroom for
# protobuf framing, so the message stays under the 2 MiB gRPC cap too.
BATCH_BYTES_BUDGET = limits.MAX_BATCH_BYTES - 64 * 1024
MAX_RPC_TIMEOUT = 300.0  # cap on one Batch RPC's deadline (each caller keeps its own)
GETMAP_TRY_TIMEOUT = 1.0  # per-node GetMap timeout while rotating through several nodes
FAST_REDIRECTS = 2  # NOT_LEADER hints followed at once; after that, with backoff
SCAN_CHUNK = 256  # items handed across threads at a time by Client.scan

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
_STATUS_BY_VALUE: dict[int, grpc.StatusCode] = {s.value[0]: s for s in grpc.StatusCode}

KeyLike = bytes | str
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Item:
    """A stored value and the version `(epoch, index)` of the write that produced it."""

    key: bytes
    value: bytes
    version: Version


# ---------------------------------------------------------------------------------------
# Pure parts: error mapping, routing, backoff, batching.


def error_from_status(
    code: grpc.StatusCode, detail: kv_pb2.ErrorDetail | None, message: str
) -> StorageError:
    """The `storage.errors` class for a status code and its optional `ErrorDetail`."""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message or "deadline exceeded; may or may not have applied")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return InvalidArgument(message or "message over the 2 MiB limit")
    kind = detail.kind if detail is not None else kv_pb2.ERROR_KIND_UNSPECIFIED
    text = detail.message if detail is not None and detail.message else message
    partition = detail.partition if detail is not None else None
    unspecified = kind == kv_pb2.ERROR_KIND_UNSPECIFIED
    if kind == kv_pb2.INVALID or (unspecified and code is grpc.StatusCode.INVALID_ARGUMENT):
        return InvalidArgument(text, partition=partition)
    if kind == kv_pb2.NOT_LEADER or (unspecified and code is grpc.StatusCode.ABORTED):
        if detail is None:
            return NotLeader(text)
        return NotLeader(
            text,
            partition=partition,
            leader_id=detail.leader_id,
            leader_address=detail.leader_address,
            epoch=detail.epoch,
        )
    if kind == kv_pb2.CAS_MISMATCH or (
        unspecified and code is grpc.StatusCode.FAILED_PRECONDITION
    ):
        current = None
        if detail is not None and detail.current_found:
            current = Version(detail.current_version.epoch, detail.current_version.index)
        return CasMismatch(text or "compare-and-set mismatch", partition=partition, current=current)
    if kind == kv_pb2.STALE_EPOCH:
        return StaleEpoch(text, partition=partition, epoch=detail.epoch if detail else 0)
    if kind == kv_pb2.UNAVAILABLE or code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    ):
        return Unavailable(text, partition=partition)
    if kind == kv_pb2.INTERNAL or code is grpc.StatusCode.INTERNAL:
        return Internal(text, partition=partition)
    return StorageError(f"{code.name}: {text}", partition=partition)


def _detail_from_metadata(metadata: Any) -> kv_pb2.ErrorDetail | None:
    for key, value in metadata or ():
        if key == ERROR_METADATA_KEY and isinstance(value, bytes):
            detail = kv_pb2.ErrorDetail()
            try:
                detail.ParseFromString(value)
            except Exception:  # a garbled detail must not hide the status itself
                return None
            return detail
    return None


def rpc_error(exc: grpc.aio.AioRpcError, address: str) -> StorageError:
    """Translate a failed RPC (status + trailing `ringstore-error-bin`) into a StorageError."""
    code = exc.code()
    detail = _detail_from_metadata(exc.trailing_metadata())
    message = exc.details() or code.name
    if detail is None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        message = f"{address}: {message}"
    return error_from_status(code, detail, message)


def item_error(status: kv_pb2.ItemStatus) -> StorageError:
    """Translate one batch item's failed `ItemStatus` into a StorageError."""
    code = _STATUS_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)
    detail = status.detail if status.HasField("detail") else None
    return error_from_status(code, detail, detail.message if detail is not None else code.name)


class RoutingTable:
    """The partition map as routing decisions: partition -> address to send to. No I/O.

    NOT_LEADER hints override the map's leader for a partition until a map arrives whose
    epoch for that partition is newer (or equal with a known leader).
    """

    __slots__ = ("_epochs", "_hints", "_replicas", "addresses", "leaders", "map", "partitions",
                 "version")

    def __init__(self, pmap: kv_pb2.PartitionMap, previous: RoutingTable | None = None) -> None:
        self.map = pmap
        self.version = pmap.version
        self.partitions = pmap.partitions
        self.addresses = {n.id: n.address for n in pmap.nodes if n.address}
        live = {n.id for n in pmap.nodes if n.live}
        q = self.partitions
        self.leaders: list[str | None] = [None] * q
        self._epochs = [0] * q
        self._replicas: list[list[str]] = [[] for _ in range(q)]
        self._hints: dict[int, tuple[int, str]] = {}
        for entry in pmap.entries:
            if entry.id >= q:
                continue
            self._epochs[entry.id] = entry.epoch
            self.leaders[entry.id] = self.addresses.get(entry.leader) if entry.leader else None
            self._replicas[entry.id] = [
                self.addresses[r] for r in entry.replicas if r in live and r in self.addresses
            ]
        if previous is not None:
            for p, (epoch, address) in previous._hints.items():
                if p < q and (
                    epoch > self._epochs[p] or (epoch == self._epochs[p] and not self.leaders[p])
                ):
                    self._hints[p] = (epoch, address)
                    self.leaders[p] = address

    def partition(self, key: bytes) -> int:
        if self.partitions == 0:
            raise Unavailable("the partition map is empty: the cluster has no partitions yet")
        return partition_of(key, self.partitions)

    def route(self, partition: int, follower: bool = False) -> str | None:
        """Where to send: the leader; a FOLLOWER read falls back to a live replica."""
        address = self.leaders[partition]
        if address is None and follower and self._replicas[partition]:
            return self._replicas[partition][0]
        return address

    def apply_hint(self, partition: int, err: NotLeader) -> str | None:
        """Follow a NOT_LEADER hint; return the new leader address, or None if unusable."""
        address = err.leader_address or self.addresses.get(err.leader_id, "")
        if not address or partition >= self.partitions:
            return None
        if err.epoch and err.epoch < self._epochs[partition]:
            return None  # the node knows less than our map does
        self._hints[partition] = (max(err.epoch, self._epochs[partition]), address)
        self.leaders[partition] = address
        return address

    def candidates(self, seeds: Sequence[str]) -> list[str]:
        """Addresses to ask for a map: live nodes first, then the others, then the seeds."""
        nodes = sorted(self.map.nodes, key=lambda n: not n.live)
        out = [n.address for n in nodes if n.address]
        return list(dict.fromkeys([*out, *seeds]))


class Backoff:
    """Exponential backoff with jitter, 10 ms doubling to 500 ms. Pure: the caller sleeps."""

    __slots__ = ("_cap", "_next", "_random")

    def __init__(
        self, first: float = 0.010, cap: float = 0.500, rand: Callable[[], float] = random.random
    ) -> None:
        self._next = first
        self._cap = cap
        self._random = rand

    def next_delay(self) -> float:
        base = self._next
        self._next = min(self._cap, base * 2)
        return base * (0.5 + 0.5 * self._random())

    def delay_within(self, remaining: float) -> float | None:
        """The next sleep, leaving at least half of `remaining` for the next attempt;
        None when too little time is left to make another attempt worthwhile."""
        if remaining <= 0.002:
            return None
        return min(self.next_delay(), remaining / 2)


class Pending:
    """One coalesced call waiting in (or sent by) a lane."""

    __slots__ = ("deadline", "future", "op", "size")

    def __init__(
        self, op: kv_pb2.Op, size: int, deadline: float, future: asyncio.Future[kv_pb2.OpResult]
    ) -> None:
        self.op = op
        self.size = size
        self.deadline = deadline
        self.future = future


def take_batch(
    queue: deque[Pending],
    max_items: int = limits.MAX_BATCH_ITEMS,
    max_bytes: int = BATCH_BYTES_BUDGET,
) -> list[Pending]:
    """Pop the next batch from the front of `queue`: at most `max_items` and `max_bytes`
    (one item always fits), skipping calls whose caller gave up."""
    batch: list[Pending] = []
    total = 0
    while queue and len(batch) < max_items:
        head = queue[0]
        if head.future.done():
            queue.popleft()
            continue
        if batch and total + head.size > max_bytes:
            break
        queue.popleft()
        batch.append(head)
        total += head.size
    return batch


def chunk_by_limits(
    indices: Sequence[int],
    sizes: Sequence[int],
    max_items: int = limits.MAX_BATCH_ITEMS,
    max_bytes: int = BATCH_BYTES_BUDGET,
) -> list[list[int]]:
    """Split item positions into consecutive chunks within the batch limits."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in indices:
        if current and (len(current) >= max_items or total + sizes[i] > max_bytes):
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += sizes[i]
    if current:
        chunks.append(current)
    return chunks


class Lane:
    """Per-address coalescing state: decides when a batch leaves. No I/O.

    Invariant: the queue is non-empty only while `in_flight == max_in_flight`.
    """

    __slots__ = ("in_flight", "max_in_flight", "queue")

    def __init__(self, max_in_flight: int = 1) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.queue: deque[Pending] = deque()

    def offer(self, pending: Pending) -> list[Pending] | None:
        """A new call: the batch to send at once (the caller owns the slot), or None (queued)."""
        if self.in_flight < self.max_in_flight:
            self.in_flight += 1
            return [pending]
        self.queue.append(pending)
        return None

    def complete(self) -> list[Pending]:
        """An RPC finished: the next batch to send in the freed slot (empty: slot released)."""
        self.in_flight -= 1
        batch = take_batch(self.queue)
        if batch:
            self.in_flight += 1
        return batch


def _final_error(err: StorageError, uncertain: bool) -> StorageError:
    """A definite error must not hide an earlier attempt whose outcome is unknown."""
    if err.definite and uncertain and not isinstance(err, (InvalidArgument, CasMismatch)):
        return Unavailable(
            f"{err.message} (an earlier attempt's outcome is unknown: it may have applied)",
            partition=err.partition,
        )
    return err


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


def _call_cancelled() -> bool:
    """A CancelledError came from the gRPC call (its channel was closed), not our task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _expire(future: asyncio.Future[kv_pb2.OpResult]) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("deadline exceeded while waiting for a batch"))


class Expiry:
    """Coarse deadline timers for queued calls: the calls whose deadlines fall in one slot
    share one timer, fired at the slot's end (never before a deadline, at most one slot
    after). One TimerHandle per call would cost more than the rest of the call's hot path."""

    __slots__ = ("_loop", "_slot", "_slots")

    def __init__(self, loop: asyncio.AbstractEventLoop, slot: float = 0.005) -> None:
        self._loop = loop
        self._slot = slot
        self._slots: dict[int, set[asyncio.Future[kv_pb2.OpResult]]] = {}

    def watch(
        self, deadline: float, future: asyncio.Future[kv_pb2.OpResult]
    ) -> set[asyncio.Future[kv_pb2.OpResult]]:
        """Expire `future` at its deadline; discard it from the returned set once answered."""
        slot = int(deadline / self._slot) + 1
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
            self._loop.call_at(slot * self._slot, self._fire, slot)
        members.add(future)
        return members

    def _fire(self, slot: int) -> None:
        for future in self._slots.pop(slot, ()):
            _expire(future)


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
    ) -> None:
        self._closed = False
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._endpoints = _split_endpoints(endpoints)
        self._zk_nodes: list[str] = []  # live node addresses last read from ZooKeeper
        if not self._endpoints and not zk:
            raise ValueError("give endpoints (HOST:PORT[,...]) or zk (HOST:PORT[,...][/chroot])")
        if timeout <= 0 or max_in_flight < 1:
            raise ValueError("timeout must be positive and max_in_flight at least 1")
        self._zk = zk
        self._cluster = cluster
        self._coalesce = coalesce
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._client_id = client_id if client_id is not None else os.urandom(16)
        limits.check_client_id(self._client_id)
        # Time-based start: a reused client_id never replays an old (client, seq) pair.
        self._seq = itertools.count(time.time_ns() // 1000)
        self._stubs: dict[str, KVAsyncStub] = {}
        self._lanes: dict[str, Lane] = {}
        self._routes: RoutingTable | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_target = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._rotation = 0
        self._expiry: Expiry | None = None

    def __repr__(self) -> str:
        where = ",".join(self._endpoints) or f"zk={self._zk}"
        return f"<AsyncClient {where} cluster={self._cluster} closed={self._closed}>"

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
        if self._routes is not None:
            return
        async with self._start_lock:
            if self._routes is not None:
                return
            self._check_open()
            loop = self._loop = asyncio.get_running_loop()
            deadline = loop.time() + self._timeout
            backoff = Backoff()
            while True:
                try:
                    if self._zk and not self._endpoints and not self._zk_nodes:
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

    async def close(self) -> None:
        """Release channels and fail queued calls. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes.values():
            while lane.queue:
                pending = lane.queue.popleft()
                if not pending.future.done():
                    pending.future.set_exception(Unavailable("the client was closed"))
        tasks = list(self._tasks)
        if self._refresh_task is not None:
            tasks.append(self._refresh_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)

    @property
    def partition_map(self) -> kv_pb2.PartitionMap:
        """The cached partition map (call `start()` or any operation first)."""
        if self._routes is None:
            raise RuntimeError("the client has no partition map yet: call start() first")
        return self._routes.map

    async def get_map(self, *, timeout: float | None = None) -> kv_pb2.PartitionMap:
        """Fetch the partition map afresh from a node and return the newest one known."""
        await self.start()
        deadline = self._deadline(timeout)
        task = self._start_refresh()
        try:
            await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - self._now()))
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while fetching the partition map") from None
        except asyncio.CancelledError:
            if not _call_cancelled():
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
        routes = await self._ready_routes(self._deadline(timeout))
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
        if self._routes is None:
            await self.start()
        deadline = self._deadline(timeout)
        routes = self._routes
        assert routes is not None
        if not routes.partitions:
            routes = await self._ready_routes(deadline)
        partition = routes.partition(key)  # Q is fixed when the cluster is created
        backoff: Backoff | None = None
        redirects = 0
        uncertain = False
        last: StorageError
        while True:
            self._check_open()
            routes = self._routes
            assert routes is not None
            address = routes.route(partition, follower)
            refresh = True
            if address is None:
                last = Unavailable(
                    f"partition {partition} has no known leader", partition=partition
                )
            else:
                try:
                    if self._coalesce:
                        return await self._send_coalesced(address, op, kind, size, deadline)
                    return await self._send_unary(address, op, kind, deadline)
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
                    raise _final_error(err, uncertain) from None
            if backoff is None:
                backoff = Backoff()
            if refresh:
                await self._await_refresh(deadline)
            delay = backoff.delay_within(deadline - self._now())
            if delay is None:
                raise _final_error(last, uncertain)
            await asyncio.sleep(delay)

    async def _ready_routes(self, deadline: float) -> RoutingTable:
        """The routing table, waiting within `deadline` while the map has no partitions yet
        (a node answering before the controller wrote the first map)."""
        if self._routes is None:
            await self.start()
        backoff = Backoff()
        while True:
            routes = self._routes
            assert routes is not None
            if routes.partitions:
                return routes
            await self._await_refresh(deadline)
            if self._routes is not routes:
                continue
            delay = backoff.delay_within(deadline - self._now())
            if delay is None:
                raise Unavailable("the partition map is empty: the cluster has no partitions yet")
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
            if not _call_cancelled():
                raise
            raise Unavailable("the client was closed") from None
        self._saw_header(reply.header, address)
        return reply

    async def _send_coalesced(
        self, address: str, op: kv_pb2.Op, kind: str, size: int, deadline: float
    ) -> Any:
        lane = self._lanes.get(address)
        if lane is None:
            lane = self._lanes[address] = Lane(self._max_in_flight)
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[kv_pb2.OpResult] = loop.create_future()
        pending = Pending(op, size + OP_OVERHEAD_BYTES, deadline, future)
        batch = lane.offer(pending)
        if batch is not None:
            await self._flush(address, lane, batch)  # our own RPC, sent inline: no task
            result = future.result()
        else:
            expiry = self._expiry
            if expiry is None:
                expiry = self._expiry = Expiry(loop)
            watched = expiry.watch(deadline, future)
            try:
                result = await future
            finally:
                watched.discard(future)
        if result.status.code:
            raise item_error(result.status)
        return getattr(result, kind)

    async def _flush(self, address: str, lane: Lane, batch: list[Pending]) -> None:
        """Send the caller's own batch inline, then hand the lane's queue to a drain task."""
        try:
            await self._send_lane_batch(address, batch)
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        finally:
            following = lane.complete()
            if following:
                self._spawn(self._drain(address, lane, following))

    async def _drain(self, address: str, lane: Lane, batch: list[Pending]) -> None:
        """Send queued batches back to back until the lane's queue is empty."""
        try:
            while batch:
                await self._send_lane_batch(address, batch)
                # One loop turn for the callers just answered to queue their next calls, so
                # they leave in the next batch instead of a batch of one after it.
                await asyncio.sleep(0)
                batch = lane.complete()
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(Unavailable("the client was closed"))
            raise

    async def _send_lane_batch(self, address: str, batch: list[Pending]) -> None:
        deadline = max(p.deadline for p in batch)
        if deadline <= self._now():
            for p in batch:
                _expire(p.future)
            return
        try:
            results = await self._batch_rpc(address, [p.op for p in batch], deadline)
        except StorageError as err:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(copy.copy(err))
            return
        except Exception as exc:  # a bug must not strand the callers of this batch
            log.exception("batch to %s failed", address)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(Internal(f"client error sending a batch: {exc!r}"))
            return
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)

    async def _batch_rpc(
        self, address: str, ops: Sequence[kv_pb2.Op], deadline: float
    ) -> Sequence[kv_pb2.OpResult]:
        """One Batch RPC; bisects when the reply would exceed the message cap."""
        timeout = min(deadline - self._now(), MAX_RPC_TIMEOUT)
        if timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the batch was sent")
        stub = self._stub(address)
        try:
            response = await stub.Batch(kv_pb2.BatchRequest(ops=ops), timeout=timeout)
        except grpc.aio.UsageError:
            raise Unavailable("the client was closed") from None
        except asyncio.CancelledError:
            if not _call_cancelled():
                raise
            raise Unavailable("the client was closed") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and len(ops) > 1:
                # Many large values in one reply: split; each half is answered on its own.
                half = len(ops) // 2
                first = await self._batch_rpc(address, ops[:half], deadline)
                return [*first, *await self._batch_rpc(address, ops[half:], deadline)]
            raise rpc_error(exc, address) from None
        self._saw_header(response.header, address)
        if len(response.results) != len(ops):
            raise Internal(
                f"{address} answered {len(response.results)} results for {len(ops)} operations"
            )
        return response.results

    async def _run_batch(
        self, ops: list[kv_pb2.Op], kind: str, keys: list[bytes], sizes: list[int],
        timeout: float | None, follower: bool,
    ) -> list[Any]:
        """Send ops grouped by leader (Batch RPCs in parallel), retrying retriable items."""
        if not ops:
            return []
        if self._routes is None:
            await self.start()
        deadline = self._deadline(timeout)
        routes = await self._ready_routes(deadline)
        partitions = [routes.partition(k) for k in keys]
        results: list[Any] = [None] * len(ops)
        uncertain = [False] * len(ops)
        todo = list(range(len(ops)))
        backoff = Backoff()
        fast = True
        while True:
            self._check_open()
            routes = self._routes or routes
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
                    results[i] = _final_error(err, uncertain[i])
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
            await self._await_refresh(deadline)
            delay = backoff.delay_within(deadline - self._now())
            if delay is None:
                return results
            await asyncio.sleep(delay)

    async def _batch_outcome(
        self, address: str, ops: Sequence[kv_pb2.Op], deadline: float
    ) -> Sequence[kv_pb2.OpResult] | StorageError:
        try:
            return await self._batch_rpc(address, ops, deadline)
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
            routes = self._routes
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
                        self._saw_header(page.header, address)
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
                    if not _call_cancelled():
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
            await self._await_refresh(deadline)
            delay = backoff.delay_within(deadline - self._now())
            if delay is None:
                raise err
            await asyncio.sleep(delay)

    # -- the partition map --------------------------------------------------------------

    def _install(self, pmap: kv_pb2.PartitionMap) -> None:
        current = self._routes
        if current is not None and pmap.version < current.version:
            return  # a lagging node's older map
        self._routes = RoutingTable(pmap, previous=current)
        if current is None or pmap.version != current.version:
            log.info("partition map version=%s partitions=%s nodes=%s",
                     pmap.version, pmap.partitions, len(pmap.nodes))

    def _saw_header(self, header: kv_pb2.ResponseHeader, address: str) -> None:
        """A node has a newer map than ours: refresh in the background, once per version."""
        version = header.map_version
        routes = self._routes
        if routes is not None and version > routes.version and version > self._refresh_target:
            self._refresh_target = version
            self._start_refresh(prefer=address)

    def _start_refresh(self, prefer: str | None = None) -> asyncio.Task[None]:
        task = self._refresh_task
        if task is None or task.done():
            assert self._loop is not None
            task = self._loop.create_task(self._refresh(prefer))
            task.add_done_callback(_log_refresh_failure)
            self._refresh_task = task
        return task

    async def _refresh(self, prefer: str | None) -> None:
        deadline = self._now() + self._timeout
        try:
            pmap = await self._fetch_map(deadline, prefer)
        except Unavailable:
            if not self._zk:
                raise
            # Every known node failed: ask ZooKeeper who is alive now.
            self._zk_nodes = await self._zk_addresses(deadline)
            pmap = await self._fetch_map(deadline)
        self._install(pmap)

    async def _await_refresh(self, deadline: float) -> None:
        """Join (or start) the one map refresh in progress, for at most until `deadline`."""
        remaining = deadline - self._now()
        if remaining <= 0 or self._closed:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._start_refresh()), remaining)
        except (StorageError, TimeoutError):
            pass  # the caller's retry loop decides what the failure means
        except asyncio.CancelledError:
            if not _call_cancelled():
                raise  # our caller is being cancelled
            # else the refresh itself was cancelled by close(): the retry loop sees it

    async def _fetch_map(
        self, deadline: float, prefer: str | None = None
    ) -> kv_pb2.PartitionMap:
        """GetMap from the first node that answers, rotating through the known ones."""
        seeds = [*self._endpoints, *self._zk_nodes]
        candidates = self._routes.candidates(seeds) if self._routes is not None else list(seeds)
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
                continue
            except asyncio.CancelledError:
                if not _call_cancelled():
                    raise
                raise Unavailable("the client was closed") from None
            self._rotation = start + n  # start at a node that answers next time
            return pmap
        raise Unavailable(
            f"no storage node answered (tried {', '.join(candidates)}); "
            f"last error: {last or 'deadline passed'}"
        )

    async def _zk_addresses(self, deadline: float) -> list[str]:
        assert self._zk is not None
        try:
            from storage.directory import node_addresses
        except ImportError as exc:
            raise Unavailable(
                f"ZooKeeper discovery is not available ({exc}); give endpoints"
            ) from exc
        remaining = max(0.1, deadline - self._now())
        try:
            addresses = await asyncio.wait_for(
                asyncio.to_thread(node_addresses, self._zk, self._cluster, remaining),
                remaining + 1.0,
            )
        except Exception as exc:
            raise Unavailable(f"cannot read live nodes from ZooKeeper {self._zk}: {exc}") from exc
        if not addresses:
            raise Unavailable(
                f"no live storage nodes in ZooKeeper {self._zk} for cluster {self._cluster!r}"
            )
        return addresses

    # -- channels, tasks ----------------------------------------------------------------

    def _stub(self, address: str) -> KVAsyncStub:
        stub = self._stubs.get(address)
        if stub is None:
            self._check_open()
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = kv_pb2_grpc.KVStub(channel)
        return stub

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _log_refresh_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("partition map refresh failed: %s", exc)


# ---------------------------------------------------------------------------------------
# The blocking client.


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
    ) -> None:
        self._closed = True  # until the thread runs; __del__ reads it
        self._async = AsyncClient(
            endpoints, zk=zk, cluster=cluster, coalesce=coalesce, timeout=timeout,
            client_id=client_id, max_in_flight=max_in_flight,
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
