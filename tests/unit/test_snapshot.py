"""Log retention and snapshots (storage/snapshot.py, and the Replicas shell that drives them)
against real RocksDB directories in tmp dirs. No network: a snapshot stream is handed from
one side to the other in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.deadline import async_poll_for
from storage import limits
from storage.catchup import _snapshot_stream
from storage.engine import Batch, Engine
from storage.errors import Version
from storage.keyspace import (
    ApplyResult,
    Outcome,
    ReplicaMeta,
    decode_meta,
    encode_meta,
    encode_record,
    encode_result,
    meta_key,
    request_key,
)
from storage.partition import Assignment
from storage.peers import Peers
from storage.replica import Replicas, Tuning
from storage.snapshot import (
    Retention,
    Section,
    SnapshotDigest,
    SnapshotHeader,
    SnapshotInstall,
    SnapshotRejected,
    SnapshotSource,
    SnapshotTrailer,
    chunk_items,
    decide_install,
    retention_cut,
    verify_trailer,
)
from storage.v1 import kv_pb2, replica_pb2

pytestmark = pytest.mark.unit

P = 3  # the partition under test; its neighbours 2 and 4 must never be touched


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Engine]:
    engine = Engine.open(tmp_path / "source")
    yield engine
    engine.close()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Engine]:
    engine = Engine.open(tmp_path / "target")
    yield engine
    engine.close()


def fill_partition(engine: Engine, p: int, keys: int, *, big: int = 0, tag: bytes = b"") -> None:
    """Data records as apply writes them, request results, log entries and meta."""
    batch = engine.batch()
    for i in range(keys):
        value = tag + (b"v" * (i % 50)) + str(i).encode()
        batch.put(p, b"key-%06d" % i, encode_record(1, i + 1, 0, value))
        if i % 3 == 0:
            result = ApplyResult(Outcome.OK, Version(1, i + 1), applied_at_ms=1000 + i)
            batch.put_request(p, request_key(b"client-" + tag, i), encode_result(result))
    for i in range(big):  # values near the 1 MiB limit: one item per chunk
        batch.put(p, b"big-%d" % i, encode_record(1, 10_000 + i, 0, bytes([i]) * (1024 * 1024)))
    for index in range(1, 6):
        batch.put_log(p, index, b"entry-%d" % index)
    batch.put_meta(meta_key(p), encode_meta(ReplicaMeta(1, 5, 5)))
    engine.write(batch)


def header(p: int = P, *, epoch: int = 2, base: tuple[int, int] = (2, 500)) -> SnapshotHeader:
    return SnapshotHeader(p, epoch, base[0], base[1], "n1")


def state(engine: Engine, p: int = P) -> tuple[object, ...]:
    """Everything the engine holds for partition p (for before == after checks)."""
    return (engine.digest(p), list(engine.requests(p)), list(engine.log_entries(p, 0)),
            engine.get_meta(meta_key(p)))


Events = list[tuple[str, object]]


def read_stream(engine: Engine, h: SnapshotHeader, **chunking: int) -> Events:
    """The stream a SnapshotSource produces, as ("items", (section, items)) and one
    ("trailer", trailer) event."""
    src = SnapshotSource(engine, h)
    try:
        events: Events = [("items", (s, items)) for s, items in src.chunks(**chunking)]
        events.append(("trailer", src.trailer()))
    finally:
        src.close()
    return events


def install(engine: Engine, h: SnapshotHeader, events: Events, promised: int = 0) -> ReplicaMeta:
    receiver = SnapshotInstall(engine, h)
    for kind, payload in events:
        if kind == "items":
            section, items = payload  # type: ignore[misc]
            receiver.add(section, items)
        else:
            assert isinstance(payload, SnapshotTrailer)
            receiver.finish(payload)
    return receiver.commit(promised)


# -- pure pieces --------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=300)),
                max_size=60),
       st.integers(min_value=1, max_value=700), st.integers(min_value=1, max_value=7))
def test_chunks_keep_order_and_bounds(items: list[tuple[bytes, bytes]], max_bytes: int,
                                      max_items: int) -> None:
    chunks = list(chunk_items(items, max_bytes, max_items))
    assert [item for chunk in chunks for item in chunk] == items
    for chunk in chunks:
        assert 1 <= len(chunk) <= max_items
        size = sum(len(k) + len(v) + 8 for k, v in chunk)
        assert len(chunk) == 1 or size <= max_bytes


@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=20)), max_size=30),
       st.integers(min_value=0, max_value=30))
def test_digest_does_not_depend_on_chunking(items: list[tuple[bytes, bytes]], cut: int) -> None:
    whole, split = SnapshotDigest(header()), SnapshotDigest(header())
    whole.update(Section.DATA, items)
    split.update(Section.DATA, items[:cut])
    split.update(Section.DATA, items[cut:])
    assert whole.trailer() == split.trailer()
    assert whole.trailer().data_items == len(items)


def test_digest_binds_section_framing_and_position() -> None:
    def digest(h: SnapshotHeader, section: Section, items: list[tuple[bytes, bytes]]) -> bytes:
        d = SnapshotDigest(h)
        d.update(section, items)
        return d.trailer().digest

    base = digest(header(), Section.DATA, [(b"ab", b"c")])
    assert base != digest(header(), Section.REQUESTS, [(b"ab", b"c")])
    assert base != digest(header(), Section.DATA, [(b"a", b"bc")])
    assert base != digest(header(base=(2, 501)), Section.DATA, [(b"ab", b"c")])
    assert base == digest(header(epoch=9), Section.DATA, [(b"ab", b"c")])  # the sender's epoch
    assert hashlib.sha256().digest_size == len(base)


def test_verify_trailer_names_the_mismatch() -> None:
    good = SnapshotTrailer(3, 1, b"x" * 32)
    assert verify_trailer(good, good) == ""
    assert "data item count" in verify_trailer(good, SnapshotTrailer(4, 1, b"x" * 32))
    assert "request item count" in verify_trailer(good, SnapshotTrailer(3, 0, b"x" * 32))
    assert "digest" in verify_trailer(good, SnapshotTrailer(3, 1, b"y" * 32))


def test_decide_install_fences_epochs_and_committed_state() -> None:
    h = header(epoch=5, base=(4, 100))
    assert decide_install(h, promised_epoch=5, commit_index=99, leading_epoch=None) == ""
    assert "stale epoch" in decide_install(h, promised_epoch=6, commit_index=0,
                                           leading_epoch=None)
    assert "leads epoch" in decide_install(h, promised_epoch=5, commit_index=0, leading_epoch=5)
    assert decide_install(h, promised_epoch=4, commit_index=0, leading_epoch=4) == ""
    assert "already committed" in decide_install(h, promised_epoch=5, commit_index=100,
                                                 leading_epoch=None)


def test_retention_is_batched_and_bounded() -> None:
    r = Retention(entries=100, bytes=10_000)
    assert not r.over(110, 11_000)
    assert r.over(111, 0) and r.over(0, 11_001)
    sizes = [(i, 10) for i in range(1, 151)]  # (base 0, last 150], 1500 bytes
    assert retention_cut(r, base=0, last=150, ceiling=150, log_bytes=1500,
                         sizes=sizes) == (50, 500)
    # Never above the ceiling (the applied index), whatever the limits say.
    assert retention_cut(r, base=0, last=150, ceiling=20, log_bytes=1500,
                         sizes=sizes) == (20, 200)
    # Bytes: 150 entries of 100 bytes against a 10,000 byte limit -> keep 100 (10,000 bytes).
    big = [(i, 100) for i in range(1, 151)]
    assert retention_cut(Retention(1000, 10_000), base=0, last=150, ceiling=150,
                         log_bytes=15_000, sizes=big) == (50, 5000)
    with pytest.raises(ValueError):
        Retention(entries=0)


# -- both ends against real engines --------------------------------------------------------------


def test_snapshot_round_trip_is_byte_identical(source: Engine, target: Engine) -> None:
    fill_partition(source, P, 3000, big=2)
    fill_partition(source, P + 1, 10, tag=b"neighbour")
    fill_partition(target, P, 500, tag=b"stale")  # replaced entirely, log included
    fill_partition(target, P - 1, 20, tag=b"other")
    other_before = state(target, P - 1)
    h = header()
    events = read_stream(source, h)
    sections = [payload[0] for kind, payload in events if kind == "items"]  # type: ignore[index]
    assert len(sections) >= 4 and sections == sorted(sections, key=lambda s: s is Section.REQUESTS)
    # The source's view was fixed when it was built: a later write is not in it.
    late = SnapshotSource(source, h)
    source.write(_put(source, P, b"written-after", b"x"))
    late_events = list(late.chunks())
    late.close()
    assert all(b"written-after" not in dict(items) for _, items in late_events)

    meta = install(target, h, events, promised=1)
    assert meta == ReplicaMeta(promised_epoch=2, commit_index=500, applied_index=500,
                               base_epoch=2, base_index=500)
    assert decode_meta(target.get_meta(meta_key(P)) or b"") == meta
    source_digest = source.digest(P)
    assert target.digest(P)[1] == source_digest[1] - 1  # all but the late write
    source.write(_delete(source, P, b"written-after"))
    assert target.digest(P) == source.digest(P)
    assert list(target.requests(P)) == list(source.requests(P))
    assert list(target.log_entries(P, 0)) == []  # the stale log went with the old state
    assert state(target, P - 1) == other_before
    assert target.digest(P + 1) == (hashlib.sha256().digest(), 0)


def _put(engine: Engine, p: int, key: bytes, value: bytes) -> Batch:
    batch = engine.batch()
    batch.put(p, key, value)
    return batch


def _delete(engine: Engine, p: int, key: bytes) -> Batch:
    batch = engine.batch()
    batch.delete(p, key)
    return batch


def _corrupt(events: Events) -> Events:
    out = list(events)
    kind, (section, items) = out[0]  # type: ignore[misc]
    key, value = items[7]
    items = [*items[:7], (key, value[:-1] + bytes([value[-1] ^ 1])), *items[8:]]
    out[0] = (kind, (section, items))
    return out


def _recount(events: Events) -> Events:
    t = events[-1][1]
    assert isinstance(t, SnapshotTrailer)
    return [*events[:-1], ("trailer", SnapshotTrailer(t.data_items + 1, t.request_items,
                                                      t.digest))]


def _reorder(events: Events) -> Events:
    items = [e for e in events if e[0] == "items"]
    return [items[-1], *items[:-1], events[-1]]  # a request chunk before data chunks


BROKEN = [
    pytest.param(lambda e: e[:-1], "truncated", id="missing-trailer"),
    pytest.param(lambda e: [e[0], *e[2:]], "count mismatch", id="missing-chunk"),
    pytest.param(_corrupt, "digest mismatch", id="corrupted-item"),
    pytest.param(_recount, "count mismatch", id="wrong-count"),
    pytest.param(_reorder, "data item after request", id="out-of-order"),
    pytest.param(lambda e: [*e, e[0]], "after the trailer", id="items-after-trailer"),
]


@pytest.mark.parametrize(("damage", "reason"), BROKEN)
def test_broken_stream_is_rejected_and_writes_nothing(source: Engine, target: Engine,
                                                      damage: object, reason: str) -> None:
    fill_partition(source, P, 5000)
    fill_partition(target, P, 40, tag=b"old")
    before = state(target)
    h = header()
    events = damage(read_stream(source, h, max_items=1000))  # type: ignore[operator]
    with pytest.raises(SnapshotRejected, match=reason):
        install(target, h, events)
    assert state(target) == before


# -- through the replication shell ----------------------------------------------------------------


def make_replicas(engine: Engine, node_id: str = "n1", **tuning: int) -> Replicas:
    return Replicas(engine, node_id, Peers(), hint=lambda p: ("", "", 0),
                    tuning=Tuning(**tuning))  # type: ignore[arg-type]


def command(i: int) -> replica_pb2.Command:
    return replica_pb2.Command(
        kind=replica_pb2.Command.PUT, key=b"k-%05d" % i, value=b"value-%d" % i,
        request_id=kv_pb2.RequestId(client_id=b"c1", seq=i), proposed_at_ms=1)


async def lead_alone(replicas: Replicas, p: int = P, epoch: int = 1) -> None:
    replicas.assign(Assignment(p, epoch, replicas.node_id, (replicas.node_id,)))
    await async_poll_for(lambda: replicas.replica(p) is not None
                         and replicas.replica(p).leader is not None  # type: ignore[union-attr]
                         and replicas.replica(p).leader.ready,  # type: ignore[union-attr]
                         5, what="the no-op to commit")


def log_sizes(engine: Engine, p: int) -> int:
    return sum(len(raw) for _, raw in engine.log_entries(p, 0))


async def test_retention_moves_the_base_as_entries_are_applied(source: Engine) -> None:
    replicas = make_replicas(source, retain_entries=50)
    replicas.start()
    try:
        await lead_alone(replicas)
        r = replicas.replica(P)
        assert r is not None
        seen_bases = set()
        for round_ in range(8):
            futures = [replicas.submit(P, command(round_ * 40 + i)) for i in range(40)]
            for future in futures:
                await future
            seen_bases.add(r.meta.base_index)
            assert r.meta.base_index <= r.meta.applied_index
            assert r.last.index - r.meta.base_index <= 55  # the limit plus its slack
            assert source.first_log_index(P) in (0, r.meta.base_index + 1)
            assert r.log_bytes == log_sizes(source, P)
        assert len(seen_bases) >= 3  # compacted several times, in batches
        assert r.meta.base_epoch == 1 and r.meta.base_index > 200
        assert source.first_log_index(P) == r.meta.base_index + 1
        assert source.last_log_index(P) == r.last.index
        assert source.digest(P)[1] == 320  # the data itself is all there
        meta, last, size = r.meta, r.last, r.log_bytes
    finally:
        await replicas.close()
    again = make_replicas(source, retain_entries=50)  # a restart restores the same view
    r2 = again.replica(P)
    assert r2 is not None and (r2.meta, r2.last, r2.log_bytes) == (meta, last, size)


async def test_retention_by_bytes(source: Engine) -> None:
    replicas = make_replicas(source, retain_bytes=2000)
    replicas.start()
    try:
        await lead_alone(replicas)
        for i in range(300):
            await replicas.submit(P, command(i))
        r = replicas.replica(P)
        assert r is not None and r.meta.base_index > 0
        assert r.log_bytes == log_sizes(source, P) <= 2200
    finally:
        await replicas.close()


def append_request(first: int, last: int, commit: int) -> replica_pb2.AppendBatchRequest:
    request = replica_pb2.AppendBatchRequest(leader_id="n9")
    append = request.appends.add(partition=P, epoch=1, prev_epoch=0 if first == 1 else 1,
                                 prev_index=first - 1, commit_index=commit)
    for index in range(first, last + 1):
        append.entries.add(epoch=1, index=index, command=command(index))
    return request


async def test_retention_never_deletes_unapplied_entries(target: Engine) -> None:
    replicas = make_replicas(target, "n2", retain_entries=10)
    replicas.start()
    try:
        response = replicas.handle_append(append_request(1, 100, commit=40))
        assert response.results[0].accepted
        r = replicas.replica(P)
        assert r is not None
        await async_poll_for(lambda: r.meta.applied_index == 40, 5, what="apply through 40")
        assert r.meta.base_index == 40  # as far as applied, though 60 entries stay
        assert (target.first_log_index(P), target.last_log_index(P)) == (41, 100)
        response = replicas.handle_append(append_request(101, 110, commit=110))
        assert response.results[0].accepted
        await async_poll_for(lambda: r.meta.applied_index == 110, 5, what="apply through 110")
        assert r.meta.base_index == 100 and target.first_log_index(P) == 101
        assert r.log_bytes == log_sizes(target, P)
    finally:
        await replicas.close()


async def chunks_of(events: Sequence[replica_pb2.SnapshotChunk]
                    ) -> AsyncIterator[replica_pb2.SnapshotChunk]:
    for chunk in events:
        yield chunk


async def stream_of(engine: Engine, h: SnapshotHeader) -> list[replica_pb2.SnapshotChunk]:
    src = SnapshotSource(engine, h)
    try:
        return [chunk async for chunk in _snapshot_stream(src)]
    finally:
        src.close()


async def test_replicas_install_a_snapshot_then_follow_the_log(source: Engine,
                                                              target: Engine) -> None:
    fill_partition(source, P, 6000, big=2)
    h = header(epoch=1, base=(1, 500))
    stream = await stream_of(source, h)
    assert len(stream) >= 6 and stream[0].HasField("header") and stream[-1].HasField("trailer")
    # About 1 MiB a message (a 1 MiB value travels alone), far under the gRPC cap.
    assert max(c.ByteSize() for c in stream) < min(1100 * 1024, limits.MAX_MESSAGE_BYTES)
    replicas = make_replicas(target, "n2")
    replicas.start()
    try:
        replicas.handle_append(append_request(1, 30, commit=10))  # an old, short log
        response = await replicas.install_snapshot(chunks_of(stream))
        assert response.accepted, response.reason
        assert (response.last_epoch, response.last_index) == (1, 500)
        r = replicas.replica(P)
        assert r is not None and r.meta.applied_index == r.meta.commit_index == 500
        assert (r.base.epoch, r.base.index, r.last.index, r.log_bytes) == (1, 500, 500, 0)
        assert target.digest(P) == source.digest(P)
        assert list(target.requests(P)) == list(source.requests(P))
        assert target.first_log_index(P) == 0
        # The log tail follows from the snapshot's position.
        response2 = replicas.handle_append(append_request(501, 505, commit=505))
        assert response2.results[0].accepted
        await async_poll_for(lambda: r.meta.applied_index == 505, 5, what="the tail applied")
        assert target.first_log_index(P) == 501
    finally:
        await replicas.close()


def _without_trailer(s: list[replica_pb2.SnapshotChunk]) -> list[replica_pb2.SnapshotChunk]:
    return s[:-1]


def _flip_value(s: list[replica_pb2.SnapshotChunk]) -> list[replica_pb2.SnapshotChunk]:
    s[1].data[3].value = s[1].data[3].value + b"!"
    return s


def _more_items(s: list[replica_pb2.SnapshotChunk]) -> list[replica_pb2.SnapshotChunk]:
    s[-1].trailer.data_items += 1
    return s


def _no_header(s: list[replica_pb2.SnapshotChunk]) -> list[replica_pb2.SnapshotChunk]:
    return s[1:]


REJECTED = [
    pytest.param(_without_trailer, 1, "truncated", id="truncated"),
    pytest.param(_flip_value, 1, "digest mismatch", id="corrupted"),
    pytest.param(_more_items, 1, "count mismatch", id="wrong-count"),
    pytest.param(_no_header, 1, "start with a header", id="no-header"),
    pytest.param(lambda s: s, 0, "stale epoch", id="stale-epoch"),
]


@pytest.mark.parametrize(("damage", "epoch", "reason"), REJECTED)
async def test_replicas_reject_and_keep_their_state(source: Engine, target: Engine,
                                                    damage: object, epoch: int,
                                                    reason: str) -> None:
    fill_partition(source, P, 3000)
    stream = damage(await stream_of(source, header(epoch=epoch, base=(1, 500))))  # type: ignore[operator]
    replicas = make_replicas(target, "n2")
    replicas.start()
    try:
        replicas.handle_append(append_request(1, 30, commit=20))
        r = replicas.replica(P)
        assert r is not None
        await async_poll_for(lambda: r.meta.applied_index == 20, 5, what="apply through 20")
        before = state(target), r.meta, r.last
        response = await replicas.install_snapshot(chunks_of(stream))
        assert not response.accepted and reason in response.reason
        if damage is not _no_header:  # (a stream without a header names no partition)
            assert (response.partition, response.last_epoch, response.last_index) == (P, 1, 30)
        assert (state(target), r.meta, r.last) == before
    finally:
        await replicas.close()
