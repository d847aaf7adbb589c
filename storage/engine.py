"""The storage engine: one RocksDB per node, and the only module that imports rocksdict.

Role: keep a node's partitions (their key spaces, replicated logs, request-id tables) and
its own metadata (promised epochs, incarnation, ...) in one RocksDB directory, and write
any mix of them atomically. It knows nothing of epochs, quorums or protobuf: callers
decide what to store; this module makes it durable and finds it again.

Invariants:

- Atomic batches. Everything written goes through `Engine.write(batch)`: one RocksDB
  WriteBatch across all column families, applied all or nothing (also across a crash:
  the WAL is always on, recovery is point-in-time). A replication round — many
  partitions' log entries, applied writes, request-id results and the applied index —
  is one batch.
- Key layout, four column families besides `default` (which stays empty):
    data      partition(4, big-endian) + user key          -> value
    log       partition(4, big-endian) + index(8, big-endian) -> entry
    requests  partition(4, big-endian) + request key        -> result
    meta      caller-chosen opaque key                      -> value
  Big-endian fixed-width prefixes make bytewise order the (partition, key) and
  (partition, index) order, so a partition is one contiguous key range: scans stop at
  the next partition's prefix and `delete_partition` is three range deletes. Partition
  ids are 0 .. 2**32 - 2 (the last id is reserved so that every partition has a
  successor prefix); log indexes are 0 .. 2**64 - 1.
- Sync semantics. `sync=False` (the default): `write` returns once the batch is in the
  WAL in the OS page cache, which survives a process kill but not a power loss.
  `sync=True`: every `write` fsyncs the WAL before returning, which survives power loss.
  An acknowledged write must have returned from `write` on a majority (DESIGN §6).
- Readers see the latest written state. An iterator returned by `scan`, `log_entries`,
  `meta_items` or `requests` reads a consistent view as of the call, is lazy, and holds
  the RocksDB files open until it is exhausted or dropped.
- Raw bytes in, raw bytes out: no pickling, no per-call options objects on the point
  paths (`get`, `multi_get`, `write`, the `Batch` methods); range reads allocate one
  ReadOptions for their upper bound.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NoReturn, cast

from rocksdict import (
    BlockBasedOptions,
    Cache,
    ColumnFamily,
    DBCompressionType,
    Options,
    Rdict,
    RdictIter,
    ReadOptions,
    WriteBatch,
    WriteBufferManager,
    WriteOptions,
)

logger = logging.getLogger(__name__)

MAX_PARTITION = 2**32 - 2
MAX_LOG_INDEX = 2**64 - 1

_PART = struct.Struct(">I")  # partition prefix; also the length prefix in digests
_LOG = struct.Struct(">IQ")  # partition + log index
_INDEX = struct.Struct(">Q")
_LOG_KEY_MAX_SUFFIX = b"\xff" * 8

_DATA, _LOG_CF, _META, _REQUESTS = "data", "log", "meta", "requests"
_COLUMN_FAMILIES = (_DATA, _LOG_CF, _META, _REQUESTS)

# A small store on a laptop: one block cache shared by every column family, with the
# memtables charged to it, so RocksDB's resident memory stays near _CACHE_BYTES.
_CACHE_BYTES = 64 * 1024 * 1024
_MEMTABLE_BYTES = 32 * 1024 * 1024  # all memtables of all column families together
_WRITE_BUFFER_BYTES = 16 * 1024 * 1024  # one memtable
_MAX_WAL_BYTES = 64 * 1024 * 1024  # then flush the column families that pin old WALs
_MAX_OPEN_FILES = 512


class EngineError(Exception):
    """RocksDB refused or failed an operation (I/O error, corruption, use after close)."""


class EngineLocked(EngineError):
    """Another process (or another open Engine in this one) holds the directory's LOCK."""


class Engine:
    """One open RocksDB directory. Not thread-safe to close while in use; reads and
    writes themselves may come from any thread (RocksDB is internally synchronized)."""

    path: Path
    sync: bool

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, sync: bool = False) -> Engine:
        """Open (creating the directory and column families if missing) a node's store.

        `sync=True` makes every `write` fsync the WAL before it returns. Raises
        `EngineLocked` if the directory is already open, `EngineError` on any other failure.
        """
        where = Path(path).absolute()
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EngineError(f"cannot create the store directory {where}: {e}") from e
        options = _options()
        try:
            db = Rdict(
                str(where), options, column_families={name: options for name in _COLUMN_FAMILIES}
            )
        except Exception as e:
            message = str(e)
            if "lock hold by current process" in message:
                raise EngineLocked(
                    f"{where} is already open in this process (an Engine, or an iterator "
                    f"over it, was not closed): {message}"
                ) from e
            if "While lock file" in message:  # fcntl on LOCK failed: another process has it
                raise EngineLocked(
                    f"{where} is locked by another process (is a storage node already running "
                    f"on it?): {message}"
                ) from e
            raise EngineError(f"cannot open the store at {where}: {message}") from e
        engine = cls(where, db, sync)
        logger.info("engine opened path=%s sync=%s", where, sync)
        return engine

    def __init__(self, path: Path, db: Rdict, sync: bool) -> None:
        """Use `Engine.open`."""
        self.path = path
        self.sync = sync
        self._db = db
        self._data = db.get_column_family(_DATA)
        self._log = db.get_column_family(_LOG_CF)
        self._meta = db.get_column_family(_META)
        self._requests = db.get_column_family(_REQUESTS)
        # Handles for WriteBatch; Batch reads them through the engine so that close()
        # can drop every reference to the DB (a live handle keeps the LOCK held).
        self._h_data: ColumnFamily | None = db.get_column_family_handle(_DATA)
        self._h_log: ColumnFamily | None = db.get_column_family_handle(_LOG_CF)
        self._h_meta: ColumnFamily | None = db.get_column_family_handle(_META)
        self._h_requests: ColumnFamily | None = db.get_column_family_handle(_REQUESTS)
        self._write_options = WriteOptions()
        self._write_options.sync = sync
        self._closed = False

    def close(self) -> None:
        """Flush the WAL and memtables and release the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        views = (self._data, self._log, self._meta, self._requests, self._db)
        # Every later call fails with EngineError instead of a rocksdict error, at no
        # cost to the open path: the attributes simply stop being databases.
        gone = cast(Rdict, _Closed(self.path))
        self._data = self._log = self._meta = self._requests = self._db = gone
        self._h_data = self._h_log = self._h_meta = self._h_requests = None
        errors: list[str] = []
        for view in views:  # each close flushes its column family; the DB goes last
            try:
                view.close()
            except Exception as e:
                errors.append(str(e))
        if errors:
            raise EngineError(f"closing {self.path}: {'; '.join(errors)}")
        logger.info("engine closed path=%s", self.path)

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def is_empty(self) -> bool:
        """True if no column family holds any key: a fresh (or wiped) directory."""
        for view in (self._db, self._data, self._log, self._meta, self._requests):
            it = view.iter()
            it.seek_to_first()
            if it.valid():
                return False
            _check(it, self.path)
        return True

    # -- writing ------------------------------------------------------------------------

    def batch(self) -> Batch:
        return Batch(self)

    def write(self, batch: Batch) -> None:
        """Apply `batch` atomically across column families (fsynced first if `sync`)."""
        if batch._engine is not self:
            raise EngineError("the batch was made by another Engine")
        if not batch._count:
            return
        try:
            self._db.write(batch._wb, self._write_options)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(
                f"write of {batch._count} operations to {self.path} failed: {e}"
            ) from e

    # -- data ---------------------------------------------------------------------------

    def get(self, partition: int, key: bytes) -> bytes | None:
        value: bytes | None = self._data.get(_PART.pack(partition) + key)
        return value

    def multi_get(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in the order of `keys` (None where absent); one RocksDB MultiGet."""
        if not keys:
            return []
        prefix = _PART.pack(partition)
        return cast("list[bytes | None]", self._data.get([prefix + key for key in keys]))

    def scan(
        self, partition: int, start: bytes = b"", end: bytes | None = None, limit: int = 0
    ) -> Iterator[tuple[bytes, bytes]]:
        """(user key, value) in key order for keys in [start, end) of the partition;
        at most `limit` pairs (0 = all)."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        prefix, upper = _partition_bounds(partition)
        if end is not None:
            upper = prefix + end
        return _pairs(_range(self._data, prefix + start, upper), 4, limit, self.path)

    def digest(self, partition: int) -> tuple[bytes, int]:
        """sha256 over the partition's data in key order, each pair hashed as
        len(key) (4 bytes, big-endian), key, len(value) (4 bytes, big-endian), value;
        and the number of keys. Equal contents give equal digests on every replica."""
        prefix, upper = _partition_bounds(partition)
        it, _bound = _range(self._data, prefix, upper)  # _bound: see _range
        h = hashlib.sha256()
        count = 0
        pack = _PART.pack
        while it.valid():
            key: bytes = it.key()[4:]
            value: bytes = it.value()
            h.update(pack(len(key)))
            h.update(key)
            h.update(pack(len(value)))
            h.update(value)
            count += 1
            it.next()
        _check(it, self.path)
        return h.digest(), count

    # -- log ----------------------------------------------------------------------------

    def log_entry(self, partition: int, index: int) -> bytes | None:
        entry: bytes | None = self._log.get(_LOG.pack(partition, index))
        return entry

    def log_entries(
        self,
        partition: int,
        start: int,
        end: int | None = None,
        *,
        max_count: int = 0,
        max_bytes: int = 0,
    ) -> Iterator[tuple[int, bytes]]:
        """(index, entry) ascending for indexes in [start, end) (end None = to the last).

        Stops after `max_count` entries, and before an entry that would take the total
        entry bytes over `max_bytes` (0 = no limit for either). The first entry in range
        is always yielded, however large, so a caller always makes progress.
        """
        if max_count < 0 or max_bytes < 0:
            raise ValueError(f"max_count and max_bytes must be >= 0: {max_count}, {max_bytes}")
        upper = _partition_bounds(partition)[1]
        if end is not None and end <= MAX_LOG_INDEX:
            upper = _LOG.pack(partition, max(end, 0))
        cursor = _range(self._log, _LOG.pack(partition, max(start, 0)), upper)
        return _log_pairs(cursor, max_count, max_bytes, self.path)

    def first_log_index(self, partition: int) -> int:
        """The lowest index in the partition's log, 0 if the log is empty."""
        prefix, upper = _partition_bounds(partition)
        it, _bound = _range(self._log, prefix, upper)  # _bound: see _range
        if it.valid():
            key: bytes = it.key()
            return int(_INDEX.unpack_from(key, 4)[0])
        _check(it, self.path)
        return 0

    def last_log_index(self, partition: int) -> int:
        """The highest index in the partition's log, 0 if the log is empty."""
        prefix = _PART.pack(partition)
        it = self._log.iter()
        it.seek_for_prev(prefix + _LOG_KEY_MAX_SUFFIX)
        if it.valid():
            key: bytes = it.key()
            if key.startswith(prefix):
                return int(_INDEX.unpack_from(key, 4)[0])
        _check(it, self.path)
        return 0

    # -- meta ---------------------------------------------------------------------------

    def get_meta(self, key: bytes) -> bytes | None:
        value: bytes | None = self._meta.get(key)
        return value

    def meta_items(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) in key order for meta keys starting with `prefix` (b"" = all)."""
        return _pairs(_range(self._meta, prefix, _successor(prefix)), 0, 0, self.path)

    # -- request-id table ---------------------------------------------------------------

    def get_request(self, partition: int, rkey: bytes) -> bytes | None:
        value: bytes | None = self._requests.get(_PART.pack(partition) + rkey)
        return value

    def requests(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        """(request key, result) in key order for the partition."""
        prefix, upper = _partition_bounds(partition)
        return _pairs(_range(self._requests, prefix, upper), 4, 0, self.path)

    # -- partitions ---------------------------------------------------------------------

    def partitions_with_data(self) -> set[int]:
        """Partitions with any key in data, log or requests: one seek per partition found."""
        found: set[int] = set()
        for view in (self._data, self._log, self._requests):
            it = view.iter()
            it.seek_to_first()
            while it.valid():
                key: bytes = it.key()
                partition: int = _PART.unpack_from(key)[0]
                found.add(partition)
                if partition > MAX_PARTITION:  # no successor prefix to seek to
                    break
                it.seek(_PART.pack(partition + 1))
            _check(it, self.path)
        return found


class Batch:
    """Operations to apply atomically with `Engine.write`; built by `Engine.batch()`.

    Building a batch does no I/O. Operations apply in the order added (a put after a
    delete_partition survives). `len()` counts the calls made on it.
    """

    __slots__ = ("_count", "_engine", "_wb")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._wb = WriteBatch(raw_mode=True)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, partition: int, key: bytes, value: bytes) -> None:
        self._wb.put(_PART.pack(partition) + key, value, self._engine._h_data)
        self._count += 1

    def delete(self, partition: int, key: bytes) -> None:
        self._wb.delete(_PART.pack(partition) + key, self._engine._h_data)
        self._count += 1

    def put_log(self, partition: int, index: int, entry: bytes) -> None:
        self._wb.put(_LOG.pack(partition, index), entry, self._engine._h_log)
        self._count += 1

    def delete_log_range(self, partition: int, start: int, end: int) -> None:
        """Delete log indexes [start, end) with one range tombstone; end may be 2**64."""
        if start >= end:
            return
        lower = _LOG.pack(partition, max(start, 0))
        upper = (
            _LOG.pack(partition, end) if end <= MAX_LOG_INDEX else _partition_bounds(partition)[1]
        )
        self._wb.delete_range(lower, upper, self._engine._h_log)
        self._count += 1

    def put_meta(self, key: bytes, value: bytes) -> None:
        self._wb.put(key, value, self._engine._h_meta)
        self._count += 1

    def delete_meta(self, key: bytes) -> None:
        self._wb.delete(key, self._engine._h_meta)
        self._count += 1

    def put_request(self, partition: int, rkey: bytes, value: bytes) -> None:
        self._wb.put(_PART.pack(partition) + rkey, value, self._engine._h_requests)
        self._count += 1

    def delete_request(self, partition: int, rkey: bytes) -> None:
        self._wb.delete(_PART.pack(partition) + rkey, self._engine._h_requests)
        self._count += 1

    def delete_partition(self, partition: int) -> None:
        """Delete the partition's data, log and requests (three range tombstones)."""
        lower, upper = _partition_bounds(partition)
        engine = self._engine
        for handle in (engine._h_data, engine._h_log, engine._h_requests):
            self._wb.delete_range(lower, upper, handle)
        self._count += 1


# -- internals ----------------------------------------------------------------------------


def _options() -> Options:
    """DB and column-family options (one object serves both: every CF gets the same)."""
    cache = Cache(_CACHE_BYTES)
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_bloom_filter(10, False)  # point reads: get, multi_get, log_entry, requests
    table.set_cache_index_and_filter_blocks(True)  # bounded by the cache, not by file count
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    options.set_block_based_table_factory(table)
    options.set_write_buffer_manager(
        WriteBufferManager.new_write_buffer_manager_with_cache(_MEMTABLE_BYTES, False, cache)
    )
    options.set_write_buffer_size(_WRITE_BUFFER_BYTES)
    options.set_max_total_wal_size(_MAX_WAL_BYTES)
    options.set_compression_type(DBCompressionType.lz4())
    options.increase_parallelism(2)
    options.set_max_background_jobs(2)
    options.set_max_open_files(_MAX_OPEN_FILES)
    options.set_bytes_per_sync(1024 * 1024)
    options.set_keep_log_file_num(3)
    options.set_max_log_file_size(4 * 1024 * 1024)
    return options


def _partition_bounds(partition: int) -> tuple[bytes, bytes]:
    """The partition's key prefix and the next partition's (its exclusive upper bound)."""
    if not 0 <= partition <= MAX_PARTITION:
        raise ValueError(f"partition id {partition} is outside 0..{MAX_PARTITION}")
    return _PART.pack(partition), _PART.pack(partition + 1)


def _successor(prefix: bytes) -> bytes | None:
    """The least key above every key that starts with `prefix`; None if there is none."""
    stem = prefix.rstrip(b"\xff")
    if not stem:
        return None
    return stem[:-1] + bytes((stem[-1] + 1,))


def _range(view: Rdict, lower: bytes, upper: bytes | None) -> tuple[RdictIter, ReadOptions]:
    """An iterator positioned at `lower` that ends before `upper`, and the ReadOptions
    that the caller must keep referenced for as long as it uses the iterator.

    Two rocksdict 0.3.29 defects shape this. In raw mode RocksDB's upper bound points
    into the bytes object held by the Python ReadOptions (not a copy): drop that object
    and the iterator reads freed memory (seen as scans that stop early). And
    `set_iterate_lower_bound` sets the upper bound, so the lower bound is a seek.
    """
    read_options = ReadOptions()
    if upper is not None:
        read_options.set_iterate_upper_bound(upper)
    it = view.iter(read_options)
    it.seek(lower)
    return it, read_options


def _pairs(
    cursor: tuple[RdictIter, ReadOptions], strip: int, limit: int, path: Path
) -> Iterator[tuple[bytes, bytes]]:
    it, _bound = cursor  # _bound keeps the upper bound alive (see _range)
    count = 0
    while it.valid():
        key: bytes = it.key()
        value: bytes = it.value()
        yield key[strip:], value
        count += 1
        if count == limit:
            return
        it.next()
    _check(it, path)


def _log_pairs(
    cursor: tuple[RdictIter, ReadOptions], max_count: int, max_bytes: int, path: Path
) -> Iterator[tuple[int, bytes]]:
    it, _bound = cursor  # _bound keeps the upper bound alive (see _range)
    count = 0
    size = 0
    unpack = _INDEX.unpack_from
    while it.valid():
        entry: bytes = it.value()
        size += len(entry)
        if max_bytes and size > max_bytes and count:
            return
        key: bytes = it.key()
        yield unpack(key, 4)[0], entry
        count += 1
        if count == max_count:
            return
        it.next()
    _check(it, path)


def _check(it: RdictIter, path: Path) -> None:
    """An iterator that stopped being valid may have hit an error rather than the end."""
    try:
        it.status()
    except Exception as e:
        raise EngineError(f"reading {path} failed: {e}") from e


class _Closed:
    """Stands in for the databases of a closed Engine: any use raises EngineError."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __getattr__(self, name: str) -> NoReturn:
        raise EngineError(f"the engine at {self._path} is closed")
