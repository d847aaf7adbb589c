"""storage.engine against a real RocksDB in a temporary directory (fast enough for units)."""

from __future__ import annotations

import hashlib
import multiprocessing
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.engine import MAX_PARTITION, Batch, Engine, EngineError, EngineLocked

pytestmark = pytest.mark.unit

# Keys chosen to catch prefix bleed: prefixes of each other, 0x00/0xff bytes, and user
# keys that look like another partition's 4-byte prefix.
TRICKY_KEYS = [
    b"a",
    b"ab",
    b"abc",
    b"\x00",
    b"\x00\x00\x00\x02",
    b"\x00\x00\x00\x02a",
    b"\xff",
    b"\xff\xff",
    b"\xff\xff\xff\xff\xff",
    b"z\xff\x00",
]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine.open(tmp_path / "db")
    yield e
    e.close()


def fill(engine: Engine, partition: int, items: dict[bytes, bytes]) -> None:
    b = engine.batch()
    for k, v in items.items():
        b.put(partition, k, v)
    engine.write(b)


# -- open / close ------------------------------------------------------------------------


def test_open_creates_directory_and_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "db"
    with Engine.open(path) as e:
        assert e.path == path.absolute()
        assert e.sync is False
        assert e.is_empty()
        assert e.partitions_with_data() == set()
    assert path.is_dir()


def test_is_empty_sees_every_column_family(tmp_path: Path) -> None:
    writes: list[Callable[[Batch], None]] = [
        lambda b: b.put(1, b"k", b"v"),
        lambda b: b.put_log(1, 1, b"e"),
        lambda b: b.put_meta(b"m", b"v"),
        lambda b: b.put_request(1, b"r", b"v"),
    ]
    for i, write in enumerate(writes):
        with Engine.open(tmp_path / str(i)) as e:
            b = e.batch()
            write(b)
            e.write(b)
            assert not e.is_empty()


def test_reopen_after_close_keeps_everything(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "db") as e:
        b = e.batch()
        b.put(1, b"k", b"v")
        b.put_log(1, 7, b"entry")
        b.put_meta(b"epoch", b"3")
        b.put_request(1, b"client/1", b"ok")
        e.write(b)
    with Engine.open(tmp_path / "db") as e:
        assert e.get(1, b"k") == b"v"
        assert e.log_entry(1, 7) == b"entry"
        assert e.get_meta(b"epoch") == b"3"
        assert e.get_request(1, b"client/1") == b"ok"
        assert not e.is_empty()


def test_close_is_idempotent_and_later_use_raises_engine_error(tmp_path: Path) -> None:
    e = Engine.open(tmp_path / "db")
    b = e.batch()
    b.put(1, b"k", b"v")
    e.close()
    e.close()
    with pytest.raises(EngineError, match="closed"):
        e.get(1, b"k")
    with pytest.raises(EngineError, match="closed"):
        list(e.scan(1))
    with pytest.raises(EngineError, match="closed"):
        e.write(b)
    # close() released the directory even though a batch made before it is still alive
    with Engine.open(tmp_path / "db") as again:
        assert again.is_empty()


def test_sync_true_writes_and_reads_back(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "db", sync=True) as e:
        assert e.sync is True
        b = e.batch()
        b.put(1, b"k", b"v")
        b.put_log(1, 1, b"e")
        e.write(b)
        assert e.get(1, b"k") == b"v"
    with Engine.open(tmp_path / "db") as e:
        assert e.log_entry(1, 1) == b"e"


def _hold_open(path: str, opened: Event, release: Event) -> None:
    engine = Engine.open(path)
    opened.set()
    release.wait(30)
    engine.close()


def test_directory_open_in_another_process_raises_engine_locked(tmp_path: Path) -> None:
    path = tmp_path / "db"
    ctx = multiprocessing.get_context("spawn")
    opened, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_open, args=(str(path), opened, release))
    holder.start()
    try:
        assert opened.wait(30), "the holder process did not open the engine"
        with pytest.raises(EngineLocked) as caught:
            Engine.open(path)
        assert str(path) in str(caught.value)
        assert "another process" in str(caught.value)
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0
    with Engine.open(path) as e:  # released once the holder closed it
        assert e.is_empty()


def test_directory_open_twice_in_one_process_raises_engine_locked(engine: Engine) -> None:
    with pytest.raises(EngineLocked, match="this process"):
        Engine.open(engine.path)


# -- data ---------------------------------------------------------------------------------


def test_put_get_delete_do_not_bleed_across_partitions(engine: Engine) -> None:
    for p in (0, 1, 2, MAX_PARTITION):
        fill(engine, p, {k: b"%d:" % p + k for k in TRICKY_KEYS})
    b = engine.batch()
    b.delete(1, b"ab")
    engine.write(b)
    assert engine.get(1, b"ab") is None
    assert engine.get(2, b"ab") == b"2:ab"
    assert engine.get(0, b"ab") == b"0:ab"
    assert engine.get(3, b"a") is None
    for p in (0, 2, MAX_PARTITION):
        assert list(engine.scan(p)) == [(k, b"%d:" % p + k) for k in sorted(TRICKY_KEYS)]
    expected_1 = [(k, b"1:" + k) for k in sorted(TRICKY_KEYS) if k != b"ab"]
    assert list(engine.scan(1)) == expected_1
    assert list(engine.scan(3)) == []


def test_empty_value_is_not_absent(engine: Engine) -> None:
    fill(engine, 1, {b"k": b""})
    assert engine.get(1, b"k") == b""
    assert engine.multi_get(1, [b"k", b"x"]) == [b"", None]


def test_multi_get_keeps_order_and_partition(engine: Engine) -> None:
    fill(engine, 1, {b"a": b"1a", b"\xff": b"1ff"})
    fill(engine, 2, {b"b": b"2b"})
    assert engine.multi_get(1, [b"\xff", b"b", b"a", b"a"]) == [b"1ff", None, b"1a", b"1a"]
    assert engine.multi_get(1, []) == []


def test_scan_range_and_limit(engine: Engine) -> None:
    fill(engine, 1, {k: k for k in TRICKY_KEYS})
    fill(engine, 2, {b"a": b"other"})
    ordered = sorted(TRICKY_KEYS)
    assert [k for k, _ in engine.scan(1, b"ab")] == [k for k in ordered if k >= b"ab"]
    assert [k for k, _ in engine.scan(1, b"ab", b"\xff")] == [
        k for k in ordered if b"ab" <= k < b"\xff"
    ]
    assert [k for k, _ in engine.scan(1, limit=3)] == ordered[:3]
    assert [k for k, _ in engine.scan(1, b"\xff", limit=100)] == [
        k for k in ordered if k >= b"\xff"
    ]
    assert list(engine.scan(1, b"b", b"a")) == []
    assert list(engine.scan(1, b"a", b"a")) == []


def test_scan_is_a_view_as_of_the_call(engine: Engine) -> None:
    fill(engine, 1, {b"a": b"1", b"b": b"2"})
    items = engine.scan(1)
    fill(engine, 1, {b"c": b"3"})
    assert [k for k, _ in items] == [b"a", b"b"]


def test_range_reads_stay_complete_while_memory_churns(engine: Engine) -> None:
    # Regression: rocksdict's raw-mode upper bound points into a Python bytes object;
    # when the engine let it die, every one of these scans stopped after one key.
    b = engine.batch()
    for i in range(50):
        b.put(1, b"k%03d" % i, b"v")
        b.put(2, b"k%03d" % i, b"v")
        b.put_log(1, i + 1, b"e")
        b.put_request(1, b"r%03d" % i, b"v")
        b.put_meta(b"m/%03d" % i, b"v")
    engine.write(b)
    for _ in range(300):
        scans = [
            engine.scan(1),
            engine.log_entries(1, 1),
            engine.requests(1),
            engine.meta_items(b"m/"),
        ]
        churn = [bytes([i % 256]) * 4 for i in range(200)]
        assert [len(list(s)) for s in scans] == [50, 50, 50, 50], len(churn)
        assert engine.digest(1)[1] == 50
        assert engine.first_log_index(1) == 1


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0, 1, 2, 255, 256]), st.binary(min_size=1, max_size=6)),
        max_size=40,
    )
)
def test_scan_matches_a_dict_model(writes: list[tuple[int, bytes]]) -> None:
    model: dict[int, dict[bytes, bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp, Engine.open(tmp) as e:
        b = e.batch()
        for p, k in writes:
            b.put(p, k, k + b"!")
            model.setdefault(p, {})[k] = k + b"!"
        e.write(b)
        for p in (0, 1, 2, 3, 255, 256):
            assert list(e.scan(p)) == sorted(model.get(p, {}).items())
        assert e.partitions_with_data() == set(model)


def test_digest_depends_on_contents_only(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "x") as x, Engine.open(tmp_path / "y") as y:
        fill(x, 1, {b"a": b"1", b"b": b"2"})
        fill(x, 2, {b"zzz": b"noise"})
        fill(y, 1, {b"b": b"2"})
        fill(y, 1, {b"a": b"1"})
        assert x.digest(1) == y.digest(1)
        assert x.digest(1)[1] == 2
        # the documented encoding, so another implementation could check it
        h = hashlib.sha256()
        for k, v in ((b"a", b"1"), (b"b", b"2")):
            h.update(struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v)
        assert x.digest(1) == (h.digest(), 2)
        fill(y, 1, {b"b": b"3"})
        assert x.digest(1) != y.digest(1)
        # the same bytes split differently between key and value must differ
        fill(x, 3, {b"ab": b"c"})
        fill(y, 3, {b"a": b"bc"})
        assert x.digest(3) != y.digest(3)
        assert x.digest(4) == (hashlib.sha256().digest(), 0)


# -- batches ------------------------------------------------------------------------------


def test_batch_is_invisible_until_written_then_all_visible(engine: Engine) -> None:
    b = engine.batch()
    assert len(b) == 0
    b.put(1, b"k", b"v1")
    b.put(2, b"k", b"v2")
    b.put_log(1, 5, b"entry")
    b.put_meta(b"applied/1", b"5")
    b.put_request(1, b"c/1", b"ok")
    assert len(b) == 5
    assert engine.get(1, b"k") is None
    assert engine.get(2, b"k") is None
    assert engine.log_entry(1, 5) is None
    assert engine.get_meta(b"applied/1") is None
    assert engine.get_request(1, b"c/1") is None
    assert engine.is_empty()
    engine.write(b)
    assert engine.get(1, b"k") == b"v1"
    assert engine.get(2, b"k") == b"v2"
    assert engine.log_entry(1, 5) == b"entry"
    assert engine.get_meta(b"applied/1") == b"5"
    assert engine.get_request(1, b"c/1") == b"ok"


def test_batch_applies_in_order(engine: Engine) -> None:
    fill(engine, 1, {b"old": b"x"})
    b = engine.batch()
    b.delete_partition(1)
    b.put(1, b"new", b"y")
    engine.write(b)
    assert list(engine.scan(1)) == [(b"new", b"y")]


def test_empty_batch_is_a_no_op_and_foreign_batch_is_refused(
    engine: Engine, tmp_path: Path
) -> None:
    engine.write(engine.batch())
    assert engine.is_empty()
    with Engine.open(tmp_path / "other") as other:
        b = other.batch()
        b.put(1, b"k", b"v")
        with pytest.raises(EngineError, match="another Engine"):
            engine.write(b)


def test_partition_ids_out_of_range_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError):
        list(engine.scan(MAX_PARTITION + 1))
    with pytest.raises(ValueError):
        engine.batch().delete_partition(-1)


# -- log ----------------------------------------------------------------------------------


def test_log_entries_and_bounds(engine: Engine) -> None:
    assert engine.first_log_index(1) == 0
    assert engine.last_log_index(1) == 0
    b = engine.batch()
    for i in range(3, 11):
        b.put_log(1, i, b"e%d" % i)
    b.put_log(0, 100, b"before")
    b.put_log(2, 1, b"after")
    engine.write(b)
    assert (engine.first_log_index(1), engine.last_log_index(1)) == (3, 10)
    assert (engine.first_log_index(0), engine.last_log_index(0)) == (100, 100)
    assert (engine.first_log_index(2), engine.last_log_index(2)) == (1, 1)
    assert (engine.first_log_index(5), engine.last_log_index(5)) == (0, 0)
    assert engine.log_entry(1, 4) == b"e4"
    assert engine.log_entry(1, 2) is None
    assert [i for i, _ in engine.log_entries(1, 0)] == list(range(3, 11))
    assert list(engine.log_entries(1, 5, 8)) == [(5, b"e5"), (6, b"e6"), (7, b"e7")]
    assert [i for i, _ in engine.log_entries(1, 9, 2**64)] == [9, 10]
    assert list(engine.log_entries(1, 8, 8)) == []
    assert list(engine.log_entries(1, 11)) == []


def test_log_entries_max_count_and_max_bytes(engine: Engine) -> None:
    b = engine.batch()
    for i in range(1, 6):
        b.put_log(1, i, b"x" * 10)
    b.put_log(1, 6, b"y" * 100)
    engine.write(b)
    assert [i for i, _ in engine.log_entries(1, 1, max_count=2)] == [1, 2]
    assert [i for i, _ in engine.log_entries(1, 1, max_bytes=30)] == [1, 2, 3]
    assert [i for i, _ in engine.log_entries(1, 1, max_bytes=29)] == [1, 2]
    assert [i for i, _ in engine.log_entries(1, 1, max_bytes=1)] == [1]  # at least one
    assert [i for i, _ in engine.log_entries(1, 6, max_bytes=1)] == [6]
    assert [i for i, _ in engine.log_entries(1, 1, max_count=4, max_bytes=25)] == [1, 2]
    assert [i for i, _ in engine.log_entries(1, 1, max_count=0, max_bytes=0)] == [1, 2, 3, 4, 5, 6]


def test_delete_log_range(engine: Engine) -> None:
    b = engine.batch()
    for p in (1, 2):
        for i in range(1, 11):
            b.put_log(p, i, b"e")
    engine.write(b)
    b = engine.batch()
    b.delete_log_range(1, 1, 4)  # compaction of the prefix
    b.delete_log_range(1, 9, 2**64)  # truncation of a conflicting suffix
    b.delete_log_range(1, 6, 6)  # empty: nothing
    engine.write(b)
    assert [i for i, _ in engine.log_entries(1, 0)] == [4, 5, 6, 7, 8]
    assert (engine.first_log_index(1), engine.last_log_index(1)) == (4, 8)
    assert [i for i, _ in engine.log_entries(2, 0)] == list(range(1, 11))
    b = engine.batch()
    b.delete_log_range(1, 0, 2**64)
    engine.write(b)
    assert (engine.first_log_index(1), engine.last_log_index(1)) == (0, 0)
    assert (engine.first_log_index(2), engine.last_log_index(2)) == (1, 10)


# -- meta and requests --------------------------------------------------------------------


def test_meta_items_by_prefix(engine: Engine) -> None:
    keys = [b"epoch/1", b"epoch/2", b"epoch0", b"epocg", b"incarnation", b"\xff", b"\xff\xff"]
    b = engine.batch()
    for k in keys:
        b.put_meta(k, b"v:" + k)
    engine.write(b)
    assert [k for k, _ in engine.meta_items(b"epoch/")] == [b"epoch/1", b"epoch/2"]
    assert [k for k, _ in engine.meta_items(b"epoch")] == [b"epoch/1", b"epoch/2", b"epoch0"]
    assert [k for k, _ in engine.meta_items(b"\xff")] == [b"\xff", b"\xff\xff"]
    assert [k for k, _ in engine.meta_items(b"")] == sorted(keys)
    assert list(engine.meta_items(b"nope")) == []
    assert engine.get_meta(b"incarnation") == b"v:incarnation"
    b = engine.batch()
    b.delete_meta(b"epoch/1")
    engine.write(b)
    assert engine.get_meta(b"epoch/1") is None
    assert dict(engine.meta_items(b"epoch/")) == {b"epoch/2": b"v:epoch/2"}


def test_requests_per_partition(engine: Engine) -> None:
    b = engine.batch()
    for p in (1, 2):
        for k in TRICKY_KEYS:
            b.put_request(p, k, b"%d" % p)
    engine.write(b)
    assert list(engine.requests(1)) == [(k, b"1") for k in sorted(TRICKY_KEYS)]
    b = engine.batch()
    b.delete_request(1, b"a")
    engine.write(b)
    assert engine.get_request(1, b"a") is None
    assert engine.get_request(2, b"a") == b"2"
    assert len(list(engine.requests(2))) == len(TRICKY_KEYS)
    assert list(engine.requests(3)) == []


# -- partitions ---------------------------------------------------------------------------


def test_delete_partition_removes_only_that_partition(engine: Engine) -> None:
    b = engine.batch()
    for p in (1, 2, 3):
        for k in TRICKY_KEYS:
            b.put(p, k, b"v")
            b.put_request(p, k, b"r")
        b.put_log(p, 1, b"e")
        b.put_log(p, 2**64 - 1, b"last")
    b.put_meta(b"\x00\x00\x00\x02", b"meta is not partitioned")
    engine.write(b)
    assert engine.last_log_index(2) == 2**64 - 1
    b = engine.batch()
    b.delete_partition(2)
    assert len(b) == 1
    engine.write(b)
    assert list(engine.scan(2)) == []
    assert list(engine.log_entries(2, 0)) == []
    assert list(engine.requests(2)) == []
    assert engine.first_log_index(2) == engine.last_log_index(2) == 0
    assert engine.digest(2) == (hashlib.sha256().digest(), 0)
    for p in (1, 3):
        assert len(list(engine.scan(p))) == len(TRICKY_KEYS)
        assert len(list(engine.requests(p))) == len(TRICKY_KEYS)
        assert [i for i, _ in engine.log_entries(p, 0)] == [1, 2**64 - 1]
    assert engine.get_meta(b"\x00\x00\x00\x02") == b"meta is not partitioned"
    assert engine.partitions_with_data() == {1, 3}


def test_partitions_with_data(engine: Engine) -> None:
    b = engine.batch()
    b.put(5, b"k", b"v")
    b.put(5, b"\xff" * 8, b"v")
    b.put_log(7, 1, b"e")
    b.put_request(9, b"r", b"v")
    b.put(MAX_PARTITION, b"k", b"v")
    b.put_meta(b"\x00\x00\x00\x01", b"meta does not count")
    engine.write(b)
    assert engine.partitions_with_data() == {5, 7, 9, MAX_PARTITION}
    b = engine.batch()
    b.delete(5, b"k")
    b.delete(5, b"\xff" * 8)
    engine.write(b)
    assert engine.partitions_with_data() == {7, 9, MAX_PARTITION}


# -- rates (printed with -s, never asserted) ----------------------------------------------


def test_put_rates_for_the_record(tmp_path: Path) -> None:
    value = b"v" * 100
    with Engine.open(tmp_path / "db") as e:
        n = 20_000
        t0 = time.perf_counter()
        for i in range(n):
            b = e.batch()
            b.put(i % 16, b"key-%08d" % i, value)
            e.write(b)
        single = n / (time.perf_counter() - t0)
        batches = 500
        t0 = time.perf_counter()
        for j in range(batches):
            b = e.batch()
            for i in range(100):
                b.put(i % 16, b"bkey-%06d-%03d" % (j, i), value)
            e.write(b)
        batched = batches * 100 / (time.perf_counter() - t0)
    with Engine.open(tmp_path / "sync", sync=True) as e:
        n_sync = 200
        t0 = time.perf_counter()
        for i in range(n_sync):
            b = e.batch()
            b.put(1, b"key-%08d" % i, value)
            e.write(b)
        single_sync = n_sync / (time.perf_counter() - t0)
    print(
        f"\nengine put rates (100-byte values): single put {single:,.0f}/s, "
        f"100-item batch {batched:,.0f} puts/s ({batched / 100:,.0f} batches/s), "
        f"single put sync=True {single_sync:,.0f}/s"
    )
