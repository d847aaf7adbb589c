"""scheduler.process (spawn, signal, terminate, reap) and scheduler.deadline (bounded waits).

Real child processes (short Python scripts); every wait is bounded by poll_for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from scheduler.deadline import async_poll_for, free_port, poll_for
from scheduler.process import Process, pid_alive, run, run_group, spawn, terminate_pid

# A child that says it is ready (after installing its handlers) and then sleeps forever.
SLEEPER = "import time\nprint('ready', flush=True)\nwhile True:\n    time.sleep(0.05)\n"
STUBBORN = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER
# A leader that starts a grandchild in its own group and reports the grandchild's pid.
FAMILY = (
    "import subprocess, sys, time\n"
    "sleeper = 'import time\\nwhile True: time.sleep(0.05)'\n"
    "child = subprocess.Popen([sys.executable, '-c', sleeper])\n"
    "print(child.pid, flush=True)\n"
    "while True:\n    time.sleep(0.05)\n"
)


def python(tmp_path: Path, code: str, name: str = "child") -> Process:
    proc = spawn([sys.executable, "-c", code], name=name, log_dir=tmp_path)
    poll_for(lambda: proc.stdout_path.read_text() != "", 10, what=f"{name} to start")
    return proc


def state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_terminate_stops_a_sleeping_child(tmp_path: Path) -> None:
    proc = python(tmp_path, SLEEPER)
    assert proc.alive() and pid_alive(proc.pid)
    assert proc.returncode is None

    assert proc.terminate(grace=5) == -signal.SIGTERM
    assert not proc.alive()
    assert not pid_alive(proc.pid)
    assert proc.returncode == -signal.SIGTERM
    assert proc.terminate(grace=5) == -signal.SIGTERM  # idempotent


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    proc = python(tmp_path, STUBBORN)
    started = time.monotonic()
    assert proc.terminate(grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5
    assert not pid_alive(proc.pid)


def test_terminate_kills_the_whole_process_group(tmp_path: Path) -> None:
    proc = python(tmp_path, FAMILY)
    grandchild = int(proc.stdout_path.read_text().split()[0])
    assert pid_alive(grandchild)
    assert os.getpgid(grandchild) == proc.pid
    proc.terminate(grace=5)
    # The grandchild is not ours: once killed it is reaped by init.
    poll_for(lambda: not pid_alive(grandchild), 5, what="the grandchild to die")


def test_terminate_after_the_child_died_by_itself(tmp_path: Path) -> None:
    proc = spawn([sys.executable, "-c", "raise SystemExit(3)"], name="quitter", log_dir=tmp_path)
    poll_for(lambda: not proc.alive(), 10, what="the child to exit")
    assert proc.returncode == 3
    assert not pid_alive(proc.pid)  # a zombie until reaped, which counts as dead
    assert state(proc.pid) == "Z"
    assert proc.terminate(grace=1) == 3
    assert not Path(f"/proc/{proc.pid}").exists()  # reaped


def test_stop_and_cont(tmp_path: Path) -> None:
    proc = python(tmp_path, SLEEPER)
    try:
        proc.stop()
        poll_for(lambda: state(proc.pid) == "T", 5, what="the child to stop")
        assert proc.alive()
        proc.cont()
        poll_for(lambda: state(proc.pid) != "T", 5, what="the child to continue")
        proc.stop()
        poll_for(lambda: state(proc.pid) == "T", 5, what="the child to stop again")
    finally:
        # A stopped child still gets to act on SIGTERM: terminate sends SIGCONT too.
        assert proc.terminate(grace=5) == -signal.SIGTERM


def test_wait_and_kill(tmp_path: Path) -> None:
    proc = python(tmp_path, SLEEPER)
    assert proc.wait(0.1) is None
    assert proc.kill() == -signal.SIGKILL
    assert proc.wait(1) == -signal.SIGKILL
    assert proc.terminate() == -signal.SIGKILL


def test_output_goes_to_files_in_append_mode(tmp_path: Path) -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr)"
    for _ in range(2):
        proc = spawn([sys.executable, "-c", code], name="echo", log_dir=tmp_path / "logs")
        assert proc.wait(10) == 0
    assert (tmp_path / "logs" / "echo.stdout").read_text() == "out\nout\n"
    assert (tmp_path / "logs" / "echo.stderr").read_text() == "err\nerr\n"
    explicit = spawn(
        [sys.executable, "-c", code],
        name="echo",
        stdout=tmp_path / "o",
        stderr=tmp_path / "e",
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert explicit.wait(10) == 0
    assert (tmp_path / "o").read_text() == "out\n"


def test_spawn_needs_somewhere_to_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_dir"):
        spawn([sys.executable, "-c", "pass"], name="x", stdout=tmp_path / "o")


def test_terminate_pid_stops_a_process_that_is_not_tracked(tmp_path: Path) -> None:
    proc = python(tmp_path, STUBBORN)
    assert not terminate_pid(proc.pid, 1, cmdline_contains="not-this-program")
    assert pid_alive(proc.pid)
    assert terminate_pid(proc.pid, 0.3, cmdline_contains="SIG_IGN")
    assert not pid_alive(proc.pid)  # our child, so a zombie until reaped: counts as dead
    assert proc.terminate() == -signal.SIGKILL
    assert not terminate_pid(proc.pid, 1)


def test_context_manager_terminates(tmp_path: Path) -> None:
    with python(tmp_path, SLEEPER) as proc:
        assert proc.alive()
    assert proc.returncode == -signal.SIGTERM


def test_run_captures_output() -> None:
    done = run([sys.executable, "-c", "import sys; print('hi'); sys.exit(2)"], timeout=10)
    assert done.returncode == 2 and not done.ok
    assert done.stdout == "hi\n"


def test_run_times_out() -> None:
    with pytest.raises(TimeoutError, match=r"timed out after 0\.2s"):
        run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.2)


# Starts a sleeping grandchild, writes "<its pid> <the grandchild's pid>" to argv[1].
PARENT_OF_SLEEPER = [sys.executable,
                     str(Path(__file__).resolve().parents[1] / "tasks" / "parent_of_sleeper.py")]


def family_of(pids: Path) -> tuple[int, int]:
    leader, grandchild = (int(p) for p in pids.read_text().split())
    return leader, grandchild


def all_dead(*pids: int) -> None:
    # Killed grandchildren are reparented and reaped by init: wait for that, bounded.
    poll_for(lambda: not any(pid_alive(p) for p in pids), 5, what=f"{pids} to be gone")


def reaped(pid: int) -> bool:
    """Gone from /proc: not even a zombie waiting for its parent."""
    return not Path(f"/proc/{pid}").exists()


async def test_run_group_kills_the_whole_group_on_timeout(tmp_path: Path) -> None:
    threads = threading.active_count()
    pids = tmp_path / "pids"
    running = asyncio.create_task(
        run_group([*PARENT_OF_SLEEPER, str(pids)], 3.0))
    await async_poll_for(pids.exists, 3.0, what="the command to start its grandchild")
    leader, grandchild = family_of(pids)
    with pytest.raises(TimeoutError, match=r"ran longer than 3\.0s; its process group"):
        await asyncio.wait_for(running, 10)
    all_dead(leader, grandchild)
    assert reaped(leader)
    assert threading.active_count() == threads  # no thread was left behind


async def test_run_group_kills_the_whole_group_when_cancelled(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    running = asyncio.create_task(
        run_group([*PARENT_OF_SLEEPER, str(pids)], 60))
    await async_poll_for(pids.exists, 10, what="the command to start its grandchild")
    leader, grandchild = family_of(pids)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    all_dead(leader, grandchild)
    assert reaped(leader)


async def test_run_group_returns_the_exit_status_and_sweeps_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    code = await run_group([*PARENT_OF_SLEEPER, str(pids), "3"], 20,
                           cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")})
    assert code == 3
    all_dead(*family_of(pids))  # what it left running in its group went with it
    assert await run_group(["true"], 10) == 0
    with pytest.raises(FileNotFoundError):
        await run_group(["/nonexistent/program"], 10)


def test_poll_for() -> None:
    calls: list[int] = []

    def third_time_lucky() -> bool:
        calls.append(1)
        return len(calls) == 3

    poll_for(third_time_lucky, 5, interval=0.001)
    assert len(calls) == 3
    with pytest.raises(TimeoutError, match=r"timed out after 0\.05s waiting for the moon"):
        poll_for(lambda: False, 0.05, interval=0.01, what="the moon")


async def test_async_poll_for_takes_sync_and_async_predicates() -> None:
    flag = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, flag.set)

    async def is_set() -> bool:
        return flag.is_set()

    await async_poll_for(is_set, 5, interval=0.005)
    await async_poll_for(flag.is_set, 5)
    with pytest.raises(TimeoutError, match="waiting for nothing"):
        await async_poll_for(lambda: False, 0.05, interval=0.01, what="nothing")


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
