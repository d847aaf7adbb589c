"""Where the storage layer keeps its state in ZooKeeper, and how it reads it back.

Layout under `<chroot>/<cluster>/storage/` (DESIGN §7):
  config              {"partitions": Q, "replication": RF, "created": iso-time}
  nodes/<node>        {"address", "domain", "incarnation", "state": joining|up|leaving|left}
  live/<node>         ephemeral, the node's session: {"address", "incarnation", "pid"}
  partitions          data: {"version": N}, bumped after every change below it
  partitions/<pppp>   {"epoch", "leader", "replicas", "learners"}, written only by the controller
  controller/         election of the controller; a contender's data is its id/address
  leaving/<node>      ephemeral: the node is stopping and asks to have its leadership moved

All access goes through `scheduler.coord` (the only kazoo user).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from scheduler.coord import Coordinator, read_tree
from storage.partition import Assignment, PartitionMap


class Paths:
    """ZooKeeper paths of one cluster's storage layer (relative to the chroot)."""

    def __init__(self, cluster: str) -> None:
        base = f"{cluster}/storage"
        self.base = base
        self.config = f"{base}/config"
        self.nodes = f"{base}/nodes"
        self.live = f"{base}/live"
        self.partitions = f"{base}/partitions"
        self.controller = f"{base}/controller"
        self.desired = f"{base}/desired"
        self.leaving = f"{base}/leaving"

    def node(self, node_id: str) -> str:
        return f"{self.nodes}/{node_id}"

    def live_node(self, node_id: str) -> str:
        return f"{self.live}/{node_id}"

    def leaving_node(self, node_id: str) -> str:
        return f"{self.leaving}/{node_id}"

    def partition(self, p: int) -> str:
        return f"{self.partitions}/{p:04d}"


@dataclass(frozen=True)
class NodeRecord:
    id: str
    address: str
    domain: str
    incarnation: str
    state: str

    @classmethod
    def from_json(cls, node_id: str, data: dict[str, Any]) -> NodeRecord:
        return cls(
            node_id,
            str(data.get("address", "")),
            str(data.get("domain", "") or node_id),
            str(data.get("incarnation", "")),
            str(data.get("state", "up")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "domain": self.domain,
            "incarnation": self.incarnation,
            "state": self.state,
        }


@dataclass(frozen=True)
class ClusterView:
    """One consistent-enough read of the storage state (config, nodes, live set, map)."""

    map: PartitionMap | None
    nodes: dict[str, NodeRecord]
    live: dict[str, dict[str, Any]]


async def read_config(coord: Coordinator, paths: Paths) -> dict[str, Any] | None:
    found = await coord.get_json(paths.config)
    return None if found is None else found[0]


async def read_nodes(coord: Coordinator, paths: Paths) -> dict[str, NodeRecord]:
    names = await coord.children(paths.nodes)
    found = await asyncio.gather(*(coord.get_json(paths.node(n)) for n in names))
    return {n: NodeRecord.from_json(n, f[0]) for n, f in zip(names, found, strict=True) if f}


async def read_live(coord: Coordinator, paths: Paths) -> dict[str, dict[str, Any]]:
    names = await coord.children(paths.live)
    found = await asyncio.gather(*(coord.get_json(paths.live_node(n)) for n in names))
    return {n: f[0] for n, f in zip(names, found, strict=True) if f}


async def read_map(coord: Coordinator, paths: Paths) -> PartitionMap | None:
    """The partition map, or None before the controller has created it."""
    config = await read_config(coord, paths)
    if config is None:
        return None
    top = await coord.get_json(paths.partitions)
    if top is None:
        return None
    version = int(top[0].get("version", 0))
    q = int(config["partitions"])
    found = await asyncio.gather(*(coord.get_json(paths.partition(p)) for p in range(q)))
    if any(f is None for f in found):
        return None
    assignments = tuple(Assignment.from_json(p, f[0]) for p, f in enumerate(found) if f)
    return PartitionMap(q, int(config["replication"]), assignments, version)


async def read_view(coord: Coordinator, paths: Paths) -> ClusterView:
    pmap, nodes, live = await asyncio.gather(
        read_map(coord, paths), read_nodes(coord, paths), read_live(coord, paths)
    )
    return ClusterView(pmap, nodes, live)


def node_addresses(zk: str, cluster: str, timeout: float = 5.0) -> list[str]:
    """gRPC addresses of the live storage nodes (synchronous; for bootstrapping clients)."""
    live = read_tree(zk, Paths(cluster).live, timeout=timeout)
    out = []
    for raw in live.values():
        try:
            address = json.loads(raw).get("address")
        except ValueError:
            continue
        if address:
            out.append(str(address))
    return sorted(out)
