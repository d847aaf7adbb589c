"""`scheduler local up|status|down` and the read commands, as a user runs them.

`local up` starts its own ZooKeeper, a master and three agents; `scheduler status` shows
the three agents; a task launched through the SDK shows in `scheduler tasks` and its
output in `scheduler logs`; `local down` leaves no process behind, tasks included.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from framework_harness import Recorder, framework_info, launch_per_agent

from scheduler.deadline import async_poll_for
from scheduler.framework import FrameworkDriver
from scheduler.local import read_state, task_pids
from scheduler.process import Completed, pid_alive, run
from scheduler.v1 import scheduler_pb2 as pb

SCHEDULER = [sys.executable, "-m", "scheduler.cli"]


async def scheduler(*args: str, timeout: float = 30.0) -> Completed:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGSTORE_")}
    return await asyncio.to_thread(run, [*SCHEDULER, *args], timeout, env=env)


async def test_local_up_status_logs_and_down_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "local"
    up = await scheduler("local", "up", "--agents", "3", "--masters", "1",
                         "--work-dir", str(work), "--cluster", "laptop", timeout=150)
    state = read_state(work)
    try:
        assert up.ok, up.stderr
        assert state is not None
        assert "scheduler local down --work-dir" in up.stdout
        for agent in state["agents"]:
            assert agent["work_dir"] in up.stdout and str(agent["pid"]) in up.stdout
        zk = state["zk"]
        assert zk in up.stdout
        common = ("--zk", zk, "--cluster", "laptop")

        again = await scheduler("local", "up", "--work-dir", str(work))
        assert again.returncode == 1 and "already running" in again.stderr

        status = await scheduler("status", "-o", "json", *common)
        assert status.ok, status.stderr
        cluster = json.loads(status.stdout)
        assert len(cluster["agents"]) == 3 and all(a["connected"] for a in cluster["agents"])
        assert {a["attributes"]["zone"] for a in cluster["agents"]} == {"a", "b", "c"}
        assert cluster["leader"] == state["masters"][0]["address"]
        table = await scheduler("status", *common)
        assert table.ok and "agents" in table.stdout

        # A task, so that `tasks`, `logs` and `down` have one to deal with.
        launched: dict[str, pb.TaskInfo] = {}
        framework = Recorder(policy=launch_per_agent(launched, 1, "echo", cpus=0.1, mem=32))
        async with FrameworkDriver(framework, framework_info("cli-test"), zk=zk,
                                   cluster="laptop"):
            await framework.wait_state(["echo-0"], "TASK_RUNNING")
            tasks = await scheduler("tasks", "-o", "json", *common)
            assert tasks.ok, tasks.stderr
            assert [(t["task_id"], t["state"]) for t in json.loads(tasks.stdout)] \
                == [("echo-0", "RUNNING")]

            async def logged() -> bool:
                logs = await scheduler("logs", "echo-0", *common)
                return logs.ok and "listening" in logs.stdout

            await async_poll_for(logged, 15, what="the task's stdout through scheduler logs")
            errors = await scheduler("logs", "echo-0", "--stderr", *common)
            assert errors.ok and "listening" not in errors.stdout
            unknown = await scheduler("logs", "no-such-task", *common)
            assert unknown.returncode == 1
            assert unknown.stderr.strip().splitlines() == [
                "error: unknown task 'no-such-task'; 'scheduler tasks' lists them"]
        assert task_pids(work), "the task outlives its framework's driver"

        listed = await scheduler("local", "status", "-o", "json", "--work-dir", str(work))
        assert listed.ok
        rows = json.loads(listed.stdout)["processes"]
        assert len(rows) == 5 and all(r["alive"] for r in rows)  # zookeeper, master, 3 agents
    finally:
        down = await scheduler("local", "down", "--work-dir", str(work), timeout=120)
    assert down.ok, down.stderr
    assert state is not None
    pids = [e["pid"] for e in [*state["agents"], *state["masters"], state["zookeeper"]]]
    assert not [pid for pid in pids if pid_alive(pid)]
    assert task_pids(work) == []
    assert read_state(work) is None
    twice = await scheduler("local", "down", "--work-dir", str(work))
    assert twice.ok and "no running local substrate" in twice.stdout
    gone = await scheduler("status", "--zk", state["zk"], "--cluster", "laptop",
                           "--timeout", "1")
    assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1
