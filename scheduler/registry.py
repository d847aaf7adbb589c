"""Where the substrate keeps its state in ZooKeeper, and how anyone finds the leader.

    <chroot>/<cluster>/substrate/masters/n_<seq>   election; data: the master's gRPC address
    <chroot>/<cluster>/substrate/agents/<id>       admitted agents (JSON), written by the leader
    <chroot>/<cluster>/substrate/frameworks/<id>   registered frameworks (JSON), by the leader

The lowest `n_` sequence number leads (scheduler.coord.Election). The registry of agents
and frameworks is written only by the leading master; it survives master failover so a
new leader knows who should come back.
"""

from __future__ import annotations

from scheduler.coord import Coordinator, Election, read_tree

# gRPC trailing-metadata key a standby master uses to name the leader.
LEADER_METADATA_KEY = "ringstore-leader"


def substrate_path(cluster: str) -> str:
    return f"{cluster}/substrate"


def masters_path(cluster: str) -> str:
    return f"{substrate_path(cluster)}/masters"


def agents_path(cluster: str) -> str:
    return f"{substrate_path(cluster)}/agents"


def agent_path(cluster: str, agent_id: str) -> str:
    return f"{agents_path(cluster)}/{agent_id}"


def frameworks_path(cluster: str) -> str:
    return f"{substrate_path(cluster)}/frameworks"


def framework_path(cluster: str, framework_id: str) -> str:
    return f"{frameworks_path(cluster)}/{framework_id}"


def master_election(coord: Coordinator, cluster: str, address: str) -> Election:
    """The election a master at `address` contends in."""
    return Election(coord, masters_path(cluster), address.encode())


def _lowest(contenders: dict[str, bytes]) -> str | None:
    names = sorted(
        (n for n in contenders if n.startswith(Election.PREFIX)),
        key=lambda n: n[len(Election.PREFIX):],
    )
    return contenders[names[0]].decode() if names else None


async def leading_master(coord: Coordinator, cluster: str) -> str | None:
    """The leading master's gRPC address, None while no master leads."""
    data = await Election(coord, masters_path(cluster), b"").leader_data()
    return data.decode() if data else None


def leading_master_sync(zk: str, cluster: str, *, timeout: float = 5.0) -> str | None:
    """The same, for short-lived callers such as the CLI (its own ZooKeeper session)."""
    return _lowest(read_tree(zk, masters_path(cluster), timeout=timeout))
