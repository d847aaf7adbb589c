"""scheduler.wire: protobuf Resource/Attribute messages to domain values and back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.resources import ResourceError, Resources
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.wire import (
    attributes_from_pb,
    attributes_to_pb,
    resources_from_pb,
    resources_to_pb,
)

pytestmark = pytest.mark.unit
VOLUME = pb.Volume(persistence_id="v", container_path="d")

TEXTS = st.sampled_from(
    [
        "",
        "cpus:2;mem:4096;disk:20000;ports:[31000-31999,32000-32010]",
        "cpus:0.25;cpus(db):1;mem(db,alice):64",
        "disk(db)[v1:data]:100;disk(db,alice)[v2:a/b]:5;disk(db):7",
        "gpus:1;ports(web):[80,443,8000-8080]",
    ]
)


@given(st.lists(TEXTS, max_size=3))
def test_resources_round_trip_through_protobuf(texts: list[str]) -> None:
    r = Resources.of(i for t in texts for i in Resources.parse(t))
    messages = resources_to_pb(r)
    assert resources_from_pb(messages) == r
    # The messages survive serialization too (what actually crosses the wire).
    again = [pb.Resource.FromString(m.SerializeToString()) for m in messages]
    assert resources_from_pb(again) == r


def test_messages_carry_roles_volumes_and_ranges() -> None:
    (disk, ports) = resources_to_pb(Resources.parse("disk(db,alice)[v1:data]:100;ports:[5-6]"))
    assert (disk.name, disk.scalar, disk.role, disk.principal) == ("disk", 100.0, "db", "alice")
    assert (disk.volume.persistence_id, disk.volume.container_path) == ("v1", "data")
    assert not ports.HasField("volume") and ports.role == "*"
    assert [(x.begin, x.end) for x in ports.ranges] == [(5, 6)]


def test_an_empty_role_is_unreserved() -> None:
    r = resources_from_pb([pb.Resource(name="cpus", scalar=1, role="")])
    assert r == Resources.parse("cpus:1")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (pb.Resource(name="cpus", scalar=-1), "cpus: -1 is negative"),
        (pb.Resource(name="cpus", scalar=float("nan")), "cpus: nan is not a finite number"),
        (
            pb.Resource(name="ports", ranges=[pb.Range(begin=9, end=3)]),
            "ports: range 9-3 is reversed",
        ),
        (
            pb.Resource(name="mem", scalar=1, role="db", volume=VOLUME),
            "mem: only disk can be a persistent volume",
        ),
        (
            pb.Resource(name="disk", scalar=1, volume=VOLUME),
            "disk: volume 'v' must be on disk reserved for a role",
        ),
        (pb.Resource(name="", scalar=1), "'' is not a resource name (letters, digits, _ . -)"),
        (
            pb.Resource(name="ports", scalar=1, ranges=[pb.Range(begin=1, end=2)]),
            "ports: has both a scalar and ranges",
        ),
    ],
)
def test_invalid_messages_raise_a_one_line_resource_error(message: pb.Resource, error: str) -> None:
    with pytest.raises(ResourceError) as caught:
        resources_from_pb([message])
    assert str(caught.value) == error


@given(st.dictionaries(st.sampled_from(["zone", "rack", "host"]), st.text(max_size=5)))
def test_attributes_round_trip(d: dict[str, str]) -> None:
    messages = attributes_to_pb(d)
    assert [m.name for m in messages] == sorted(d)
    assert attributes_from_pb(messages) == d


def test_bad_attributes_are_rejected() -> None:
    with pytest.raises(ResourceError, match="given twice"):
        attributes_from_pb([pb.Attribute(name="zone", text="a")] * 2)
    with pytest.raises(ResourceError, match="empty name"):
        attributes_from_pb([pb.Attribute(name="", text="a")])
