"""Conversions between the protocol's Resource/Attribute messages and the domain values.

Only conversions live here, so that servicers and clients never build resources by hand.
Everything that comes off the wire is validated by `Resources.of`: a negative scalar, a
reversed range, a volume on anything but reserved disk and the like raise ResourceError
(its message is one line, fit for an INVALID_ARGUMENT status).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from scheduler.resources import UNRESERVED, Range, Resource, ResourceError, Resources, Volume
from scheduler.v1 import scheduler_pb2 as pb


def resources_to_pb(r: Resources) -> list[pb.Resource]:
    """One message per normalized item; unreserved items carry role "*"."""
    out = []
    for item in r:
        message = pb.Resource(
            name=item.name,
            scalar=item.scalar,
            ranges=[pb.Range(begin=x.begin, end=x.end) for x in item.ranges],
            role=item.role,
            principal=item.principal,
        )
        if item.volume is not None:
            message.volume.persistence_id = item.volume.persistence_id
            message.volume.container_path = item.volume.container_path
        out.append(message)
    return out


def resources_from_pb(items: Iterable[pb.Resource]) -> Resources:
    """The normalized value of `items` (role "" means "*"); ResourceError if invalid."""
    domain = []
    for message in items:
        volume = None
        if message.HasField("volume"):
            volume = Volume(message.volume.persistence_id, message.volume.container_path)
        domain.append(
            Resource(
                name=message.name,
                scalar=message.scalar,
                ranges=tuple(Range(x.begin, x.end) for x in message.ranges),
                role=message.role or UNRESERVED,
                principal=message.principal,
                volume=volume,
            )
        )
    return Resources.of(domain)


def attributes_to_pb(d: Mapping[str, str]) -> list[pb.Attribute]:
    """Sorted by name, so equal mappings give equal messages."""
    return [pb.Attribute(name=k, text=v) for k, v in sorted(d.items())]


def attributes_from_pb(items: Iterable[pb.Attribute]) -> dict[str, str]:
    """ResourceError on an empty or repeated name."""
    out: dict[str, str] = {}
    for message in items:
        if not message.name:
            raise ResourceError("attribute with an empty name")
        if message.name in out:
            raise ResourceError(f"attribute {message.name!r} is given twice")
        out[message.name] = message.text
    return out
