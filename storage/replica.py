"""The replication shell: drives `storage.replication` for every partition on this node.

One `Replicas` object per node owns, for each partition the node holds, its in-memory
replica state (`PartitionReplica`, mirroring the engine's meta column family) and its
role, and the node-wide machinery that makes many partitions cheap:

- group commit: proposals that arrive in one event-loop turn, for any partitions this
  node leads, go into the log in one engine batch (`_flush`, here);
- one sender per peer node: while an Append to a peer is in flight, new entries of every
  partition queue up and leave together in the next AppendBatch (`storage/sender.py`);
- one apply pass per commit advance, for all partitions at once, in one engine batch,
  which also enforces log retention (`storage/apply.py`);
- snapshots for followers behind the retained log (`storage/catchup.py`).

This module keeps roles (assign, leading, step-down), writes, reads and the read
barrier, the follower's side of Append, and Promise. The other three get the `Replicas`
object and use only its public surface: `replica`, `open_replica`, `leading`, `entry`,
`epoch_at`, `step_down`, and each other through `applier`, `senders` and `catchup`.
`PartitionReplica` is the state they share; all four run on one event loop.

Invariants:
- Log entries are written (engine WAL) before they count toward any majority, on the
  leader as on followers; a write is acknowledged only after its entry is committed
  and applied.
- The promised epoch is persisted before a Promise or an Append in a higher epoch is
  answered; it never decreases.
- A leader acknowledges no write and serves no LINEARIZABLE or LEASE read until the
  no-op of its epoch is committed, nor while its ZooKeeper session is not known alive
  (`serving`, set by the node): writes in flight when the session goes fail as
  Unavailable (they may or may not be applied), and waiting reads fail at once.
- Everything between reading replica state and writing the engine batch runs without
  an `await`, so asyncio interleaving cannot split a decision from its effect (here:
  `_flush`, `handle_append`; likewise the apply pass and a snapshot's install).
- Log retention and the apply pass: see `storage/apply.py`; snapshots (sent to a
  follower whose next index is at or below the leader's base, installed all or
  nothing): see `storage/catchup.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from storage.apply import Applier
from storage.catchup import Catchup
from storage.engine import Batch, Engine
from storage.errors import NotLeader, StorageError, Unavailable
from storage.keyspace import (
    ApplyResult,
    ReplicaMeta,
    ValueRecord,
    decode_meta,
    decode_record,
    encode_meta,
    meta_key,
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
from storage.sender import Senders
from storage.snapshot import DEFAULT_RETAIN_BYTES, DEFAULT_RETAIN_ENTRIES
from storage.v1 import kv_pb2, replica_pb2

log = logging.getLogger(__name__)

LINEARIZABLE = kv_pb2.LINEARIZABLE
LEASE = kv_pb2.LEASE
FOLLOWER = kv_pb2.FOLLOWER


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
        self._led: dict[int, PartitionReplica] = {}
        self._closed = False
        self._started = time.monotonic()
        self.applier = Applier(self)  # the apply pass and log retention
        self.senders = Senders(self)  # leader -> follower Appends, heartbeats
        self.catchup = Catchup(self)  # snapshots, both ends
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
        self.senders.start()
        # Entries committed before a restart but not yet applied are applied now.
        self.applier.schedule(p for p, r in self._replicas.items()
                              if r.meta.commit_index > r.meta.applied_index)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stopping = [*self.senders.stop(), *self.catchup.stop()]
        await asyncio.gather(*stopping, return_exceptions=True)
        for r in list(self._led.values()):
            self.step_down(r, "node closing")

    def open_replica(self, p: int) -> PartitionReplica:
        """This node's replica of p, created empty if it holds none yet."""
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

    def leading(self) -> Iterable[PartitionReplica]:
        """The replicas this node leads, in the order it came to lead them."""
        return self._led.values()

    def set_serving(self, serving: bool, why: str) -> None:
        """Whether this node's ZooKeeper session is known alive (and the map re-read since).
        While not, leaders acknowledge nothing: writes waiting for their commit fail as
        Unavailable and waiting reads are woken to fail."""
        if serving == self.serving:
            return
        self.serving = serving
        led = list(self._led.values())
        if serving:
            log.info("serving again node=%s leading=%d (%s)", self.node_id, len(led), why)
            return
        log.warning("not serving node=%s leading=%d: %s", self.node_id, len(led), why)
        for r in led:
            self._fail_waiters(r, f"this node's ZooKeeper session is {why}")
            r.notify()

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
        r = self.open_replica(a.partition)
        r.assignment = a
        if a.leader == self.node_id and a.epoch >= r.meta.promised_epoch and member:
            lp = r.leader
            if lp is None or lp.epoch != a.epoch or lp.replicas != a.replicas \
                    or lp.learners != a.learners:
                self._become_leader(r, a)
        elif r.leader is not None:
            self.step_down(r, f"map names {a.leader or 'no leader'} at epoch {a.epoch}")
        r.notify()

    def _become_leader(self, r: PartitionReplica, a: Assignment) -> None:
        if r.leader is not None:
            self.step_down(r, "leadership re-established")
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
            self.senders.sender(peer)
        log.info("leading partition=%d epoch=%d replicas=%s noop_index=%d",
                 r.partition, a.epoch, ",".join(a.replicas), noop_index)
        self._propose(r, replica_pb2.LogEntry(epoch=a.epoch, noop=True), None)

    def step_down(self, r: PartitionReplica, why: str) -> None:
        """Stop leading r: its snapshot sends end and its waiting writes fail as
        Unavailable (they may or may not have been applied)."""
        lp, r.leader = r.leader, None
        self._led.pop(r.partition, None)
        self.catchup.forget(r.partition)
        r.confirm_need.clear()
        if lp is not None:
            log.info("stepped down partition=%d epoch=%d reason=%s", r.partition, lp.epoch, why)
        self._fail_waiters(r, f"leadership lost ({why})")
        r.notify()

    def _fail_waiters(self, r: PartitionReplica, why: str) -> None:
        waiters, r.waiters = r.waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(Unavailable(
                    f"partition {r.partition}: {why}; the write may or may not have been "
                    "applied", partition=r.partition))

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
            raise self._not_serving(p, "writes")
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
            if future is not None and not self.serving:  # the session went this turn
                if not future.done():
                    future.set_exception(self._not_serving(r.partition, "writes"))
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
            self.applier.schedule(committed)
        for peer in peers:
            self.senders.sender(peer).wake()

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
                           key=lambda q: self.senders.sender(q).rtt)
            need = {peer: self.senders.sender(peer).seq + 1 for peer in peers}
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
            self.senders.sender(peer).wake()

    async def _serving_leader(self, p: int) -> LeaderProgress:
        r = self._replicas.get(p)
        if r is None or r.leader is None:
            raise self._not_leader(p)
        lp = r.leader
        if not self.serving:
            raise self._not_serving(p, "reads")
        if not lp.ready:
            await self._wait(r, lambda: self._check_leader(r, lp) and lp.ready)
        return lp

    def _check_leader(self, r: PartitionReplica, lp: LeaderProgress) -> bool:
        if r.leader is not lp:
            raise self._not_leader(r.partition)
        if not self.serving:
            raise self._not_serving(r.partition, "reads")
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

    # -- the retained log ------------------------------------------------------------

    def entry(self, r: PartitionReplica, index: int) -> replica_pb2.LogEntry | None:
        """The entry at `index` if the retained log (base, last] holds it."""
        if index <= r.meta.base_index:
            return None
        entry = r.tail.get(index)
        if entry is not None:
            return entry
        raw = self.engine.log_entry(r.partition, index)
        return replica_pb2.LogEntry.FromString(raw) if raw is not None else None

    def epoch_at(self, r: PartitionReplica, index: int) -> int | None:
        """The epoch of the entry at `index`, if the retained log [base, last] has it."""
        if index == 0:
            return 0
        if index == r.meta.base_index:
            return r.meta.base_epoch
        if index > r.last.index or index < r.meta.base_index:
            return None
        entry = self.entry(r, index)
        return entry.epoch if entry is not None else None

    def _persist_meta(self, r: PartitionReplica) -> None:
        batch = self.engine.batch()
        batch.put_meta(meta_key(r.partition), encode_meta(r.meta))
        self.engine.write(batch)

    # -- follower side -------------------------------------------------------------

    def handle_append(self, request: replica_pb2.AppendBatchRequest
                      ) -> replica_pb2.AppendBatchResponse:
        response = replica_pb2.AppendBatchResponse(node_id=self.node_id)
        batch = self.engine.batch()
        now = time.monotonic()
        to_apply = []
        for append in request.appends:
            r = self.open_replica(append.partition)
            result = self._follow(r, append, batch, now)
            response.results.append(result)
            if result.accepted and r.meta.commit_index > r.meta.applied_index:
                to_apply.append(r.partition)
        self.engine.write(batch)
        if to_apply:
            self.applier.schedule(to_apply)
        return response

    def _follow(self, r: PartitionReplica, append: replica_pb2.AppendRequest, batch: Batch,
                now: float) -> replica_pb2.AppendResult:
        if r.leader is not None:
            if append.epoch > r.leader.epoch:
                self.step_down(r, f"append from a leader of epoch {append.epoch}")
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
            epoch_at=lambda i: self.epoch_at(r, i),
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
                r.last = LogPosition(self.epoch_at(r, cut - 1) or 0, cut - 1)
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
        r = self.open_replica(request.partition)
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
                self.step_down(r, f"promised epoch {request.epoch}")
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
        r = self.open_replica(p)
        digest, keys = self.engine.digest(p)
        return replica_pb2.DigestResponse(
            partition=p, digest=digest, applied_index=r.meta.applied_index, keys=keys,
            last_epoch=r.last.epoch, last_index=r.last.index,
        )

    # -- snapshots (storage/catchup.py) ----------------------------------------------

    async def install_snapshot(self, chunks: AsyncIterable[replica_pb2.SnapshotChunk]
                               ) -> replica_pb2.InstallSnapshotResponse:
        """Receive a snapshot stream and install it all or nothing (storage/catchup.py)."""
        return await self.catchup.install_snapshot(chunks)

    # -- errors --------------------------------------------------------------------

    @staticmethod
    def _not_serving(p: int, what: str) -> Unavailable:
        return Unavailable(f"partition {p}: this node's ZooKeeper session is not known "
                           f"alive; refusing {what} until it is", partition=p)

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


def _now_ms() -> int:
    return int(time.time() * 1000)
