"""An agent's resources as a value: cpus, mem and disk (MiB) scalars, port ranges,
reservations by role and persistent volumes; their text form and the operations on them.

Pure: never does I/O. Every function either returns a new value or raises ResourceError
with a one-line message that says what is wrong; nothing is ever changed in place.

Invariants of a `Resources` value (its normalized form):
- a resource is identified by (name, role, principal, volume); items with the same identity
  merge: scalars add up, ranges are unioned and coalesced ([1-3] and [4-5] are [1-5]);
- ranges are sets: adding overlapping ranges unions them, so `a + b - b == a` holds when
  their ranges are disjoint (scalars always);
- scalars are kept in thousandths (as Mesos does), so sums and differences are exact and
  never drift below zero; a zero scalar and an empty range set vanish;
- a name is either a scalar or a range resource within one value, never both;
- role "*" (also spelled "") is unreserved and has no principal; a volume is disk reserved
  for a role;
- equality and hash are those of the normalized form, and `parse(str(r)) == r`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

UNRESERVED = "*"
# The scalars dominant resource fairness compares.
SHARE_NAMES = ("cpus", "mem", "disk")
# Text order of the well-known names; others follow alphabetically.
_NAME_ORDER = {"cpus": 0, "mem": 1, "disk": 2, "ports": 3}
_MILLI = 1000
_MAX_RANGE = 2**64 - 1

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_ROLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_PRINCIPAL = re.compile(r"[A-Za-z0-9_@][A-Za-z0-9_.@\-]*\Z")
_PERSISTENCE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_CONTAINER_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*\Z")
# name, optional (role[,principal]), optional [persistence_id:container_path], ':' value
_ITEM = re.compile(
    r"\s*(?P<name>[^()\[\]:;]+?)\s*"
    r"(?:\(\s*(?P<role>[^(),]*?)\s*(?:,\s*(?P<principal>[^()]*?)\s*)?\))?\s*"
    r"(?:\[\s*(?P<pid>[^:\]]*?)\s*:\s*(?P<path>[^\]]*?)\s*\])?\s*"
    r":\s*(?P<value>.*?)\s*\Z"
)


class ResourceError(ValueError):
    """Malformed resources or an operation that does not apply; the message is one line."""


@dataclass(frozen=True, order=True)
class Range:
    """The inclusive range [begin, end]."""

    begin: int
    end: int

    def __str__(self) -> str:
        return str(self.begin) if self.begin == self.end else f"{self.begin}-{self.end}"


@dataclass(frozen=True, order=True)
class Volume:
    """A persistent volume: a directory that outlives tasks, seen at container_path."""

    persistence_id: str
    container_path: str


@dataclass(frozen=True)
class Resource:
    """One item: a scalar or ranges of `name`, reserved for `role` unless it is "*"."""

    name: str
    scalar: float = 0.0
    ranges: tuple[Range, ...] = ()
    role: str = UNRESERVED
    principal: str = ""
    volume: Volume | None = None

    def __str__(self) -> str:
        return str(Resources.of([self]))


# (name, role, principal, volume): what makes two items the same resource.
_Key = tuple[str, str, str, Volume | None]
# Coalesced, sorted, disjoint (begin, end) pairs.
_Spans = tuple[tuple[int, int], ...]


def _sort_key(key: _Key) -> tuple[int, str, str, str, str, str]:
    name, role, principal, volume = key
    pid, path = (volume.persistence_id, volume.container_path) if volume else ("", "")
    return (_NAME_ORDER.get(name, len(_NAME_ORDER)), name, role, principal, pid, path)


def _coalesce(spans: Iterable[tuple[int, int]]) -> _Spans:
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1] + 1:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    return tuple(merged)


def _spans_minus(have: _Spans, take: _Spans) -> _Spans:
    """`have` without `take` (both coalesced)."""
    out: list[tuple[int, int]] = []
    for begin, end in have:
        for t_begin, t_end in take:
            if t_end < begin or t_begin > end:
                continue
            if t_begin > begin:
                out.append((begin, t_begin - 1))
            begin = t_end + 1
            if begin > end:
                break
        if begin <= end:
            out.append((begin, end))
    return tuple(out)


def _spans_within(inner: _Spans, outer: _Spans) -> bool:
    return all(any(b <= begin and end <= e for b, e in outer) for begin, end in inner)


def _milli(name: str, value: float) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ResourceError(f"{name}: {value!r} is not a finite number")
    if value < 0:
        raise ResourceError(f"{name}: {value:g} is negative")
    return round(value * _MILLI)


def _render_milli(milli: int) -> str:
    if milli % _MILLI == 0:
        return str(milli // _MILLI)
    return f"{milli / _MILLI:.3f}".rstrip("0")


def _check_identity(item: Resource) -> _Key:
    name = item.name
    if not _NAME.match(name):
        raise ResourceError(f"{name!r} is not a resource name (letters, digits, _ . -)")
    role = item.role or UNRESERVED
    if role != UNRESERVED and not _ROLE.match(role):
        raise ResourceError(f"{name}: {role!r} is not a role name")
    if item.principal:
        if role == UNRESERVED:
            raise ResourceError(f"{name}: principal {item.principal!r} given without a role")
        if not _PRINCIPAL.match(item.principal):
            raise ResourceError(f"{name}: {item.principal!r} is not a principal")
    volume = item.volume
    if volume is not None:
        if name != "disk":
            raise ResourceError(f"{name}: only disk can be a persistent volume")
        if role == UNRESERVED:
            raise ResourceError(
                f"disk: volume {volume.persistence_id!r} must be on disk reserved for a role"
            )
        if not _PERSISTENCE_ID.match(volume.persistence_id):
            raise ResourceError(f"disk: {volume.persistence_id!r} is not a persistence id")
        path = volume.container_path
        if not _CONTAINER_PATH.match(path) or ".." in path.split("/"):
            raise ResourceError(f"disk: container path {path!r} must be relative, without '..'")
        if item.ranges:
            raise ResourceError("disk: a persistent volume is a scalar")
    return (name, role, item.principal, volume)


class Resources:
    """An immutable, normalized multiset of resources (see the module's invariants)."""

    __slots__ = ("_hash", "_ranges", "_scalars")

    _scalars: dict[_Key, int]
    _ranges: dict[_Key, _Spans]
    _hash: int | None

    def __init__(self) -> None:
        """The empty value; build others with `of`, `parse` and the operators."""
        self._scalars = {}
        self._ranges = {}
        self._hash = None

    @classmethod
    def _make(cls, scalars: dict[_Key, int], ranges: dict[_Key, _Spans]) -> Resources:
        value = cls()
        value._scalars = {k: v for k, v in scalars.items() if v}
        value._ranges = {k: v for k, v in ranges.items() if v}
        return value

    # ------------------------------------------------------------------ building

    @classmethod
    def of(cls, items: Iterable[Resource]) -> Resources:
        """Validate and normalize `items`; raises ResourceError on the first bad one."""
        scalars: dict[_Key, int] = {}
        ranges: dict[_Key, list[tuple[int, int]]] = {}
        for item in items:
            key = _check_identity(item)
            name = key[0]
            if item.ranges and item.scalar:
                raise ResourceError(f"{name}: has both a scalar and ranges")
            if item.ranges:
                spans = ranges.setdefault(key, [])
                for r in item.ranges:
                    if type(r.begin) is not int or type(r.end) is not int:
                        raise ResourceError(f"{name}: range {r.begin}-{r.end} is not integral")
                    if r.begin < 0 or r.end > _MAX_RANGE:
                        raise ResourceError(f"{name}: range {r} is out of bounds")
                    if r.begin > r.end:
                        raise ResourceError(f"{name}: range {r} is reversed")
                    spans.append((r.begin, r.end))
            else:
                milli = _milli(name, item.scalar)
                scalars[key] = scalars.get(key, 0) + milli
        value = cls._make(scalars, {k: _coalesce(v) for k, v in ranges.items()})
        both = {k[0] for k in value._scalars} & {k[0] for k in value._ranges}
        if both:
            raise ResourceError(f"{min(both)}: used both as a scalar and as ranges")
        return value

    @classmethod
    def parse(cls, text: str, role: str = UNRESERVED) -> Resources:
        """Parse "cpus:2;mem:4096;ports:[31000-31999]"; items without "(role)" get `role`.

        Also "cpus(role):1", "cpus(role,principal):1", "disk(role)[id:path]:100" (volume).
        """
        items: list[Resource] = []
        for part in text.split(";"):
            if not part.strip():
                continue
            m = _ITEM.match(part)
            if m is None:
                raise ResourceError(f"{part.strip()!r}: expected name:value (e.g. cpus:2)")
            name, value = m["name"], m["value"]
            if not value:
                raise ResourceError(f"{name}: missing value after ':'")
            item_role = role if m["role"] is None else (m["role"] or UNRESERVED)
            principal = m["principal"] or ""
            volume = Volume(m["pid"], m["path"]) if m["pid"] is not None else None
            if value.startswith("["):
                spans = _parse_ranges(name, value)
                items.append(Resource(name, 0.0, spans, item_role, principal, volume))
            else:
                number = _parse_number(name, value)
                items.append(Resource(name, number, (), item_role, principal, volume))
        return cls.of(items)

    # ----------------------------------------------------------------- reading

    def _keys(self) -> list[_Key]:
        return sorted([*self._scalars, *self._ranges], key=_sort_key)

    def __iter__(self) -> Iterator[Resource]:
        for key in self._keys():
            name, role, principal, volume = key
            if key in self._scalars:
                yield Resource(name, self._scalars[key] / _MILLI, (), role, principal, volume)
            else:
                spans = tuple(Range(b, e) for b, e in self._ranges[key])
                yield Resource(name, 0.0, spans, role, principal, volume)

    def __str__(self) -> str:
        parts = []
        for key in self._keys():
            name, role, principal, volume = key
            label = name
            if role != UNRESERVED:
                label += f"({role},{principal})" if principal else f"({role})"
            if volume is not None:
                label += f"[{volume.persistence_id}:{volume.container_path}]"
            if key in self._scalars:
                parts.append(f"{label}:{_render_milli(self._scalars[key])}")
            else:
                spans = ",".join(str(Range(b, e)) for b, e in self._ranges[key])
                parts.append(f"{label}:[{spans}]")
        return ";".join(parts)

    def __repr__(self) -> str:
        return f"Resources.parse({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Resources):
            return NotImplemented
        return self._scalars == other._scalars and self._ranges == other._ranges

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((frozenset(self._scalars.items()), frozenset(self._ranges.items())))
        return self._hash

    def __bool__(self) -> bool:
        return not self.is_empty()

    def is_empty(self) -> bool:
        return not self._scalars and not self._ranges

    def scalar(self, name: str) -> float:
        """The total of scalar `name` over all roles and volumes."""
        return sum(v for k, v in self._scalars.items() if k[0] == name) / _MILLI

    def ranges(self, name: str) -> tuple[Range, ...]:
        """The ranges of `name` over all roles, coalesced."""
        spans = _coalesce(s for k, v in self._ranges.items() if k[0] == name for s in v)
        return tuple(Range(b, e) for b, e in spans)

    def first_ports(self, n: int) -> list[int]:
        """The lowest `n` ports; ResourceError if there are fewer."""
        ports: list[int] = []
        for r in self.ranges("ports"):
            ports.extend(range(r.begin, min(r.end, r.begin + n - len(ports) - 1) + 1))
            if len(ports) >= n:
                return ports
        if len(ports) < n:
            raise ResourceError(f"ports: {n} wanted, only {len(ports)} available")
        return ports

    def dominant_share(self, total: Resources) -> float:
        """max over cpus, mem, disk of self/total (names absent from total are skipped)."""
        share = 0.0
        for name in SHARE_NAMES:
            whole = total.scalar(name)
            if whole > 0:
                share = max(share, self.scalar(name) / whole)
        return share

    # ------------------------------------------------------------ selecting

    def _filter(self, keep: Callable[[_Key], bool]) -> Resources:
        return Resources._make(
            {k: v for k, v in self._scalars.items() if keep(k)},
            {k: v for k, v in self._ranges.items() if keep(k)},
        )

    def unreserved(self) -> Resources:
        return self._filter(lambda k: k[1] == UNRESERVED)

    def reserved(self, role: str) -> Resources:
        """What is reserved for `role` (including its volumes)."""
        return self._filter(lambda k: k[1] == role and role != UNRESERVED)

    def allocatable_to(self, role: str) -> Resources:
        """What a framework of `role` may be offered: unreserved plus reserved for it."""
        return self._filter(lambda k: k[1] in (UNRESERVED, role))

    def volumes(self) -> tuple[Resource, ...]:
        return tuple(r for r in self if r.volume is not None)

    def without_volumes(self) -> Resources:
        return self._filter(lambda k: k[3] is None)

    def roles(self) -> tuple[str, ...]:
        """The roles something is reserved for, sorted."""
        return tuple(sorted({k[1] for k in (*self._scalars, *self._ranges)} - {UNRESERVED}))

    # -------------------------------------------------------------- arithmetic

    def __add__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        scalars = dict(self._scalars)
        for k, v in other._scalars.items():
            scalars[k] = scalars.get(k, 0) + v
        ranges = dict(self._ranges)
        for k, spans in other._ranges.items():
            ranges[k] = _coalesce([*ranges.get(k, ()), *spans])
        return Resources._make(scalars, ranges)

    def contains(self, other: Resources) -> bool:
        """Whether every item of `other` is here with the same identity and enough of it."""
        return all(self._scalars.get(k, 0) >= v for k, v in other._scalars.items()) and all(
            _spans_within(spans, self._ranges.get(k, ())) for k, spans in other._ranges.items()
        )

    def shortfall(self, other: Resources) -> Resources:
        """The part of `other` that is not here (empty when `self.contains(other)`)."""
        scalars = {k: v - self._scalars.get(k, 0) for k, v in other._scalars.items()}
        ranges = {
            k: _spans_minus(spans, self._ranges.get(k, ())) for k, spans in other._ranges.items()
        }
        return Resources._make({k: v for k, v in scalars.items() if v > 0}, ranges)

    def __sub__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        if not self.contains(other):
            raise ResourceError(f"{other} is not within {self} (missing {self.shortfall(other)})")
        scalars = dict(self._scalars)
        for k, v in other._scalars.items():
            scalars[k] -= v
        ranges = dict(self._ranges)
        for k, spans in other._ranges.items():
            ranges[k] = _spans_minus(ranges[k], spans)
        return Resources._make(scalars, ranges)


def _parse_number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ResourceError(f"{name}: {text!r} is not a number") from None
    _milli(name, value)
    return value


def _parse_ranges(name: str, text: str) -> tuple[Range, ...]:
    if not text.endswith("]"):
        raise ResourceError(f"{name}: {text!r} is not a range list like [31000-31999]")
    out = []
    for part in text[1:-1].split(","):
        part = part.strip()
        if not part:
            continue
        begin, sep, end = part.partition("-")
        try:
            r = Range(int(begin), int(end) if sep else int(begin))
        except ValueError:
            raise ResourceError(f"{name}: {part!r} is not a range like 31000-31999") from None
        if r.begin > r.end:
            raise ResourceError(f"{name}: range {r} is reversed")
        out.append(r)
    if not out:
        raise ResourceError(f"{name}: empty range list")
    return tuple(out)


# ------------------------------------------------------------------- operations


def _with_identity(r: Resources, role: str, principal: str) -> Resources:
    return Resources.of(
        Resource(i.name, i.scalar, i.ranges, role, principal if role != UNRESERVED else "", None)
        for i in r
    )


def reserve(total: Resources, wanted: Resources, role: str, principal: str = "") -> Resources:
    """`total` with the unreserved `wanted` reserved for `role` (RESERVE).

    `wanted` may be written unreserved or already carrying `role` (as on the wire).
    """
    if not role or role == UNRESERVED:
        raise ResourceError("reserve: a role other than '*' is needed")
    if wanted.is_empty():
        raise ResourceError("reserve: nothing to reserve")
    for item in wanted:
        if item.volume is not None:
            raise ResourceError(f"reserve: {Resources.of([item])} is a volume")
        if item.role not in (UNRESERVED, role):
            raise ResourceError(f"reserve: {Resources.of([item])} is not for role {role!r}")
    plain = _with_identity(wanted, UNRESERVED, "")
    if not total.unreserved().contains(plain):
        raise ResourceError(
            f"reserve: {plain} is not available unreserved "
            f"(missing {total.unreserved().shortfall(plain)})"
        )
    return total - plain + _with_identity(plain, role, principal)


def unreserve(total: Resources, wanted: Resources) -> Resources:
    """`total` with the reserved `wanted` returned to the unreserved pool (UNRESERVE)."""
    if wanted.is_empty():
        raise ResourceError("unreserve: nothing to unreserve")
    for item in wanted:
        if item.role == UNRESERVED:
            raise ResourceError(f"unreserve: {Resources.of([item])} is not reserved")
        if item.volume is not None:
            raise ResourceError(
                f"unreserve: {Resources.of([item])} is a persistent volume; destroy it first"
            )
    if not total.contains(wanted):
        raise ResourceError(
            f"unreserve: {wanted} is not available (missing {total.shortfall(wanted)})"
        )
    return total - wanted + _with_identity(wanted, UNRESERVED, "")


def _check_volumes(verb: str, volumes: Resources) -> list[Resource]:
    items = list(volumes)
    if not items:
        raise ResourceError(f"{verb}: no volumes given")
    for item in items:
        if item.volume is None:
            raise ResourceError(f"{verb}: {Resources.of([item])} is not a persistent volume")
    return items


def create_volumes(total: Resources, volumes: Resources) -> Resources:
    """`total` with each volume carved out of the plain disk reserved for its role (CREATE).

    Persistence ids are unique within `total` (pass the agent's total to enforce it per agent).
    """
    items = _check_volumes("create", volumes)
    existing = {v.volume.persistence_id for v in total.volumes() if v.volume is not None}
    seen: set[str] = set()
    for item in items:
        assert item.volume is not None
        pid = item.volume.persistence_id
        if pid in existing or pid in seen:
            raise ResourceError(f"create: persistence id {pid!r} is already in use")
        seen.add(pid)
    source = Resources.of(Resource("disk", i.scalar, (), i.role, i.principal, None) for i in items)
    if not total.contains(source):
        raise ResourceError(
            f"create: volumes need {source} of reserved disk (missing {total.shortfall(source)})"
        )
    return total - source + volumes


def destroy_volumes(total: Resources, volumes: Resources) -> Resources:
    """`total` with each volume turned back into plain disk reserved for its role (DESTROY)."""
    items = _check_volumes("destroy", volumes)
    if not total.contains(volumes):
        raise ResourceError(
            f"destroy: {total.shortfall(volumes)} is not a volume here (or not all of it)"
        )
    plain = Resources.of(Resource("disk", i.scalar, (), i.role, i.principal, None) for i in items)
    return total - volumes + plain


# ------------------------------------------------------------------- attributes


def parse_attributes(text: str) -> dict[str, str]:
    """Parse "zone:a;rack:r1"; names are unique and non-empty."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ResourceError(f"attribute {part.strip()!r}: expected name:value (e.g. zone:a)")
        if not _NAME.match(name):
            raise ResourceError(f"attribute {name!r}: letters, digits, _ . - only")
        if name in out:
            raise ResourceError(f"attribute {name!r} is given twice")
        if ";" in value:
            raise ResourceError(f"attribute {name!r}: value must not contain ';'")
        out[name] = value
    return out


def render_attributes(attributes: dict[str, str]) -> str:
    """The text form parse_attributes reads, names sorted."""
    return ";".join(f"{k}:{v}" for k, v in sorted(attributes.items()))
