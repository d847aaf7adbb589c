"""storage.client: the pure parts it decides with (storage.coalescing: batching and lanes;
storage.routing: routing and backoff; storage.wire_errors: error mapping) and the client end
to end against a real in-process grpc.aio test server on 127.0.0.1.

The test server (`FakeNode`) is a tiny hand-written KVServicer over a dict: it serves a
fixed partition map, records every RPC and Batch size, de-duplicates writes by request id,
and can be told to answer NOT_LEADER (with a hint), lose replies (UNAVAILABLE after
applying) or stall. It is a test server, not a mock of gRPC: every call crosses real gRPC.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import limits
from storage.batcher import Expiry, Pending
from storage.client import AsyncClient, Client, Item
from storage.coalescing import BATCH_BYTES_BUDGET, Lane, chunk_by_limits, take_batch
from storage.errors import (
    CasMismatch,
    DeadlineExceeded,
    InvalidArgument,
    NotLeader,
    StaleEpoch,
    StorageError,
    Unavailable,
    Version,
)
from storage.partition import partition_of
from storage.routing import Backoff, RoutingTable, final_error
from storage.v1 import kv_pb2, kv_pb2_grpc
from storage.wire_errors import ERROR_METADATA_KEY, error_from_status, item_error, rpc_error

pytestmark = pytest.mark.timeout(60)

S = grpc.StatusCode


# ---------------------------------------------------------------------------------------
# The test server.


class FakeStore:
    """The data all fake nodes share, with request-id de-duplication decided at apply."""

    def __init__(self) -> None:
        self.data: dict[bytes, tuple[bytes, kv_pb2.Version]] = {}
        self.index = 0
        self.applied: dict[tuple[bytes, int], kv_pb2.OpResult] = {}

    def version(self) -> kv_pb2.Version:
        self.index += 1
        return kv_pb2.Version(epoch=1, index=self.index)


def failed(code: grpc.StatusCode, detail: kv_pb2.ErrorDetail) -> kv_pb2.OpResult:
    return kv_pb2.OpResult(status=kv_pb2.ItemStatus(code=code.value[0], detail=detail))


class FakeNode(kv_pb2_grpc.KVServicer):
    def __init__(self, node_id: str, cluster: FakeCluster) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self.address = ""
        self.calls: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.batch_time_remaining: list[float] = []
        self.seqs: list[int] = []
        self.leads: set[int] | None = None  # None: leads every partition
        self.lose_replies = 0  # apply, then answer UNAVAILABLE this many times
        self.delay = 0.0
        self.header_version: int | None = None

    # -- the logic ------------------------------------------------------------------------

    def header(self) -> kv_pb2.ResponseHeader:
        version = self.header_version or self.cluster.map.version
        return kv_pb2.ResponseHeader(map_version=version, node_id=self.node_id)

    def apply(self, op: kv_pb2.Op) -> kv_pb2.OpResult:
        kind = op.WhichOneof("op")
        assert kind is not None
        req: Any = getattr(op, kind)
        p = partition_of(req.key, self.cluster.q)
        if self.leads is not None and p not in self.leads:
            return failed(S.ABORTED, kv_pb2.ErrorDetail(
                kind=kv_pb2.NOT_LEADER, message=f"{self.node_id} does not lead {p}",
                partition=p, leader_address=self.cluster.true_leader(p), epoch=2))
        if kind == "get":
            found = self.cluster.store.data.get(req.key)
            if found is None:
                return kv_pb2.OpResult(get=kv_pb2.GetResponse(found=False))
            return kv_pb2.OpResult(get=kv_pb2.GetResponse(found=True, value=found[0],
                                                          version=found[1]))
        rid = (req.request_id.client_id, req.request_id.seq)
        self.seqs.append(rid[1])
        store = self.cluster.store
        if rid not in store.applied:
            store.applied[rid] = self.write(kind, req, p)
        if self.lose_replies > 0:
            self.lose_replies -= 1
            return failed(S.UNAVAILABLE, kv_pb2.ErrorDetail(
                kind=kv_pb2.UNAVAILABLE, message="reply lost", partition=p))
        return store.applied[rid]

    def write(self, kind: str, req: Any, p: int) -> kv_pb2.OpResult:
        data = self.cluster.store.data
        if kind == "put":
            v = self.cluster.store.version()
            data[req.key] = (req.value, v)
            return kv_pb2.OpResult(put=kv_pb2.PutResponse(version=v))
        if kind == "delete":
            existed = data.pop(req.key, None) is not None
            return kv_pb2.OpResult(delete=kv_pb2.DeleteResponse(
                existed=existed, version=self.cluster.store.version()))
        current = data.get(req.key)
        ok = (current is None) if req.HasField("expect_absent") else (
            current is not None and current[1] == req.expected_version)
        if not ok:
            detail = kv_pb2.ErrorDetail(kind=kv_pb2.CAS_MISMATCH, message="version mismatch",
                                        partition=p, current_found=current is not None)
            if current is not None:
                detail.current_version.CopyFrom(current[1])
            return failed(S.FAILED_PRECONDITION, detail)
        v = self.cluster.store.version()
        if req.delete:
            data.pop(req.key, None)
        else:
            data[req.key] = (req.value, v)
        return kv_pb2.OpResult(cas=kv_pb2.CompareAndSetResponse(version=v))

    # -- the RPCs -------------------------------------------------------------------------

    async def _unary(self, name: str, op: kv_pb2.Op, context: Any) -> Any:
        self.calls[name] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        result = self.apply(op)
        if result.status.code:
            await context.abort(
                {s.value[0]: s for s in S}[result.status.code], result.status.detail.message,
                trailing_metadata=((ERROR_METADATA_KEY,
                                    result.status.detail.SerializeToString()),))
        reply = getattr(result, op.WhichOneof("op") or "")
        reply.header.CopyFrom(self.header())
        return reply

    async def Put(self, request: kv_pb2.PutRequest, context: Any) -> Any:
        return await self._unary("Put", kv_pb2.Op(put=request), context)

    async def Get(self, request: kv_pb2.GetRequest, context: Any) -> Any:
        return await self._unary("Get", kv_pb2.Op(get=request), context)

    async def Delete(self, request: kv_pb2.DeleteRequest, context: Any) -> Any:
        return await self._unary("Delete", kv_pb2.Op(delete=request), context)

    async def CompareAndSet(self, request: kv_pb2.CompareAndSetRequest, context: Any) -> Any:
        return await self._unary("CompareAndSet", kv_pb2.Op(cas=request), context)

    async def Batch(self, request: kv_pb2.BatchRequest, context: Any) -> kv_pb2.BatchResponse:
        self.calls["Batch"] += 1
        self.batch_sizes.append(len(request.ops))
        self.batch_time_remaining.append(context.time_remaining() or 0.0)
        if self.delay:
            await asyncio.sleep(self.delay)
        return kv_pb2.BatchResponse(results=[self.apply(op) for op in request.ops],
                                    header=self.header())

    async def BatchPut(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def BatchGet(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def Scan(self, request: kv_pb2.ScanRequest, context: Any) -> AsyncIterator[Any]:
        self.calls["Scan"] += 1
        keys = sorted(
            k for k in self.cluster.store.data
            if partition_of(k, self.cluster.q) == request.partition and k >= request.start_key
            and (not request.end_key or k < request.end_key)
        )
        if request.limit:
            keys = keys[: request.limit]
        size = request.page_size or 100
        for i in range(0, max(len(keys), 1), size):
            page = kv_pb2.ScanPage(header=self.header())
            for k in keys[i : i + size]:
                value, version = self.cluster.store.data[k]
                page.items.add(key=k, value=value, version=version)
            if i + size < len(keys):
                page.next_key = keys[i + size]
            yield page

    async def GetMap(self, request: Any, context: Any) -> kv_pb2.PartitionMap:
        self.calls["GetMap"] += 1
        return self.cluster.map


class FakeCluster:
    """`n` fake nodes on 127.0.0.1, each a real grpc.aio server; node n0 leads by default."""

    def __init__(self, n: int = 1, q: int = 1) -> None:
        self.q = q
        self.store = FakeStore()
        self.nodes = [FakeNode(f"n{i}", self) for i in range(n)]
        self.servers: list[grpc.aio.Server] = []
        self.map = kv_pb2.PartitionMap()
        self.leaders = {p: "n0" for p in range(q)}

    def true_leader(self, p: int) -> str:
        return self.node(self.leaders[p]).address

    def node(self, node_id: str) -> FakeNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    @property
    def endpoints(self) -> str:
        return ",".join(n.address for n in self.nodes)

    def build_map(self, version: int = 1, map_leaders: dict[int, str] | None = None) -> None:
        leaders = map_leaders or self.leaders
        ids = [n.node_id for n in self.nodes]
        self.map = kv_pb2.PartitionMap(
            version=version, partitions=self.q, replication=len(ids), cluster="test",
            entries=[kv_pb2.PartitionInfo(id=p, epoch=1, leader=leaders[p], replicas=ids)
                     for p in range(self.q)],
            nodes=[kv_pb2.NodeInfo(id=n.node_id, address=n.address, state="up", live=True)
                   for n in self.nodes],
        )

    async def start(self) -> None:
        for node in self.nodes:
            server = grpc.aio.server()
            kv_pb2_grpc.add_KVServicer_to_server(node, server)
            port = server.add_insecure_port("127.0.0.1:0")
            node.address = f"127.0.0.1:{port}"
            await server.start()
            self.servers.append(server)
        self.build_map()

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(0) for s in self.servers))

    def total(self, name: str) -> int:
        return sum(n.calls[name] for n in self.nodes)


@pytest.fixture
async def make_cluster() -> AsyncIterator[Callable[..., Awaitable[FakeCluster]]]:
    clusters: list[FakeCluster] = []

    async def make(n: int = 1, q: int = 1) -> FakeCluster:
        cluster = FakeCluster(n, q)
        await cluster.start()
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        await cluster.stop()


def keys_in(partition: int, q: int, count: int, prefix: str = "k") -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while len(out) < count:
        key = f"{prefix}{i}".encode()
        if partition_of(key, q) == partition:
            out.append(key)
        i += 1
    return out


async def poll_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------
# Pure: batching, lanes, backoff, routing, error mapping.


async def pending(size: int = 10, deadline: float = 1e9) -> Pending:
    future: asyncio.Future[kv_pb2.OpResult] = asyncio.get_running_loop().create_future()
    return Pending(kv_pb2.Op(), size, deadline, future)


async def test_take_batch_caps_items_at_128() -> None:
    queue = deque([await pending() for _ in range(300)])
    sizes = [len(take_batch(queue)) for _ in range(4)]
    assert sizes == [128, 128, 44, 0]


async def test_take_batch_caps_bytes_but_always_takes_one() -> None:
    big = limits.MAX_VALUE_BYTES + limits.MAX_KEY_BYTES + 64
    queue = deque([await pending(big) for _ in range(3)] + [await pending(10)])
    assert [len(take_batch(queue)) for _ in range(3)] == [1, 1, 2]
    assert 2 * big > BATCH_BYTES_BUDGET and BATCH_BYTES_BUDGET < limits.MAX_MESSAGE_BYTES


async def test_take_batch_skips_callers_that_gave_up() -> None:
    items = [await pending() for _ in range(5)]
    items[0].future.cancel()
    items[3].future.set_exception(DeadlineExceeded("gone"))
    items[3].future.exception()
    assert take_batch(deque(items)) == [items[1], items[2], items[4]]


@given(st.lists(st.integers(min_value=1, max_value=limits.MAX_VALUE_BYTES + 4096), max_size=400))
def test_chunk_by_limits_keeps_order_and_limits(sizes: list[int]) -> None:
    chunks = chunk_by_limits(range(len(sizes)), sizes)
    assert [i for c in chunks for i in c] == list(range(len(sizes)))
    for chunk in chunks:
        assert 1 <= len(chunk) <= limits.MAX_BATCH_ITEMS
        assert len(chunk) == 1 or sum(sizes[i] for i in chunk) <= BATCH_BYTES_BUDGET


async def test_lane_queues_behind_the_in_flight_call_and_releases_one_batch() -> None:
    lane: Lane[Pending] = Lane(max_in_flight=1)
    first = await pending()
    assert lane.offer(first) == [first]
    queued = [await pending() for _ in range(10)]
    assert all(lane.offer(p) is None for p in queued)
    assert lane.complete() == queued  # the ten leave together in one batch
    assert lane.in_flight == 1
    assert lane.complete() == []
    assert lane.in_flight == 0
    again = await pending()
    assert lane.offer(again) == [again]


async def test_lane_allows_max_in_flight_before_queueing() -> None:
    lane: Lane[Pending] = Lane(max_in_flight=2)
    a, b, c = await pending(), await pending(), await pending()
    assert lane.offer(a) == [a] and lane.offer(b) == [b]
    assert lane.offer(c) is None
    assert lane.complete() == [c] and lane.in_flight == 2


async def test_expiry_shares_timers_and_never_fires_early() -> None:
    loop = asyncio.get_running_loop()
    expiry = Expiry(loop, slot=0.02)
    mid_slot = (int(loop.time() / 0.02) + 3) * 0.02 + 0.005  # two slots ahead, mid-slot
    futures = [loop.create_future() for _ in range(3)]
    answered = loop.create_future()
    deadlines = [mid_slot, mid_slot + 0.001, mid_slot + 0.2]
    for deadline, future in zip(deadlines, futures, strict=True):
        expiry.watch(deadline, future)
    expiry.watch(mid_slot, answered).discard(answered)
    assert len(expiry._slots) == 2  # the first two deadlines share one timer
    for deadline, future in zip(deadlines, futures, strict=True):
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(future, 1.0)
        assert loop.time() >= deadline
    assert not answered.done()
    answered.cancel()


def test_backoff_doubles_from_10ms_to_500ms() -> None:
    top = Backoff(rand=lambda: 1.0)
    assert [top.next_delay() for _ in range(8)] == pytest.approx(
        [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5])
    bottom = Backoff(rand=lambda: 0.0)
    assert bottom.next_delay() == pytest.approx(0.005)  # jitter: half to all of the step


def test_backoff_stays_within_the_deadline() -> None:
    backoff = Backoff(rand=lambda: 1.0)
    remaining, attempts = 1.0, 0
    while (delay := backoff.delay_within(remaining)) is not None:
        assert 0 < delay <= remaining / 2
        remaining -= delay + 0.001  # the sleep, then an attempt that fails fast
        attempts += 1
    assert remaining > -0.01 and attempts > 5


def routing_map(q: int = 4, leaders: dict[int, str] | None = None, epoch: int = 1,
                version: int = 1) -> kv_pb2.PartitionMap:
    leaders = leaders if leaders is not None else {p: "a" for p in range(q)}
    return kv_pb2.PartitionMap(
        version=version, partitions=q,
        entries=[kv_pb2.PartitionInfo(id=p, epoch=epoch, leader=leaders.get(p, ""),
                                      replicas=["a", "b", "c"]) for p in range(q)],
        nodes=[kv_pb2.NodeInfo(id="a", address="A:1", live=True),
               kv_pb2.NodeInfo(id="b", address="B:1", live=True),
               kv_pb2.NodeInfo(id="c", address="C:1", live=False)],
    )


def test_routing_sends_to_the_leader_and_follows_hints() -> None:
    routes = RoutingTable(routing_map())
    assert routes.route(2) == "A:1"
    assert routes.partition(b"x") == partition_of(b"x", 4)
    assert routes.apply_hint(2, NotLeader("no", leader_id="b", epoch=2)) == "B:1"
    assert routes.route(2) == "B:1" and routes.route(1) == "A:1"
    assert routes.apply_hint(1, NotLeader("no", leader_address="D:1", epoch=2)) == "D:1"
    assert routes.apply_hint(0, NotLeader("no")) is None  # no hint at all
    assert routes.apply_hint(0, NotLeader("no", leader_id="zz")) is None  # unknown node


def test_routing_ignores_stale_hints_and_drops_hints_a_newer_map_supersedes() -> None:
    routes = RoutingTable(routing_map(epoch=3))
    assert routes.apply_hint(0, NotLeader("old", leader_address="B:1", epoch=2)) is None
    assert routes.apply_hint(0, NotLeader("new", leader_address="B:1", epoch=4)) == "B:1"
    same = RoutingTable(routing_map(epoch=3, version=2), previous=routes)
    assert same.route(0) == "B:1"  # the hint is newer than this map
    newer = RoutingTable(routing_map(epoch=5, version=3), previous=same)
    assert newer.route(0) == "A:1"


def test_routing_follower_reads_fall_back_to_a_live_replica() -> None:
    routes = RoutingTable(routing_map(leaders={}))
    assert routes.route(0) is None
    assert routes.route(0, follower=True) == "A:1"
    assert routes.candidates(["S:1", "A:1"]) == ["A:1", "B:1", "C:1", "S:1"]


def test_an_empty_map_routes_nothing() -> None:
    with pytest.raises(Unavailable, match="empty"):
        RoutingTable(kv_pb2.PartitionMap(version=1)).partition(b"k")


def test_error_mapping_from_error_detail() -> None:
    hint = kv_pb2.ErrorDetail(kind=kv_pb2.NOT_LEADER, message="moved", partition=7,
                              leader_id="b", leader_address="B:1", epoch=9)
    err = error_from_status(S.ABORTED, hint, "x")
    assert isinstance(err, NotLeader) and err.definite and err.retriable
    assert (err.partition, err.leader_id, err.leader_address, err.epoch) == (7, "b", "B:1", 9)

    cas = kv_pb2.ErrorDetail(kind=kv_pb2.CAS_MISMATCH, message="m", current_found=True,
                             current_version=kv_pb2.Version(epoch=2, index=5))
    mismatch = error_from_status(S.FAILED_PRECONDITION, cas, "")
    assert isinstance(mismatch, CasMismatch) and mismatch.current == Version(2, 5)
    absent = error_from_status(S.FAILED_PRECONDITION,
                               kv_pb2.ErrorDetail(kind=kv_pb2.CAS_MISMATCH), "")
    assert isinstance(absent, CasMismatch) and absent.current is None

    cases = [
        (S.INVALID_ARGUMENT, kv_pb2.INVALID, InvalidArgument),
        (S.UNAVAILABLE, kv_pb2.UNAVAILABLE, Unavailable),
        (S.FAILED_PRECONDITION, kv_pb2.STALE_EPOCH, StaleEpoch),
        (S.DEADLINE_EXCEEDED, kv_pb2.UNAVAILABLE, DeadlineExceeded),
    ]
    for code, kind, cls in cases:
        assert type(error_from_status(code, kv_pb2.ErrorDetail(kind=kind), "m")) is cls


def test_error_mapping_from_status_code_alone() -> None:
    too_big = error_from_status(S.RESOURCE_EXHAUSTED, None, "Sent message larger than max")
    assert isinstance(too_big, InvalidArgument) and "larger than max" in too_big.message
    assert isinstance(error_from_status(S.DEADLINE_EXCEEDED, None, "late"), DeadlineExceeded)
    assert isinstance(error_from_status(S.UNAVAILABLE, None, "refused"), Unavailable)
    assert isinstance(error_from_status(S.ABORTED, None, "x"), NotLeader)
    assert type(error_from_status(S.UNIMPLEMENTED, None, "x")) is StorageError


def test_error_mapping_from_item_status_and_trailing_metadata() -> None:
    detail = kv_pb2.ErrorDetail(kind=kv_pb2.NOT_LEADER, leader_address="B:1", epoch=3)
    status = kv_pb2.ItemStatus(code=S.ABORTED.value[0], detail=detail)
    err = item_error(status)
    assert isinstance(err, NotLeader) and err.leader_address == "B:1"

    exc = grpc.aio.AioRpcError(
        S.ABORTED, grpc.aio.Metadata(),
        grpc.aio.Metadata((ERROR_METADATA_KEY, detail.SerializeToString())), details="moved")
    mapped = rpc_error(exc, "A:1")
    assert isinstance(mapped, NotLeader) and mapped.epoch == 3
    refused = grpc.aio.AioRpcError(S.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="Connection refused")
    down = rpc_error(refused, "A:1")
    assert isinstance(down, Unavailable) and "A:1" in down.message


def test_a_definite_error_after_an_unknown_outcome_is_reported_as_unknown() -> None:
    err = final_error(NotLeader("moved"), uncertain=True)
    assert isinstance(err, Unavailable) and not err.definite
    assert isinstance(final_error(NotLeader("moved"), uncertain=False), NotLeader)
    assert isinstance(final_error(CasMismatch("m"), uncertain=True), CasMismatch)


# ---------------------------------------------------------------------------------------
# End to end over real gRPC.


async def test_concurrent_puts_are_coalesced_into_few_batches(make_cluster: Any) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    async with AsyncClient(cluster.endpoints) as client:
        versions = await asyncio.gather(*(client.put(f"k{i}", f"v{i}") for i in range(64)))
    assert node.calls["Put"] == 0
    assert 1 <= node.calls["Batch"] <= 4, node.batch_sizes
    assert sum(node.batch_sizes) == 64
    assert len(set(versions)) == 64  # each caller got its own result
    for i, version in enumerate(versions):
        value, stored = cluster.store.data[f"k{i}".encode()]
        assert value == f"v{i}".encode() and Version(stored.epoch, stored.index) == version


async def test_sustained_load_fills_each_batch(make_cluster: Any) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]

    async def worker(j: int) -> None:
        for i in range(10):
            await client.put(f"w{j}-{i}", b"v")

    async with AsyncClient(cluster.endpoints) as client:
        await asyncio.gather(*(worker(j) for j in range(64)))
    assert sum(node.batch_sizes) == 640
    assert node.calls["Batch"] <= 16, node.batch_sizes  # ~64 a batch, not 1/63 alternating


async def test_without_coalescing_each_call_is_its_own_rpc(make_cluster: Any) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    async with AsyncClient(cluster.endpoints, coalesce=False) as client:
        versions = await asyncio.gather(*(client.put(f"k{i}", b"v") for i in range(64)))
    assert node.calls["Put"] == 64 and node.calls["Batch"] == 0
    assert len(set(versions)) == 64


async def test_coalesced_operations_of_every_kind(make_cluster: Any) -> None:
    cluster = await make_cluster()
    async with AsyncClient(cluster.endpoints) as client:
        v1 = await client.put("a", "1")
        got, missing, v2, existed, gone = await asyncio.gather(
            client.get("a"), client.get("zz"), client.cas("b", "2", expected=None),
            client.delete("nope"), client.get("b", consistency="follower"))
        assert got == Item(b"a", b"1", v1)
        assert missing is None and existed is False
        assert gone is None or gone.version == v2
        v3 = await client.cas("a", b"3", expected=v1, ttl=10)
        with pytest.raises(CasMismatch) as caught:
            await client.cas("a", b"4", expected=v1)
        assert caught.value.current == v3 and caught.value.definite
        with pytest.raises(CasMismatch) as absent:
            await client.cas("zz", None, expected=Version(1, 1), delete=True)
        assert absent.value.current is None
        assert await client.delete("a") is True
        assert await client.get("a") is None


async def test_unary_operations_map_errors_too(make_cluster: Any) -> None:
    cluster = await make_cluster()
    async with AsyncClient(cluster.endpoints, coalesce=False) as client:
        v1 = await client.put("a", "1")
        assert await client.get("a") == Item(b"a", b"1", v1)
        with pytest.raises(CasMismatch) as caught:
            await client.cas("a", b"2", expected=None)
        assert caught.value.current == v1
        assert await client.delete("a") is True
    assert cluster.nodes[0].calls["CompareAndSet"] == 1


async def test_a_not_leader_item_is_rerouted_to_the_hinted_leader(make_cluster: Any) -> None:
    cluster = await make_cluster(n=2)
    a, b = cluster.nodes
    a.leads = set()  # the map says a leads; a knows b does
    cluster.leaders = {0: "n1"}
    async with AsyncClient(a.address) as client:
        version = await client.put("k", "v")
        assert cluster.store.data[b"k"][1].index == version.index
        assert (a.calls["Batch"], b.calls["Batch"]) == (1, 1)
        await client.put("k2", "v")  # the hint is remembered
        assert (a.calls["Batch"], b.calls["Batch"]) == (1, 2)


async def test_only_the_not_leader_items_of_a_batch_are_rerouted(make_cluster: Any) -> None:
    cluster = await make_cluster(n=2, q=2)
    a, b = cluster.nodes
    a.leads = {0}
    cluster.leaders = {0: "n0", 1: "n1"}
    mine, theirs = keys_in(0, 2, 10, "x"), keys_in(1, 2, 10, "y")
    async with AsyncClient(a.address) as client:
        await asyncio.gather(*(client.put(k, k) for k in mine + theirs))
    assert all(cluster.store.data[k][0] == k for k in mine + theirs)
    assert sum(b.batch_sizes) == 10  # only the partition-1 items went on to b
    assert sum(a.batch_sizes) == 20


async def test_a_dead_leader_is_replaced_through_a_map_refresh(make_cluster: Any) -> None:
    cluster = await make_cluster(n=2)
    async with AsyncClient(cluster.endpoints) as client:
        await client.put("before", "v")
        await cluster.servers[0].stop(0)  # n0 dies; the controller moves leadership to n1
        cluster.build_map(version=2, map_leaders={0: "n1"})
        version = await client.put("after", "v", timeout=5.0)
        assert client.partition_map.version == 2
    assert cluster.store.data[b"after"][1].index == version.index
    assert cluster.nodes[1].calls["Batch"] == 1


async def test_bootstrap_reads_node_addresses_from_zookeeper(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import storage.directory

    cluster = await make_cluster()
    asked: list[tuple[str, str, float]] = []

    def node_addresses(zk: str, name: str, timeout: float = 5.0) -> list[str]:
        asked.append((zk, name, timeout))
        return [cluster.nodes[0].address]

    monkeypatch.setattr(storage.directory, "node_addresses", node_addresses)
    async with AsyncClient(zk="zk1:2181/ringstore", cluster="blue", timeout=2.0) as client:
        await client.put("k", "v")
    assert [(zk, name) for zk, name, _ in asked] == [("zk1:2181/ringstore", "blue")]
    assert 0 < asked[0][2] <= 2.0


async def test_calls_wait_within_their_deadline_for_a_first_map(make_cluster: Any) -> None:
    cluster = await make_cluster()
    real = cluster.map
    cluster.map = kv_pb2.PartitionMap(version=0)  # the controller has not written it yet
    async with AsyncClient(cluster.endpoints) as client:
        with pytest.raises(Unavailable, match="empty"):
            await client.put("k", "v", timeout=0.2)
        asyncio.get_running_loop().call_later(0.2, setattr, cluster, "map", real)
        version = await client.put("k", "v", timeout=3.0)
    assert cluster.store.data[b"k"][1].index == version.index


async def test_oversized_input_fails_fast_without_any_rpc(make_cluster: Any) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    async with AsyncClient(cluster.endpoints) as client:
        before = sum(node.calls.values())
        with pytest.raises(InvalidArgument, match="1 MiB"):
            await client.put("k", b"x" * (limits.MAX_VALUE_BYTES + 1))
        with pytest.raises(InvalidArgument, match="key"):
            await client.get(b"k" * (limits.MAX_KEY_BYTES + 1))
        with pytest.raises(InvalidArgument, match="empty key"):
            await client.delete(b"")
        with pytest.raises(InvalidArgument, match="consistency"):
            await client.get("k", consistency="eventual")
        with pytest.raises(InvalidArgument):
            await client.batch_put([("a", b"x" * (limits.MAX_VALUE_BYTES + 1))])
        assert sum(node.calls.values()) == before


async def test_a_lost_reply_is_retried_with_the_same_request_id(make_cluster: Any) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    node.lose_replies = 2
    async with AsyncClient(cluster.endpoints) as client:
        version = await client.put("k", "v")
    assert cluster.store.index == 1  # applied once
    assert version == Version(1, 1)
    assert len(node.seqs) == 3 and len(set(node.seqs)) == 1


async def test_a_stalled_node_gives_deadline_exceeded_within_the_deadline(
    make_cluster: Any,
) -> None:
    cluster = await make_cluster()
    async with AsyncClient(cluster.endpoints) as client:
        cluster.nodes[0].delay = 2.0
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.put(f"k{i}", b"v", timeout=0.3) for i in range(5)), return_exceptions=True)
        assert time.monotonic() - started < 1.5
        assert all(isinstance(r, DeadlineExceeded) for r in results), results


async def test_a_batch_rpc_gets_the_latest_deadline_of_its_callers(make_cluster: Any) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    async with AsyncClient(cluster.endpoints, attempt_timeout=10.0) as client:
        node.delay = 0.2
        first = asyncio.ensure_future(client.put("a", b"v", timeout=1.0))
        await poll_for(lambda: node.calls["Batch"] == 1)
        short = client.put("b", b"v", timeout=0.5)
        long = client.put("c", b"v", timeout=4.0)
        await asyncio.gather(first, short, long)
    assert node.batch_sizes == [1, 2]
    assert node.batch_time_remaining[1] > 3.0


async def test_an_attempt_that_gets_no_answer_is_retried_within_the_deadline(
    make_cluster: Any,
) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    async with AsyncClient(cluster.endpoints, attempt_timeout=0.3) as client:
        node.delay = 0.5  # every attempt outlives its 0.3 s budget
        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await client.put("slow", b"v", timeout=1.5)
        assert time.monotonic() - started < 2.5
        assert node.calls["Batch"] >= 2  # retried, not stuck on the first attempt


async def test_close_fails_queued_and_in_flight_calls(make_cluster: Any) -> None:
    cluster = await make_cluster()
    client = AsyncClient(cluster.endpoints)
    await client.start()
    cluster.nodes[0].delay = 1.0
    calls = [asyncio.ensure_future(client.put(f"k{i}", b"v")) for i in range(10)]
    await poll_for(lambda: cluster.nodes[0].calls["Batch"] == 1)
    started = time.monotonic()
    await client.close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 3)
    assert time.monotonic() - started < 0.9
    assert all(isinstance(r, Unavailable) for r in results), results
    await client.close()  # idempotent


async def test_unreachable_endpoints_raise_unavailable_within_the_timeout() -> None:
    started = time.monotonic()
    client = AsyncClient("127.0.0.1:1", timeout=0.5)
    try:
        with pytest.raises(Unavailable, match=r"127\.0\.0\.1:1"):
            await client.put("k", "v")
    finally:
        await client.close()
    assert time.monotonic() - started < 3.0


async def test_batch_put_and_batch_get_split_at_128_items(make_cluster: Any) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    async with AsyncClient(cluster.endpoints, coalesce=False) as client:
        versions = await client.batch_put([(f"k{i}", f"v{i}") for i in range(300)])
        assert sorted(node.batch_sizes) == [44, 128, 128]
        assert all(isinstance(v, Version) for v in versions) and len(set(versions)) == 300
        got = await client.batch_get(["k0", "missing", "k299"])
    assert isinstance(got[0], Item) and got[0].value == b"v0" and got[0].version == versions[0]
    assert got[1] is None
    assert isinstance(got[2], Item) and got[2].value == b"v299"


async def test_batch_put_reroutes_not_leader_items(make_cluster: Any) -> None:
    cluster = await make_cluster(n=2, q=2)
    a, b = cluster.nodes
    a.leads = {0}
    cluster.leaders = {0: "n0", 1: "n1"}
    items = [(k, b"v") for k in keys_in(0, 2, 5, "x") + keys_in(1, 2, 5, "y")]
    async with AsyncClient(cluster.endpoints) as client:
        results = await client.batch_put(items)
    assert all(isinstance(r, Version) for r in results), results
    assert b.batch_sizes == [5]


async def test_scan_fans_out_over_partitions_in_pages(make_cluster: Any) -> None:
    cluster = await make_cluster(q=4)
    keys = [f"k{i:03d}".encode() for i in range(50)]
    async with AsyncClient(cluster.endpoints) as client:
        await client.batch_put([(k, k) for k in keys])
        everything = [item async for item in client.scan(page_size=7)]
        assert sorted(i.key for i in everything) == keys
        assert all(i.value == i.key for i in everything)
        limited = [item async for item in client.scan(limit=13, page_size=5)]
        assert len(limited) == 13
        one = [item.key async for item in client.scan(partition=2, start=b"k010")]
        assert one == sorted(k for k in keys if partition_of(k, 4) == 2 and k >= b"k010")
        with pytest.raises(InvalidArgument):
            [item async for item in client.scan(partition=9)]


async def test_a_newer_map_version_in_a_reply_refreshes_the_map(make_cluster: Any) -> None:
    cluster = await make_cluster()
    async with AsyncClient(cluster.endpoints) as client:
        assert client.partition_map.version == 1
        cluster.build_map(version=5)
        await client.put("k", "v")
        await poll_for(lambda: client.partition_map.version == 5)
        assert (await client.get_map()).version == 5


async def test_sync_client_blocks_with_the_same_semantics(make_cluster: Any) -> None:
    cluster = await make_cluster(q=2)

    def work() -> tuple[Version, Item | None, list[Item], bool]:
        with Client(cluster.endpoints) as client:
            version = client.put("k", "v")
            item = client.get("k")
            with pytest.raises(CasMismatch):
                client.cas("k", "w", expected=None)
            scanned = list(client.scan())
            assert client.partition_map.partitions == 2
            return version, item, scanned, client.delete("k")

    version, item, scanned, existed = await asyncio.wait_for(asyncio.to_thread(work), 20)
    assert item == Item(b"k", b"v", version)
    assert scanned == [item] and existed


async def test_a_leaked_client_warns(make_cluster: Any) -> None:
    cluster = await make_cluster()
    client = AsyncClient(cluster.endpoints)
    await client.start()
    channels = list(client._channels.values())
    with pytest.warns(ResourceWarning, match="unclosed"):
        del client
        gc.collect()
    await asyncio.gather(*(ch.close() for ch in channels))


async def test_a_leaked_sync_client_warns_and_stops_its_thread(make_cluster: Any) -> None:
    cluster = await make_cluster()

    def leak() -> None:
        client = Client(cluster.endpoints)
        client.put("k", "v")
        thread = client._thread
        with pytest.warns(ResourceWarning, match="unclosed"):
            del client
            gc.collect()
        thread.join(5)
        assert not thread.is_alive()

    await asyncio.wait_for(asyncio.to_thread(leak), 20)


def test_a_client_needs_endpoints_or_zookeeper() -> None:
    with pytest.raises(ValueError, match="endpoints"):
        AsyncClient()
    with pytest.raises(ValueError, match="endpoints"):
        Client(" , ")
