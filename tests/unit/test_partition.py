"""storage.partition: the ring (key -> partition), placement properties of plan(), diff().

Pure: no processes, no I/O beyond reading the module's own source for the import check.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import xxhash
from hypothesis import example, given, settings
from hypothesis import strategies as st

from storage import partition
from storage.partition import (
    DEFAULT_PARTITIONS,
    DEFAULT_REPLICATION,
    MAX_PARTITIONS,
    Assignment,
    Member,
    Move,
    PartitionMap,
    Ring,
    check_partition_count,
    diff,
    partition_of,
    partition_range,
    partition_shift,
    plan,
    position,
)

pytestmark = pytest.mark.unit

Sets = Mapping[int, Sequence[str]]
RF = DEFAULT_REPLICATION
POWERS = [1 << b for b in range(13)]


def nodes(n: int, zones: int = 0, first: int = 0) -> list[Member]:
    """n members n00, n01, ...; with `zones`, member i lives in zone z(i % zones)."""
    return [Member(f"n{i:02d}", f"z{i % zones}" if zones else "") for i in range(first, first + n)]


def moved(old: Sets, new: Sets) -> int:
    """(partition, member) pairs present in `new` but not in `old`."""
    return sum(len(set(new[p]) - set(old.get(p, ()))) for p in new)


def domain_cap(members: Sequence[Member], r: int) -> int:
    sizes = Counter(m.domain for m in members).values()
    return next(c for c in range(1, r + 1) if sum(min(c, s) for s in sizes) >= r)


def assert_valid(result: Sets, members: Sequence[Member], q: int, rf: int) -> None:
    """Every partition has min(rf, n) distinct members, spread over domains by the rule."""
    ids = {m.id for m in members}
    domain = {m.id: m.domain for m in members}
    r = min(rf, len(members))
    assert sorted(result) == list(range(q))
    cap = domain_cap(members, r) if members else 0
    for p, s in result.items():
        assert len(s) == r == len(set(s)), (p, s)
        assert set(s) <= ids, (p, s)
        per_domain = Counter(domain[m] for m in s)
        assert max(per_domain.values(), default=0) <= cap, (p, s, per_domain)


def assert_balanced(result: Sets, members: Sequence[Member], q: int, rf: int) -> None:
    """Replica and preferred-leader counts are the floor or ceiling of their means."""
    n, r = len(members), min(rf, len(members))
    replicas = Counter(m for s in result.values() for m in s)
    leaders = Counter(s[0] for s in result.values())
    for m in members:
        assert math.floor(q * r / n) <= replicas[m.id] <= math.ceil(q * r / n), (m, replicas)
        assert math.floor(q / n) <= leaders[m.id] <= math.ceil(q / n), (m, leaders)


# -- the ring -------------------------------------------------------------------------------


def test_constants() -> None:
    assert (MAX_PARTITIONS, DEFAULT_PARTITIONS, DEFAULT_REPLICATION) == (4096, 64, 3)
    check_partition_count(DEFAULT_PARTITIONS)


@pytest.mark.parametrize("q", [0, 3, 8192, -1, 6, 4095, 2**13, True, 64.0])
def test_check_partition_count_rejects(q: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        check_partition_count(q)
    if type(q) is int:  # the per-request path only looks q up, so True and 64.0 pass there
        with pytest.raises(ValueError):
            partition_of(b"k", q)


@pytest.mark.parametrize("q", POWERS)
def test_check_partition_count_accepts_powers_of_two(q: int) -> None:
    check_partition_count(q)
    assert partition_shift(q) == 64 - q.bit_length() + 1


def test_position_is_xxh3_64() -> None:
    assert position(b"hello") == xxhash.xxh3_64_intdigest(b"hello")
    assert 0 <= position(b"") < 2**64


def test_partition_of_is_uniform_for_64_partitions() -> None:
    """Chi-square over 100k random keys, plus 100k sequential ones (real keys have structure).
    With 63 degrees of freedom the statistic has mean 63 and sd ~11.2; 130 is ~6 sd out."""
    seed = 20240611
    print(f"seed={seed}")
    rng = random.Random(seed)
    q, n = 64, 100_000
    for keys in (
        [rng.randbytes(rng.randint(1, 32)) for _ in range(n)],
        [b"user:%d" % i for i in range(n)],
    ):
        counts = Counter(partition_of(k, q) for k in keys)
        expected = n / q
        chi2 = sum((counts[p] - expected) ** 2 / expected for p in range(q))
        assert chi2 < 130, chi2


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=1, max_size=64), q=st.sampled_from(POWERS))
def test_partition_of_agrees_with_partition_range(key: bytes, q: int) -> None:
    p = partition_of(key, q)
    start, end = partition_range(p, q)
    assert start <= position(key) < end
    assert Ring(q).partition_of(key) == p
    assert Ring(q).partition_range(p) == (start, end)


@pytest.mark.parametrize("q", [1, 2, 64, 4096])
def test_partition_ranges_tile_the_ring(q: int) -> None:
    ranges = [partition_range(p, q) for p in range(q)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 2**64
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert len({end - start for start, end in ranges}) == 1
    with pytest.raises(ValueError):
        partition_range(q, q)
    with pytest.raises(ValueError):
        partition_range(-1, q)


def test_one_partition_holds_every_key() -> None:
    assert {partition_of(b"%d" % i, 1) for i in range(100)} == {0}


# -- Member, Assignment, PartitionMap --------------------------------------------------------


def test_member_domain_defaults_to_its_id() -> None:
    assert Member("a").domain == "a"
    assert Member("a", "zone-1").domain == "zone-1"
    with pytest.raises(ValueError):
        Member("")


ids = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=8)


@st.composite
def assignments(draw: st.DrawFn) -> Assignment:
    people = draw(st.lists(ids, unique=True, max_size=8))
    cut = draw(st.integers(0, len(people)))
    replicas, learners = tuple(people[:cut]), tuple(people[cut:])
    leader: str | None = None
    wants_leader = draw(st.booleans())
    if replicas and wants_leader:
        leader = draw(st.sampled_from(replicas))
    return Assignment(
        draw(st.integers(0, 4095)), draw(st.integers(0, 2**63)), leader, replicas, learners
    )


@settings(max_examples=100, deadline=None)
@given(a=assignments())
def test_assignment_json_round_trip(a: Assignment) -> None:
    d = json.loads(json.dumps(a.to_json()))
    assert set(d) == {"epoch", "leader", "replicas", "learners"}
    assert Assignment.from_json(a.partition, d) == a


def test_assignment_from_json_defaults_and_rejects() -> None:
    a = Assignment.from_json(3, {"epoch": 2, "leader": None, "replicas": ["a", "b"]})
    assert a == Assignment(3, 2, None, ("a", "b"), ())
    malformed: list[dict[str, object]] = [
        {"epoch": "2", "leader": None, "replicas": []},
        {"epoch": 1, "leader": 7, "replicas": []},
        {"epoch": 1, "leader": None, "replicas": "ab"},
        {"epoch": 1, "leader": None, "replicas": [1]},
        {"epoch": 1, "leader": "c", "replicas": ["a"]},
        {"epoch": 1, "leader": None, "replicas": ["a", "a"]},
        {"epoch": 1, "leader": None, "replicas": ["a"], "learners": ["a"]},
        {"epoch": -1, "leader": None, "replicas": []},
    ]
    for bad in malformed:
        with pytest.raises(ValueError):
            Assignment.from_json(0, bad)


def make_map(sets: Sets, q: int, rf: int = RF) -> PartitionMap:
    return PartitionMap(
        q, rf, tuple(Assignment(p, 1, s[0], tuple(s)) for p, s in sorted(sets.items()))
    )


def test_partition_map_lookups_and_counts() -> None:
    members = nodes(5)
    sets = plan(None, members, 16, RF)
    pm = make_map(sets, 16)
    for key in (b"a", b"b", b"user:1"):
        assert pm.for_key(key) is pm.assignments[partition_of(key, 16)]
    assert pm.replica_sets() == sets
    assert sum(pm.replica_counts().values()) == 48
    assert sum(pm.leader_counts().values()) == 16
    assert set(pm.replica_counts()) == {m.id for m in members}
    with pytest.raises(ValueError):
        PartitionMap(16, RF, pm.assignments[:-1])
    with pytest.raises(ValueError):
        PartitionMap(12, RF, ())
    with pytest.raises(ValueError):
        PartitionMap(16, 0, pm.assignments)


# -- plan(): the properties -----------------------------------------------------------------

SMALL_Q = st.sampled_from([16, 64])
ANY_Q = st.sampled_from([16, 64, 256, 1024])


@st.composite
def cluster(draw: st.DrawFn, q: st.SearchStrategy[int] = ANY_Q) -> tuple[int, int]:
    """(Q, n): Q from `q`, any 3..64 nodes."""
    return draw(q), draw(st.integers(3, 64))


@settings(max_examples=60, deadline=None)
@given(qn=cluster())
@example(qn=(1024, 64))
def test_fresh_plan_is_valid_balanced_and_deterministic(qn: tuple[int, int]) -> None:
    q, n = qn
    members = nodes(n)
    result = plan(None, members, q, RF)
    assert_valid(result, members, q, RF)
    assert_balanced(result, members, q, RF)
    assert plan({}, list(reversed(members)), q, RF) == result
    assert plan(result, members, q, RF) == result  # a balanced map is left alone


def test_plan_for_1024_partitions_and_64_nodes_is_fast() -> None:
    members = nodes(64)
    started = time.perf_counter()
    result = plan(None, members, 1024, RF)
    elapsed = time.perf_counter() - started
    print(f"plan(Q=1024, n=64) took {elapsed:.3f}s")
    assert_valid(result, members, 1024, RF)
    assert_balanced(result, members, 1024, RF)
    grown = plan(result, nodes(65), 1024, RF)
    assert moved(result, grown) <= math.ceil(1024 * RF / 65) + 64
    assert_balanced(grown, nodes(65), 1024, RF)
    assert elapsed < 2.0  # the budget is 0.5 s; slack for a loaded CI machine


@settings(max_examples=60, deadline=None)
@given(qn=cluster(), rf=st.integers(1, 5))
@example(qn=(1024, 64), rf=3)
def test_adding_one_node_moves_about_its_share(qn: tuple[int, int], rf: int) -> None:
    q, n = qn
    before = plan(None, nodes(n), q, rf)
    after = plan(before, nodes(n + 1), q, rf)
    assert_valid(after, nodes(n + 1), q, rf)
    assert_balanced(after, nodes(n + 1), q, rf)
    r = min(rf, n + 1)
    assert moved(before, after) <= math.ceil(q * r / (n + 1)) + n
    if r == min(rf, n):  # the new node's replicas, and no more than rounding allows
        assert Counter(m for s in after.values() for m in s)[f"n{n:02d}"] == moved(before, after)


@settings(max_examples=60, deadline=None)
@given(qn=cluster(), rf=st.integers(1, 5), data=st.data())
def test_removing_one_node_moves_only_its_replicas(
    qn: tuple[int, int], rf: int, data: st.DataObject
) -> None:
    q, n = qn
    members = nodes(n)
    before = plan(None, members, q, rf)
    gone = data.draw(st.sampled_from(members))
    rest = [m for m in members if m != gone]
    after = plan(before, rest, q, rf)
    assert_valid(after, rest, q, rf)
    assert_balanced(after, rest, q, rf)
    # Only the removed node's replicas move, except that, rarely, one kept replica moves
    # too: either no balanced plan fills the partitions it leaves from members they lack
    # alone, or the planner's greedy fill and chain search miss the one that exists.
    # Measured over every Q <= 256, n <= 16, rf <= 5 and removed node: 27 of 5,160
    # removals move one kept replica, none moves two (and 0 of 4,157 random larger ones).
    kept_moved = sum(len(set(before[p]) - {gone.id} - set(after[p])) for p in range(q))
    assert kept_moved <= 1
    held = sum(gone.id in s for s in before.values())
    if min(rf, n - 1) == min(rf, n):
        assert moved(before, after) == held + kept_moved
    else:
        assert moved(before, after) == 0 and kept_moved == 0


def test_removal_that_costs_one_kept_replica_moves_exactly_one() -> None:
    """Found by hypothesis in CI: Q 16, 7 nodes, RF 5, n04 removed. A balanced plan that
    only fills n04's partitions exists, but the planner misses it and moves one kept
    replica (a known imperfection of its greedy fill, bounded at one move; a better
    planner may move none)."""
    members = nodes(7)
    before = plan(None, members, 16, 5)
    rest = [m for m in members if m.id != "n04"]
    after = plan(before, rest, 16, 5)
    assert_valid(after, rest, 16, 5)
    assert_balanced(after, rest, 16, 5)
    kept_moved = sum(len(set(before[p]) - {"n04"} - set(after[p])) for p in range(16))
    held = sum("n04" in s for s in before.values())
    assert kept_moved <= 1 and moved(before, after) == held + kept_moved


@settings(max_examples=40, deadline=None)
@given(q=SMALL_Q, n=st.integers(3, 24), steps=st.lists(st.booleans(), min_size=1, max_size=8))
def test_a_walk_of_joins_and_leaves_stays_valid_and_moves_little(
    q: int, n: int, steps: list[bool]
) -> None:
    """Starting from a fresh map, nodes join (True) or the oldest leaves (False)."""
    members = nodes(n)
    current = plan(None, members, q, RF)
    joined = n
    for join in steps:
        if join or len(members) <= 3:
            members, joined = [*members, *nodes(1, first=joined)], joined + 1
        else:
            members = members[1:]
        previous, current = current, plan(current, members, q, RF)
        assert_valid(current, members, q, RF)
        assert_balanced(current, members, q, RF)
        bound = math.ceil(q * RF / len(members)) + len(members) - 1
        assert moved(previous, current) <= bound


@st.composite
def messy_maps(draw: st.DrawFn, q: int, pool: Sequence[str]) -> dict[int, list[str]]:
    """Any current map: unknown or repeated members, short, long or missing sets."""
    return draw(
        st.dictionaries(
            st.integers(0, q - 1), st.lists(st.sampled_from(pool), max_size=6), max_size=q
        )
    )


@settings(max_examples=100, deadline=None)
@given(q=SMALL_Q, n=st.integers(1, 20), rf=st.integers(1, 5), data=st.data())
def test_plan_repairs_any_current_map(q: int, n: int, rf: int, data: st.DataObject) -> None:
    members = nodes(n)
    pool = [f"n{i:02d}" for i in range(n + 4)]
    current = data.draw(messy_maps(q, pool))
    result = plan(current, members, q, rf)
    assert_valid(result, members, q, rf)
    assert_balanced(result, members, q, rf)
    shuffled = data.draw(st.permutations(members))
    assert plan(dict(reversed(current.items())), shuffled, q, rf) == result
    assert plan(result, members, q, rf) == result


# -- plan(): failure domains ----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(q=st.sampled_from([16, 64, 256]), per_zone=st.integers(1, 12))
def test_three_equal_zones_hold_one_replica_each(q: int, per_zone: int) -> None:
    members = nodes(3 * per_zone, zones=3)
    result = plan(None, members, q, RF)
    assert_valid(result, members, q, RF)
    assert_balanced(result, members, q, RF)
    zone = {m.id: m.domain for m in members}
    assert all(sorted(zone[m] for m in s) == ["z0", "z1", "z2"] for s in result.values())
    # A node joins zone z0: only z0 sheds replicas, to the newcomer.
    grown = [*members, Member("new", "z0")]
    after = plan(result, grown, q, RF)
    assert_valid(after, grown, q, RF)
    assert moved(result, after) == sum("new" in s for s in after.values())
    assert moved(result, after) <= math.ceil(q / (per_zone + 1))


@settings(max_examples=30, deadline=None)
@given(q=SMALL_Q, sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5), rf=st.integers(1, 5))
def test_unequal_domains_keep_the_domain_rule(q: int, sizes: list[int], rf: int) -> None:
    members = [Member(f"n{d}{i}", f"z{d}") for d, size in enumerate(sizes) for i in range(size)]
    result = plan(None, members, q, rf)
    assert_valid(result, members, q, rf)
    assert plan(result, members, q, rf) == result
    leaders = Counter(s[0] for s in result.values())
    replicas = Counter(m for s in result.values() for m in s)
    assert all(leaders[m] <= replicas[m] for m in leaders)


def test_two_zones_split_three_replicas_two_and_one() -> None:
    members = nodes(6, zones=2)
    result = plan(None, members, 64, RF)
    assert_valid(result, members, 64, RF)
    assert_balanced(result, members, 64, RF)
    zone = {m.id: m.domain for m in members}
    assert all(sorted(Counter(zone[m] for m in s).values()) == [1, 2] for s in result.values())


def test_one_domain_still_gets_full_sets() -> None:
    members = [Member(f"n{i}", "host") for i in range(4)]
    result = plan(None, members, 16, RF)
    assert_valid(result, members, 16, RF)
    assert_balanced(result, members, 16, RF)


def test_plan_edge_cases() -> None:
    assert plan(None, [], 4, RF) == {0: (), 1: (), 2: (), 3: ()}
    assert plan(None, nodes(2), 4, RF) == plan(None, nodes(2), 4, 2)
    assert all(len(s) == 2 for s in plan(None, nodes(2), 4, RF).values())
    with pytest.raises(ValueError):
        plan(None, nodes(3), 12, RF)
    with pytest.raises(ValueError):
        plan(None, nodes(3), 16, 0)
    with pytest.raises(ValueError):
        plan(None, [Member("a"), Member("a")], 16, RF)
    with pytest.raises(ValueError):
        plan({16: ["n00"]}, nodes(3), 16, RF)


def test_leaders_rebalance_by_reordering_not_by_moving() -> None:
    """Every set led by the same node: the fix is a reordering, no replica moves."""
    members = nodes(4)
    current = {p: tuple(sorted(s)) for p, s in plan(None, members, 16, RF).items()}
    assert Counter(s[0] for s in current.values())["n00"] > 4
    result = plan(current, members, 16, RF)
    assert_balanced(result, members, 16, RF)
    assert all(set(result[p]) == set(current[p]) for p in current)


def test_changing_replication_keeps_what_it_can() -> None:
    members = nodes(10)
    three = plan(None, members, 64, 3)
    two = plan(three, members, 64, 2)
    assert_valid(two, members, 64, 2)
    assert_balanced(two, members, 64, 2)
    back = plan(two, members, 64, 3)
    assert_valid(back, members, 64, 3)
    assert_balanced(back, members, 64, 3)
    assert all(set(two[p]) <= set(back[p]) for p in range(64))  # growing only adds


@pytest.mark.parametrize(("q", "n"), [(16, 8), (64, 15), (64, 30), (256, 64)])
def test_fresh_sets_mix_members(q: int, n: int) -> None:
    """No lockstep groups: each node shares partitions with many others, so a lost node's
    replicas are rebuilt from many peers and three failures hit few partitions."""
    result = plan(None, nodes(n), q, RF)
    partners: dict[str, set[str]] = {}
    for s in result.values():
        for m in s:
            partners.setdefault(m, set()).update(set(s) - {m})
    for m, others in partners.items():
        held = sum(m in s for s in result.values())
        assert len(others) >= min(n - 1, held * (RF - 1)) / 2, (m, others)


def test_movement_numbers_at_64_partitions() -> None:
    for n in (3, 10):
        before = plan(None, nodes(n), 64, RF)
        after = plan(before, nodes(n + 1), 64, RF)
        bound = math.ceil(64 * RF / (n + 1)) + n
        print(f"{n}->{n + 1} nodes at Q=64: moved {moved(before, after)} (bound {bound})")
        assert moved(before, after) <= math.ceil(64 * RF / (n + 1))


# -- diff() ---------------------------------------------------------------------------------


def apply(old: Sets, moves: Sequence[Move]) -> dict[int, set[str]]:
    out = {p: set(s) for p, s in old.items()}
    for mv in moves:
        s = out.setdefault(mv.partition, set())
        if mv.remove is not None:
            assert mv.remove in s
            s.remove(mv.remove)
        if mv.add is not None:
            assert mv.add not in s
            s.add(mv.add)
    return out


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_diff_moves_one_replica_at_a_time_and_reaches_new(data: st.DataObject) -> None:
    pool = [f"n{i}" for i in range(8)]
    sets = st.dictionaries(
        st.integers(0, 15), st.lists(st.sampled_from(pool), unique=True, max_size=5), max_size=16
    )
    old, new = data.draw(sets), data.draw(sets)
    moves = diff(old, new)
    assert all(mv.add is not None or mv.remove is not None for mv in moves)
    assert [mv.partition for mv in moves] == sorted(mv.partition for mv in moves)
    after = apply(old, moves)
    assert {p: s for p, s in after.items() if s} == {p: set(s) for p, s in new.items() if s}
    assert diff(old, new) == moves
    assert sum(mv.add is not None for mv in moves) == moved(old, new)


def test_diff_of_a_plan_change_is_the_moved_replicas() -> None:
    before = plan(None, nodes(4), 16, RF)
    after = plan(before, nodes(5), 16, RF)
    moves = diff(before, after)
    assert all(mv.add == "n04" and mv.remove is not None for mv in moves)
    assert len(moves) == moved(before, after)
    assert diff(after, after) == []


# -- purity ---------------------------------------------------------------------------------


def test_partition_module_imports_no_io() -> None:
    allowed = {
        "__future__",
        "collections",
        "collections.abc",
        "dataclasses",
        "fractions",
        "typing",
        "xxhash",
        "math",
        "itertools",
        "functools",
        "bisect",
        "heapq",
    }
    tree = ast.parse(Path(partition.__file__).read_text())
    imported = {
        name
        for node in ast.walk(tree)
        for name in (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert imported <= allowed, imported - allowed
