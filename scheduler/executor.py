"""Running one task: sandbox, environment, ports, volumes, launch, memory limit, kill.

A task runs under the exit-status wrapper of scheduler.task_process (`spawn_task`), which
leads the task's own session and process group: the agent's death does not touch it,
and a restarted agent can learn how it ended. `Executor` works the same on a task it
launched and on one it re-attached to after a restart (`attach`). Invariants:

- the task is alive while its wrapper (the group leader) is; when the wrapper is gone the
  rest of the group is swept with SIGKILL and the task is terminal;
- a recorded pid is only trusted together with its process start time, so a pid that the
  kernel reused for another process is never taken for the task (nor signalled);
- a kill is SIGTERM (and SIGCONT, so a stopped task can act on it) to the group, then,
  after the grace, SIGKILL to every member but the wrapper, which records the status and
  exits; the group is SIGKILLed whole if the wrapper still lingers;
- memory: the resident memory of the group without the wrapper is polled; a task over its
  declared mem is SIGKILLed at once and ends FAILED / REASON_MEMORY_LIMIT;
- `before_kill(reason, message)` is called before any signal is sent, so the agent can
  checkpoint why the task is dying; the terminal state follows from that reason and the
  recorded exit status (`outcome`, pure).

States and reasons are the protocol's enum names as strings (this module does not use
generated code; the agent translates).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.deadline import async_poll_for
from scheduler.health import GrpcProbe, HealthChecker, HealthSpec, make_probe
from scheduler.process import Process, pid_alive
from scheduler.task_process import (
    EXIT_STATUS_FILE,
    ExitStatus,
    group_rss_bytes,
    pids_with_argument,
    process_start_time,
    read_exit_status,
    signal_group,
    spawn_task,
)

__all__ = [
    "Executor",
    "Outcome",
    "TaskSpec",
    "VolumeMount",
    "expand_ports",
    "outcome",
    "task_environment",
    "volume_env_name",
]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# How long the wrapper gets to record the status once its task was SIGKILLed.
_WRAPPER_EXIT_TIMEOUT = 2.0


@dataclass(frozen=True)
class VolumeMount:
    """A persistent volume handed to a task: <sandbox>/<container_path> -> host_path."""

    persistence_id: str
    container_path: str
    host_path: Path


@dataclass(frozen=True)
class TaskSpec:
    """What the executor needs to run a task (built by the agent from a TaskInfo)."""

    framework_id: str
    task_id: str
    argv: tuple[str, ...]
    environment: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()
    volumes: tuple[VolumeMount, ...] = ()
    mem_mib: float | None = None
    kill_grace: float = 3.0
    health: HealthSpec | None = None


@dataclass(frozen=True)
class Outcome:
    """A terminal state to report: TaskState and StatusReason names, message, exit code."""

    state: str
    reason: str
    message: str
    exit_code: int | None = None


def expand_ports(ranges: Iterable[tuple[int, int]]) -> list[int]:
    """The ports of inclusive ranges, in the order given: [(31000, 31001)] -> [31000, 31001]."""
    return [port for begin, end in ranges for port in range(begin, end + 1)]


def volume_env_name(container_path: str) -> str:
    """VOLUME_<CONTAINER_PATH>: upper-cased, every character outside [A-Z0-9] becomes '_'."""
    return "VOLUME_" + re.sub(r"[^A-Z0-9]", "_", container_path.strip("/").upper())


def task_environment(
    spec: TaskSpec, *, sandbox: Path, agent_id: str, base: Mapping[str, str]
) -> dict[str, str]:
    """The task's environment: `base` (the agent's own), then the agent's variables
    (PORT0..n, PORTS, SANDBOX, TASK_ID, AGENT_ID, FRAMEWORK_ID, VOLUME_*), then the
    command's own environment, which wins."""
    env = dict(base)
    for i, port in enumerate(spec.ports):
        env[f"PORT{i}"] = str(port)
    env["PORTS"] = ",".join(str(p) for p in spec.ports)
    env["SANDBOX"] = str(sandbox)
    env["TASK_ID"] = spec.task_id
    env["AGENT_ID"] = agent_id
    env["FRAMEWORK_ID"] = spec.framework_id
    for volume in spec.volumes:
        env[volume_env_name(volume.container_path)] = str(sandbox / volume.container_path)
    env.update(spec.environment)
    return env


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


def outcome(
    status: ExitStatus | None, *, kill_reason: str, kill_message: str, leader_code: int | None
) -> Outcome:
    """The terminal state of a task whose wrapper is gone (pure).

    `status` is what the wrapper recorded, `kill_reason` why the agent killed it ("" if it
    did not), `leader_code` the wrapper's own exit status when the agent is its parent.
    """
    code = status.exit_code if status is not None else None
    detail = describe_exit(code) if code is not None else "exit status unknown"
    if kill_reason in ("REASON_MEMORY_LIMIT", "REASON_HEALTH_CHECK_FAILED"):
        return Outcome("TASK_FAILED", kill_reason, kill_message or detail, code)
    if kill_reason:
        return Outcome("TASK_KILLED", kill_reason, kill_message or detail, code)
    if status is not None and status.error:
        return Outcome("TASK_FAILED", "REASON_LAUNCH_FAILED", status.error, code)
    if code == 0:
        return Outcome("TASK_FINISHED", "REASON_COMMAND_EXITED", detail, 0)
    if code is not None:
        return Outcome("TASK_FAILED", "REASON_COMMAND_EXITED", detail, code)
    if leader_code is not None:
        detail = f"the task's wrapper ended without a status ({describe_exit(leader_code)})"
    else:
        detail = "the task ended while the agent was away; its exit status is unknown"
    return Outcome("TASK_FAILED", "REASON_COMMAND_EXITED", detail, None)


class Executor:
    """One task's process: launch or re-attach, watch, kill. See the module docstring."""

    def __init__(
        self,
        spec: TaskSpec,
        sandbox: Path,
        *,
        agent_id: str,
        before_kill: Callable[[str, str], None],
        on_health: Callable[[bool], None] = lambda healthy: None,
        grpc_probe: GrpcProbe | None = None,
        poll_interval: float = 0.25,
    ) -> None:
        self.spec = spec
        self.sandbox = sandbox
        self.agent_id = agent_id
        self.before_kill = before_kill
        self.on_health = on_health
        self.grpc_probe = grpc_probe
        self.poll_interval = poll_interval
        self.process: Process | None = None  # set when this agent spawned it
        self.pid: int | None = None
        self.start_time: int | None = None
        self.kill_reason = ""
        self.kill_message = ""
        self._killer: asyncio.Task[None] | None = None
        self._health: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.spec.framework_id}/{self.spec.task_id}"

    def environment(self) -> dict[str, str]:
        return task_environment(
            self.spec, sandbox=self.sandbox, agent_id=self.agent_id, base=os.environ
        )

    def prepare_sandbox(self) -> None:
        """Create the sandbox and link each volume at <sandbox>/<container_path>."""
        self.sandbox.mkdir(parents=True, exist_ok=True)
        for volume in self.spec.volumes:
            link = self.sandbox / volume.container_path.strip("/")
            volume.host_path.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if link.is_symlink() and Path(os.readlink(link)) == volume.host_path:
                    continue
                link.unlink()
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(volume.host_path, target_is_directory=True)

    def launch(self) -> tuple[int, int]:
        """Spawn the task; return (pid, start time) to checkpoint. Raises OSError."""
        self.prepare_sandbox()
        self.process = spawn_task(
            self.spec.argv, name=self.name, sandbox=self.sandbox, env=self.environment()
        )
        self.pid = self.process.pid
        self.start_time = process_start_time(self.pid) or 0
        log.info("launched task=%s pid=%s", self.name, self.pid)
        return self.pid, self.start_time

    def attach(self, pid: int, start_time: int, kill_reason: str = "", kill_message: str = ""
               ) -> bool:
        """Adopt a task launched by an earlier run of the agent; True if it still runs."""
        self.pid, self.start_time = pid, start_time
        self.kill_reason, self.kill_message = kill_reason, kill_message
        return self.alive()

    def find_wrapper(self) -> tuple[int, int] | None:
        """(pid, start time) of a live wrapper of this task that nobody recorded (the agent
        died between spawning it and checkpointing its pid): its argv names the task's
        own exit-status file."""
        for pid in pids_with_argument(str(self.sandbox / EXIT_STATUS_FILE)):
            start_time = process_start_time(pid)
            if start_time is not None:
                return pid, start_time
        return None

    def alive(self) -> bool:
        """True while the task's wrapper runs (a stopped task is alive)."""
        if self.process is not None:
            return self.process.alive()
        if self.pid is None:
            return False
        return pid_alive(self.pid) and process_start_time(self.pid) == self.start_time

    def memory_bytes(self) -> int:
        return group_rss_bytes(self.pid, spare_leader=True) if self.pid else 0

    def start_health_checks(self) -> None:
        health = self.spec.health
        if health is None or self._health is not None:
            return
        probe = make_probe(
            health, env=self.environment(), cwd=self.sandbox, grpc_probe=self.grpc_probe
        )

        async def failed() -> None:
            # Not awaited: `wait` cancels the checker, which must not cancel the kill.
            self.kill(self.spec.kill_grace, "REASON_HEALTH_CHECK_FAILED",
                      f"{health.kind} health check failed "
                      f"{max(1, health.consecutive_failures)} times in a row")

        checker = HealthChecker(
            health, probe, on_change=self.on_health, on_failed=failed, name=self.name
        )
        self._health = asyncio.create_task(checker.run(), name=f"health {self.name}")

    def kill(self, grace: float, reason: str, message: str) -> asyncio.Task[None]:
        """Start killing the task (once; later calls return the same kill) and return it."""
        if self._killer is None:
            self.kill_reason, self.kill_message = reason, message
            self.before_kill(reason, message)
            self._killer = asyncio.create_task(self._kill(grace), name=f"kill {self.name}")
        return self._killer

    async def _wait_exit(self, timeout: float) -> bool:
        try:
            await async_poll_for(lambda: not self.alive(), timeout, interval=0.02,
                                 what=f"{self.name} to exit")
        except TimeoutError:
            return False
        return True

    async def _kill(self, grace: float) -> None:
        pid = self.pid
        if pid is None or not self.alive():
            return
        log.info("killing task=%s pid=%s grace=%s reason=%s", self.name, pid, grace,
                 self.kill_reason)
        if grace > 0:
            signal_group(pid, signal.SIGTERM)
            signal_group(pid, signal.SIGCONT)
            if await self._wait_exit(grace):
                return
            log.warning("task=%s still running %ss after SIGTERM: SIGKILL", self.name, grace)
        signal_group(pid, signal.SIGKILL, spare_leader=True)
        signal_group(pid, signal.SIGCONT)
        if not await self._wait_exit(_WRAPPER_EXIT_TIMEOUT) and self.alive():
            signal_group(pid, signal.SIGKILL)

    def _check_memory(self) -> None:
        limit = self.spec.mem_mib
        if limit is None or limit <= 0 or self._killer is not None:
            return
        used = self.memory_bytes()
        if used > limit * MIB:
            message = f"used {used // MIB} MiB > limit {limit:g} MiB"
            log.warning("task over its memory task=%s %s", self.name, message)
            self.kill(0, "REASON_MEMORY_LIMIT", message)

    async def wait(self) -> Outcome:
        """Watch the task (memory, health) until its wrapper is gone; sweep the group;
        return the terminal outcome."""
        self.start_health_checks()
        try:
            while self.alive():
                self._check_memory()
                await asyncio.sleep(self.poll_interval)
        finally:
            if self._health is not None:
                self._health.cancel()
        if self._killer is not None:
            await self._killer
        return self.finish()

    def finish(self) -> Outcome:
        """Sweep what is left of the task's group, reap the wrapper, return the outcome."""
        leader_code = None
        # Not when the pid now names another process (reused): its group is not ours.
        if self.pid is not None and (self.process is not None or not pid_alive(self.pid)):
            signal_group(self.pid, signal.SIGKILL, spare_leader=True)
        if self.process is not None:
            leader_code = self.process.wait(_WRAPPER_EXIT_TIMEOUT)
        result = outcome(
            read_exit_status(self.sandbox),
            kill_reason=self.kill_reason,
            kill_message=self.kill_message,
            leader_code=leader_code,
        )
        log.info("task ended task=%s state=%s reason=%s message=%s", self.name, result.state,
                 result.reason, result.message)
        return result

