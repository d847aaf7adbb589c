"""Partitioning (DESIGN §5): key -> partition on the xxh3 ring, replica placement, plan diffs.

Role: the pure core the ring controller, the nodes and the client share. The controller
calls `plan()` to decide who holds what and `diff()` to turn a new plan into one-replica
moves; nodes and clients call `partition_of()` / `PartitionMap.for_key()` on every request.

Invariants:
- Never does I/O and keeps no state between calls: same input, same output (ties are broken
  by member id or by a fixed hash, never by chance or by the order of the caller's lists).
- A key's position is xxh3_64(key) on the 64-bit ring. The ring is cut into Q equal arcs
  (Q a power of two in 1..4096, fixed when the cluster is created); partition i is the arc
  [i * 2^64 / Q, (i + 1) * 2^64 / Q), so the partition is the position's top log2(Q) bits.
- A replica set holds min(RF, members) distinct members, in distinct failure domains
  whenever there are at least that many domains, otherwise spread as evenly as the domains
  allow. Element 0 is the preferred leader.
- `plan()` keeps every member within +-1 of its share of replicas and of preferred
  leaderships when domains are of equal size (otherwise the domain rule wins and balance is
  as close as it allows), keeps every existing replica it can, and balances leaders by
  reordering sets, never by moving data.
- An `Assignment`'s leader, when known, is one of its replicas; learners are not replicas.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeGuard

import xxhash

MAX_PARTITIONS = 4096
DEFAULT_PARTITIONS = 64
DEFAULT_REPLICATION = 3
RING_SIZE = 1 << 64

# Q -> how far a position shifts right to leave its partition: the per-request path is one
# dict lookup, one hash and one shift.
_SHIFTS: dict[int, int] = {1 << b: 64 - b for b in range(MAX_PARTITIONS.bit_length())}
_MASK = RING_SIZE - 1
_GOLDEN = 0x9E3779B97F4A7C15


def check_partition_count(q: int) -> None:
    """Raise ValueError unless `q` is a power of two in 1..MAX_PARTITIONS."""
    if isinstance(q, bool) or not isinstance(q, int) or q not in _SHIFTS:
        raise ValueError(f"partition count {q!r} is not a power of two in 1..{MAX_PARTITIONS}")


def partition_shift(q: int) -> int:
    """The right shift that turns a ring position into its partition for `q` partitions."""
    check_partition_count(q)
    return _SHIFTS[q]


def position(key: bytes) -> int:
    """The key's point on the 64-bit ring."""
    point: int = xxhash.xxh3_64_intdigest(key)
    return point


def partition_of(key: bytes, partitions: int) -> int:
    """The partition whose arc holds the key's position."""
    try:
        shift = _SHIFTS[partitions]
    except KeyError:
        check_partition_count(partitions)
        raise
    point: int = xxhash.xxh3_64_intdigest(key)
    return point >> shift


def partition_range(p: int, partitions: int) -> tuple[int, int]:
    """The [start, end) ring positions of partition `p`'s arc."""
    shift = partition_shift(partitions)
    if not 0 <= p < partitions:
        raise ValueError(f"partition {p} is outside 0..{partitions - 1}")
    return p << shift, (p + 1) << shift


class Ring:
    """Key -> partition for one partition count, with the shift computed once."""

    __slots__ = ("partitions", "shift")

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.shift = partition_shift(partitions)

    def partition_of(self, key: bytes) -> int:
        point: int = xxhash.xxh3_64_intdigest(key)
        return point >> self.shift

    def partition_range(self, p: int) -> tuple[int, int]:
        return partition_range(p, self.partitions)

    def __repr__(self) -> str:
        return f"Ring(partitions={self.partitions})"


@dataclass(frozen=True)
class Member:
    """A storage node that may hold replicas; `domain` is its failure domain (agent host or
    zone) and is the node's own id when the caller gives none."""

    id: str
    domain: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a member needs a non-empty id")
        if not self.domain:
            object.__setattr__(self, "domain", self.id)


@dataclass(frozen=True)
class Assignment:
    """One partition's entry in the map, as stored in `storage/partitions/<p>`."""

    partition: int
    epoch: int
    leader: str | None
    replicas: tuple[str, ...]
    learners: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.partition < 0 or self.epoch < 0:
            raise ValueError(f"partition {self.partition} epoch {self.epoch}: must be >= 0")
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"partition {self.partition}: repeated replica in {self.replicas}")
        if self.leader is not None and self.leader not in self.replicas:
            raise ValueError(f"partition {self.partition}: leader {self.leader} is no replica")
        if len(set(self.learners)) != len(self.learners) or set(self.learners) & set(self.replicas):
            raise ValueError(f"partition {self.partition}: learners {self.learners} overlap")

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "leader": self.leader,
            "replicas": list(self.replicas),
            "learners": list(self.learners),
        }

    @classmethod
    def from_json(cls, partition: int, d: Mapping[str, Any]) -> Assignment:
        """Parse a stored entry; ValueError if it is malformed (`learners` may be absent)."""
        epoch, leader = d.get("epoch"), d.get("leader")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ValueError(f"partition {partition}: epoch {epoch!r} is not an integer")
        if leader is not None and not isinstance(leader, str):
            raise ValueError(f"partition {partition}: leader {leader!r} is not a string")
        replicas, learners = d.get("replicas"), d.get("learners", [])
        if not _is_ids(replicas) or not _is_ids(learners):
            raise ValueError(f"partition {partition}: {replicas!r}, {learners!r} are not id lists")
        return cls(partition, epoch, leader, tuple(replicas), tuple(learners))


def _is_ids(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(m, str) for m in value)


@dataclass(frozen=True)
class PartitionMap:
    """The whole map at one version; `assignments[p]` is partition p's entry."""

    partitions: int
    replication: int
    assignments: tuple[Assignment, ...]
    version: int = 0

    def __post_init__(self) -> None:
        check_partition_count(self.partitions)
        if self.replication < 1:
            raise ValueError(f"replication {self.replication} is below 1")
        if [a.partition for a in self.assignments] != list(range(self.partitions)):
            raise ValueError(f"assignments must be partitions 0..{self.partitions - 1} in order")

    def for_key(self, key: bytes) -> Assignment:
        return self.assignments[partition_of(key, self.partitions)]

    def replica_sets(self) -> dict[int, tuple[str, ...]]:
        """The map in the shape `plan()` and `diff()` take."""
        return {a.partition: a.replicas for a in self.assignments}

    def replica_counts(self) -> dict[str, int]:
        return _count(m for a in self.assignments for m in a.replicas)

    def leader_counts(self) -> dict[str, int]:
        return _count(a.leader for a in self.assignments if a.leader is not None)


def _count(ids: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(ids).items()))


@dataclass(frozen=True)
class Move:
    """One step of a membership change of one partition: add and/or remove one replica."""

    partition: int
    add: str | None
    remove: str | None


def diff(old: Mapping[int, Sequence[str]], new: Mapping[int, Sequence[str]]) -> list[Move]:
    """The moves that turn `old`'s replica sets into `new`'s (as sets), by partition; within
    a partition, swaps pair additions and removals in set order, then lone adds, then lone
    removes."""
    moves: list[Move] = []
    for p in sorted(set(old) | set(new)):
        before, after = old.get(p, ()), new.get(p, ())
        adds = [m for m in dict.fromkeys(after) if m not in before]
        removes = [m for m in dict.fromkeys(before) if m not in after]
        swaps = min(len(adds), len(removes))
        moves.extend(Move(p, a, r) for a, r in zip(adds[:swaps], removes[:swaps], strict=True))
        moves.extend(Move(p, a, None) for a in adds[swaps:])
        moves.extend(Move(p, None, r) for r in removes[swaps:])
    return moves


def plan(
    current: Mapping[int, Sequence[str]] | None,
    members: Sequence[Member],
    partitions: int,
    replication: int,
) -> dict[int, tuple[str, ...]]:
    """Every partition's ordered replica set (element 0 the preferred leader) for `members`,
    starting from `current` (None or empty for a fresh cluster). See the module invariants."""
    check_partition_count(partitions)
    if replication < 1:
        raise ValueError(f"replication {replication} is below 1")
    domain_of: dict[str, str] = {}
    for m in members:
        if m.id in domain_of:
            raise ValueError(f"member {m.id} is listed twice")
        domain_of[m.id] = m.domain
    if not domain_of:
        return {p: () for p in range(partitions)}
    for p in current or {}:
        if not 0 <= p < partitions:
            raise ValueError(f"current map has partition {p} outside 0..{partitions - 1}")
    return _Placement(current or {}, domain_of, partitions, min(replication, len(domain_of))).run()


def _water_fill(
    total: int, weights: Mapping[str, int], caps: Mapping[str, int]
) -> dict[str, Fraction]:
    """Shares of `total` proportional to `weights`, none above its cap (sum(caps) >= total)."""
    order = sorted(weights, key=lambda k: (Fraction(caps[k], weights[k]), k))
    shares: dict[str, Fraction] = {}
    remaining, weight = Fraction(total), sum(weights.values())
    for i, k in enumerate(order):
        level = remaining / weight
        if caps[k] > level * weights[k]:
            shares.update((rest, level * weights[rest]) for rest in order[i:])
            break
        shares[k] = Fraction(caps[k])
        remaining -= caps[k]
        weight -= weights[k]
    return shares


def _round(total: int, shares: Mapping[str, Fraction], held: Mapping[str, int]) -> dict[str, int]:
    """Integers within 1 of `shares` summing to `total`. The +1s go first to whoever already
    holds its rounded-up share (so a balanced map stays as it is), then to the largest
    fractions."""
    out = {k: int(v) for k, v in shares.items()}
    up = sorted(
        (k for k, v in shares.items() if v != out[k]),
        key=lambda k: (held[k] <= out[k], out[k] - shares[k], k),
    )
    for k in up[: total - sum(out.values())]:
        out[k] += 1
    return out


_Vacancy = tuple[int, str]


def _on_chain(
    p: int, vacancy: _Vacancy, via: Mapping[_Vacancy, tuple[_Vacancy, str] | None]
) -> bool:
    link: tuple[_Vacancy, str] | None = (vacancy, "")
    while link is not None:
        if link[0][0] == p:
            return True
        link = via[link[0]]
    return False


class _Placement:
    """One run of `plan()`: mutable working state, discarded afterwards."""

    def __init__(
        self, current: Mapping[int, Sequence[str]], domain_of: dict[str, str], q: int, r: int
    ) -> None:
        self.q, self.r, self.domain_of = q, r, domain_of
        self.ids = sorted(domain_of)
        self.salt = {m: xxhash.xxh3_64_intdigest(m.encode()) for m in self.ids}
        self.domains: dict[str, list[str]] = {}
        for m in self.ids:
            self.domains.setdefault(domain_of[m], []).append(m)
        sizes = [len(ms) for ms in self.domains.values()]
        # The most replicas of one partition one domain may hold: 1 when there are enough
        # domains, else the smallest even spread the domains' sizes allow.
        self.cap = 1
        while sum(min(self.cap, s) for s in sizes) < r:
            self.cap += 1
        self.sets: list[list[str]] = [[] for _ in range(q)]
        self.old: list[frozenset[str]] = [frozenset() for _ in range(q)]
        self.first: list[str | None] = [None] * q
        self.dcount: list[dict[str, int]] = [{} for _ in range(q)]
        self.holdings: dict[str, set[int]] = {m: set() for m in self.ids}
        self.load = dict.fromkeys(self.ids, 0)
        self.dload = dict.fromkeys(self.domains, 0)
        for p, seq in current.items():
            for m in dict.fromkeys(seq):
                if m in domain_of:
                    self._add(p, m)
            self.old[p] = frozenset(self.sets[p])
            self.first[p] = self.sets[p][0] if self.sets[p] else None
        self.target = self._targets()

    # -- bookkeeping ----------------------------------------------------------------------

    def _add(self, p: int, m: str) -> None:
        self.sets[p].append(m)
        self.holdings[m].add(p)
        d = self.domain_of[m]
        self.dcount[p][d] = self.dcount[p].get(d, 0) + 1
        self.load[m] += 1
        self.dload[d] += 1

    def _remove(self, p: int, m: str) -> None:
        self.sets[p].remove(m)
        self.holdings[m].discard(p)
        self.dcount[p][self.domain_of[m]] -= 1
        self.load[m] -= 1
        self.dload[self.domain_of[m]] -= 1

    def _room(self, p: int, m: str, leaving: str | None = None) -> bool:
        """Whether m may join p's set (with `leaving` gone) under the domain rule."""
        d = self.domain_of[m]
        held = self.dcount[p].get(d, 0) - (leaving is not None and self.domain_of[leaving] == d)
        return held < self.cap and m not in self.sets[p]

    def _score(self, p: int, m: str) -> int:
        """A fixed pseudo-random tie-break, so fresh sets spread over many member pairs."""
        return ((self.salt[m] ^ (p * _GOLDEN)) * _GOLDEN) & _MASK

    def _targets(self) -> dict[str, int]:
        """Replica count per member: domains share Q*r in proportion to their size, capped
        by the domain rule; members share their domain's load; the +1s go to whoever holds
        more now, so a member already at its share keeps every replica."""
        sizes = {d: len(ms) for d, ms in self.domains.items()}
        caps = {d: self.q * min(self.cap, s) for d, s in sizes.items()}
        shares = _water_fill(self.q * self.r, sizes, caps)
        self.dlo = {d: int(v) for d, v in shares.items()}
        self.dhi = {d: self.dlo[d] + (v != self.dlo[d]) for d, v in shares.items()}
        self.dtarget = _round(self.q * self.r, shares, self.dload)
        target: dict[str, int] = {}
        for d, ms in self.domains.items():
            base, extra = divmod(self.dtarget[d], len(ms))
            for i, m in enumerate(sorted(ms, key=lambda m: (-self.load[m], m))):
                target[m] = base + (i < extra)
        return target

    # -- replicas -------------------------------------------------------------------------

    def run(self) -> dict[int, tuple[str, ...]]:
        self._make_legal()
        self._shed_excess()
        self._fill()
        leader = self._leaders()
        return {p: (leader[p], *(m for m in s if m != leader[p])) for p, s in enumerate(self.sets)}

    def _drop_one(self, p: int, candidates: Sequence[str]) -> None:
        s = self.sets[p]
        # The most over-target member goes; among equals the one furthest from leading.
        self._remove(p, max(candidates, key=lambda m: (self.load[m] - self.target[m], s.index(m))))

    def _make_legal(self) -> None:
        for p, s in enumerate(self.sets):
            for d, n in sorted(self.dcount[p].items()):
                for _ in range(n - self.cap):
                    self._drop_one(p, [m for m in s if self.domain_of[m] == d])
            while len(s) > self.r:
                self._drop_one(p, s)

    def _shed_excess(self) -> None:
        """Over-target members give up replicas, spread so that no partition loses two
        while another loses none, and keeping their preferred leaderships when they can."""
        for m in self.ids:
            excess = self.load[m] - self.target[m]
            if excess <= 0:
                continue
            held = sorted(
                self.holdings[m],
                key=lambda p: (self.r - len(self.sets[p]), self.sets[p][0] == m, self._score(p, m)),
            )
            for p in held[:excess]:
                self._remove(p, m)

    def _fill(self) -> None:
        stuck: list[int] = []
        for p in sorted(range(self.q), key=lambda p: (len(self.sets[p]), p)):
            while len(self.sets[p]) < self.r:
                # The neediest member of the neediest domain joins (a domain that must be in
                # every remaining set goes first); the hash breaks ties, so fresh sets mix
                # members instead of moving them in lockstep groups.
                best = max(
                    (m for m in self.ids if self.load[m] < self.target[m] and self._room(p, m)),
                    key=lambda m: (
                        self.dtarget[self.domain_of[m]] - self.dload[self.domain_of[m]],
                        self.target[m] - self.load[m],
                        self._score(p, m),
                    ),
                    default=None,
                )
                if best is None:
                    stuck.extend([p] * (self.r - len(self.sets[p])))
                    break
                self._add(p, best)
        for p in stuck:
            if self._augment(p, True) or self._retarget(p) or self._augment(p, False):
                continue
            # No way to honour every target: the domain rule wins over balance.
            joining = (m for m in self.ids if self._room(p, m))
            self._add(p, min(joining, key=lambda m: (self.load[m] - self.target[m], m)))

    def _augment(self, p0: int, new_only: bool) -> bool:
        """Fill one hole of p0 along a shortest chain: y1 leaves q1 for p0, y2 leaves q2 for
        q1, ..., and an under-target member joins the last partition. With `new_only` the
        chain only reroutes replicas this plan added, so no kept replica moves. A vacancy is
        a partition and the domain of the member leaving it ("" for the hole itself): with
        domains, what may fill a vacancy depends on which domain left it."""
        start: _Vacancy = (p0, "")
        via: dict[_Vacancy, tuple[_Vacancy, str] | None] = {start: None}
        expanded: set[str] = set()
        queue = deque([start])
        while queue:
            vacancy = queue.popleft()
            link = via[vacancy]
            q, leaving = vacancy[0], link[1] if link else None
            for y in self.ids:
                wants = self.load[y] < self.target[y]
                if (y in expanded and not wants) or not self._room(q, y, leaving):
                    continue
                if wants:
                    self._apply_chain(vacancy, y, via)
                    return True
                expanded.add(y)
                for q2 in sorted(self.holdings[y]):
                    nxt = (q2, self.domain_of[y])
                    if nxt in via or (new_only and y in self.old[q2]):
                        continue
                    if not _on_chain(q2, vacancy, via):  # a chain touches a partition once
                        via[nxt] = (vacancy, y)
                        queue.append(nxt)
        return False

    def _apply_chain(
        self, vacancy: _Vacancy, y: str, via: Mapping[_Vacancy, tuple[_Vacancy, str] | None]
    ) -> None:
        while True:
            link = via[vacancy]
            self._add(vacancy[0], y)
            if link is None:
                return
            self._remove(vacancy[0], link[1])
            vacancy, y = link

    def _retarget(self, p: int) -> bool:
        """Fill a hole of p with a member at its target by handing it one unit of target
        from a member that wants more but could not join p, where both targets stay a
        valid rounding of the shares (which of them got the +1 was only a tie-break)."""
        wanting = [z for z in self.ids if self.load[z] < self.target[z]]
        for y in self.ids:
            if self.load[y] != self.target[y] or not self._room(p, y):
                continue
            for z in wanting:
                if self._may_shift(z, y):
                    self.target[z] -= 1
                    self.target[y] += 1
                    self.dtarget[self.domain_of[z]] -= 1
                    self.dtarget[self.domain_of[y]] += 1
                    self._add(p, y)
                    return True
        return False

    def _may_shift(self, z: str, y: str) -> bool:
        dz, dy = self.domain_of[z], self.domain_of[y]
        if dz != dy and (self.dtarget[dz] <= self.dlo[dz] or self.dtarget[dy] >= self.dhi[dy]):
            return False
        delta = {z: -1, y: 1}
        for d in {dz, dy}:
            spread = [self.target[m] + delta.get(m, 0) for m in self.domains[d]]
            if max(spread) - min(spread) > 1:
                return False
        return True

    # -- leaders --------------------------------------------------------------------------

    def _leaders(self) -> list[str]:
        """One leader per partition among its replicas, each member leading its share of Q
        (+-1, capped by how many replicas it holds). Keeps the current preferred leader where
        the share allows, then repairs along chains of reorderings: no data moves."""
        shares = _water_fill(self.q, dict.fromkeys(self.ids, 1), self.load)
        self.lo = {m: int(v) for m, v in shares.items()}
        self.hi = {m: self.lo[m] + (v != self.lo[m]) for m, v in shares.items()}
        self.leader: list[str] = []
        self.led: dict[str, set[int]] = {m: set() for m in self.ids}
        for p, s in enumerate(self.sets):
            rank = {m: (len(self.led[m]) >= self.hi[m], m != self.first[p]) for m in s}
            choice = min(s, key=lambda m: (*rank[m], len(self.led[m]), s.index(m)))
            self.leader.append(choice)
            self.led[choice].add(p)
        for m in self.ids:
            while len(self.led[m]) > self.hi[m] and self._pass_lead(m):
                pass
        for m in self.ids:
            while len(self.led[m]) < self.lo[m] and self._take_lead(m):
                pass
        return self.leader

    def _hand(self, p: int, to: str) -> None:
        self.led[self.leader[p]].discard(p)
        self.led[to].add(p)
        self.leader[p] = to

    def _pass_lead(self, src: str) -> bool:
        """src hands one partition to a co-replica below its share, through a chain of
        members at their share each handing one on."""
        via: dict[str, tuple[int, str] | None] = {src: None}
        queue = deque([src])
        while queue:
            v = queue.popleft()
            for p in sorted(self.led[v]):
                for y in self.sets[p]:
                    if y in via:
                        continue
                    via[y] = (p, v)
                    if len(self.led[y]) < self.hi[y]:
                        while (link := via[y]) is not None:
                            self._hand(link[0], y)
                            y = link[1]
                        return True
                    queue.append(y)
        return False

    def _take_lead(self, dst: str) -> bool:
        """dst takes one partition from a co-replica above its floor, through a chain of
        members at their floor each taking one."""
        via: dict[str, tuple[int, str] | None] = {dst: None}
        queue = deque([dst])
        while queue:
            u = queue.popleft()
            for p in sorted(self.holdings[u]):
                v = self.leader[p]
                if v in via:
                    continue
                via[v] = (p, u)
                if len(self.led[v]) > self.lo[v]:
                    while (link := via[v]) is not None:
                        self._hand(link[0], link[1])
                        v = link[1]
                    return True
                queue.append(v)
        return False
