"""scheduler.executor on real processes, without an agent: launch, environment, exit
status, memory limit, kill escalation, re-attach after a restart, pid reuse."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from scheduler.deadline import async_poll_for, free_port
from scheduler.executor import Executor, TaskSpec, VolumeMount
from scheduler.health import HealthSpec, make_probe
from scheduler.process import pid_alive

TASKS = Path(__file__).resolve().parents[1] / "tasks"


def task(name: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, str(TASKS / name), *args)


class Recorder:
    def __init__(self) -> None:
        self.kills: list[tuple[str, str]] = []
        self.health: list[bool] = []

    def before_kill(self, reason: str, message: str) -> None:
        self.kills.append((reason, message))


def executor(tmp_path: Path, spec: TaskSpec, rec: Recorder) -> Executor:
    return Executor(spec, tmp_path / "sandbox" / spec.task_id, agent_id="ag1",
                    before_kill=rec.before_kill, on_health=rec.health.append, poll_interval=0.05)


def task_pid(ex: Executor) -> int:
    for line in (ex.sandbox / "stdout").read_text().splitlines():
        if line.startswith("pid "):
            return int(line.split()[1])
    raise AssertionError("the task did not print its pid")


async def started(ex: Executor) -> int:
    await async_poll_for(lambda: "pid " in (ex.sandbox / "stdout").read_text(), 10,
                         what="the task to start")
    return task_pid(ex)


async def test_exit_codes_and_environment(tmp_path: Path) -> None:
    rec = Recorder()
    volume = tmp_path / "volumes" / "role" / "v1"
    spec = TaskSpec("fw", "ok", ("sh", "-c", 'echo "$PORTS $TASK_ID $AGENT_ID $X"; '
                                       'echo kept > "$VOLUME_DATA/f"'),
                    environment={"X": "y"}, ports=(31000, 31001),
                    volumes=(VolumeMount("v1", "data", volume),))
    ex = executor(tmp_path, spec, rec)
    ex.launch()
    result = await asyncio.wait_for(ex.wait(), 10)
    assert (result.state, result.exit_code) == ("TASK_FINISHED", 0)
    assert (ex.sandbox / "stdout").read_text() == "31000,31001 ok ag1 y\n"
    assert (volume / "f").read_text() == "kept\n"

    ex = executor(tmp_path, TaskSpec("fw", "three", task("exit_with.py", "3")), rec)
    ex.launch()
    result = await asyncio.wait_for(ex.wait(), 10)
    assert (result.state, result.reason, result.exit_code) == (
        "TASK_FAILED", "REASON_COMMAND_EXITED", 3)

    ex = executor(tmp_path, TaskSpec("fw", "nope", ("/nonexistent/program",)), rec)
    ex.launch()
    result = await asyncio.wait_for(ex.wait(), 10)
    assert (result.state, result.reason) == ("TASK_FAILED", "REASON_LAUNCH_FAILED")
    assert rec.kills == []


async def test_killed_process_is_failed_with_its_signal(tmp_path: Path) -> None:
    rec = Recorder()
    ex = executor(tmp_path, TaskSpec("fw", "t", task("serve_port.py"), ports=(free_port(),)),
                  rec)
    ex.launch()
    pid = await started(ex)
    os.kill(pid, signal.SIGKILL)
    result = await asyncio.wait_for(ex.wait(), 10)
    assert (result.state, result.exit_code, result.message) == (
        "TASK_FAILED", -9, "killed by SIGKILL")


async def test_memory_limit(tmp_path: Path) -> None:
    rec = Recorder()
    ex = executor(tmp_path, TaskSpec("fw", "hog", task("alloc_memory.py", "200"), mem_mib=64),
                  rec)
    ex.launch()
    result = await asyncio.wait_for(ex.wait(), 20)
    assert (result.state, result.reason) == ("TASK_FAILED", "REASON_MEMORY_LIMIT")
    assert result.message.startswith("used ") and result.message.endswith("> limit 64 MiB")
    assert rec.kills == [("REASON_MEMORY_LIMIT", result.message)]


async def test_kill_escalates_to_sigkill_after_grace(tmp_path: Path) -> None:
    rec = Recorder()
    spec = TaskSpec("fw", "stubborn", task("serve_port.py", "--ignore-term"),
                    ports=(free_port(),))
    ex = executor(tmp_path, spec, rec)
    ex.launch()
    pid = await started(ex)
    os.kill(pid, signal.SIGSTOP)  # frozen as well: SIGCONT must come with SIGTERM
    waiting = asyncio.create_task(ex.wait())
    loop = asyncio.get_running_loop()
    begun = loop.time()
    ex.kill(0.5, "REASON_KILLED_BY_FRAMEWORK", "")
    result = await asyncio.wait_for(waiting, 10)
    assert loop.time() - begun >= 0.5
    assert (result.state, result.exit_code) == ("TASK_KILLED", -9)
    assert not pid_alive(pid)

    ex = executor(tmp_path, TaskSpec("fw", "polite", task("serve_port.py"),
                                     ports=(free_port(),)), rec)
    ex.launch()
    await started(ex)
    ex.kill(5, "REASON_KILLED_BY_FRAMEWORK", "")
    result = await asyncio.wait_for(ex.wait(), 10)
    assert (result.state, result.exit_code) == ("TASK_KILLED", -15)


async def test_reattach_after_restart_and_pid_reuse(tmp_path: Path) -> None:
    rec = Recorder()
    spec = TaskSpec("fw", "long", task("exit_with.py", "7", str(tmp_path / "gate")))
    first = executor(tmp_path, spec, rec)
    wrapper, start_time = first.launch()
    await started(first)

    # A new executor (as after an agent restart) adopts the live task by pid + start time.
    again = executor(tmp_path, spec, rec)
    assert again.attach(wrapper, start_time)
    impostor = executor(tmp_path, spec, rec)
    assert not impostor.attach(wrapper, start_time + 1)  # same pid, another process
    # A wrapper whose pid was never checkpointed is found by its argv.
    assert executor(tmp_path, spec, rec).find_wrapper() == (wrapper, start_time)
    other = TaskSpec("fw", "other", spec.argv)
    assert executor(tmp_path, other, rec).find_wrapper() is None

    (tmp_path / "gate").touch()
    result = await asyncio.wait_for(again.wait(), 10)
    assert (result.state, result.exit_code) == ("TASK_FAILED", 7)
    first.finish()  # reap the wrapper (its parent is this process)


async def test_health_check_kills_a_frozen_task(tmp_path: Path) -> None:
    rec = Recorder()
    port = free_port()
    health = HealthSpec("COMMAND", argv=(sys.executable, "-c", f"""
import socket, sys
s = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)
sys.exit(0 if s.recv(100).startswith(b'hello') else 1)
"""), interval=0.1, timeout=1, consecutive_failures=2, kill_on_failure=True)
    spec = TaskSpec("fw", "frozen", task("serve_port.py"), ports=(port,), health=health,
                    kill_grace=0.5)
    ex = Executor(spec, tmp_path / "sb", agent_id="a", before_kill=rec.before_kill,
                  on_health=rec.health.append, poll_interval=0.05)
    ex.launch()
    pid = await started(ex)
    waiting = asyncio.create_task(ex.wait())
    await async_poll_for(lambda: rec.health == [True], 10, what="a healthy report")
    os.kill(pid, signal.SIGSTOP)
    result = await asyncio.wait_for(waiting, 20)
    assert rec.health == [True, False]
    assert (result.state, result.reason) == ("TASK_FAILED", "REASON_HEALTH_CHECK_FAILED")


async def test_a_hanging_command_health_check_fails_and_leaves_nothing_behind(
        tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    health = HealthSpec("COMMAND", argv=task("parent_of_sleeper.py", str(pids)), timeout=3)
    probe = make_probe(health, env=dict(os.environ), cwd=tmp_path)
    checking = asyncio.ensure_future(probe())
    await async_poll_for(pids.exists, 3, what="the check to start its grandchild")
    assert await asyncio.wait_for(checking, 10) is False  # timed out: a failed check
    family = [int(p) for p in pids.read_text().split()]
    await async_poll_for(lambda: not any(pid_alive(p) for p in family), 5,
                         what=f"{family} (the check and its grandchild) to be gone")
