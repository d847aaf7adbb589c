"""The client's routing decisions: where a call goes, and what it does when it cannot get there.

Role: turn a partition map into an address per partition (`RoutingTable`), follow NOT_LEADER
hints, pace retries (`Backoff`) and decide which error a call that gave up reports
(`final_error`). `storage.client` and `storage.discovery` ask; they own the clock, the sleeps
and the sockets.

Invariants:
- Pure: no I/O, no clock, no asyncio, grpc or protobuf import. The map is read through the
  `PartitionMapView` protocol, the shape of kv.proto's `PartitionMap`.
- A NOT_LEADER hint overrides the map's leader for its partition until a map arrives whose
  epoch for that partition is newer (or equal, with a known leader); a hint older than the
  map is ignored.
- A definite error is reported as definite only if no earlier attempt of the same call had
  an unknown outcome.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from storage.errors import CasMismatch, InvalidArgument, NotLeader, StorageError, Unavailable
from storage.partition import partition_of

__all__ = [
    "Backoff",
    "EntryView",
    "NodeView",
    "PartitionMapView",
    "RoutingTable",
    "final_error",
]


class NodeView(Protocol):
    """A node of the map (kv.proto `NodeInfo`)."""

    @property
    def id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def live(self) -> bool: ...


class EntryView(Protocol):
    """One partition of the map (kv.proto `PartitionInfo`); `leader` is empty while none."""

    @property
    def id(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def leader(self) -> str: ...
    @property
    def replicas(self) -> Iterable[str]: ...


class PartitionMapView(Protocol):
    """The partition map as routing reads it (kv.proto `PartitionMap`)."""

    @property
    def version(self) -> int: ...
    @property
    def partitions(self) -> int: ...
    @property
    def nodes(self) -> Sequence[NodeView]: ...
    @property
    def entries(self) -> Iterable[EntryView]: ...


M = TypeVar("M", bound=PartitionMapView)


class RoutingTable(Generic[M]):
    """The partition map as routing decisions: partition -> address to send to. No I/O.

    NOT_LEADER hints override the map's leader for a partition until a map arrives whose
    epoch for that partition is newer (or equal with a known leader).
    """

    __slots__ = ("_epochs", "_hints", "_replicas", "addresses", "leaders", "map", "partitions",
                 "version")

    def __init__(self, pmap: M, previous: RoutingTable[M] | None = None) -> None:
        self.map = pmap
        self.version = pmap.version
        self.partitions = pmap.partitions
        self.addresses = {n.id: n.address for n in pmap.nodes if n.address}
        live = {n.id for n in pmap.nodes if n.live}
        q = self.partitions
        self.leaders: list[str | None] = [None] * q
        self._epochs = [0] * q
        self._replicas: list[list[str]] = [[] for _ in range(q)]
        self._hints: dict[int, tuple[int, str]] = {}
        for entry in pmap.entries:
            if entry.id >= q:
                continue
            self._epochs[entry.id] = entry.epoch
            self.leaders[entry.id] = self.addresses.get(entry.leader) if entry.leader else None
            self._replicas[entry.id] = [
                self.addresses[r] for r in entry.replicas if r in live and r in self.addresses
            ]
        if previous is not None:
            for p, (epoch, address) in previous._hints.items():
                if p < q and (
                    epoch > self._epochs[p] or (epoch == self._epochs[p] and not self.leaders[p])
                ):
                    self._hints[p] = (epoch, address)
                    self.leaders[p] = address

    def partition(self, key: bytes) -> int:
        if self.partitions == 0:
            raise Unavailable("the partition map is empty: the cluster has no partitions yet")
        return partition_of(key, self.partitions)

    def route(self, partition: int, follower: bool = False) -> str | None:
        """Where to send: the leader; a FOLLOWER read falls back to a live replica."""
        address = self.leaders[partition]
        if address is None and follower and self._replicas[partition]:
            return self._replicas[partition][0]
        return address

    def apply_hint(self, partition: int, err: NotLeader) -> str | None:
        """Follow a NOT_LEADER hint; return the new leader address, or None if unusable."""
        address = err.leader_address or self.addresses.get(err.leader_id, "")
        if not address or partition >= self.partitions:
            return None
        if err.epoch and err.epoch < self._epochs[partition]:
            return None  # the node knows less than our map does
        self._hints[partition] = (max(err.epoch, self._epochs[partition]), address)
        self.leaders[partition] = address
        return address

    def candidates(self, seeds: Sequence[str]) -> list[str]:
        """Addresses to ask for a map: live nodes first, then the others, then the seeds."""
        nodes = sorted(self.map.nodes, key=lambda n: not n.live)
        out = [n.address for n in nodes if n.address]
        return list(dict.fromkeys([*out, *seeds]))


class Backoff:
    """Exponential backoff with jitter, 10 ms doubling to 500 ms. Pure: the caller sleeps."""

    __slots__ = ("_cap", "_next", "_random")

    def __init__(
        self, first: float = 0.010, cap: float = 0.500, rand: Callable[[], float] = random.random
    ) -> None:
        self._next = first
        self._cap = cap
        self._random = rand

    def next_delay(self) -> float:
        base = self._next
        self._next = min(self._cap, base * 2)
        return base * (0.5 + 0.5 * self._random())

    def delay_within(self, remaining: float) -> float | None:
        """The next sleep, leaving at least half of `remaining` for the next attempt;
        None when too little time is left to make another attempt worthwhile."""
        if remaining <= 0.002:
            return None
        return min(self.next_delay(), remaining / 2)


def final_error(err: StorageError, uncertain: bool) -> StorageError:
    """A definite error must not hide an earlier attempt whose outcome is unknown."""
    if err.definite and uncertain and not isinstance(err, (InvalidArgument, CasMismatch)):
        return Unavailable(
            f"{err.message} (an earlier attempt's outcome is unknown: it may have applied)",
            partition=err.partition,
        )
    return err
