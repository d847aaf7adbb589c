"""Leader -> follower traffic: one sender per peer node, for every partition they share.

Role: the part of the replication shell (`storage/replica.py`) that moves a leader's log
to its followers. `Senders` keeps one `PeerSender` per peer node and the heartbeat loop;
`build_append` gathers, for one peer, an Append for each partition this node leads on it
into one AppendBatch, and `on_append_response` records the peer's answers in each
partition's `LeaderProgress` (commit, read confirmation, lease).

Invariants:
- At most one AppendBatch is in flight to a peer: entries proposed meanwhile, for any
  partition the two nodes share, queue and leave together in the next one.
- A request carries at most `limits.MAX_APPEND_BATCH_BYTES` of entries, except that one
  entry always goes, however large.
- An answer counts only for the leadership it was sent for: if the partition's
  `LeaderProgress` has changed since (a step-down, a new epoch), the answer is ignored.
  A follower that promised a higher epoch makes this leader step down.
- A follower whose next index is at or below the leader's base gets no Append for that
  partition: it is handed to `storage/catchup.py` for a snapshot, then the log tail.
- Every `Tuning.heartbeat` each peer's sender is woken to send for every partition
  this node leads on it, entries or not (leases, read confirmation, commit index);
  failed sends back off exponentially, up to `Tuning.retry_max`.
- `build_append` and `on_append_response` run without an `await`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from storage import limits
from storage.replication import LeaderProgress
from storage.v1 import replica_pb2

if TYPE_CHECKING:
    from storage.replica import Replicas

log = logging.getLogger(__name__)


class Senders:
    """One node's leader -> follower traffic: a `PeerSender` per peer and the heartbeat."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.node_id = replicas.node_id
        self.peers = replicas.peers
        self.tuning = replicas.tuning
        self._senders: dict[str, PeerSender] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")

    def stop(self) -> list[asyncio.Task[None]]:
        """Stop the heartbeat and every sender; return their tasks for the caller to await."""
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        for sender in self._senders.values():
            sender.close()
        tasks = [s.task for s in self._senders.values() if s.task]
        if self._heartbeat_task is not None:
            tasks.append(self._heartbeat_task)
        return tasks

    def sender(self, peer: str) -> PeerSender:
        """The sender to `peer`, started on first use."""
        sender = self._senders.get(peer)
        if sender is None:
            sender = PeerSender(self, peer)
            self._senders[peer] = sender
        return sender

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.tuning.heartbeat)
            peers = {peer for r in self.replicas.leading() if r.leader for peer in r.leader.peers}
            for peer in peers:
                self.sender(peer).wake(heartbeat=True)

    def build_append(self, peer: str, seq: int, heartbeat: bool
                     ) -> tuple[replica_pb2.AppendBatchRequest, list[_Sent]]:
        request = replica_pb2.AppendBatchRequest(leader_id=self.node_id)
        sent: list[_Sent] = []
        size = 0  # entry bytes in this request; one entry always goes, however large
        for r in self.replicas.leading():
            lp = r.leader
            if lp is None or peer not in lp.match:
                continue
            wants_confirm = r.confirm_need.get(peer, 0) > lp.confirmed[peer]
            if not (heartbeat or wants_confirm or lp.has_entries_for(peer)):
                continue
            nxt = lp.next[peer]
            if nxt <= r.meta.base_index:  # a snapshot, then the log tail from its position
                self.replicas.catchup.start_snapshot(r, lp, peer)
                continue
            prev_index = nxt - 1
            prev_epoch = self.replicas.epoch_at(r, prev_index)
            if prev_epoch is None:
                lp.next[peer] = max(1, r.last.index + 1)
                continue
            append = request.appends.add(
                partition=r.partition, epoch=lp.epoch, prev_epoch=prev_epoch,
                prev_index=prev_index, commit_index=lp.commit_index,
            )
            index = nxt
            while index <= r.last.index:
                entry = self.replicas.entry(r, index)
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
        self.replicas.catchup.peer_reachable(peer)
        results = {res.partition: res for res in response.results}
        committed: list[int] = []
        again = False
        for item in sent:
            r = self.replicas.replica(item.partition)
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
                self.replicas.step_down(r, f"{peer} promised epoch {res.promised_epoch}")
            else:
                lp.on_reject(peer, prev_index_sent=item.prev_index,
                             follower_last=res.last_index)
                log.info("append refused partition=%d peer=%s reason=%s next=%d",
                         item.partition, peer, res.reason, lp.next[peer])
                again = True
        if committed:
            self.replicas.applier.schedule(committed)
        return again


@dataclass
class _Sent:
    partition: int
    leader: LeaderProgress
    prev_index: int
    through: int
    commit: int


class PeerSender:
    """Sends AppendBatch requests to one follower node, one in flight at a time."""

    def __init__(self, senders: Senders, peer: str) -> None:
        self.senders = senders
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
        tuning = self.senders.tuning
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            heartbeat, self._heartbeat = self._heartbeat, False
            stub = self.senders.peers.stub(self.peer)
            if stub is None:
                continue
            seq = self.seq + 1
            request, sent = self.senders.build_append(self.peer, seq, heartbeat)
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
            if self.senders.on_append_response(self.peer, seq, sent_at, sent, response):
                self._wake.set()
