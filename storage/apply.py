"""The apply pass: committed log entries become data, for all partitions in one batch.

Role: the part of the replication shell (`storage/replica.py`) that applies what is
committed. `Replicas` schedules a pass whenever a commit index advances (on the leader
when a majority holds an entry, on a follower when an Append carries a higher commit
index, and at start for entries committed before a restart); every partition scheduled
within one event-loop turn is applied in the same pass, in ONE engine batch, which also
keeps each partition's log within its retention limits.

Invariants:
- Entries are applied in index order, up to the commit index and never past the last
  entry the replica holds; the data they write and the meta's new `applied_index` are in
  the same engine batch.
- CAS and request-id de-duplication are decided here, in log order (`_apply_command`),
  against the data as the batch so far leaves it: two CAS on one version in one batch
  cannot both win, and a retried write (same client id and sequence) is applied once.
- A waiting writer is answered only after the batch that applies its entry is written.
- Log retention (`_compact`, in the apply batch): a partition's log keeps about
  `Tuning.retain_entries` entries and `retain_bytes` bytes; only applied entries are
  deleted, in the same engine batch that moves the meta's base to the last one deleted.
  While a snapshot is being sent (`PartitionReplica.sending`, see `storage/catchup.py`),
  entries after its position are kept.
- A pass runs without an `await`, so asyncio interleaving cannot split a decision from
  its effect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from storage.engine import Batch, Engine
from storage.errors import Version
from storage.keyspace import (
    ApplyResult,
    Outcome,
    decode_result,
    encode_meta,
    encode_record,
    encode_result,
    meta_key,
    record_version,
    request_key,
)
from storage.snapshot import Retention, retention_cut
from storage.v1 import replica_pb2

if TYPE_CHECKING:
    from storage.replica import PartitionReplica, Replicas

log = logging.getLogger(__name__)

TAIL_CACHE_ENTRIES = 20_000


class Applier:
    """The apply pass of one node's `Replicas`, and the log retention done inside it."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.engine = replicas.engine
        self._pending: set[int] = set()
        self._scheduled = False
        self._retention = Retention(replicas.tuning.retain_entries,
                                    replicas.tuning.retain_bytes)

    def schedule(self, partitions: Iterable[int]) -> None:
        """Apply what is committed in `partitions` in the next apply pass (this turn)."""
        self._pending.update(partitions)
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._apply)

    def _apply(self) -> None:
        """Apply committed entries of every pending partition in one engine batch."""
        self._scheduled = False
        pending, self._pending = self._pending, set()
        batch = self.engine.batch()
        overlay: dict[tuple[int, bytes], bytes | None] = {}
        requests: dict[tuple[int, bytes], bytes] = {}
        done: list[tuple[asyncio.Future[ApplyResult], ApplyResult]] = []
        applied: list[PartitionReplica] = []
        for p in sorted(pending):
            r = self.replicas.replica(p)
            if r is None:
                continue
            commit = r.leader.commit_index if r.leader is not None else r.meta.commit_index
            commit = min(commit, r.last.index)
            if commit <= r.meta.applied_index:
                continue
            for index in range(r.meta.applied_index + 1, commit + 1):
                entry = self.replicas.entry(r, index)
                if entry is None:
                    log.error("missing log entry partition=%d index=%d", p, index)
                    commit = index - 1
                    break
                if entry.WhichOneof("body") != "command":
                    continue
                result = _apply_command(self.engine, batch, overlay, requests, p, entry)
                future = r.waiters.pop(index, None)
                if future is not None:
                    done.append((future, result))
            r.meta = replace(r.meta, commit_index=max(r.meta.commit_index, commit),
                                   applied_index=commit)
            self._compact(r, batch)
            batch.put_meta(meta_key(p), encode_meta(r.meta))
            applied.append(r)
        self.engine.write(batch)
        for future, result in done:
            if not future.done():
                future.set_result(result)
        for r in applied:
            self._prune_tail(r)
            r.notify()

    def _prune_tail(self, r: PartitionReplica) -> None:
        floor = r.meta.applied_index
        if r.leader is not None and r.leader.match:
            floor = min(floor, min(r.leader.match.values()))
        floor = max(floor, r.last.index - TAIL_CACHE_ENTRIES)
        if r.tail and min(r.tail) <= floor:
            for index in [i for i in r.tail if i <= floor]:
                del r.tail[index]

    def _compact(self, r: PartitionReplica, batch: Batch) -> None:
        """Log retention: once the log is over its limits (with slack, so this is not work
        per apply), stage the deletion of its oldest applied entries and the move of base
        in `batch`. Reads only the entries it deletes (and one more)."""
        base, last = r.meta.base_index, r.last.index
        if not self._retention.over(last - base, r.log_bytes):
            return
        ceiling = min([r.meta.applied_index, *r.sending.values()])
        sizes = self.engine.log_entries(r.partition, base + 1, ceiling + 1)
        try:
            cut, removed = retention_cut(
                self._retention, base=base, last=last, ceiling=ceiling, log_bytes=r.log_bytes,
                sizes=((index, len(raw)) for index, raw in sizes))
        finally:
            sizes.close()  # type: ignore[attr-defined]  # a generator: releases the iterator
        if cut <= base:
            return
        epoch = self.replicas.epoch_at(r, cut)
        if epoch is None:
            log.error("log compaction found no entry partition=%d index=%d", r.partition, cut)
            return
        batch.delete_log_range(r.partition, 0, cut + 1)
        r.meta = replace(r.meta, base_epoch=epoch, base_index=cut)
        r.log_bytes -= removed
        for index in [i for i in r.tail if i <= cut]:
            del r.tail[index]
        log.debug("log compacted partition=%d base=%d.%d entries=%d bytes=%d", r.partition,
                  epoch, cut, last - cut, r.log_bytes)


def _apply_command(
    engine: Engine,
    batch: Batch,
    overlay: dict[tuple[int, bytes], bytes | None],
    requests: dict[tuple[int, bytes], bytes],
    p: int,
    entry: replica_pb2.LogEntry,
) -> ApplyResult:
    """Decide and stage one command; CAS and de-duplication are decided here, in log order."""
    cmd = entry.command
    version = Version(entry.epoch, entry.index)
    rkey = b""
    if cmd.request_id.client_id:
        rkey = request_key(cmd.request_id.client_id, cmd.request_id.seq)
        prior = requests.get((p, rkey))
        if prior is None:
            prior = engine.get_request(p, rkey)
        if prior is not None:
            return decode_result(prior)
    slot = (p, cmd.key)
    current = overlay[slot] if slot in overlay else engine.get(p, cmd.key)
    current_version: Version | None = None
    if current is not None:
        epoch, index, expires = record_version(current)
        if expires == 0 or expires > cmd.proposed_at_ms:
            current_version = Version(epoch, index)
    kind = cmd.kind
    result: ApplyResult
    write: bytes | None
    if kind == replica_pb2.Command.CAS:
        expected = None if cmd.expect_absent else Version(cmd.expected_version.epoch,
                                                          cmd.expected_version.index)
        if current_version != expected:
            result = ApplyResult(Outcome.CAS_MISMATCH, version, current=current_version,
                                 applied_at_ms=cmd.proposed_at_ms)
            if rkey:
                requests[(p, rkey)] = encode_result(result)
                batch.put_request(p, rkey, requests[(p, rkey)])
            return result
        write = None if cmd.delete else encode_record(
            entry.epoch, entry.index, cmd.expires_at_ms, cmd.value)
    elif kind == replica_pb2.Command.DELETE:
        write = None
    else:
        write = encode_record(entry.epoch, entry.index, cmd.expires_at_ms, cmd.value)
    if write is None:
        batch.delete(p, cmd.key)
    else:
        batch.put(p, cmd.key, write)
    overlay[slot] = write
    result = ApplyResult(Outcome.OK, version, existed=current_version is not None,
                         applied_at_ms=cmd.proposed_at_ms)
    if rkey:
        requests[(p, rkey)] = encode_result(result)
        batch.put_request(p, rkey, requests[(p, rkey)])
    return result
