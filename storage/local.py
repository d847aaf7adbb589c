"""A whole storage cluster on this machine: ZooKeeper, controllers and storage nodes.

Used by `storage local up|down|status` and, as the test harness, by the integration and
chaos tests. Every process is started through `scheduler.process` in its own process
group, on 127.0.0.1 with ports chosen free here (so a restarted node keeps its address),
with its logs and data under one work directory. A state file (`cluster.json`) records
every PID so `storage local down` can stop exactly what `up` started.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from scheduler.coord import CoordError, read_tree
from scheduler.deadline import free_port, poll_for
from scheduler.process import Process, pid_alive, spawn, terminate_pid
from scheduler.zookeeper import ZooKeeperServer, find_installation
from storage.directory import Paths
from storage.v1 import kv_pb2, kv_pb2_grpc

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"


@dataclass
class NodeProcess:
    node_id: str
    address: str
    data_dir: Path
    process: Process | None = None


@dataclass(frozen=True)
class Leader:
    """Who leads a partition, as the newest map any running node serves says."""

    node_id: str
    address: str
    epoch: int


@dataclass
class LocalCluster:
    """ZooKeeper (unless `zk` is given) + controllers + N storage nodes, all local."""

    work_dir: Path
    nodes: int = 3
    zk: str | None = None
    cluster: str = "default"
    partitions: int = 64
    replication: int = 3
    controllers: int = 1
    sync: bool = False
    session_timeout: float = 4.0
    controller_env: dict[str, str] = field(default_factory=dict)  # added to their environment
    zookeeper: ZooKeeperServer | None = None
    node_processes: dict[str, NodeProcess] = field(default_factory=dict)
    controller_processes: list[Process] = field(default_factory=list)
    paused: set[str] = field(default_factory=set)  # node ids frozen by pause_node

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def endpoints(self) -> list[str]:
        return [n.address for n in self.node_processes.values()]

    # -- start / stop -------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start everything and wait until every partition has a serving leader."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.zk is None:
            self.zookeeper = ZooKeeperServer(self.work_dir / "zookeeper",
                                             install=find_installation())
            self.zookeeper.start(timeout=60)
            self.zk = f"{self.zookeeper.address}/ringstore"
        for _ in range(self.controllers):
            self.start_controller()
        for i in range(1, self.nodes + 1):
            node_id = f"n{i}"
            self.node_processes[node_id] = NodeProcess(
                node_id, f"127.0.0.1:{free_port()}", self.work_dir / "data" / node_id)
            self.start_node(node_id)
        self.save_state()
        self.wait_ready(timeout)

    def _python(self) -> list[str]:
        return [sys.executable, "-m", "storage"]

    def start_controller(self) -> Process:
        process = self._spawn_controller(len(self.controller_processes) + 1)
        self.controller_processes.append(process)
        return process

    def _spawn_controller(self, number: int) -> Process:
        assert self.zk is not None
        argv = [*self._python(), "controller", "--zk", self.zk, "--cluster", self.cluster,
                "--partitions", str(self.partitions), "--replication", str(self.replication),
                "--expect-nodes", str(min(self.nodes, max(self.replication, 1))),
                "--id", f"controller-{number}", "--session-timeout", str(self.session_timeout)]
        env = {**os.environ, **self.controller_env} if self.controller_env else None
        return spawn(argv, name=f"controller-{number}", log_dir=self.log_dir, env=env)

    def start_node(self, node_id: str) -> Process:
        node = self.node_processes[node_id]
        assert self.zk is not None
        argv = [*self._python(), "node", "--node-id", node_id, "--listen", node.address,
                "--data-dir", str(node.data_dir), "--zk", self.zk, "--cluster", self.cluster,
                "--sync", "always" if self.sync else "never",
                "--session-timeout", str(self.session_timeout)]
        node.process = spawn(argv, name=node_id, log_dir=self.log_dir)
        self.save_state()
        return node.process

    def stop_node(self, node_id: str, grace: float = 10.0) -> None:
        process = self.node_processes[node_id].process
        if process is not None:
            process.terminate(grace)

    def kill_node(self, node_id: str) -> None:
        process = self.node_processes[node_id].process
        if process is not None:
            process.kill()

    # -- faults (the chaos nemesis and the failure tests) ---------------------------

    def pause_node(self, node_id: str) -> None:
        """SIGSTOP the node: it keeps its sockets and state but answers nothing."""
        process = self.node_processes[node_id].process
        if process is not None:
            process.stop()
            self.paused.add(node_id)

    def resume_node(self, node_id: str) -> None:
        """SIGCONT a node frozen by `pause_node`."""
        process = self.node_processes[node_id].process
        if process is not None:
            process.cont()
        self.paused.discard(node_id)

    def pause_zookeeper(self) -> None:
        """SIGSTOP the ZooKeeper server this cluster started (not one given as `zk`): every
        session's connection goes silent, SUSPENDED, and may expire when it resumes."""
        if self.zookeeper is None:
            raise RuntimeError("this cluster did not start its ZooKeeper; it cannot pause it")
        self.zookeeper.process.stop()

    def resume_zookeeper(self) -> None:
        """SIGCONT the ZooKeeper server frozen by `pause_zookeeper`."""
        if self.zookeeper is None:
            raise RuntimeError("this cluster did not start its ZooKeeper; it cannot resume it")
        self.zookeeper.process.cont()

    def node_alive(self, node_id: str) -> bool:
        """The node's process runs (a paused process counts as running)."""
        process = self.node_processes[node_id].process
        return process is not None and process.alive()

    def address_of(self, node_id: str) -> str:
        return self.node_processes[node_id].address

    def kill_controller(self, index: int) -> None:
        """SIGKILL controller `index` (0-based, the order they were started in)."""
        self.controller_processes[index].kill()

    def restart_controller(self, index: int) -> Process:
        """Start controller `index` again (same id) after it was killed or stopped."""
        old = self.controller_processes[index]
        old.terminate()  # a no-op once it is dead and reaped
        process = self._spawn_controller(index + 1)
        self.controller_processes[index] = process
        self.save_state()
        return process

    def controller_alive(self, index: int) -> bool:
        return self.controller_processes[index].alive()

    def active_controller(self) -> int | None:
        """Index of the controller that leads the election (lowest contender), None if no
        contender is registered or ZooKeeper cannot be read. A killed leader stays listed
        until its session expires."""
        assert self.zk is not None
        try:
            contenders = read_tree(self.zk, Paths(self.cluster).controller, timeout=5.0)
        except CoordError:
            return None
        pids = {p.pid: i for i, p in enumerate(self.controller_processes)}
        for name in sorted(contenders, key=lambda n: n.rsplit("_", 1)[-1]):
            try:
                pid = int(json.loads(contenders[name]).get("pid", 0))
            except (ValueError, AttributeError):
                continue
            return pids.get(pid)
        return None

    def assignment(self, partition: int, timeout: float = 5.0) -> dict[str, Any] | None:
        """The partition's record as the controller last wrote it in ZooKeeper (`epoch`,
        `leader`, ...), ahead of the map the nodes serve; None if absent or unreadable."""
        assert self.zk is not None
        try:
            records = read_tree(self.zk, Paths(self.cluster).partitions, timeout=timeout)
        except CoordError:
            return None
        raw = records.get(Paths(self.cluster).partition(partition).rsplit("/", 1)[-1])
        if raw is None:
            return None
        record: dict[str, Any] = json.loads(raw)
        return record

    def leader_of(self, partition: int, timeout: float = 2.0) -> Leader | None:
        """The partition's leader in the newest map served by a running, unpaused node;
        None if no node answers or the map names no leader."""
        best: kv_pb2.PartitionMap | None = None
        for node in self.node_processes.values():
            if node.node_id in self.paused or node.process is None or not node.process.alive():
                continue
            with grpc.insecure_channel(node.address) as channel:
                try:
                    pmap = kv_pb2_grpc.KVStub(channel).GetMap(kv_pb2.GetMapRequest(),
                                                              timeout=timeout)
                except grpc.RpcError:
                    continue
            if best is None or pmap.version > best.version:
                best = pmap
        if best is None:
            return None
        entry = next((e for e in best.entries if e.id == partition), None)
        if entry is None or not entry.leader:
            return None
        address = {n.id: n.address for n in best.nodes}.get(entry.leader, "")
        return Leader(entry.leader, address, entry.epoch)

    def partition_led_as_planned(self, timeout: float = 30.0) -> int:
        """A partition led by the first replica of its set. The controller's leader
        rebalancing never moves such a leadership, so a test may count on it until it
        injects a fault."""
        found: list[int] = []

        def look() -> bool:
            pmap = self.partition_map()
            found[:] = [e.id for e in pmap.entries
                        if e.leader and e.replicas and e.leader == e.replicas[0]] if pmap else []
            return bool(found)

        poll_for(look, timeout, interval=0.1, what="a partition led by its planned replica")
        return found[0]

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this cluster started, by PID. Idempotent."""
        for node in self.node_processes.values():
            if node.process is not None:
                node.process.terminate(grace)
        for process in self.controller_processes:
            process.terminate(grace)
        if self.zookeeper is not None:
            self.zookeeper.stop()
        state = self.work_dir / STATE_FILE
        if state.exists():
            state.unlink()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- readiness ------------------------------------------------------------------

    def partition_map(self, timeout: float = 2.0) -> kv_pb2.PartitionMap | None:
        """GetMap from the first node that answers."""
        for address in self.endpoints:
            with grpc.insecure_channel(address) as channel:
                try:
                    return kv_pb2_grpc.KVStub(channel).GetMap(kv_pb2.GetMapRequest(),
                                                              timeout=timeout)
                except grpc.RpcError:
                    continue
        return None

    def ready(self) -> bool:
        """Every running node answers, sees itself live, and sees the same map in which
        every partition has a live leader."""
        versions = set()
        for node in self.node_processes.values():
            if node.process is None or not node.process.alive():
                continue
            with grpc.insecure_channel(node.address) as channel:
                try:
                    pmap = kv_pb2_grpc.KVStub(channel).GetMap(kv_pb2.GetMapRequest(), timeout=2)
                except grpc.RpcError:
                    return False
            live = {n.id for n in pmap.nodes if n.live}
            if node.node_id not in live or not pmap.entries:
                return False
            if any(not e.leader or e.leader not in live for e in pmap.entries):
                return False
            versions.add(pmap.version)
        return len(versions) == 1

    def wait_ready(self, timeout: float = 60.0) -> None:
        poll_for(self.ready, timeout, interval=0.2, what="every partition to have a leader")

    # -- state file (for `storage local down`) ------------------------------------

    def save_state(self) -> None:
        state: dict[str, Any] = {
            "zk": self.zk,
            "cluster": self.cluster,
            "zookeeper_pid": self.zookeeper.pid if self.zookeeper else None,
            "controllers": [p.pid for p in self.controller_processes],
            "nodes": {n.node_id: {"address": n.address, "data_dir": str(n.data_dir),
                                  "pid": n.process.pid if n.process else None}
                      for n in self.node_processes.values()},
            "log_dir": str(self.log_dir),
            "saved_at": time.time(),
        }
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.work_dir / STATE_FILE)


def read_state(work_dir: Path) -> dict[str, Any] | None:
    path = work_dir / STATE_FILE
    if not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def recorded_pids(state: dict[str, Any]) -> list[int]:
    pids = [int(n["pid"]) for n in state.get("nodes", {}).values() if n.get("pid")]
    pids += [int(p) for p in state.get("controllers", [])]
    if state.get("zookeeper_pid"):
        pids.append(int(state["zookeeper_pid"]))
    return pids


def stop_recorded(work_dir: Path, grace: float = 10.0) -> list[int]:
    """Stop every process recorded in work_dir's state file; return the PIDs stopped."""
    state = read_state(work_dir)
    if state is None:
        return []
    stopped = []
    for pid in recorded_pids(state):
        if pid_alive(pid):
            terminate_pid(pid, grace)
            stopped.append(pid)
    (work_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped

