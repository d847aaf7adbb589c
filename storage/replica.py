"""The replication shell: drives `storage.replication` for every partition on this node.

One `Replicas` object per node owns, for each partition the node holds, its in-memory
replica state (mirroring the engine's meta column family), and the node-wide machinery
that makes many partitions cheap:

- group commit: proposals that arrive in one event-loop turn, for any partitions this
  node leads, go into the log in one engine batch (`_flush`);
- one sender per peer node: while an Append to a peer is in flight, new entries of every
  partition queue up and leave together in the next AppendBatch;
- one apply pass per commit advance, for all partitions at once, in one engine batch.

Invariants:
- Log entries are written (engine WAL) before they count toward any majority, on the
  leader as on followers; a write is acknowledged only after its entry is committed
  and applied.
- The promised epoch is persisted before a Promise or an Append in a higher epoch is
  answered; it never decreases.
- A leader acknowledges no write and serves no LINEARIZABLE or LEASE read until the
  no-op of its epoch is committed, nor while its ZooKeeper session is not known alive.
- Everything between reading replica state and writing the engine batch runs without
  an `await`, so asyncio interleaving cannot split a decision from its effect.
- Log retention (`_compact`, in the apply batch): a partition's log keeps about
  `Tuning.retain_entries` entries and `retain_bytes` bytes; only applied entries are
  deleted, in the same engine batch that moves the meta's base to the last one deleted.
  While a snapshot is being sent, entries after its position are kept.
- A follower whose next index is at or below the leader's base gets a snapshot
  (`_send_snapshot`, at most one per (peer, partition) at a time, retried with bounded
  backoff) and then the log tail; it installs a snapshot all or nothing
  (`install_snapshot`, see `storage/snapshot.py`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from storage import limits
from storage.engine import Batch, Engine
from storage.errors import NotLeader, StorageError, Unavailable, Version
from storage.keyspace import (
    ApplyResult,
    Outcome,
    ReplicaMeta,
    ValueRecord,
    decode_meta,
    decode_record,
    decode_result,
    encode_meta,
    encode_record,
    encode_result,
    meta_key,
    record_version,
    request_key,
)
from storage.partition import Assignment
from storage.peers import Peers
from storage.replication import (
    LeaderProgress,
    LogPosition,
    decide_append,
    decide_promise,
    majority,
)
from storage.snapshot import (
    DEFAULT_RETAIN_BYTES,
    DEFAULT_RETAIN_ENTRIES,
    Retention,
    Section,
    SnapshotHeader,
    SnapshotInstall,
    SnapshotRejected,
    SnapshotSource,
    SnapshotTrailer,
    decide_install,
    retention_cut,
)
from storage.v1 import kv_pb2, replica_pb2

log = logging.getLogger(__name__)

LINEARIZABLE = kv_pb2.LINEARIZABLE
LEASE = kv_pb2.LEASE
FOLLOWER = kv_pb2.FOLLOWER

TAIL_CACHE_ENTRIES = 20_000


@dataclass(frozen=True)
class Tuning:
    """Knobs of the replication shell: timings (seconds) and log retention."""

    heartbeat: float = 0.2
    append_timeout: float = 2.0
    lease: float = 1.0
    lease_margin: float = 0.3
    retry_min: float = 0.05
    retry_max: float = 1.0
    confirm_fallback: float = 0.05
    retain_entries: int = DEFAULT_RETAIN_ENTRIES  # log entries kept per partition
    retain_bytes: int = DEFAULT_RETAIN_BYTES  # about this many log bytes per partition
    snapshot_timeout: float = 120.0  # one whole snapshot stream
    snapshot_retry_max: float = 5.0  # the longest pause between snapshot attempts


@dataclass
class PartitionReplica:
    """This node's replica of one partition. Mirrors the durable meta plus caches."""

    partition: int
    meta: ReplicaMeta
    last: LogPosition
    voter: bool = True
    assignment: Assignment | None = None
    leader: LeaderProgress | None = None
    tail: dict[int, replica_pb2.LogEntry] = field(default_factory=dict)
    waiters: dict[int, asyncio.Future[ApplyResult]] = field(default_factory=dict)
    confirm_need: dict[str, int] = field(default_factory=dict)
    lease_epoch: int = 0
    lease_acked_at: float = float("-inf")
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    log_bytes: int = 0  # bytes of the entries in (base, last], approximately
    sending: dict[str, int] = field(default_factory=dict)  # peer -> index of a snapshot
    # being sent to it (retention keeps the entries after it)

    @property
    def base(self) -> LogPosition:
        return LogPosition(self.meta.base_epoch, self.meta.base_index)

    def notify(self) -> None:
        """Wake everything waiting on this replica's state; arm a fresh event."""
        self.changed.set()
        self.changed = asyncio.Event()


HintFn = Callable[[int], tuple[str, str, int]]


class Replicas:
    """Every partition replica on this node, and the node-wide replication machinery."""

    def __init__(
        self,
        engine: Engine,
        node_id: str,
        peers: Peers,
        *,
        hint: HintFn,
        voter: bool = True,
        tuning: Tuning | None = None,
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.peers = peers
        self.hint = hint
        self.voter = voter
        self.tuning = tuning or Tuning()
        self.serving = True  # False while the ZooKeeper session is not known alive
        self._replicas: dict[int, PartitionReplica] = {}
        self._proposals: list[tuple[PartitionReplica, replica_pb2.LogEntry,
                                    asyncio.Future[ApplyResult] | None]] = []
        self._flush_scheduled = False
        self._apply_pending: set[int] = set()
        self._apply_scheduled = False
        self._senders: dict[str, _PeerSender] = {}
        self._led: dict[int, PartitionReplica] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False
        self._started = time.monotonic()
        self._retention = Retention(self.tuning.retain_entries, self.tuning.retain_bytes)
        self._snapshots: dict[tuple[str, int], asyncio.Task[None]] = {}
        # (peer, partition) -> (failed attempts, retry not before, failed as unreachable)
        self._snapshot_failures: dict[tuple[str, int], tuple[int, float, bool]] = {}
        self._load()

    # -- lifecycle ---------------------------------------------------------------

    def _load(self) -> None:
        for key, raw in self.engine.meta_items(b"p"):
            if len(key) != 5:
                continue
            p = int.from_bytes(key[1:], "big")
            self._replicas[p] = self._restore(p, decode_meta(raw))
        log.info("replicas loaded node=%s partitions=%d", self.node_id, len(self._replicas))

    def _restore(self, p: int, meta: ReplicaMeta) -> PartitionReplica:
        last_index = self.engine.last_log_index(p)
        if last_index > meta.base_index:
            raw = self.engine.log_entry(p, last_index)
            entry = replica_pb2.LogEntry.FromString(raw) if raw else None
            last = LogPosition(entry.epoch if entry else 0, last_index)
        else:
            last = LogPosition(meta.base_epoch, meta.base_index)
        r = PartitionReplica(p, meta, last, voter=self.voter)
        # One scan of the retained log (bounded by retention) restores its byte count.
        r.log_bytes = sum(len(raw) for _, raw in self.engine.log_entries(p, meta.base_index + 1))
        return r

    def start(self) -> None:
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        # Entries committed before a restart but not yet applied are applied now.
        self._schedule_apply(p for p, r in self._replicas.items()
                             if r.meta.commit_index > r.meta.applied_index)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        for sender in self._senders.values():
            sender.close()
        snapshots = list(self._snapshots.values())
        for task in snapshots:
            task.cancel()
        await asyncio.gather(*(s.task for s in self._senders.values() if s.task), *snapshots,
                             return_exceptions=True)
        if self._heartbeat_task is not None:
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        for r in list(self._led.values()):
            self._step_down(r, "node closing")

    def _replica(self, p: int) -> PartitionReplica:
        r = self._replicas.get(p)
        if r is None:
            r = PartitionReplica(p, ReplicaMeta(), LogPosition(0, 0), voter=self.voter)
            self._replicas[p] = r
        return r

    def holds(self, p: int) -> bool:
        return p in self._replicas

    def replica(self, p: int) -> PartitionReplica | None:
        return self._replicas.get(p)

    def led_partitions(self) -> list[int]:
        return sorted(self._led)

    def set_voter(self, voter: bool) -> None:
        """Whether this node's replicas promise and count in quorums (false for a wiped
        directory until the controller records its incarnation)."""
        self.voter = voter
        for r in self._replicas.values():
            r.voter = voter

    def can_hand_off(self, live: set[str]) -> bool:
        """Every partition this node leads has enough live voting followers that a new
        epoch can be promised without this node's vote counting twice."""
        return all(
            sum(1 for q in lp.peers if q in lp.voting and q in live)
            >= majority(len(lp.replicas)) - 1
            for r in self._led.values() if (lp := r.leader) is not None
        )

    def followers_caught_up(self, live: set[str]) -> bool:
        """Every live voting follower of every partition this node leads holds its log."""
        return all(
            lp.match[q] >= lp.last_index
            for r in self._led.values() if (lp := r.leader) is not None
            for q in lp.peers if q in lp.voting and q in live
        )

    # -- roles (from the partition map) --------------------------------------------

    def assign(self, a: Assignment) -> None:
        """Apply the controller's view of partition `a.partition` to this node's role."""
        member = self.node_id in a.replicas or self.node_id in a.learners
        r = self._replicas.get(a.partition)
        if r is None and not member:
            return
        r = self._replica(a.partition)
        r.assignment = a
        if a.leader == self.node_id and a.epoch >= r.meta.promised_epoch and member:
            lp = r.leader
            if lp is None or lp.epoch != a.epoch or lp.replicas != a.replicas \
                    or lp.learners != a.learners:
                self._become_leader(r, a)
        elif r.leader is not None:
            self._step_down(r, f"map names {a.leader or 'no leader'} at epoch {a.epoch}")
        r.notify()

    def _become_leader(self, r: PartitionReplica, a: Assignment) -> None:
        if r.leader is not None:
            self._step_down(r, "leadership re-established")
        if a.epoch > r.meta.promised_epoch:
            r.meta = replace(r.meta, promised_epoch=a.epoch)
            self._persist_meta(r)
        noop_index = r.last.index + 1
        r.leader = LeaderProgress(
            node_id=self.node_id,
            epoch=a.epoch,
            replicas=a.replicas,
            learners=a.learners,
            last_index=r.last.index,
            commit_index=r.meta.commit_index,
            noop_index=noop_index,
        )
        self._led[r.partition] = r
        for peer in r.leader.peers:
            self._sender(peer)
        log.info("leading partition=%d epoch=%d replicas=%s noop_index=%d",
                 r.partition, a.epoch, ",".join(a.replicas), noop_index)
        self._propose(r, replica_pb2.LogEntry(epoch=a.epoch, noop=True), None)

    def _step_down(self, r: PartitionReplica, why: str) -> None:
        lp, r.leader = r.leader, None
        self._led.pop(r.partition, None)
        for key in [k for k in self._snapshots if k[1] == r.partition]:
            self._snapshots[key].cancel()
        for key in [k for k in self._snapshot_failures if k[1] == r.partition]:
            del self._snapshot_failures[key]
        r.confirm_need.clear()
        if lp is not None:
            log.info("stepped down partition=%d epoch=%d reason=%s", r.partition, lp.epoch, why)
        waiters, r.waiters = r.waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(Unavailable(
                    f"partition {r.partition}: leadership lost ({why}); the write may or may "
                    "not have been applied", partition=r.partition))
        r.notify()

    # -- writes ------------------------------------------------------------------

    async def write(self, p: int, command: replica_pb2.Command) -> ApplyResult:
        """Append `command` to partition p's log; return its result once applied."""
        return await self.submit(p, command)

    def submit(self, p: int, command: replica_pb2.Command) -> asyncio.Future[ApplyResult]:
        """Queue `command` for partition p's log (no await, so a batch of writes costs no
        task each); the future resolves with its result once applied. Raises NotLeader or
        Unavailable at once when this node cannot take the write."""
        r = self._replicas.get(p)
        lp = r.leader if r is not None else None
        if r is None or lp is None:
            raise self._not_leader(p)
        if not self.serving:
            raise Unavailable(f"partition {p}: this node's ZooKeeper session is not known "
                              "alive; refusing writes until it is", partition=p)
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._propose(r, replica_pb2.LogEntry(epoch=lp.epoch, command=command), future)
        return future

    def _propose(self, r: PartitionReplica, entry: replica_pb2.LogEntry,
                 future: asyncio.Future[ApplyResult] | None) -> None:
        self._proposals.append((r, entry, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Group commit: write every queued proposal to the log in one engine batch."""
        self._flush_scheduled = False
        proposals, self._proposals = self._proposals, []
        batch = self.engine.batch()
        touched: dict[int, PartitionReplica] = {}
        for r, entry, future in proposals:
            lp = r.leader
            if lp is None or lp.epoch != entry.epoch:
                if future is not None and not future.done():
                    future.set_exception(self._not_leader(r.partition))
                continue
            index = r.last.index + 1
            entry.index = index
            raw = entry.SerializeToString()
            batch.put_log(r.partition, index, raw)
            r.log_bytes += len(raw)
            r.tail[index] = entry
            r.last = LogPosition(entry.epoch, index)
            if future is not None:
                r.waiters[index] = future
            touched[r.partition] = r
        if not touched:
            return
        self.engine.write(batch)
        committed = []
        peers: set[str] = set()
        for r in touched.values():
            lp = r.leader
            assert lp is not None
            if lp.on_local_append(r.last.index):
                committed.append(r.partition)
            peers.update(lp.peers)
        if committed:
            self._schedule_apply(committed)
        for peer in peers:
            self._sender(peer).wake()

    # -- reads -------------------------------------------------------------------

    async def read(self, p: int, key: bytes, consistency: int) -> ValueRecord | None:
        await self.read_barrier(p, consistency)
        return self.read_local(p, [key])[0]

    def read_local(self, p: int, keys: Sequence[bytes]) -> list[ValueRecord | None]:
        """This replica's applied values (after `read_barrier` for anything but FOLLOWER)."""
        now = _now_ms()
        raws = self.engine.multi_get(p, keys) if len(keys) > 1 else [self.engine.get(p, keys[0])]
        out: list[ValueRecord | None] = []
        for raw in raws:
            record = decode_record(raw) if raw is not None else None
            out.append(record if record is not None and record.live_at(now) else None)
        return out

    async def read_barrier(self, p: int, consistency: int) -> None:
        """Return once a read of partition p at `consistency` may be served locally."""
        r = self._replicas.get(p)
        if consistency == FOLLOWER:
            if r is None or r.assignment is None or (
                self.node_id not in r.assignment.replicas
                and self.node_id not in r.assignment.learners
            ):
                raise self._not_leader(p)
            return
        lp = await self._serving_leader(p)
        r = self._replicas[p]
        read_index = lp.commit_index
        if consistency == LEASE and time.monotonic() < lp.lease_valid_until(
            self.tuning.lease, self.tuning.lease_margin
        ):
            pass
        else:
            # Ask only as many followers as a majority needs, quickest first; the rest are
            # asked too if that has not confirmed within `confirm_fallback`.
            peers = sorted((q for q in lp.replicas if q != self.node_id),
                           key=lambda q: self._sender(q).rtt)
            need = {peer: self._senders[peer].seq + 1 for peer in peers}
            quorum = majority(len(lp.replicas)) - 1
            self._ask_confirm(r, peers[:quorum], need)
            widen = asyncio.get_running_loop().call_later(
                self.tuning.confirm_fallback, self._ask_confirm, r, peers[quorum:], need)
            try:
                await self._wait(r, lambda: self._check_leader(r, lp)
                                 and lp.confirmed_since(need))
            finally:
                widen.cancel()
        await self._wait(r, lambda: self._check_leader(r, lp)
                         and r.meta.applied_index >= read_index)

    def _ask_confirm(self, r: PartitionReplica, peers: list[str], need: dict[str, int]) -> None:
        for peer in peers:
            if r.confirm_need.get(peer, 0) < need[peer]:
                r.confirm_need[peer] = need[peer]
            self._senders[peer].wake()

    async def _serving_leader(self, p: int) -> LeaderProgress:
        r = self._replicas.get(p)
        if r is None or r.leader is None:
            raise self._not_leader(p)
        lp = r.leader
        if not self.serving:
            raise Unavailable(f"partition {p}: this node's ZooKeeper session is not known "
                              "alive; refusing reads until it is", partition=p)
        if not lp.ready:
            await self._wait(r, lambda: self._check_leader(r, lp) and lp.ready)
        return lp

    def _check_leader(self, r: PartitionReplica, lp: LeaderProgress) -> bool:
        if r.leader is not lp:
            raise self._not_leader(r.partition)
        if not self.serving:
            raise Unavailable(f"partition {r.partition}: ZooKeeper session not known alive",
                              partition=r.partition)
        return True

    async def _wait(self, r: PartitionReplica, ready: Callable[[], bool]) -> None:
        """Wait until `ready()`; the caller's deadline (gRPC) bounds it by cancellation."""
        while not ready():
            await r.changed.wait()

    def scan(self, p: int, start: bytes, end: bytes | None, limit: int
             ) -> list[tuple[bytes, ValueRecord]]:
        now = _now_ms()
        out = []
        for key, raw in self.engine.scan(p, start, end, 0):
            record = decode_record(raw)
            if record.live_at(now):
                out.append((key, record))
                if limit and len(out) >= limit:
                    break
        return out

    # -- apply -------------------------------------------------------------------

    def _schedule_apply(self, partitions: Iterable[int]) -> None:
        self._apply_pending.update(partitions)
        if self._apply_pending and not self._apply_scheduled:
            self._apply_scheduled = True
            asyncio.get_running_loop().call_soon(self._apply)

    def _apply(self) -> None:
        """Apply committed entries of every pending partition in one engine batch."""
        self._apply_scheduled = False
        pending, self._apply_pending = self._apply_pending, set()
        batch = self.engine.batch()
        overlay: dict[tuple[int, bytes], bytes | None] = {}
        requests: dict[tuple[int, bytes], bytes] = {}
        done: list[tuple[asyncio.Future[ApplyResult], ApplyResult]] = []
        applied: list[PartitionReplica] = []
        for p in sorted(pending):
            r = self._replicas.get(p)
            if r is None:
                continue
            commit = r.leader.commit_index if r.leader is not None else r.meta.commit_index
            commit = min(commit, r.last.index)
            if commit <= r.meta.applied_index:
                continue
            for index in range(r.meta.applied_index + 1, commit + 1):
                entry = self._entry(r, index)
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
        epoch = self._epoch_at(r, cut)
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

    def _entry(self, r: PartitionReplica, index: int) -> replica_pb2.LogEntry | None:
        """The entry at `index` if the retained log (base, last] holds it."""
        if index <= r.meta.base_index:
            return None
        entry = r.tail.get(index)
        if entry is not None:
            return entry
        raw = self.engine.log_entry(r.partition, index)
        return replica_pb2.LogEntry.FromString(raw) if raw is not None else None

    def _epoch_at(self, r: PartitionReplica, index: int) -> int | None:
        if index == 0:
            return 0
        if index == r.meta.base_index:
            return r.meta.base_epoch
        if index > r.last.index or index < r.meta.base_index:
            return None
        entry = self._entry(r, index)
        return entry.epoch if entry is not None else None

    def _persist_meta(self, r: PartitionReplica) -> None:
        batch = self.engine.batch()
        batch.put_meta(meta_key(r.partition), encode_meta(r.meta))
        self.engine.write(batch)

    # -- leader -> follower traffic -------------------------------------------------

    def _sender(self, peer: str) -> _PeerSender:
        sender = self._senders.get(peer)
        if sender is None:
            sender = _PeerSender(self, peer)
            self._senders[peer] = sender
        return sender

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.tuning.heartbeat)
            peers = {peer for r in self._led.values() if r.leader for peer in r.leader.peers}
            for peer in peers:
                self._sender(peer).wake(heartbeat=True)

    def build_append(self, peer: str, seq: int, heartbeat: bool
                     ) -> tuple[replica_pb2.AppendBatchRequest, list[_Sent]]:
        request = replica_pb2.AppendBatchRequest(leader_id=self.node_id)
        sent: list[_Sent] = []
        size = 0  # entry bytes in this request; one entry always goes, however large
        for r in self._led.values():
            lp = r.leader
            if lp is None or peer not in lp.match:
                continue
            wants_confirm = r.confirm_need.get(peer, 0) > lp.confirmed[peer]
            if not (heartbeat or wants_confirm or lp.has_entries_for(peer)):
                continue
            nxt = lp.next[peer]
            if nxt <= r.meta.base_index:
                self._start_snapshot(r, lp, peer)  # then the log tail, from its position
                continue
            prev_index = nxt - 1
            prev_epoch = self._epoch_at(r, prev_index)
            if prev_epoch is None:
                lp.next[peer] = max(1, r.last.index + 1)
                continue
            append = request.appends.add(
                partition=r.partition, epoch=lp.epoch, prev_epoch=prev_epoch,
                prev_index=prev_index, commit_index=lp.commit_index,
            )
            index = nxt
            while index <= r.last.index:
                entry = self._entry(r, index)
                if entry is None:
                    break
                entry_size = entry.ByteSize()
                if size and size + entry_size > limits.MAX_APPEND_BATCH_BYTES:
                    break
                append.entries.append(entry)
                size += entry_size
                index += 1
            sent.append(_Sent(r.partition, lp, prev_index, index - 1, lp.commit_index))
        return request, sent

    def on_append_response(self, peer: str, seq: int, sent_at: float, sent: list[_Sent],
                           response: replica_pb2.AppendBatchResponse) -> bool:
        """Record a follower's answers; return True if more should be sent at once."""
        if self._snapshot_failures:
            self._peer_reachable(peer)
        results = {res.partition: res for res in response.results}
        committed: list[int] = []
        again = False
        for item in sent:
            r = self._replicas.get(item.partition)
            res = results.get(item.partition)
            if r is None or res is None or r.leader is not item.leader:
                continue
            lp = item.leader
            if res.accepted:
                if lp.on_accept(peer, seq=seq, sent_at=sent_at, through=item.through,
                                commit_sent=item.commit, voter=res.voter):
                    committed.append(item.partition)
                again = again or lp.has_entries_for(peer)
                r.notify()
            elif res.promised_epoch > lp.epoch:
                self._step_down(r, f"{peer} promised epoch {res.promised_epoch}")
            else:
                lp.on_reject(peer, prev_index_sent=item.prev_index,
                             follower_last=res.last_index)
                log.info("append refused partition=%d peer=%s reason=%s next=%d",
                         item.partition, peer, res.reason, lp.next[peer])
                again = True
        if committed:
            self._schedule_apply(committed)
        return again

    # -- follower side -------------------------------------------------------------

    def handle_append(self, request: replica_pb2.AppendBatchRequest
                      ) -> replica_pb2.AppendBatchResponse:
        response = replica_pb2.AppendBatchResponse(node_id=self.node_id)
        batch = self.engine.batch()
        now = time.monotonic()
        to_apply = []
        for append in request.appends:
            r = self._replica(append.partition)
            result = self._follow(r, append, batch, now)
            response.results.append(result)
            if result.accepted and r.meta.commit_index > r.meta.applied_index:
                to_apply.append(r.partition)
        self.engine.write(batch)
        if to_apply:
            self._schedule_apply(to_apply)
        return response

    def _follow(self, r: PartitionReplica, append: replica_pb2.AppendRequest, batch: Batch,
                now: float) -> replica_pb2.AppendResult:
        if r.leader is not None:
            if append.epoch > r.leader.epoch:
                self._step_down(r, f"append from a leader of epoch {append.epoch}")
            elif append.epoch == r.leader.epoch:
                return self._append_result(r, False, "two leaders in one epoch: refused")
        entries = append.entries
        decision = decide_append(
            promised_epoch=r.meta.promised_epoch,
            last=r.last,
            base=r.base,
            commit_index=r.meta.commit_index,
            epoch=append.epoch,
            prev=LogPosition(append.prev_epoch, append.prev_index),
            entries=[LogPosition(e.epoch, e.index) for e in entries],
            leader_commit=append.commit_index,
            epoch_at=lambda i: self._epoch_at(r, i),
        )
        meta = r.meta
        if decision.promised_epoch > meta.promised_epoch:
            meta = replace(meta, promised_epoch=decision.promised_epoch)
        if decision.accepted:
            if decision.truncate_from is not None:
                cut = decision.truncate_from
                r.log_bytes -= sum(len(raw) for _, raw in
                                   self.engine.log_entries(r.partition, cut, r.last.index + 1))
                batch.delete_log_range(r.partition, cut, r.last.index + 1)
                for index in [i for i in r.tail if i >= cut]:
                    del r.tail[index]
                r.last = LogPosition(self._epoch_at(r, cut - 1) or 0, cut - 1)
                log.info("truncated partition=%d from=%d", r.partition, cut)
            for entry in entries[decision.first_new:]:
                raw = entry.SerializeToString()
                batch.put_log(r.partition, entry.index, raw)
                r.log_bytes += len(raw)
                r.tail[entry.index] = entry
            if len(entries) > decision.first_new:
                last = entries[len(entries) - 1]
                r.last = LogPosition(last.epoch, last.index)
            meta = replace(meta, commit_index=min(decision.commit_index, r.last.index))
            r.lease_epoch = append.epoch
            r.lease_acked_at = now
        if meta != r.meta:
            r.meta = meta
            batch.put_meta(meta_key(r.partition), encode_meta(meta))
        return self._append_result(r, decision.accepted, decision.reason)

    def _append_result(self, r: PartitionReplica, accepted: bool, reason: str
                       ) -> replica_pb2.AppendResult:
        return replica_pb2.AppendResult(
            partition=r.partition, accepted=accepted, promised_epoch=r.meta.promised_epoch,
            last_epoch=r.last.epoch, last_index=r.last.index, reason=reason, voter=r.voter,
        )

    def handle_promise(self, request: replica_pb2.PromiseRequest, incarnation: str
                       ) -> replica_pb2.PromiseResponse:
        r = self._replica(request.partition)
        lease_left = 0.0
        if request.epoch > r.lease_epoch and not request.leader_released:
            # A restarted replica forgot whom it acknowledged: it honours a lease it may
            # have granted just before it stopped by counting from its own start.
            acked = max(r.lease_acked_at, self._started)
            lease_left = self.tuning.lease - (time.monotonic() - acked)
        decision = decide_promise(
            promised_epoch=r.meta.promised_epoch, requested=request.epoch,
            can_vote=r.voter, lease_remaining_s=lease_left,
        )
        if decision.promised:
            if r.leader is not None and r.leader.epoch < request.epoch:
                self._step_down(r, f"promised epoch {request.epoch}")
            if request.epoch > r.meta.promised_epoch:
                r.meta = replace(r.meta, promised_epoch=request.epoch)
                self._persist_meta(r)
        log.info("promise partition=%d epoch=%d granted=%s reason=%s", request.partition,
                 request.epoch, decision.promised, decision.reason)
        return replica_pb2.PromiseResponse(
            promised=decision.promised, promised_epoch=r.meta.promised_epoch,
            last_epoch=r.last.epoch, last_index=r.last.index, reason=decision.reason,
            incarnation=incarnation, retry_after_ms=int(decision.retry_after_s * 1000),
        )

    def digest(self, p: int) -> replica_pb2.DigestResponse:
        r = self._replica(p)
        digest, keys = self.engine.digest(p)
        return replica_pb2.DigestResponse(
            partition=p, digest=digest, applied_index=r.meta.applied_index, keys=keys,
            last_epoch=r.last.epoch, last_index=r.last.index,
        )

    # -- snapshots: leader side ---------------------------------------------------------

    def _start_snapshot(self, r: PartitionReplica, lp: LeaderProgress, peer: str) -> None:
        """Send peer a snapshot of r, unless one is in flight or a retry is not yet due."""
        key = (peer, r.partition)
        if key in self._snapshots or self._closed:
            return
        failures, retry_at, _ = self._snapshot_failures.get(key, (0, 0.0, False))
        if time.monotonic() < retry_at:
            return
        log.log(logging.INFO if failures % 10 == 0 else logging.DEBUG,
                "follower behind the retained log: sending a snapshot partition=%d peer=%s "
                "next=%d base=%d attempt=%d", r.partition, peer, lp.next[peer],
                r.meta.base_index, failures + 1)
        task = asyncio.create_task(self._send_snapshot(r, lp, peer),
                                   name=f"snapshot-{peer}-{r.partition}")
        self._snapshots[key] = task
        task.add_done_callback(functools.partial(self._snapshot_done, key))

    def _peer_reachable(self, peer: str) -> None:
        """The peer answered: snapshots that failed only because it was unreachable are
        due at once, not after their backoff (a restarted follower catches up sooner)."""
        for key, (failures, _, unreachable) in list(self._snapshot_failures.items()):
            if unreachable and key[0] == peer:
                self._snapshot_failures[key] = (failures, 0.0, False)

    def _snapshot_done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        if self._snapshots.get(key) is task:
            del self._snapshots[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("snapshot sender crashed peer=%s partition=%d", *key,
                      exc_info=task.exception())

    async def _send_snapshot(self, r: PartitionReplica, lp: LeaderProgress, peer: str) -> None:
        stub = self.peers.stub(peer)
        if stub is None or r.leader is not lp:
            return
        # No await from reading the applied position to opening the iterators: the view
        # is exactly the state at that position.
        index = r.meta.applied_index
        epoch = self._epoch_at(r, index)
        if epoch is None:
            log.error("no epoch for the applied index partition=%d index=%d", r.partition, index)
            return
        source = SnapshotSource(self.engine, SnapshotHeader(
            r.partition, lp.epoch, epoch, index, self.node_id))
        r.sending[peer] = index
        started = time.monotonic()
        response: replica_pb2.InstallSnapshotResponse | None = None
        unreachable = False
        try:
            response = await stub.InstallSnapshot(_snapshot_stream(source),
                                                  timeout=self.tuning.snapshot_timeout)
            reason = response.reason
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            unreachable = exc.code() == grpc.StatusCode.UNAVAILABLE
        except Exception as exc:  # e.g. reading the engine failed: retried like the rest
            log.exception("snapshot stream failed partition=%d peer=%s", r.partition, peer)
            reason = f"stream failed: {exc!r}"
        finally:
            source.close()
            if r.sending.get(peer) == index:
                del r.sending[peer]
        key = (peer, r.partition)
        if response is not None and response.accepted:
            self._snapshot_failures.pop(key, None)
            t = source.trailer()
            log.info("snapshot sent partition=%d peer=%s position=%d.%d keys=%d requests=%d "
                     "bytes=%d seconds=%.3f", r.partition, peer, epoch, index, t.data_items,
                     t.request_items, source.bytes, time.monotonic() - started)
            if r.leader is lp:
                lp.next[peer] = max(lp.next[peer], index + 1)
                lp.match[peer] = max(lp.match[peer], index)
                r.notify()
                self._sender(peer).wake()
            return
        if r.leader is lp and response is not None:
            if response.promised_epoch > lp.epoch:
                self._step_down(r, f"{peer} promised epoch {response.promised_epoch}")
                return
            if response.last_index > r.meta.base_index:  # it holds enough: back to the log
                lp.next[peer] = max(1, min(response.last_index + 1, r.last.index + 1))
        failures = self._snapshot_failures.get(key, (0, 0.0, False))[0] + 1
        delay = min(self.tuning.snapshot_retry_max,
                    self.tuning.retry_min * 2 ** min(failures, 10)) * (0.5 + random.random() / 2)
        self._snapshot_failures[key] = (failures, time.monotonic() + delay, unreachable)
        level = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
        log.log(level, "snapshot not installed partition=%d peer=%s failures=%d retry_in=%.2fs "
                "reason=%s", r.partition, peer, failures, delay, reason)

    # -- snapshots: follower side ---------------------------------------------------------

    async def install_snapshot(self, chunks: AsyncIterable[replica_pb2.SnapshotChunk]
                               ) -> replica_pb2.InstallSnapshotResponse:
        """Receive a snapshot stream and install it all or nothing (storage/snapshot.py)."""
        header: SnapshotHeader | None = None
        install: SnapshotInstall | None = None
        started = time.monotonic()
        accepted, reason = False, ""
        try:
            async for chunk in chunks:
                if install is None:
                    header = _snapshot_header(chunk)
                    self._check_install(self._replica(header.partition), header)
                    log.info("snapshot receiving partition=%d epoch=%d position=%d.%d "
                             "leader=%s", header.partition, header.epoch, header.base_epoch,
                             header.base_index, header.leader_id)
                    install = SnapshotInstall(self.engine, header)
                    continue
                if chunk.HasField("header"):
                    raise SnapshotRejected("a second header")
                if chunk.data:
                    install.add(Section.DATA, [(i.key, i.value) for i in chunk.data])
                if chunk.requests:
                    install.add(Section.REQUESTS, [(i.key, i.value) for i in chunk.requests])
                if chunk.HasField("trailer"):
                    t = chunk.trailer
                    install.finish(SnapshotTrailer(t.data_items, t.request_items, t.digest))
            if install is None:
                raise SnapshotRejected("an empty stream")
            self._commit_snapshot(install, started)
            accepted = True
        except SnapshotRejected as exc:
            reason = str(exc)
        except Exception as exc:  # nothing was written: the batch is dropped with `install`
            log.exception("snapshot install failed")
            reason = f"install failed: {exc}"
        p = header.partition if header is not None else 0
        r = self._replicas.get(p)
        if not accepted:
            log.warning("snapshot refused partition=%d leader=%s reason=%s", p,
                        header.leader_id if header else "?", reason)
        return replica_pb2.InstallSnapshotResponse(
            partition=p, accepted=accepted, reason=reason,
            promised_epoch=r.meta.promised_epoch if r else 0,
            last_epoch=r.last.epoch if r else 0, last_index=r.last.index if r else 0,
            node_id=self.node_id)

    def _check_install(self, r: PartitionReplica, header: SnapshotHeader) -> None:
        reason = decide_install(header, promised_epoch=r.meta.promised_epoch,
                                commit_index=r.meta.commit_index,
                                leading_epoch=r.leader.epoch if r.leader else None)
        if reason:
            raise SnapshotRejected(reason)

    def _commit_snapshot(self, install: SnapshotInstall, started: float) -> None:
        """Re-check the fence, write the snapshot in one batch, reset the replica. No await."""
        h = install.header
        r = self._replica(h.partition)
        self._check_install(r, h)
        if r.leader is not None:
            self._step_down(r, f"installing a snapshot of epoch {h.epoch}")
        r.meta = install.commit(r.meta.promised_epoch)
        r.last = LogPosition(h.base_epoch, h.base_index)
        r.tail.clear()
        r.log_bytes = 0
        r.notify()
        log.info("snapshot installed partition=%d epoch=%d position=%d.%d bytes=%d "
                 "seconds=%.3f leader=%s", h.partition, h.epoch, h.base_epoch, h.base_index,
                 install.bytes, time.monotonic() - started, h.leader_id)

    # -- errors --------------------------------------------------------------------

    def _not_leader(self, p: int) -> StorageError:
        leader_id, address, epoch = self.hint(p)
        if not leader_id:
            return Unavailable(f"partition {p} has no leader right now; retry shortly",
                               partition=p)
        if leader_id == self.node_id:
            return Unavailable(f"partition {p}: this node is taking over leadership; retry",
                               partition=p)
        return NotLeader(
            f"this node does not lead partition {p}; its leader is {leader_id} at "
            f"{address or 'an unknown address'} (epoch {epoch})",
            partition=p, leader_id=leader_id, leader_address=address, epoch=epoch,
        )


@dataclass
class _Sent:
    partition: int
    leader: LeaderProgress
    prev_index: int
    through: int
    commit: int


class _PeerSender:
    """Sends AppendBatch requests to one follower node, one in flight at a time."""

    def __init__(self, replicas: Replicas, peer: str) -> None:
        self.replicas = replicas
        self.peer = peer
        self.seq = 0
        self.rtt = 0.0  # smoothed Append round trip (s); failures count as slow
        self._wake = asyncio.Event()
        self._heartbeat = False
        self._closed = False
        self._failures = 0
        self.task: asyncio.Task[None] | None = asyncio.create_task(self._run(),
                                                                   name=f"sender-{peer}")

    def wake(self, *, heartbeat: bool = False) -> None:
        self._heartbeat = self._heartbeat or heartbeat
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def _run(self) -> None:
        tuning = self.replicas.tuning
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            heartbeat, self._heartbeat = self._heartbeat, False
            stub = self.replicas.peers.stub(self.peer)
            if stub is None:
                continue
            seq = self.seq + 1
            request, sent = self.replicas.build_append(self.peer, seq, heartbeat)
            if not sent:
                continue
            self.seq = seq
            sent_at = time.monotonic()
            try:
                response = await stub.Append(request, timeout=tuning.append_timeout)
            except grpc.aio.AioRpcError as exc:
                self._failures += 1
                self.rtt = tuning.append_timeout
                delay = min(tuning.retry_max, tuning.retry_min * 2 ** min(self._failures, 6))
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.warning("append to peer failed peer=%s code=%s failures=%d",
                                self.peer, exc.code().name, self._failures)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                self._wake.set()
                continue
            except asyncio.CancelledError:
                raise
            self._failures = 0
            self.rtt = 0.8 * self.rtt + 0.2 * (time.monotonic() - sent_at)
            if self.replicas.on_append_response(self.peer, seq, sent_at, sent, response):
                self._wake.set()


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


def _snapshot_header(chunk: replica_pb2.SnapshotChunk) -> SnapshotHeader:
    """The header that must open a snapshot stream, alone in its message."""
    if not chunk.HasField("header"):
        raise SnapshotRejected("the stream does not start with a header")
    if chunk.data or chunk.requests or chunk.HasField("trailer"):
        raise SnapshotRejected("the header must travel alone")
    h = chunk.header
    return SnapshotHeader(h.partition, h.epoch, h.base_epoch, h.base_index, h.leader_id)


async def _snapshot_stream(source: SnapshotSource) -> AsyncIterator[replica_pb2.SnapshotChunk]:
    """A snapshot as gRPC messages: header, item chunks, trailer; yields to the event loop
    between chunks, and reads the engine one chunk at a time."""
    h = source.header
    yield replica_pb2.SnapshotChunk(header=replica_pb2.SnapshotHeader(
        partition=h.partition, epoch=h.epoch, base_epoch=h.base_epoch,
        base_index=h.base_index, leader_id=h.leader_id))
    for section, items in source.chunks():
        chunk = replica_pb2.SnapshotChunk()
        target = chunk.data if section is Section.DATA else chunk.requests
        for key, value in items:
            target.add(key=key, value=value)
        yield chunk
        await asyncio.sleep(0)
    t = source.trailer()
    yield replica_pb2.SnapshotChunk(trailer=replica_pb2.SnapshotTrailer(
        data_items=t.data_items, request_items=t.request_items, digest=t.digest))


def _now_ms() -> int:
    return int(time.time() * 1000)
