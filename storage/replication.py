"""Per-partition replication decisions (DESIGN §6): log matching, quorum, epochs, reads.

Pure: every function and class here takes positions, epochs and clock readings as
arguments and returns decisions; the shell (`storage/replica.py`) does the disk and
network work. Never does I/O and never reads a clock.

Invariants kept by these decisions:
- A replica accepts an Append only in an epoch at least as high as any it promised, and
  only if it holds the entry before the new ones at the same `(epoch, index)`.
- A replica drops a conflicting suffix of its log only above its commit index.
- A leader counts an index as committed only when a majority of its epoch's replica
  set (itself included) holds it, and only at or after the no-op of its own epoch, so a
  new leader never commits on the strength of an older epoch's entries.
- A LINEARIZABLE read is answered only after a majority acknowledged the leader's epoch
  in a round that started after the read arrived.
- A replica that acknowledged a leader refuses to promise a higher epoch until the lease
  period has passed on its own monotonic clock; a leader serves LEASE reads only while
  less than (lease - margin) has passed since a majority's acknowledgements were sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)
class LogPosition:
    """A log position; positions order by epoch first, then index."""

    epoch: int
    index: int


ZERO = LogPosition(0, 0)


def majority(size: int) -> int:
    """The smallest number of members that is a majority of `size`."""
    return size // 2 + 1


def quorum_index(indexes: Iterable[int], size: int) -> int:
    """The highest index held by a majority of a set of `size` members.

    `indexes` lists what each member holds (members not listed hold nothing).
    """
    ranked = sorted(indexes, reverse=True)
    need = majority(size)
    return ranked[need - 1] if len(ranked) >= need else 0


@dataclass(frozen=True)
class AppendDecision:
    accepted: bool
    reason: str = ""
    truncate_from: int | None = None  # drop log entries at and after this index
    first_new: int = 0  # entries[first_new:] are to be written
    promised_epoch: int = 0
    commit_index: int = 0


def decide_append(
    *,
    promised_epoch: int,
    last: LogPosition,
    base: LogPosition,
    commit_index: int,
    epoch: int,
    prev: LogPosition,
    entries: Sequence[LogPosition],
    leader_commit: int,
    epoch_at: Callable[[int], int | None],
) -> AppendDecision:
    """Decide a follower's answer to `Append(epoch, prev, entries, leader_commit)`.

    `epoch_at(i)` returns the epoch of the replica's entry at index i (None if absent),
    for base.index < i <= last.index.
    """
    if epoch < promised_epoch:
        return AppendDecision(False, f"stale epoch {epoch} < promised {promised_epoch}",
                              promised_epoch=promised_epoch, commit_index=commit_index)
    if prev.index > last.index:
        return AppendDecision(False, f"gap: prev index {prev.index} > last index {last.index}",
                              promised_epoch=epoch, commit_index=commit_index)
    if prev.index > base.index:
        held = epoch_at(prev.index)
        if held != prev.epoch:
            return AppendDecision(
                False,
                f"mismatch at {prev.index}: holds epoch {held}, leader has {prev.epoch}",
                promised_epoch=epoch,
                commit_index=commit_index,
            )
    elif prev.index == base.index and prev.epoch != base.epoch and base.index > 0:
        return AppendDecision(False, f"mismatch at base {base.index}",
                              promised_epoch=epoch, commit_index=commit_index)
    truncate_from: int | None = None
    first_new = len(entries)
    for offset, pos in enumerate(entries):
        if pos.index <= base.index:
            continue
        if pos.index > last.index:
            first_new = offset
            break
        held = epoch_at(pos.index)
        if held != pos.epoch:
            if pos.index <= commit_index:
                return AppendDecision(
                    False,
                    f"refusing to drop committed entry {pos.index} (commit {commit_index})",
                    promised_epoch=epoch,
                    commit_index=commit_index,
                )
            truncate_from = pos.index
            first_new = offset
            break
    matched_through = entries[-1].index if entries else prev.index
    new_commit = max(commit_index, min(leader_commit, matched_through))
    return AppendDecision(
        True,
        truncate_from=truncate_from,
        first_new=first_new,
        promised_epoch=epoch,
        commit_index=new_commit,
    )


@dataclass(frozen=True)
class PromiseDecision:
    promised: bool
    reason: str = ""
    retry_after_s: float = 0.0


def decide_promise(
    *, promised_epoch: int, requested: int, can_vote: bool, lease_remaining_s: float
) -> PromiseDecision:
    """Decide whether a replica promises epoch `requested` (DESIGN §6, failover step 2).

    Re-promising the epoch already promised is idempotent (a controller may retry);
    epochs are reserved uniquely in ZooKeeper, so no two controllers ask for the same one.
    """
    if not can_vote:
        return PromiseDecision(False, "this replica's data directory is not the voting "
                               "incarnation: it rejoins as a learner and votes in no quorum")
    if requested < promised_epoch:
        return PromiseDecision(False, f"already promised epoch {promised_epoch}")
    if requested > promised_epoch and lease_remaining_s > 0:
        return PromiseDecision(False, "a lease granted to the current leader is still running",
                               lease_remaining_s)
    return PromiseDecision(True)


def choose_leader(promised: Mapping[str, LogPosition], preference: Sequence[str]) -> str:
    """Among replicas that promised, the one with the highest last position.

    Ties go to the earliest in `preference` (the planned order), so leaders stay balanced.
    """
    if not promised:
        raise ValueError("no replica promised")
    best = max(promised.values())
    rank = {node: i for i, node in enumerate(preference)}
    tied = [n for n, pos in promised.items() if pos == best]
    return min(tied, key=lambda n: (rank.get(n, len(rank)), n))


class LeaderProgress:
    """A leader's view of its followers for one partition in one epoch.

    `replicas` vote (commit and read confirmations count only them); `learners` receive
    the log but never count. Request sequence numbers (`seq`) are per follower and
    increase with every Append sent to it; a read noted `need[peer] = next seq` is
    confirmed by an acknowledgement of any request with seq >= need[peer].
    """

    def __init__(
        self,
        *,
        node_id: str,
        epoch: int,
        replicas: Sequence[str],
        learners: Sequence[str],
        last_index: int,
        commit_index: int,
        noop_index: int,
    ) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.replicas = tuple(replicas)
        self.learners = tuple(learners)
        self.last_index = last_index
        self.commit_index = commit_index
        self.noop_index = noop_index
        self.peers = tuple(p for p in (*self.replicas, *self.learners) if p != node_id)
        self.match: dict[str, int] = dict.fromkeys(self.peers, 0)
        # Followers whose acknowledgements count: a replica that answers as a non-voter
        # (a wiped directory rejoining) holds what it acknowledges but counts in no quorum.
        self.voting: set[str] = set(self.replicas)
        self.next: dict[str, int] = dict.fromkeys(self.peers, last_index + 1)
        self.peer_commit: dict[str, int] = dict.fromkeys(self.peers, 0)
        self.confirmed: dict[str, int] = dict.fromkeys(self.peers, 0)
        self.acked_sent_at: dict[str, float] = dict.fromkeys(self.peers, float("-inf"))

    @property
    def ready(self) -> bool:
        """The epoch's no-op is committed: the leader may acknowledge and serve reads."""
        return self.commit_index >= self.noop_index

    def has_entries_for(self, peer: str) -> bool:
        """The follower lacks entries this leader holds: worth an Append at once. (A lagging
        commit index alone waits for the next Append or heartbeat: followers learn it
        late, which only delays their FOLLOWER reads, and costs no extra RPC.)"""
        return self.next[peer] <= self.last_index

    def on_accept(
        self, peer: str, *, seq: int, sent_at: float, through: int, commit_sent: int,
        voter: bool = True,
    ) -> bool:
        """Record an accepted Append; return True if the commit index advanced."""
        if not voter:
            self.voting.discard(peer)
        elif peer in self.replicas:
            self.voting.add(peer)
        if through > self.match[peer]:
            self.match[peer] = through
        self.next[peer] = max(self.next[peer], through + 1)
        self.peer_commit[peer] = max(self.peer_commit[peer], commit_sent)
        if seq > self.confirmed[peer]:
            self.confirmed[peer] = seq
            self.acked_sent_at[peer] = max(self.acked_sent_at[peer], sent_at)
        return self.advance_commit()

    def on_reject(self, peer: str, *, prev_index_sent: int, follower_last: int) -> None:
        """Back up `next` after a refused Append (gap or mismatch), never past 1."""
        self.next[peer] = max(1, min(prev_index_sent, follower_last + 1))

    def on_local_append(self, last_index: int) -> bool:
        self.last_index = last_index
        return self.advance_commit()

    def advance_commit(self) -> bool:
        held = [self.last_index if node == self.node_id else self.match.get(node, 0)
                for node in self.replicas if node in self.voting]
        index = quorum_index(held, len(self.replicas))
        if index >= self.noop_index and index > self.commit_index:
            self.commit_index = index
            return True
        return False

    def confirmed_since(self, need: Mapping[str, int]) -> bool:
        """A majority of voters acknowledged a request at or after `need` (self counts)."""
        count = sum(
            1
            for node in self.replicas
            if node == self.node_id
            or (node in self.voting and self.confirmed.get(node, 0) >= need.get(node, 1 << 62))
        )
        return count >= majority(len(self.replicas))

    def lease_valid_until(self, lease_s: float, margin_s: float) -> float:
        """Monotonic instant until which LEASE reads may be served locally."""
        sent = sorted(
            (float("inf") if node == self.node_id else self.acked_sent_at.get(node, float("-inf"))
             for node in self.replicas if node in self.voting),
            reverse=True,
        )
        need = majority(len(self.replicas))
        return sent[need - 1] + lease_s - margin_s if len(sent) >= need else float("-inf")
