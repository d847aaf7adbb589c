"""scheduler.resources: the text form, normalization, arithmetic and the reservation and
volume operations.

Pure: hypothesis prints the falsifying example (and its seed with --hypothesis-seed).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from scheduler.resources import (
    UNRESERVED,
    Range,
    Resource,
    ResourceError,
    Resources,
    Volume,
    create_volumes,
    destroy_volumes,
    parse_attributes,
    render_attributes,
    reserve,
    unreserve,
)

pytestmark = pytest.mark.unit

ROLES = st.sampled_from([UNRESERVED, "db", "web"])
MILLIS = st.integers(0, 10**7).map(lambda m: m / 1000)
SPANS = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 20)).map(lambda t: Range(t[0], t[0] + t[1])),
    max_size=4,
)


@st.composite
def items(draw: st.DrawFn) -> Resource:
    role = draw(ROLES)
    principal = draw(st.sampled_from(["", "alice"])) if role != UNRESERVED else ""
    kind = draw(st.sampled_from(["cpus", "mem", "disk", "gpus", "ports", "volume"]))
    if kind == "ports":
        return Resource("ports", ranges=tuple(draw(SPANS)), role=role, principal=principal)
    if kind == "volume":
        volume = Volume(draw(st.sampled_from(["v1", "v2"])), draw(st.sampled_from(["data", "a/b"])))
        return Resource(
            "disk",
            draw(MILLIS),
            role=role if role != UNRESERVED else "db",
            principal=principal,
            volume=volume,
        )
    return Resource(kind, draw(MILLIS), role=role, principal=principal)


resources = st.lists(items(), max_size=8).map(Resources.of)


@st.composite
def part_of(draw: st.DrawFn, whole: Resources) -> Resources:
    """Some of `whole`: a fraction of each scalar, a sub-range of each range set."""
    out = []
    for item in whole:
        if not draw(st.booleans()):
            continue
        if item.ranges:
            r = draw(st.sampled_from(item.ranges))
            begin = draw(st.integers(r.begin, r.end))
            end = draw(st.integers(begin, r.end))
            out.append(
                Resource(
                    item.name,
                    ranges=(Range(begin, end),),
                    role=item.role,
                    principal=item.principal,
                    volume=item.volume,
                )
            )
        else:
            milli = round(item.scalar * 1000)
            part = draw(st.integers(0, milli)) / 1000
            out.append(
                Resource(
                    item.name, part, role=item.role, principal=item.principal, volume=item.volume
                )
            )
    return Resources.of(out)


# ------------------------------------------------------------------ text form


def test_parse_reads_the_agent_flag_syntax() -> None:
    r = Resources.parse("cpus:2;mem:4096;disk:20000;ports:[31000-31999,32000-32010]")
    assert r.scalar("cpus") == 2
    assert r.scalar("mem") == 4096
    assert r.scalar("disk") == 20000
    assert r.ranges("ports") == (Range(31000, 32010),)  # adjacent ranges coalesce
    assert str(r) == "cpus:2;mem:4096;disk:20000;ports:[31000-32010]"


def test_parse_reads_roles_principals_volumes_and_spacing() -> None:
    r = Resources.parse(" cpus(db) : 1.5 ; mem(db,alice):64; disk(db)[d1:data]:10; ports:[5, 7-9];")
    assert r.reserved("db").scalar("cpus") == 1.5
    assert [i.principal for i in r if i.name == "mem"] == ["alice"]
    assert r.volumes() == (Resource("disk", 10.0, role="db", volume=Volume("d1", "data")),)
    assert r.ranges("ports") == (Range(5, 5), Range(7, 9))
    assert Resources.parse("cpus:1", role="db") == Resources.parse("cpus(db):1")
    assert Resources.parse("cpus(*):1") == Resources.parse("cpus():1") == Resources.parse("cpus:1")
    assert Resources.parse("") == Resources() and Resources().is_empty() and not Resources()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ports:[32000-31000]", "ports: range 32000-31000 is reversed"),
        ("cpus:abc", "cpus: 'abc' is not a number"),
        ("cpus:-1", "cpus: -1 is negative"),
        ("cpus:inf", "cpus: inf is not a finite number"),
        ("cpus", "'cpus': expected name:value (e.g. cpus:2)"),
        ("mem:", "mem: missing value after ':'"),
        ("ports:[1-2", "ports: '[1-2' is not a range list like [31000-31999]"),
        ("ports:[a-b]", "ports: 'a-b' is not a range like 31000-31999"),
        ("ports:[]", "ports: empty range list"),
        ("cpus:1;cpus:[1-2]", "cpus: used both as a scalar and as ranges"),
        ("cpus(a b):1", "cpus: 'a b' is not a role name"),
        ("cpus(*,alice):1", "cpus: principal 'alice' given without a role"),
        ("mem(db)[v:data]:1", "mem: only disk can be a persistent volume"),
        ("disk[v:data]:1", "disk: volume 'v' must be on disk reserved for a role"),
        ("disk(db)[v:../x]:1", "disk: container path '../x' must be relative, without '..'"),
        ("disk(db)[v:/abs]:1", "disk: container path '/abs' must be relative, without '..'"),
        ("9cpus:1", "'9cpus' is not a resource name (letters, digits, _ . -)"),
    ],
)
def test_malformed_text_is_a_one_line_error(text: str, message: str) -> None:
    with pytest.raises(ResourceError) as caught:
        Resources.parse(text)
    assert str(caught.value) == message


@given(resources)
def test_str_then_parse_is_identity(r: Resources) -> None:
    assert Resources.parse(str(r)) == r
    assert Resources.of(r) == r
    assert hash(Resources.parse(str(r))) == hash(r)


# ------------------------------------------------------------------ normalization


def test_same_identity_merges_and_zero_vanishes() -> None:
    r = Resources.of(
        [
            Resource("cpus", 1),
            Resource("cpus", 0.5),
            Resource("cpus", 2, role="db"),
            Resource("mem", 0),
            Resource("ports", ranges=()),
        ]
    )
    assert str(r) == "cpus:1.5;cpus(db):2"
    assert r.scalar("cpus") == 3.5 and r.scalar("mem") == 0 and r.ranges("ports") == ()


def test_scalars_are_exact_in_thousandths() -> None:
    r = Resources.parse("cpus:0.1") + Resources.parse("cpus:0.2")
    assert r == Resources.parse("cpus:0.3")
    assert (r - Resources.parse("cpus:0.3")).is_empty()
    assert Resources.parse("cpus:0.0001").is_empty()


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=8))
def test_ranges_merge_into_sorted_disjoint_non_adjacent_spans(raw: list[tuple[int, int]]) -> None:
    r = Resources.of([Resource("ports", ranges=tuple(Range(b, b + n) for b, n in raw))])
    spans = r.ranges("ports")
    assert {p for s in spans for p in range(s.begin, s.end + 1)} == {
        p for b, n in raw for p in range(b, b + n + 1)
    }
    assert all(a.end + 1 < b.begin for a, b in itertools.pairwise(spans))
    assert all(s.begin <= s.end for s in spans)


def test_ranges_are_unioned_over_roles_by_ranges() -> None:
    r = Resources.parse("ports:[10-12];ports(db):[13-20]")
    assert r.ranges("ports") == (Range(10, 20),)
    assert r.reserved("db").ranges("ports") == (Range(13, 20),)


# ------------------------------------------------------------------ arithmetic


def shifted_ports(r: Resources, by: int) -> Resources:
    return Resources.of(
        Resource(
            i.name,
            i.scalar,
            tuple(Range(x.begin + by, x.end + by) for x in i.ranges),
            i.role,
            i.principal,
            i.volume,
        )
        for i in r
    )


@given(resources, resources)
def test_add_then_subtract_is_identity(a: Resources, b: Resources) -> None:
    # Ranges are sets, not multisets: the identity needs b's ports to be disjoint from a's.
    b = shifted_ports(b, 1000)
    assert (a + b) - b == a
    assert a + b == b + a
    assert (a + b).contains(a) and (a + b).contains(b)


@given(resources, resources)
def test_contains_agrees_with_subtraction(a: Resources, b: Resources) -> None:
    if a.contains(b):
        assert (a - b) + b == a
        assert a.shortfall(b).is_empty()
    else:
        with pytest.raises(ResourceError):
            a - b
        assert not a.shortfall(b).is_empty()


@given(st.data(), resources)
def test_a_part_is_contained_and_subtracts(data: st.DataObject, whole: Resources) -> None:
    part = data.draw(part_of(whole))
    assert whole.contains(part)
    rest = whole - part
    assert rest + part == whole
    assert part.dominant_share(whole) <= 1.0


def test_subtracting_what_is_not_there_says_what_is_missing() -> None:
    have = Resources.parse("cpus:2;mem:100;ports:[1-5]")
    with pytest.raises(ResourceError, match=r"\(missing cpus:1;ports:\[6\]\)$"):
        have - Resources.parse("cpus:3;ports:[5-6]")
    # Reserved resources do not satisfy a demand for unreserved ones, nor the reverse.
    assert not Resources.parse("cpus(db):4").contains(Resources.parse("cpus:1"))
    assert not Resources.parse("cpus:4").contains(Resources.parse("cpus(db):1"))


def test_selections_by_role_and_volume() -> None:
    r = Resources.parse("cpus:1;cpus(db):2;cpus(web):4;disk(db):10;disk(db)[v:data]:5")
    assert r.unreserved() == Resources.parse("cpus:1")
    assert r.reserved("db") == Resources.parse("cpus(db):2;disk(db):10;disk(db)[v:data]:5")
    assert r.reserved(UNRESERVED).is_empty()
    assert r.allocatable_to("db") == r.unreserved() + r.reserved("db")
    assert r.allocatable_to("other") == r.unreserved()
    assert r.without_volumes() == Resources.parse("cpus:1;cpus(db):2;cpus(web):4;disk(db):10")
    assert r.roles() == ("db", "web")
    assert r.scalar("cpus") == 7


def test_first_ports_take_the_lowest() -> None:
    r = Resources.parse("ports:[31005-31006,31000-31001]")
    assert r.first_ports(3) == [31000, 31001, 31005]
    assert r.first_ports(0) == []
    with pytest.raises(ResourceError, match="ports: 5 wanted, only 4 available"):
        r.first_ports(5)


def test_dominant_share_is_the_largest_fraction() -> None:
    total = Resources.parse("cpus:10;mem:1000;disk:100;ports:[1-100]")
    assert Resources.parse("cpus:1;mem:500").dominant_share(total) == 0.5
    assert Resources.parse("ports:[1-100]").dominant_share(total) == 0
    assert Resources.parse("cpus:1").dominant_share(Resources()) == 0
    assert Resources.parse("cpus(db):5").dominant_share(total) == 0.5


@given(st.data(), resources)
def test_dominant_share_of_contained_usage_is_within_0_and_1(
    data: st.DataObject, total: Resources
) -> None:
    used = data.draw(part_of(total))
    assert 0.0 <= used.dominant_share(total) <= 1.0


# ------------------------------------------------------------------ operations


@given(st.data(), resources, st.sampled_from(["db", "web"]), st.sampled_from(["", "alice"]))
def test_reserve_then_unreserve_is_identity(
    data: st.DataObject, total: Resources, role: str, principal: str
) -> None:
    # An agent's port belongs to one pool: the same port unreserved and reserved at once
    # is not a state an agent can be in (and reserving it again would merge the two).
    def size(ranges: tuple[Range, ...]) -> int:
        return sum(r.end - r.begin + 1 for r in ranges)

    assume(sum(size(i.ranges) for i in total if i.name == "ports") == size(total.ranges("ports")))
    wanted = data.draw(part_of(total.unreserved()))
    if wanted.is_empty():
        return
    reserved = reserve(total, wanted, role, principal)
    assert reserved.scalar("cpus") == total.scalar("cpus")
    assert reserved.ranges("ports") == total.ranges("ports")
    moved = Resources.of(Resource(i.name, i.scalar, i.ranges, role, principal) for i in wanted)
    assert reserved.contains(moved)
    assert unreserve(reserved, moved) == total


def test_reserve_accepts_wanted_carrying_the_role_and_rejects_the_impossible() -> None:
    total = Resources.parse("cpus:4;mem:100")
    assert reserve(total, Resources.parse("cpus(db):1"), "db") == Resources.parse(
        "cpus:3;cpus(db):1;mem:100"
    )
    with pytest.raises(ResourceError, match=r"^reserve: cpus:5 is not available unreserved"):
        reserve(total, Resources.parse("cpus:5"), "db")
    with pytest.raises(ResourceError, match="not for role 'db'"):
        reserve(total, Resources.parse("cpus(web):1"), "db")
    with pytest.raises(ResourceError, match="a role other than"):
        reserve(total, Resources.parse("cpus:1"), UNRESERVED)
    with pytest.raises(ResourceError, match="is not reserved"):
        unreserve(total, Resources.parse("cpus:1"))
    with pytest.raises(ResourceError, match="is not available"):
        unreserve(total, Resources.parse("cpus(db):1"))


def test_volumes_are_carved_from_reserved_disk_and_given_back() -> None:
    total = Resources.parse("cpus:1;disk:100;disk(db):60")
    vol = Resources.parse("disk(db)[v1:data]:40")
    created = create_volumes(total, vol)
    assert created == Resources.parse("cpus:1;disk:100;disk(db):20;disk(db)[v1:data]:40")
    assert created.scalar("disk") == total.scalar("disk")
    assert destroy_volumes(created, vol) == total
    with pytest.raises(ResourceError, match="persistent volume; destroy it first"):
        unreserve(created, vol)


def test_volume_operations_reject_what_does_not_apply() -> None:
    total = Resources.parse("disk:100;disk(db):60;disk(db)[v1:data]:10")
    with pytest.raises(ResourceError, match="persistence id 'v1' is already in use"):
        create_volumes(total, Resources.parse("disk(db)[v1:other]:5"))
    with pytest.raises(ResourceError, match="persistence id 'v2' is already in use"):
        create_volumes(total, Resources.parse("disk(db)[v2:a]:5;disk(db)[v2:b]:5"))
    with pytest.raises(ResourceError, match=r"missing disk\(db\):40"):
        create_volumes(total, Resources.parse("disk(db)[v3:data]:100"))
    with pytest.raises(ResourceError, match="is not a persistent volume"):
        create_volumes(total, Resources.parse("disk(db):5"))
    with pytest.raises(ResourceError, match="is not a volume here"):
        destroy_volumes(total, Resources.parse("disk(db)[v9:data]:10"))
    with pytest.raises(ResourceError, match="no volumes given"):
        destroy_volumes(total, Resources())


# ------------------------------------------------------------------ attributes


def test_attributes_parse_and_render() -> None:
    assert parse_attributes("zone:a; rack : r1;") == {"zone": "a", "rack": "r1"}
    assert parse_attributes("") == {}
    assert render_attributes({"zone": "a", "rack": "r1"}) == "rack:r1;zone:a"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zone", "attribute 'zone': expected name:value (e.g. zone:a)"),
        (":a", "attribute ':a': expected name:value (e.g. zone:a)"),
        ("zone:a;zone:b", "attribute 'zone' is given twice"),
        ("my zone:a", "attribute 'my zone': letters, digits, _ . - only"),
    ],
)
def test_malformed_attributes_are_a_one_line_error(text: str, message: str) -> None:
    with pytest.raises(ResourceError) as caught:
        parse_attributes(text)
    assert str(caught.value) == message


@given(st.text(alphabet="cpusmem:;[]-,()0123456789.* ab", max_size=30))
def test_any_text_parses_or_fails_with_a_resource_error(text: str) -> None:
    try:
        r = Resources.parse(text)
    except ResourceError as e:
        assert "\n" not in str(e)
    else:
        assert Resources.parse(str(r)) == r
