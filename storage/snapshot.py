"""Log retention and partition snapshots (DESIGN §6, catch-up).

Role: decide how much of a partition's log to keep, and move a whole partition from a
leader to a follower that is behind the retained log. The replication shell drives both
(`storage/apply.py` compacts, `storage/catchup.py` streams); this module holds the
decisions (pure functions and classes), and the two ends of a snapshot as engine
readers/writers. It knows nothing of protobuf or gRPC.

A snapshot stream is: one `SnapshotHeader`, then chunks of data items (key, stored value
record byte for byte) followed by chunks of request-table items (key, stored result),
then one `SnapshotTrailer` with both counts and a sha256 over the header's position and
every item in stream order (`SnapshotDigest`).

Invariants:
- Retention never deletes an entry above the applied index: `retention_cut` stops at
  the ceiling it is given (the applied index, lowered while a snapshot taken at an older
  position is still being sent). The retained log is exactly (base, last]; compaction
  moves base to the last deleted entry in the same engine batch as the deletion.
- A snapshot's view and its position agree: `SnapshotSource` opens the data and
  request-table iterators (each a consistent view as of its creation) in its
  constructor, which the caller runs with no `await` between reading the applied
  position and constructing it, so no write can fall between them.
- Installation is all or nothing: `SnapshotInstall` stages the partition's deletion,
  every item and the new meta in ONE engine batch, and writes it only after the trailer
  arrived and its counts and digest match what was received. Any refusal (stale epoch,
  items out of order, a missing trailer, a count or digest mismatch) raises
  `SnapshotRejected` and leaves the engine untouched.

Memory: the sender holds one chunk at a time (at most `CHUNK_BYTES`, or one item over
it). The receiver holds the whole partition in one RocksDB WriteBatch until it commits;
a partition is at most a few hundred MB here, so that is accepted in exchange for an
atomic install. (A streaming install would need a staging area and a switch-over.)
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from storage.engine import Engine
from storage.keyspace import ReplicaMeta, encode_meta, meta_key

# A chunk's payload stays near 1 MiB, well under limits.MAX_MESSAGE_BYTES (one item,
# a 1 MiB value plus a 4 KiB key, always fits alone). The item cap bounds the time the
# sender spends building one message between yields to the event loop.
CHUNK_BYTES = 1024 * 1024
CHUNK_ITEMS = 4096
ITEM_OVERHEAD_BYTES = 8  # protobuf framing of one (key, value) item, roughly

DEFAULT_RETAIN_ENTRIES = 50_000
DEFAULT_RETAIN_BYTES = 64 * 1024 * 1024
RETENTION_SLACK = 0.1  # compact once the log is this much over a limit, back to the limit

_LEN = struct.Struct(">I")
_POSITION = struct.Struct(">IQQ")

Item = tuple[bytes, bytes]


class SnapshotRejected(Exception):
    """A snapshot (or a stream of one) is refused; the message says why. Nothing was written."""


class Section(enum.Enum):
    """Which table an item belongs to; the value is its tag in the digest."""

    DATA = b"d"
    REQUESTS = b"r"


@dataclass(frozen=True)
class SnapshotHeader:
    partition: int
    epoch: int  # the sending leader's epoch
    base_epoch: int  # the log position the snapshot represents
    base_index: int
    leader_id: str


@dataclass(frozen=True)
class SnapshotTrailer:
    data_items: int
    request_items: int
    digest: bytes


# -- retention ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """How much of a partition's log to keep: at most `entries` entries and about `bytes`
    bytes of entries. Compaction is batched: it runs once the log is over a limit by
    `slack` of that limit and cuts back to the limit, so it is not work per apply."""

    entries: int = DEFAULT_RETAIN_ENTRIES
    bytes: int = DEFAULT_RETAIN_BYTES
    slack: float = RETENTION_SLACK

    def __post_init__(self) -> None:
        if self.entries < 1 or self.bytes < 1:
            raise ValueError(f"retention limits must be >= 1: entries={self.entries} "
                             f"bytes={self.bytes}")

    def over(self, count: int, size: int) -> bool:
        """A log of `count` entries and `size` bytes is due for compaction."""
        return (count > self.entries + int(self.entries * self.slack)
                or size > self.bytes + int(self.bytes * self.slack))


def retention_cut(
    retention: Retention,
    *,
    base: int,
    last: int,
    ceiling: int,
    log_bytes: int,
    sizes: Iterable[tuple[int, int]],
) -> tuple[int, int]:
    """How far to compact a log holding (base, last] of `log_bytes` bytes.

    `sizes` yields (index, entry bytes) ascending from base + 1; it is read only as far
    as needed. Returns (cut, bytes removed): entries (base, cut] go, the new base is cut
    (cut == base: nothing to do). Never cuts above `ceiling` (the applied index), so
    unapplied entries are never deleted, even if the log stays over its limits.
    """
    need_index = last - retention.entries  # the cut must reach at least this far
    cut, removed = base, 0
    for index, size in sizes:
        if index > ceiling:
            break
        if index > need_index and log_bytes - removed <= retention.bytes:
            break
        cut, removed = index, removed + size
    return cut, removed


# -- the stream -------------------------------------------------------------------------------


class SnapshotDigest:
    """sha256 over the header's (partition, base_epoch, base_index) and then every item
    in stream order, each as tag, len(key) (4 bytes), key, len(value) (4 bytes), value;
    with the item counts. Sender and receiver compute it the same way."""

    def __init__(self, header: SnapshotHeader) -> None:
        self._hash = hashlib.sha256(
            _POSITION.pack(header.partition, header.base_epoch, header.base_index))
        self.data_items = 0
        self.request_items = 0

    def update(self, section: Section, items: Iterable[Item]) -> None:
        tag, pack = section.value, _LEN.pack
        parts: list[bytes] = []
        for key, value in items:
            parts += (tag, pack(len(key)), key, pack(len(value)), value)
        self._hash.update(b"".join(parts))
        count = len(parts) // 5
        if section is Section.DATA:
            self.data_items += count
        else:
            self.request_items += count

    def trailer(self) -> SnapshotTrailer:
        return SnapshotTrailer(self.data_items, self.request_items, self._hash.digest())


def chunk_items(items: Iterable[Item], max_bytes: int = CHUNK_BYTES,
                max_items: int = CHUNK_ITEMS) -> Iterator[list[Item]]:
    """Group items into chunks of at most `max_items` items and about `max_bytes` bytes;
    an item larger than `max_bytes` travels alone. No empty chunk is yielded."""
    chunk: list[Item] = []
    size = 0
    for key, value in items:
        item_size = len(key) + len(value) + ITEM_OVERHEAD_BYTES
        if chunk and (size + item_size > max_bytes or len(chunk) >= max_items):
            yield chunk
            chunk, size = [], 0
        chunk.append((key, value))
        size += item_size
    if chunk:
        yield chunk


def verify_trailer(received: SnapshotTrailer, sent: SnapshotTrailer) -> str:
    """Why the received items do not match the sender's trailer ("" if they do)."""
    if received.data_items != sent.data_items:
        return (f"data item count mismatch: received {received.data_items}, "
                f"the trailer says {sent.data_items}")
    if received.request_items != sent.request_items:
        return (f"request item count mismatch: received {received.request_items}, "
                f"the trailer says {sent.request_items}")
    if received.digest != sent.digest:
        return "digest mismatch: the items received are not the items sent"
    return ""


def decide_install(header: SnapshotHeader, *, promised_epoch: int, commit_index: int,
                   leading_epoch: int | None) -> str:
    """Why a replica refuses to install `header`'s snapshot ("" if it may).

    Fenced like an Append: a leader of an epoch below the promise is refused. A replica
    whose commit index has reached the snapshot's position already holds all of it (a
    committed prefix is the same everywhere), and installing would throw away log
    entries it may have acknowledged, so it is refused too.
    """
    if header.epoch < promised_epoch:
        return f"stale epoch {header.epoch} < promised {promised_epoch}"
    if leading_epoch is not None and leading_epoch >= header.epoch:
        return f"this replica leads epoch {leading_epoch}: refusing a snapshot of epoch " \
               f"{header.epoch}"
    if header.base_index <= commit_index:
        return f"already committed through {commit_index} >= snapshot index {header.base_index}"
    return ""


# -- the two ends -------------------------------------------------------------------------------


class SnapshotSource:
    """The sending end: one partition's data and request table as of construction.

    Construct it with no `await` between reading the applied position (the header) and
    the constructor, so the view is exactly the state at that position. `chunks()` reads
    lazily (one chunk in memory at a time); `trailer()` is valid once it is exhausted.
    Call `close()` when done, to release the engine's iterators.
    """

    def __init__(self, engine: Engine, header: SnapshotHeader) -> None:
        self.header = header
        self._data: Iterator[Item] = engine.scan(header.partition)
        self._requests: Iterator[Item] = engine.requests(header.partition)
        self._digest = SnapshotDigest(header)
        self.bytes = 0
        self._done = False

    def chunks(self, max_bytes: int = CHUNK_BYTES,
               max_items: int = CHUNK_ITEMS) -> Iterator[tuple[Section, list[Item]]]:
        for section, items in ((Section.DATA, self._data), (Section.REQUESTS, self._requests)):
            for chunk in chunk_items(items, max_bytes, max_items):
                self._digest.update(section, chunk)
                self.bytes += sum(len(k) + len(v) for k, v in chunk)
                yield section, chunk
        self._done = True

    def trailer(self) -> SnapshotTrailer:
        if not self._done:
            raise RuntimeError("the trailer is known only after every chunk was read")
        return self._digest.trailer()

    def close(self) -> None:
        for iterator in (self._data, self._requests):
            close = getattr(iterator, "close", None)
            if close is not None:
                close()


class SnapshotInstall:
    """The receiving end: stages one snapshot in one engine batch; writes nothing until
    `commit`, which is allowed only after `finish` verified the trailer.

    Items must come data first, then requests; anything after the trailer is refused.
    Every refusal raises `SnapshotRejected`; dropping the object discards the batch.
    """

    def __init__(self, engine: Engine, header: SnapshotHeader) -> None:
        self.header = header
        self._engine = engine
        self._batch = engine.batch()
        self._batch.delete_partition(header.partition)  # data, log and requests
        self._digest = SnapshotDigest(header)
        self._section = Section.DATA
        self.finished = False
        self.bytes = 0

    def add(self, section: Section, items: list[Item]) -> None:
        if self.finished:
            raise SnapshotRejected("items after the trailer")
        if section is Section.DATA and self._section is Section.REQUESTS:
            raise SnapshotRejected("a data item after request-table items")
        self._section = section
        p, batch = self.header.partition, self._batch
        put = batch.put if section is Section.DATA else batch.put_request
        for key, value in items:
            put(p, key, value)
            self.bytes += len(key) + len(value)
        self._digest.update(section, items)

    def finish(self, trailer: SnapshotTrailer) -> None:
        """Verify the sender's trailer against what was received."""
        if self.finished:
            raise SnapshotRejected("a second trailer")
        reason = verify_trailer(self._digest.trailer(), trailer)
        if reason:
            raise SnapshotRejected(reason)
        self.finished = True

    def commit(self, promised_epoch: int) -> ReplicaMeta:
        """Write the snapshot and the replica meta it implies, atomically; return the meta.

        The caller re-checks `decide_install` first, with no `await` in between."""
        if not self.finished:
            raise SnapshotRejected("truncated: the stream ended before its trailer")
        h = self.header
        meta = ReplicaMeta(promised_epoch=max(promised_epoch, h.epoch),
                           commit_index=h.base_index, applied_index=h.base_index,
                           base_epoch=h.base_epoch, base_index=h.base_index)
        self._batch.put_meta(meta_key(h.partition), encode_meta(meta))
        self._engine.write(self._batch)
        return meta
