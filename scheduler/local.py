"""A whole substrate on this machine: ZooKeeper, masters and agents, as separate processes.

Used by `scheduler local up|down|status` and, as `LocalSubstrate`, by the end-to-end
tests. Invariants:

- every process is started through `scheduler.process.spawn` (its own process group), on
  127.0.0.1, with its logs under `<work-dir>/logs` and each agent's work dir under
  `<work-dir>/agents/<name>`; masters listen on ports chosen free here and keep them
  across restarts, so a restarted master has the same address;
- agents sit in zones a, b, c in turn, with disjoint port ranges (they share one host);
- a state file (`substrate.json`) records every PID; `stop_recorded` stops exactly those
  (by PID, checking the command line so a reused PID is left alone) and then the task
  processes whose sandbox lies under the work dir: tasks run in sessions of their own and
  outlive their agent on purpose, so stopping the agents alone would leave them behind.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.checkpoint import write_atomically
from scheduler.deadline import free_port, poll_for
from scheduler.process import Process, pid_alive, spawn, terminate_pid
from scheduler.registry import leading_master_sync
from scheduler.status import StatusError, cluster_state
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.zookeeper import ZooKeeperServer, find_installation

log = logging.getLogger(__name__)

STATE_FILE = "substrate.json"
ZONES = ("a", "b", "c")
PORTS_PER_AGENT = 100
# Sized for a laptop: three agents together ask for 6 cpus and 6 GiB, which is a promise
# to the allocator, not a reservation of the host.
DEFAULT_AGENT_RESOURCES = "cpus:2;mem:2048;disk:8192"


class SubstrateError(RuntimeError):
    """A process of the local substrate failed; the message names its log."""


@dataclass
class Daemon:
    """One master or agent process of the substrate."""

    name: str
    argv: list[str]
    address: str = ""  # masters: their gRPC address
    work_dir: Path | None = None  # agents: their work dir
    zone: str = ""
    process: Process | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def own_zookeeper(directory: Path, timeout: float = 60.0) -> tuple[ZooKeeperServer, str]:
    """Start a standalone ZooKeeper living in `directory` (the installed one; raises
    ZooKeeperNotInstalled saying what to install); return it and its connect string."""
    server = ZooKeeperServer(directory, install=find_installation())
    server.start(timeout=timeout)
    return server, f"{server.address}/ringstore"


def _python() -> list[str]:
    return [sys.executable, "-m", "scheduler.cli"]


@dataclass
class LocalSubstrate:
    """ZooKeeper (unless `zk` is given) + masters + agents on this machine."""

    work_dir: Path
    agents: int = 3
    masters: int = 1
    zk: str | None = None
    cluster: str = "default"
    agent_resources: str = DEFAULT_AGENT_RESOURCES
    port_base: int = 21000
    master_flags: Sequence[str] = ()
    agent_flags: Sequence[str] = ()
    verbose: bool = True
    zookeeper: ZooKeeperServer | None = None
    master_daemons: list[Daemon] = field(default_factory=list)
    agent_daemons: list[Daemon] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    # -- start / stop ---------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start everything; return once the leading master lists every agent connected."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.zk is None:
            self.zookeeper, self.zk = own_zookeeper(self.work_dir / "zookeeper")
        for i in range(self.masters):
            address = f"127.0.0.1:{free_port()}"
            argv = [*_python(), "master", "--zk", self.zk, "--cluster", self.cluster,
                    "--listen", address, *self._verbose(), *self.master_flags]
            self.master_daemons.append(Daemon(f"master-{i + 1}", argv, address=address))
        for i in range(self.agents):
            zone = ZONES[i % len(ZONES)]
            low = self.port_base + i * PORTS_PER_AGENT
            resources = f"{self.agent_resources};ports:[{low}-{low + PORTS_PER_AGENT - 1}]"
            work_dir = self.work_dir / "agents" / f"agent-{i + 1}"
            argv = [*_python(), "agent", "--zk", self.zk, "--cluster", self.cluster,
                    "--work-dir", str(work_dir), "--resources", resources,
                    "--attributes", f"zone:{zone}", "--listen", "127.0.0.1:0",
                    *self._verbose(), *self.agent_flags]
            self.agent_daemons.append(
                Daemon(f"agent-{i + 1}", argv, work_dir=work_dir, zone=zone))
        for daemon in self.master_daemons:
            self._spawn(daemon)
        self.wait_leader(timeout)
        for daemon in self.agent_daemons:
            self._spawn(daemon)
        self.wait_agents(self.agents, timeout)

    def _verbose(self) -> list[str]:
        return ["-v"] if self.verbose else []

    def _spawn(self, daemon: Daemon) -> Process:
        if daemon.work_dir is not None:
            daemon.work_dir.mkdir(parents=True, exist_ok=True)
        daemon.process = spawn(daemon.argv, name=daemon.name, log_dir=self.log_dir)
        self.save_state()
        return daemon.process

    def _check_alive(self) -> None:
        for daemon in (*self.master_daemons, *self.agent_daemons):
            process = daemon.process
            if process is not None and not process.alive():
                raise SubstrateError(
                    f"{daemon.name} exited with status {process.returncode}; "
                    f"see {process.stderr_path}")

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process this substrate started, and their tasks. Idempotent."""
        for daemon in (*self.agent_daemons, *self.master_daemons):
            if daemon.process is not None:
                daemon.process.terminate(grace)
        for pid in task_pids(self.work_dir):
            terminate_pid(pid, grace)
        if self.zookeeper is not None:
            self.zookeeper.stop()
        StateFile(self.work_dir).remove()

    def __enter__(self) -> LocalSubstrate:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults -----------------------------------------------------------------------

    def kill_master(self, index: int) -> None:
        """SIGKILL master `index` (0-based)."""
        self._kill(self.master_daemons[index])

    def restart_master(self, index: int) -> Process:
        """Start master `index` again, on the same address."""
        return self._restart(self.master_daemons[index])

    def kill_agent(self, index: int) -> None:
        """SIGKILL agent `index` (its tasks, in their own sessions, live on)."""
        self._kill(self.agent_daemons[index])

    def restart_agent(self, index: int) -> Process:
        """Start agent `index` again on the same work dir (it recovers its tasks)."""
        return self._restart(self.agent_daemons[index])

    def _kill(self, daemon: Daemon) -> None:
        if daemon.process is not None:
            daemon.process.kill()

    def _restart(self, daemon: Daemon) -> Process:
        if daemon.process is not None:
            daemon.process.terminate()
        return self._spawn(daemon)

    # -- observation --------------------------------------------------------------------

    def leader_address(self) -> str | None:
        assert self.zk is not None
        return leading_master_sync(self.zk, self.cluster)

    def leader_index(self) -> int | None:
        """Index of the master named in the election (a killed leader stays named until
        its ZooKeeper session expires)."""
        address = self.leader_address()
        for i, daemon in enumerate(self.master_daemons):
            if daemon.address == address:
                return i
        return None

    def state(self, timeout: float = 3.0) -> pb.ClusterState:
        """GetState from the leading master (raises StatusError)."""
        assert self.zk is not None
        return cluster_state(self.zk, self.cluster, timeout=timeout)

    def wait_leader(self, timeout: float = 30.0) -> str:
        def answered() -> bool:
            self._check_alive()
            try:
                self.state(timeout=2.0)
            except StatusError:
                return False
            return True

        try:
            poll_for(answered, timeout, interval=0.2,
                     what="a master to lead and answer GetState")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {self._last_words(self.master_daemons)}") from None
        address = self.leader_address()
        assert address is not None
        return address

    def wait_agents(self, count: int, timeout: float = 30.0) -> pb.ClusterState:
        """Wait until the leading master lists `count` connected agents; return its state."""
        seen: list[pb.ClusterState] = []

        def registered() -> bool:
            self._check_alive()
            try:
                state = self.state(timeout=2.0)
            except StatusError:
                return False
            seen[:] = [state]
            return sum(1 for a in state.agents if a.connected) >= count

        try:
            poll_for(registered, timeout, interval=0.2, what=f"{count} agents to register")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {self._last_words(self.agent_daemons)}") from None
        return seen[0]

    def _last_words(self, daemons: Sequence[Daemon]) -> str:
        """The last log line of each daemon, for a message saying why a wait failed."""
        words = []
        for d in daemons:
            if d.process is None:
                continue
            try:
                lines = d.process.stderr_path.read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            words.append(f"{d.name}: {lines[-1] if lines else '(no output)'}")
        return "; ".join(words) or "no process started"

    def describe(self) -> list[str]:
        """Where everything is, for `scheduler local up` to print."""
        masters, agents = len(self.master_daemons), len(self.agent_daemons)
        lines = [f"Ringstore substrate {self.cluster!r} is up ({masters} "
                 f"master{'s' * (masters != 1)}, {agents} agent{'s' * (agents != 1)})."]
        zk_pid = self.zookeeper.pid if self.zookeeper else "-"
        lines.append(f"  zookeeper  {self.zk}  pid {zk_pid}")
        leader = self.leader_address()
        for d in self.master_daemons:
            mark = "  (leader)" if d.address == leader else ""
            lines.append(f"  {d.name:<9}  {d.address}  pid {d.pid}{mark}")
        for d in self.agent_daemons:
            lines.append(f"  {d.name:<9}  zone {d.zone}  pid {d.pid}  work dir {d.work_dir}")
        lines.append(f"  logs       {self.log_dir}")
        lines.append(f"  use it     export RINGSTORE_ZK={self.zk} "
                     f"RINGSTORE_CLUSTER={self.cluster}; scheduler status")
        lines.append(f"Stop it all with: scheduler local down --work-dir {self.work_dir}")
        return lines

    # -- the state file -----------------------------------------------------------------

    def save_state(self) -> None:
        def entry(d: Daemon) -> dict[str, Any]:
            return {"name": d.name, "pid": d.pid, "address": d.address,
                    "work_dir": str(d.work_dir) if d.work_dir else "", "zone": d.zone,
                    "log": str(self.log_dir / f"{d.name}.stderr")}

        state: dict[str, Any] = {
            "zk": self.zk,
            "cluster": self.cluster,
            "zookeeper": {"name": "zookeeper", "pid": self.zookeeper.pid,
                          "address": self.zookeeper.address,
                          "log": str(self.zookeeper.log_path)}
            if self.zookeeper is not None and self.zookeeper.alive() else None,
            "masters": [entry(d) for d in self.master_daemons],
            "agents": [entry(d) for d in self.agent_daemons],
            "work_dir": str(self.work_dir),
            "saved_at": time.time(),
        }
        StateFile(self.work_dir).write(state)


@dataclass(frozen=True)
class StateFile:
    """`<work-dir>/substrate.json`: replaced whole (write, then rename), so a reader sees
    the old record or the new one, never half of one."""

    work_dir: Path

    @property
    def path(self) -> Path:
        return self.work_dir / STATE_FILE

    def write(self, state: dict[str, Any]) -> None:
        write_atomically(self.path, json.dumps(state, indent=2).encode())

    def read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        state: dict[str, Any] = json.loads(text)
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read_state(work_dir: Path) -> dict[str, Any] | None:
    """The record `scheduler local up` left in `work_dir`, None if there is none."""
    return StateFile(work_dir).read()


def _entries(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Agents first, then masters, then ZooKeeper: the order to stop them in."""
    entries = [*state.get("agents", []), *state.get("masters", [])]
    if state.get("zookeeper"):
        entries.append(state["zookeeper"])
    return [e for e in entries if e.get("pid")]


def process_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Each recorded process with whether it is alive (for `scheduler local status`)."""
    return [{**e, "alive": pid_alive(int(e["pid"]))} for e in _entries(state)]


def running_pids(work_dir: Path) -> list[int]:
    state = read_state(work_dir)
    if state is None:
        return []
    return [int(e["pid"]) for e in _entries(state) if pid_alive(int(e["pid"]))]


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _environ_mentions(pid: int, prefix: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(v.startswith(b"SANDBOX=" + prefix.encode()) for v in environ.split(b"\0"))


def task_pids(work_dir: Path) -> list[int]:
    """Processes (other than this one) running in a sandbox under `work_dir`'s agents:
    their working directory or their SANDBOX variable lies there."""
    agents = (work_dir / "agents").resolve()
    if not agents.exists():
        return []
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        cwd = _cwd(pid)
        inside = cwd is not None and cwd.is_relative_to(agents)
        if (inside or _environ_mentions(pid, str(agents))) and pid_alive(pid):
            found.append(pid)
    return found


def stop_recorded(work_dir: Path, grace: float = 5.0) -> list[int]:
    """Stop every process recorded in work_dir's state file, then the tasks left in its
    agents' sandboxes; return the PIDs stopped."""
    state = read_state(work_dir)
    stopped: list[int] = []
    for e in _entries(state or {}):
        pid = int(e["pid"])
        marker = "zookeeper" if e["name"] == "zookeeper" else "scheduler"
        if terminate_pid(pid, grace, cmdline_contains=marker):
            stopped.append(pid)
    for pid in task_pids(work_dir):
        if terminate_pid(pid, grace):
            stopped.append(pid)
    StateFile(work_dir).remove()
    return stopped
