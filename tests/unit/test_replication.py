"""storage.replication: log matching, epoch fencing, leader choice, quorum, commit and reads.

Pure: every test drives the decision functions with positions, epochs and clock readings
and checks the decisions against DESIGN §6; nothing here touches a disk, a socket or a
clock. Hypothesis prints the falsifying example (and `--hypothesis-seed` replays a run).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from storage.replication import (
    ZERO,
    AppendDecision,
    LeaderProgress,
    LogPosition,
    choose_leader,
    decide_append,
    decide_promise,
    majority,
    quorum_index,
)

INF = float("inf")


# -- a follower's log, as the shell (`storage/replica.py`) keeps it ---------------------


@dataclass
class FollowerLog:
    """What a follower holds for one partition: its retained log after `base`, its commit
    index and its promised epoch. `apply` does what the shell does with a decision, and
    checks on the way that the decision is one the shell can carry out safely."""

    entries: dict[int, int]  # index -> epoch, for base.index < index <= last.index
    base: LogPosition = ZERO
    commit: int = 0
    promised: int = 0
    truncations: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, epochs: Sequence[int], *, base_index: int = 0, commit: int = 0,
           promised: int = 0) -> FollowerLog:
        """`epochs[i]` is the epoch of index i + 1; indexes <= base_index are compacted."""
        base = LogPosition(epochs[base_index - 1], base_index) if base_index else ZERO
        held = {i: e for i, e in enumerate(epochs, start=1) if i > base_index}
        return cls(held, base, commit, max(promised, max(epochs, default=0)))

    @property
    def last(self) -> LogPosition:
        if not self.entries:
            return self.base
        index = max(self.entries)
        return LogPosition(self.entries[index], index)

    def epoch_at(self, index: int) -> int | None:
        # decide_append may ask only about the retained log (its documented contract).
        assert self.base.index < index <= self.last.index, (
            f"epoch_at({index}) outside the retained log ({self.base.index}, {self.last.index}]"
        )
        return self.entries.get(index)

    def decide(self, *, epoch: int, prev: LogPosition, entries: Sequence[LogPosition],
               leader_commit: int) -> AppendDecision:
        return decide_append(
            promised_epoch=self.promised, last=self.last, base=self.base,
            commit_index=self.commit, epoch=epoch, prev=prev, entries=entries,
            leader_commit=leader_commit, epoch_at=self.epoch_at,
        )

    def apply(self, decision: AppendDecision, entries: Sequence[LogPosition]) -> None:
        assert decision.promised_epoch >= self.promised, "a promise never goes down"
        self.promised = decision.promised_epoch
        if not decision.accepted:
            assert decision.truncate_from is None
            assert decision.commit_index == self.commit
            return
        if decision.truncate_from is not None:
            cut = decision.truncate_from
            assert cut > self.commit, f"truncates committed entry {cut} (commit {self.commit})"
            assert self.base.index < cut <= self.last.index
            self.truncations.append(cut)
            for index in [i for i in self.entries if i >= cut]:
                del self.entries[index]
        new = entries[decision.first_new:]
        if new:
            assert new[0].index == self.last.index + 1, "new entries must extend the log"
        for pos in new:
            self.entries[pos.index] = pos.epoch
        assert decision.commit_index >= self.commit, "the commit index never goes down"
        assert decision.commit_index <= self.last.index
        self.commit = decision.commit_index

    def append(self, *, epoch: int, prev: LogPosition, entries: Sequence[LogPosition],
               leader_commit: int) -> AppendDecision:
        decision = self.decide(epoch=epoch, prev=prev, entries=entries,
                               leader_commit=leader_commit)
        self.apply(decision, entries)
        return decision

    def epochs(self) -> list[int]:
        """Epochs of the retained log, base excluded, in index order."""
        return [self.entries[i] for i in range(self.base.index + 1, self.last.index + 1)]


def run(start: int, *epochs: int) -> list[LogPosition]:
    """Entries with the given epochs at indexes start, start + 1, ..."""
    return [LogPosition(e, i) for i, e in enumerate(epochs, start=start)]


def follower(epochs: Sequence[int], **kw: int) -> FollowerLog:
    return FollowerLog.of(epochs, **kw)


# -- decide_append: fencing and log matching -------------------------------------------


def test_stale_epoch_rejected_with_the_promised_epoch_unchanged() -> None:
    f = follower([1, 1, 2], commit=2, promised=5)
    d = f.decide(epoch=4, prev=LogPosition(2, 3), entries=run(4, 4), leader_commit=4)
    assert not d.accepted
    assert "stale epoch" in d.reason
    assert d.promised_epoch == 5
    assert d.commit_index == 2
    assert d.truncate_from is None


def test_same_epoch_as_promised_is_not_stale() -> None:
    f = follower([1, 1, 2], promised=5)
    d = f.decide(epoch=5, prev=LogPosition(2, 3), entries=run(4, 5), leader_commit=0)
    assert d.accepted
    assert d.promised_epoch == 5


def test_gap_rejected_when_prev_is_beyond_the_last_entry() -> None:
    f = follower([1, 1], commit=1, promised=1)
    d = f.decide(epoch=3, prev=LogPosition(1, 3), entries=run(4, 3), leader_commit=4)
    assert not d.accepted
    assert "gap" in d.reason
    assert d.commit_index == 1
    assert d.truncate_from is None


def test_prev_epoch_mismatch_rejected() -> None:
    f = follower([1, 1, 2], commit=1)
    d = f.decide(epoch=3, prev=LogPosition(3, 3), entries=run(4, 3), leader_commit=3)
    assert not d.accepted
    assert "mismatch at 3" in d.reason
    assert d.commit_index == 1
    assert d.truncate_from is None


def test_rejections_from_a_current_epoch_still_raise_the_promise() -> None:
    """A reject that is not about the epoch fences older leaders just as an accept does."""
    gap = follower([1], promised=1).decide(
        epoch=4, prev=LogPosition(1, 5), entries=[], leader_commit=0)
    mismatch = follower([1, 1], promised=1).decide(
        epoch=4, prev=LogPosition(2, 2), entries=[], leader_commit=0)
    assert (gap.accepted, gap.promised_epoch) == (False, 4)
    assert (mismatch.accepted, mismatch.promised_epoch) == (False, 4)


def test_matching_append_writes_only_the_new_entries() -> None:
    f = follower([1, 1, 2], promised=2)
    entries = run(3, 2, 3, 3)  # index 3 is held already, 4 and 5 are new
    d = f.append(epoch=3, prev=LogPosition(1, 2), entries=entries, leader_commit=0)
    assert d.accepted
    assert d.truncate_from is None
    assert d.first_new == 1
    assert d.promised_epoch == 3
    assert f.epochs() == [1, 1, 2, 3, 3]


def test_redelivery_of_the_same_entries_writes_nothing() -> None:
    f = follower([1, 1])
    entries = run(3, 2, 2)
    first = f.append(epoch=2, prev=LogPosition(1, 2), entries=entries, leader_commit=0)
    assert (first.accepted, first.first_new, first.truncate_from) == (True, 0, None)
    again = f.append(epoch=2, prev=LogPosition(1, 2), entries=entries, leader_commit=0)
    assert again.accepted
    assert again.truncate_from is None
    assert again.first_new == len(entries)
    assert f.epochs() == [1, 1, 2, 2]


def test_a_shorter_redelivery_keeps_the_longer_log() -> None:
    """An old Append arriving late must not cut entries the follower received since."""
    f = follower([1, 1, 2, 2, 2])
    d = f.append(epoch=2, prev=LogPosition(1, 1), entries=run(2, 1, 2), leader_commit=0)
    assert d.accepted
    assert (d.truncate_from, d.first_new) == (None, 2)
    assert f.epochs() == [1, 1, 2, 2, 2]


def test_conflicting_suffix_truncated_at_the_first_conflicting_index() -> None:
    f = follower([1, 1, 2, 2, 2], commit=2, promised=2)
    entries = run(3, 2, 3, 3)  # 3 matches; 4 is the first conflict; 5 conflicts too
    d = f.append(epoch=3, prev=LogPosition(1, 2), entries=entries, leader_commit=2)
    assert d.accepted
    assert d.truncate_from == 4
    assert d.first_new == 1
    assert f.epochs() == [1, 1, 2, 3, 3]
    assert f.truncations == [4]


def test_conflict_at_the_first_entry_truncates_there() -> None:
    f = follower([1, 1, 2, 2])
    d = f.append(epoch=3, prev=LogPosition(1, 2), entries=run(3, 3), leader_commit=0)
    assert (d.accepted, d.truncate_from, d.first_new) == (True, 3, 0)
    assert f.epochs() == [1, 1, 3]


def test_never_truncates_a_committed_entry_rejects_instead() -> None:
    f = follower([1, 1, 2, 2], commit=3, promised=2)
    d = f.decide(epoch=3, prev=LogPosition(1, 2), entries=run(3, 3), leader_commit=3)
    assert not d.accepted
    assert "committed" in d.reason
    assert d.truncate_from is None
    assert d.commit_index == 3


def test_conflict_just_above_the_commit_index_is_truncated() -> None:
    f = follower([1, 1, 2, 2], commit=3, promised=2)
    d = f.append(epoch=3, prev=LogPosition(2, 3), entries=run(4, 3), leader_commit=3)
    assert (d.accepted, d.truncate_from) == (True, 4)
    assert f.epochs() == [1, 1, 2, 3]


# -- decide_append: the compacted prefix (base) ----------------------------------------


def test_prev_below_base_accepted_and_entries_at_or_below_base_skipped() -> None:
    # base = (1, 4): indexes 1..4 are in the snapshot; 5 and 6 are retained.
    f = follower([1, 1, 1, 1, 2, 2], base_index=4, commit=4, promised=2)
    entries = run(3, 1, 1, 2, 2, 2)  # 3, 4 at/below base; 5, 6 held; 7 new
    d = f.append(epoch=2, prev=LogPosition(1, 2), entries=entries, leader_commit=7)
    assert d.accepted
    assert d.truncate_from is None
    assert d.first_new == 4
    assert d.commit_index == 7
    assert f.epochs() == [2, 2, 2]


def test_entries_at_or_below_base_are_never_compared_even_if_they_differ() -> None:
    # The snapshot holds committed entries; an Append cannot contradict them, so the
    # decision must not call epoch_at below the base (FollowerLog asserts it does not).
    f = follower([1, 1, 1], base_index=3, commit=3)
    d = f.append(epoch=6, prev=LogPosition(1, 1), entries=run(2, 5, 5, 6), leader_commit=0)
    assert (d.accepted, d.truncate_from, d.first_new) == (True, None, 2)
    assert f.last == LogPosition(6, 4)


def test_all_entries_at_or_below_base_write_nothing() -> None:
    f = follower([1, 1, 1, 1], base_index=4, commit=4)
    d = f.append(epoch=1, prev=LogPosition(1, 1), entries=run(2, 1, 1), leader_commit=4)
    assert d.accepted
    assert d.first_new == 2
    assert d.truncate_from is None
    assert d.commit_index == 4


def test_prev_at_base_with_matching_epoch_accepted() -> None:
    f = follower([1, 1, 3], base_index=3, commit=3, promised=3)
    d = f.append(epoch=4, prev=LogPosition(3, 3), entries=run(4, 4, 4), leader_commit=5)
    assert d.accepted
    assert d.first_new == 0
    assert d.commit_index == 5
    assert f.last == LogPosition(4, 5)


def test_prev_at_base_with_mismatching_epoch_rejected() -> None:
    f = follower([1, 1, 3], base_index=3, commit=3, promised=3)
    d = f.decide(epoch=4, prev=LogPosition(2, 3), entries=run(4, 4), leader_commit=4)
    assert not d.accepted
    assert "base" in d.reason
    assert d.commit_index == 3


def test_prev_at_an_empty_base_is_always_the_start_of_the_log() -> None:
    f = follower([2, 2], commit=0)
    d = f.append(epoch=3, prev=ZERO, entries=run(1, 3), leader_commit=0)
    assert (d.accepted, d.truncate_from, d.first_new) == (True, 1, 0)
    assert f.epochs() == [3]


# -- decide_append: the follower's commit index ----------------------------------------


@pytest.mark.parametrize(
    ("old", "leader_commit", "entries_through", "expected"),
    [
        (0, 5, 3, 3),  # bounded by what the Append proved matching
        (0, 2, 3, 2),  # bounded by the leader's commit
        (4, 2, 5, 4),  # never decreases (leader lags on commit)
        (2, 9, 5, 5),
        (5, 9, 5, 5),
    ],
)
def test_follower_commit_is_max_of_old_and_min_of_leader_commit_and_matched(
    old: int, leader_commit: int, entries_through: int, expected: int
) -> None:
    f = follower([1, 1, 1, 1, 1], commit=old)
    entries = run(2, *([1] * (entries_through - 1)))
    d = f.append(epoch=1, prev=LogPosition(1, 1), entries=entries, leader_commit=leader_commit)
    assert d.accepted
    assert d.commit_index == expected


def test_heartbeat_commits_only_up_to_prev_not_an_unverified_suffix() -> None:
    # Entries 4 and 5 (epoch 2) may be from a deposed leader: the heartbeat proves only 3.
    f = follower([1, 1, 2, 2, 2], commit=0)
    d = f.append(epoch=3, prev=LogPosition(2, 3), entries=[], leader_commit=5)
    assert d.accepted
    assert d.commit_index == 3
    assert d.truncate_from is None
    assert d.first_new == 0


def test_promised_epoch_raised_to_the_request_epoch_on_accept() -> None:
    f = follower([1], promised=2)
    d = f.append(epoch=7, prev=LogPosition(1, 1), entries=[], leader_commit=0)
    assert d.accepted
    assert d.promised_epoch == 7
    assert f.promised == 7


# -- decide_append against a reference model -------------------------------------------


def reference_append(f: FollowerLog, epoch: int, prev: LogPosition,
                     entries: Sequence[LogPosition], leader_commit: int
                     ) -> tuple[bool, dict[int, int], int]:
    """DESIGN §6, spelled out directly: (accepted, resulting log, resulting commit)."""
    held = dict(f.entries)
    if epoch < f.promised or prev.index > f.last.index:
        return False, held, f.commit
    if prev.index > f.base.index and held.get(prev.index) != prev.epoch:
        return False, held, f.commit
    if 0 < prev.index == f.base.index and prev.epoch != f.base.epoch:
        return False, held, f.commit
    for pos in entries:
        if pos.index <= f.base.index or held.get(pos.index) == pos.epoch:
            continue
        if pos.index in held:
            if pos.index <= f.commit:
                return False, dict(f.entries), f.commit
            for index in [i for i in held if i >= pos.index]:
                del held[index]
        held[pos.index] = pos.epoch
    matched = entries[-1].index if entries else prev.index
    return True, held, max(f.commit, min(leader_commit, matched))


@st.composite
def append_cases(draw: st.DrawFn) -> tuple[FollowerLog, int, LogPosition, list[LogPosition], int]:
    """A follower, and an Append that may or may not fit it (epochs from a tiny range, so
    matches, mismatches and partial overlaps are all common)."""
    epochs = sorted(draw(st.lists(st.integers(1, 4), max_size=8)))
    n = len(epochs)
    base_index = draw(st.integers(0, n))
    commit = draw(st.integers(base_index, n))
    promised = draw(st.integers(0, 5))
    f = follower(epochs, base_index=base_index, commit=commit, promised=promised)
    epoch = draw(st.integers(0, 6))
    prev_index = draw(st.integers(0, n + 2))
    own = epochs[prev_index - 1] if 0 < prev_index <= n else 0
    prev_epoch = draw(st.sampled_from([own, own + 1, max(own - 1, 0)]))
    size = draw(st.integers(0, 5))
    new_epochs: list[int] = []
    for i in range(prev_index + 1, prev_index + size + 1):
        floor = new_epochs[-1] if new_epochs else prev_epoch
        theirs = epochs[i - 1] if i <= n else 0
        choice = draw(st.sampled_from([theirs, floor, floor + 1]))
        new_epochs.append(max(choice, floor))
    leader_commit = draw(st.integers(0, prev_index + size + 1))
    return f, epoch, LogPosition(prev_epoch, prev_index), run(prev_index + 1, *new_epochs), \
        leader_commit


@settings(max_examples=250, deadline=None)
@given(append_cases())
def test_decide_append_matches_the_reference_model(
    case: tuple[FollowerLog, int, LogPosition, list[LogPosition], int],
) -> None:
    f, epoch, prev, entries, leader_commit = case
    promised = f.promised
    accepted, expected_log, expected_commit = reference_append(
        f, epoch, prev, entries, leader_commit)
    d = f.append(epoch=epoch, prev=prev, entries=entries, leader_commit=leader_commit)
    assert d.accepted == accepted, d.reason
    assert f.entries == expected_log
    assert f.commit == expected_commit
    assert d.promised_epoch == (promised if epoch < promised else epoch)


# -- log matching: a leader bringing a follower up to date -----------------------------


@dataclass(frozen=True)
class Divergence:
    leader: list[int]  # epochs of the leader's log, index 1..n; the last epoch is its own
    shared: int  # the follower holds the leader's first `shared` entries
    follower: FollowerLog
    leader_commit: int
    batch: int  # most entries per Append


@st.composite
def divergences(draw: st.DrawFn) -> Divergence:
    epoch = draw(st.integers(2, 8))
    older = sorted(draw(st.lists(st.integers(1, epoch - 1), max_size=12)))
    leader = older + [epoch] * draw(st.integers(1, 4))  # starts with this epoch's no-op
    n = len(leader)
    shared = draw(st.integers(0, n))
    # The follower's own suffix comes from epochs the leader holds nowhere after the
    # shared prefix (log matching: one (epoch, index) means one history before it).
    floor = leader[shared - 1] if shared else 1
    foreign = [e for e in range(floor, epoch) if e not in leader[shared:]]
    suffix = sorted(draw(st.lists(st.sampled_from(foreign), max_size=10))) if foreign else []
    epochs = leader[:shared] + suffix
    # Only entries every later leader holds can be committed: at most the shared prefix.
    commit = draw(st.integers(0, shared))
    base_index = draw(st.integers(0, commit))
    promised = draw(st.integers(0, epoch))
    f = follower(epochs, base_index=base_index, commit=commit, promised=promised)
    return Divergence(leader, shared, f, draw(st.integers(0, n)), draw(st.integers(1, 5)))


@settings(max_examples=250, deadline=None)
@given(divergences())
def test_leader_brings_a_diverged_or_lagging_follower_to_its_log(case: Divergence) -> None:
    leader, f = case.leader, case.follower
    n, epoch = len(leader), leader[-1]
    noop_index = leader.index(epoch) + 1
    commit_before = f.commit
    committed_before = {i: e for i, e in f.entries.items() if i <= f.commit}
    base_before = f.base

    def at(index: int) -> LogPosition:
        return LogPosition(leader[index - 1], index) if index else ZERO

    # G never answers: L and F are the majority of three.
    lp = LeaderProgress(node_id="L", epoch=epoch, replicas=["L", "F", "G"], learners=[],
                        last_index=n, commit_index=case.leader_commit, noop_index=noop_index)
    assert lp.next["F"] == n + 1
    rejects = 0
    for seq in itertools.count(1):
        assert seq <= 2 * n + 3, "the leader did not converge"
        nxt = lp.next["F"]
        through = min(n, nxt + case.batch - 1)
        entries = [at(i) for i in range(nxt, through + 1)]
        d = f.append(epoch=epoch, prev=at(nxt - 1), entries=entries,
                     leader_commit=lp.commit_index)
        assert d.promised_epoch == epoch
        if d.accepted:
            lp.on_accept("F", seq=seq, sent_at=float(seq), through=through,
                         commit_sent=lp.commit_index)
            if lp.match["F"] == n:
                break
        else:
            assert "committed" not in d.reason, d.reason
            event(d.reason.split(" ")[0])  # gap / mismatch
            rejects += 1
            lp.on_reject("F", prev_index_sent=nxt - 1, follower_last=f.last.index)
            assert lp.next["F"] < nxt, "a reject must back up next"
    event(f"truncated: {bool(f.truncations)}, base: {f.base.index > 0}")
    # Rejected only while prev was beyond the shared prefix: one step back per reject.
    assert rejects <= max(n - case.shared, 0)
    assert f.base == base_before
    assert f.last == LogPosition(epoch, n)
    assert f.epochs() == leader[f.base.index:]
    assert all(cut > commit_before for cut in f.truncations)
    assert all(f.entries.get(i, e) == e for i, e in committed_before.items())
    # F holds the no-op and everything after: L + F commit all; a heartbeat tells F.
    assert lp.commit_index == n
    assert lp.ready
    hb = f.append(epoch=epoch, prev=at(n), entries=[], leader_commit=lp.commit_index)
    assert hb.accepted
    assert f.commit == n


# -- decide_promise ----------------------------------------------------------------------


def test_promise_refuses_a_lower_epoch() -> None:
    d = decide_promise(promised_epoch=5, requested=4, can_vote=True, lease_remaining_s=0.0)
    assert not d.promised
    assert "5" in d.reason


def test_promise_grants_a_higher_epoch_without_a_lease() -> None:
    d = decide_promise(promised_epoch=5, requested=6, can_vote=True, lease_remaining_s=0.0)
    assert d.promised
    assert d.retry_after_s == 0.0


@pytest.mark.parametrize("lease_remaining_s", [0.0, -1.0, 2.5])
def test_promise_is_idempotent_for_the_same_epoch(lease_remaining_s: float) -> None:
    for _ in range(2):
        d = decide_promise(promised_epoch=6, requested=6, can_vote=True,
                           lease_remaining_s=lease_remaining_s)
        assert d.promised


def test_promise_refused_while_a_lease_runs_and_says_when_to_retry() -> None:
    d = decide_promise(promised_epoch=5, requested=6, can_vote=True, lease_remaining_s=1.25)
    assert not d.promised
    assert "lease" in d.reason
    assert d.retry_after_s == 1.25


def test_promise_granted_once_the_lease_has_run_out() -> None:
    d = decide_promise(promised_epoch=5, requested=6, can_vote=True, lease_remaining_s=-0.01)
    assert d.promised


@pytest.mark.parametrize("requested", [4, 5, 6])
def test_promise_refused_by_a_non_voter(requested: int) -> None:
    d = decide_promise(promised_epoch=5, requested=requested, can_vote=False,
                       lease_remaining_s=0.0)
    assert not d.promised
    assert "learner" in d.reason


@settings(max_examples=200, deadline=None)
@given(promised=st.integers(0, 10), requested=st.integers(0, 10), can_vote=st.booleans(),
       lease=st.floats(-5, 5, allow_nan=False))
def test_promise_granted_exactly_when_safe(
    promised: int, requested: int, can_vote: bool, lease: float
) -> None:
    d = decide_promise(promised_epoch=promised, requested=requested, can_vote=can_vote,
                       lease_remaining_s=lease)
    safe = can_vote and (requested == promised or (requested > promised and lease <= 0))
    assert d.promised == safe
    assert d.retry_after_s >= 0
    if d.retry_after_s:
        assert d.retry_after_s == lease


# -- choose_leader -----------------------------------------------------------------------


def test_choose_leader_highest_epoch_beats_longer_log() -> None:
    promised = {"a": LogPosition(3, 10), "b": LogPosition(4, 2), "c": LogPosition(3, 50)}
    assert choose_leader(promised, ["a", "b", "c"]) == "b"


def test_choose_leader_same_epoch_longest_log_wins() -> None:
    promised = {"a": LogPosition(3, 10), "b": LogPosition(3, 12), "c": LogPosition(2, 50)}
    assert choose_leader(promised, ["a", "c", "b"]) == "b"


def test_choose_leader_ties_go_to_the_earliest_in_preference() -> None:
    promised = {"a": LogPosition(3, 10), "b": LogPosition(3, 10), "c": LogPosition(3, 10)}
    assert choose_leader(promised, ["c", "a", "b"]) == "c"
    assert choose_leader(promised, ["b", "c", "a"]) == "b"


def test_choose_leader_ignores_preferred_nodes_that_did_not_promise() -> None:
    promised = {"a": LogPosition(3, 10), "b": LogPosition(3, 10)}
    assert choose_leader(promised, ["x", "y", "b", "a"]) == "b"


def test_choose_leader_ranks_promised_nodes_missing_from_preference_last() -> None:
    promised = {"a": LogPosition(3, 10), "z": LogPosition(3, 10), "m": LogPosition(3, 10)}
    assert choose_leader(promised, ["z"]) == "z"
    assert choose_leader(promised, []) == "a"  # deterministic: by name
    assert choose_leader({"q": LogPosition(1, 1)}, ["a", "b"]) == "q"


def test_choose_leader_with_no_promises_raises() -> None:
    with pytest.raises(ValueError, match="no replica promised"):
        choose_leader({}, ["a", "b"])


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdefg"),
                    st.builds(LogPosition, st.integers(0, 3), st.integers(0, 3)), min_size=1),
    st.permutations("abcdefg"),
)
def test_choose_leader_property(promised: dict[str, LogPosition], order: list[str]) -> None:
    chosen = choose_leader(promised, order)
    assert promised[chosen] == max(promised.values())
    best = [n for n in order if promised.get(n) == promised[chosen]]
    assert chosen == best[0]


# -- majority and quorum_index -------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3),
                                                (6, 4), (7, 4)])
def test_majority(size: int, expected: int) -> None:
    assert majority(size) == expected
    assert 2 * majority(size) > size >= 2 * (majority(size) - 1)


@pytest.mark.parametrize(
    ("indexes", "size", "expected"),
    [
        ([7], 1, 7),
        ([], 1, 0),
        ([5, 3], 2, 3),
        ([5], 2, 0),
        ([9, 4, 1], 3, 4),
        ([9, 4], 3, 4),
        ([9], 3, 0),
        ([8, 8, 2, 2], 4, 2),
        ([8, 8, 8, 2], 4, 8),
        ([10, 9, 8, 7, 6], 5, 8),
        ([10, 9], 5, 0),
        ([6, 5, 4, 3, 2, 1, 0], 7, 3),
    ],
)
def test_quorum_index_examples(indexes: list[int], size: int, expected: int) -> None:
    assert quorum_index(indexes, size) == expected


@st.composite
def holdings(draw: st.DrawFn) -> tuple[list[int], int]:
    size = draw(st.integers(1, 7))
    indexes = draw(st.lists(st.integers(0, 20), max_size=size))
    return indexes, size


@settings(max_examples=150, deadline=None)
@given(holdings())
def test_quorum_index_is_held_by_a_majority_and_nothing_higher_is(
    case: tuple[list[int], int],
) -> None:
    indexes, size = case
    q = quorum_index(indexes, size)
    holders = sum(1 for i in indexes if i >= q)
    assert q == 0 or holders >= majority(size)
    assert sum(1 for i in indexes if i >= q + 1) < majority(size)


# -- LeaderProgress ----------------------------------------------------------------------


def progress(replicas: Sequence[str] = ("L", "a", "b"), *, learners: Sequence[str] = (),
             last_index: int = 10, commit_index: int = 0, noop_index: int = 10,
             epoch: int = 3) -> LeaderProgress:
    return LeaderProgress(node_id="L", epoch=epoch, replicas=replicas, learners=learners,
                          last_index=last_index, commit_index=commit_index,
                          noop_index=noop_index)


def test_progress_starts_sending_after_the_leaders_last_entry() -> None:
    lp = progress(learners=["x"])
    assert lp.peers == ("a", "b", "x")
    assert lp.next == {"a": 11, "b": 11, "x": 11}
    assert lp.match == {"a": 0, "b": 0, "x": 0}
    assert not any(lp.has_entries_for(p) for p in lp.peers)


def test_older_epoch_entry_on_a_majority_does_not_commit_before_the_noop() -> None:
    # Leader of epoch 3: indexes 1..7 came from older epochs, 8 is its no-op.
    lp = progress(last_index=8, commit_index=2, noop_index=8)
    assert not lp.ready
    # Index 7 (epoch 2) reaches every replica: still not committed.
    assert not lp.on_accept("a", seq=1, sent_at=1.0, through=7, commit_sent=2)
    assert not lp.on_accept("b", seq=1, sent_at=1.0, through=7, commit_sent=2)
    assert lp.commit_index == 2
    assert not lp.ready
    # The no-op reaches a majority: everything up to it commits at once.
    assert lp.on_accept("a", seq=2, sent_at=2.0, through=8, commit_sent=2)
    assert lp.commit_index == 8
    assert lp.ready


def test_commit_advances_with_local_appends_after_the_noop() -> None:
    lp = progress(last_index=8, noop_index=8)
    lp.on_accept("a", seq=1, sent_at=1.0, through=8, commit_sent=0)
    assert lp.commit_index == 8
    assert not lp.on_local_append(9)  # only the leader holds 9
    assert lp.has_entries_for("a")
    assert lp.commit_index == 8
    assert lp.on_accept("b", seq=1, sent_at=1.0, through=9, commit_sent=8)
    assert lp.commit_index == 9
    assert not lp.on_accept("a", seq=2, sent_at=2.0, through=9, commit_sent=9)


def test_single_replica_commits_on_local_append() -> None:
    lp = progress(("L",), last_index=4, commit_index=4, noop_index=5)
    assert not lp.ready
    assert lp.on_local_append(5)
    assert lp.commit_index == 5
    assert lp.ready


def test_on_accept_moves_match_and_next_forward_only() -> None:
    lp = progress(last_index=10)
    lp.on_reject("a", prev_index_sent=10, follower_last=4)
    assert lp.next["a"] == 5
    lp.on_accept("a", seq=2, sent_at=2.0, through=9, commit_sent=3)
    assert (lp.match["a"], lp.next["a"], lp.peer_commit["a"]) == (9, 10, 3)
    lp.on_accept("a", seq=1, sent_at=1.0, through=6, commit_sent=1)  # late, older answer
    assert (lp.match["a"], lp.next["a"], lp.peer_commit["a"]) == (9, 10, 3)
    assert lp.confirmed["a"] == 2
    assert lp.acked_sent_at["a"] == 2.0


@pytest.mark.parametrize(
    ("prev_index_sent", "follower_last", "expected_next"),
    [
        (10, 4, 5),  # gap: resume right after the follower's last entry
        (10, 20, 10),  # mismatch at 10 with a longer follower: step back one
        (6, 6, 6),  # mismatch at the follower's last entry
        (0, 0, 1),  # never below 1
        (1, 0, 1),
        (3, -1, 1),
    ],
)
def test_on_reject_backs_up_next(prev_index_sent: int, follower_last: int,
                                 expected_next: int) -> None:
    lp = progress()
    lp.on_reject("a", prev_index_sent=prev_index_sent, follower_last=follower_last)
    assert lp.next["a"] == expected_next
    assert lp.has_entries_for("a") == (expected_next <= lp.last_index)


def test_confirmed_since_needs_a_majority_at_or_after_the_noted_seqs() -> None:
    lp = progress(("L", "a", "b", "c", "d"))
    need = {"a": 5, "b": 7, "c": 3, "d": 3}
    lp.on_accept("a", seq=4, sent_at=1.0, through=0, commit_sent=0)
    lp.on_accept("b", seq=6, sent_at=1.0, through=0, commit_sent=0)
    assert not lp.confirmed_since(need)  # only the leader itself
    lp.on_accept("a", seq=5, sent_at=2.0, through=0, commit_sent=0)
    assert not lp.confirmed_since(need)  # leader + a: 2 of 5
    lp.on_accept("c", seq=3, sent_at=2.0, through=0, commit_sent=0)
    assert lp.confirmed_since(need)  # leader + a + c: 3 of 5
    assert not lp.confirmed_since({"a": 6, "b": 7, "c": 4, "d": 3})


def test_confirmed_since_self_alone_in_a_single_replica_set() -> None:
    assert progress(("L",)).confirmed_since({})


def test_confirmed_since_does_not_count_peers_missing_from_need() -> None:
    lp = progress()
    lp.on_accept("a", seq=9, sent_at=1.0, through=0, commit_sent=0)
    assert not lp.confirmed_since({"b": 1})
    assert lp.confirmed_since({"a": 9})


def test_non_voting_follower_counts_in_no_commit() -> None:
    lp = progress(last_index=8, noop_index=8)
    assert not lp.on_accept("a", seq=1, sent_at=1.0, through=8, commit_sent=0, voter=False)
    assert lp.commit_index == 0
    assert lp.match["a"] == 8  # it holds the entries, it just does not vote
    assert lp.on_accept("b", seq=1, sent_at=1.0, through=8, commit_sent=0)
    assert lp.commit_index == 8


def test_non_voting_follower_counts_in_no_confirmation() -> None:
    lp = progress()
    lp.on_accept("a", seq=5, sent_at=1.0, through=0, commit_sent=0, voter=False)
    assert not lp.confirmed_since({"a": 1, "b": 1})
    lp.on_accept("b", seq=5, sent_at=1.0, through=0, commit_sent=0)
    assert lp.confirmed_since({"a": 1, "b": 1})


def test_a_replica_that_answers_as_non_voter_stops_counting() -> None:
    """A replica whose disk was wiped mid-epoch answers as a non-voter: what it acknowledged
    before no longer counts towards new commits, confirmations or leases."""
    lp = progress(last_index=8, noop_index=8)
    lp.on_accept("a", seq=1, sent_at=1.0, through=8, commit_sent=0)
    assert lp.commit_index == 8
    assert lp.confirmed_since({"a": 1})
    assert lp.lease_valid_until(5.0, 1.0) == 5.0
    lp.on_accept("a", seq=2, sent_at=2.0, through=8, commit_sent=8, voter=False)
    lp.on_local_append(9)
    assert not lp.on_accept("a", seq=3, sent_at=3.0, through=9, commit_sent=8, voter=False)
    assert lp.commit_index == 8
    assert not lp.confirmed_since({"a": 1})
    assert lp.lease_valid_until(5.0, 1.0) == -INF


def test_learners_receive_the_log_but_never_count() -> None:
    lp = progress(learners=["x", "y"], last_index=8, noop_index=8)
    assert not lp.on_accept("x", seq=1, sent_at=1.0, through=8, commit_sent=0)
    assert not lp.on_accept("y", seq=1, sent_at=1.0, through=8, commit_sent=0)
    assert lp.commit_index == 0
    assert "x" not in lp.voting
    assert not lp.confirmed_since({"x": 1, "y": 1})
    assert lp.lease_valid_until(5.0, 1.0) == -INF


def test_lease_is_the_majority_th_latest_acknowledged_send_plus_lease_minus_margin() -> None:
    lp = progress(("L", "a", "b", "c", "d"))
    assert lp.lease_valid_until(5.0, 1.0) == -INF  # nobody acknowledged yet
    lp.on_accept("a", seq=1, sent_at=100.0, through=0, commit_sent=0)
    assert lp.lease_valid_until(5.0, 1.0) == -INF  # leader + a: 2 of 5
    lp.on_accept("b", seq=1, sent_at=90.0, through=0, commit_sent=0)
    assert lp.lease_valid_until(5.0, 1.0) == 94.0  # leader, a(100), b(90)
    lp.on_accept("c", seq=1, sent_at=95.0, through=0, commit_sent=0)
    assert lp.lease_valid_until(5.0, 1.0) == 99.0  # leader, a(100), c(95)
    lp.on_accept("b", seq=2, sent_at=101.0, through=0, commit_sent=0)
    assert lp.lease_valid_until(5.0, 1.0) == 104.0  # leader, b(101), a(100)


def test_lease_ignores_an_older_acknowledgement_arriving_late() -> None:
    lp = progress()
    lp.on_accept("a", seq=2, sent_at=20.0, through=0, commit_sent=0)
    lp.on_accept("a", seq=1, sent_at=10.0, through=0, commit_sent=0)
    assert lp.lease_valid_until(3.0, 0.5) == 22.5


def test_lease_is_minus_infinity_with_too_few_voters() -> None:
    lp = progress(("L", "a", "b"))
    lp.on_accept("a", seq=1, sent_at=10.0, through=0, commit_sent=0, voter=False)
    lp.on_accept("b", seq=1, sent_at=10.0, through=0, commit_sent=0, voter=False)
    assert lp.lease_valid_until(3.0, 0.5) == -INF


def test_lease_of_a_single_replica_set_never_runs_out() -> None:
    # No other replica can promise a new epoch: only the leader's own replica can, and
    # promising steps the leader down first.
    assert progress(("L",)).lease_valid_until(3.0, 0.5) == INF


def test_lease_of_a_leader_outside_its_replica_set_needs_a_majority_of_others() -> None:
    lp = progress(("a", "b", "c"))
    lp.on_accept("a", seq=1, sent_at=10.0, through=0, commit_sent=0)
    assert lp.lease_valid_until(3.0, 0.5) == -INF
    assert not lp.confirmed_since({"a": 1, "b": 1, "c": 1})
    lp.on_accept("b", seq=1, sent_at=12.0, through=0, commit_sent=0)
    assert lp.lease_valid_until(3.0, 0.5) == 12.5
    assert lp.confirmed_since({"a": 1, "b": 1, "c": 1})


# -- LeaderProgress against brute-force models -----------------------------------------


@dataclass(frozen=True)
class Ack:
    peer: str
    seq: int
    sent_at: float
    through: int
    voter: bool


@st.composite
def ack_histories(draw: st.DrawFn) -> tuple[list[str], list[str], int, list[Ack | int]]:
    """A replica set (leader "L" included), learners, the no-op index, and a sequence of
    events: an `Ack`, or an int (a local append to that index)."""
    size = draw(st.integers(1, 7))
    replicas = ["L", *(f"r{i}" for i in range(1, size))]
    learners = draw(st.lists(st.sampled_from(["x", "y"]), unique=True))
    peers = replicas[1:] + learners
    noop_index = draw(st.integers(1, 6))
    events: list[Ack | int] = []
    last = noop_index
    for _ in range(draw(st.integers(0, 30))):
        if not peers or draw(st.integers(0, 5)) == 0:
            last += draw(st.integers(0, 2))
            events.append(last)
        else:
            events.append(Ack(draw(st.sampled_from(peers)), draw(st.integers(1, 10)),
                              float(draw(st.integers(0, 50))), draw(st.integers(0, last)),
                              draw(st.integers(0, 4)) > 0))
    return replicas, learners, noop_index, events


def brute_quorum(held: dict[str, int], size: int) -> int:
    """The highest index some majority-sized subset of `held` entirely holds."""
    best = 0
    for group in itertools.combinations(held, majority(size)):
        best = max(best, min(held[node] for node in group))
    return best


@settings(max_examples=150, deadline=None)
@given(ack_histories())
def test_progress_matches_a_brute_force_model(
    case: tuple[list[str], list[str], int, list[Ack | int]],
) -> None:
    replicas, learners, noop_index, events = case
    lp = LeaderProgress(node_id="L", epoch=2, replicas=replicas, learners=learners,
                        last_index=noop_index, commit_index=0, noop_index=noop_index)
    last, commit = noop_index, 0
    voting = set(replicas)
    match: dict[str, int] = {}
    confirmed: dict[str, int] = {}
    sent: dict[str, float] = {}
    lease_s, margin_s = 7.0, 2.0
    for step in events:
        before = lp.commit_index
        if isinstance(step, int):
            last = step
            advanced = lp.on_local_append(step)
        else:
            ack = step
            if not ack.voter:
                voting.discard(ack.peer)
            elif ack.peer in replicas:
                voting.add(ack.peer)
            match[ack.peer] = max(match.get(ack.peer, 0), ack.through)
            if ack.seq > confirmed.get(ack.peer, 0):
                confirmed[ack.peer] = ack.seq
                sent[ack.peer] = max(sent.get(ack.peer, -INF), ack.sent_at)
            advanced = lp.on_accept(ack.peer, seq=ack.seq, sent_at=ack.sent_at,
                                    through=ack.through, commit_sent=0, voter=ack.voter)
        voters = [n for n in replicas if n in voting]
        held = {n: last if n == "L" else match.get(n, 0) for n in voters}
        q = brute_quorum(held, len(replicas))
        if q >= noop_index and q > commit:
            commit = q
        assert lp.commit_index == commit
        assert advanced == (commit > before)
        assert lp.ready == (commit >= noop_index)
        # Confirmation: a majority of voters (the leader counts) at or after `need`.
        for need_seq in (1, 5, 10):
            need = dict.fromkeys(replicas[1:], need_seq)
            ok = 1 + sum(1 for n in voters if n != "L" and confirmed.get(n, 0) >= need_seq)
            assert lp.confirmed_since(need) == (ok >= majority(len(replicas)))
        # Lease: the latest instant some majority of voters (the leader: always) had all
        # acknowledged requests sent at or after.
        times = {n: INF if n == "L" else sent.get(n, -INF) for n in voters}
        since = max((min(times[n] for n in group)
                     for group in itertools.combinations(times, majority(len(replicas)))),
                    default=-INF)
        assert lp.lease_valid_until(lease_s, margin_s) == since + lease_s - margin_s

