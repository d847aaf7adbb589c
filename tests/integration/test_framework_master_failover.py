"""End to end: three masters, three agents, a framework on the SDK; SIGKILL the leader.

A standby takes over; the agents and the framework follow it without restarting; a task
that dies during the failover and a KILL issued during it are both reported, and the
framework sees every state change of every task exactly once, in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework_harness import (
    Recorder,
    cluster_state,
    framework_info,
    launch_per_agent,
    start_substrate,
)

from scheduler.deadline import async_poll_for
from scheduler.framework import FrameworkDriver
from scheduler.local import LocalSubstrate
from scheduler.process import pid_alive
from scheduler.v1 import scheduler_pb2 as pb

# The order an agent reports states in; a task's updates must follow it without repeats.
ORDER = ["TASK_STAGING", "TASK_STARTING", "TASK_RUNNING", "TASK_FINISHED", "TASK_FAILED",
         "TASK_KILLED"]


@pytest.fixture
def substrate(zk: str, tmp_path: Path) -> Iterator[LocalSubstrate]:
    substrate = start_substrate(tmp_path / "substrate", zk, masters=3)
    try:
        yield substrate
    finally:
        substrate.stop()


def task_pid(substrate: LocalSubstrate, info: pb.TaskInfo, framework_id: str) -> int | None:
    """The pid serve_port.py printed in its sandbox's stdout (None until it has)."""
    for daemon in substrate.agent_daemons:
        assert daemon.work_dir is not None
        stdout = daemon.work_dir / "sandboxes" / framework_id / info.task_id / "stdout"
        if stdout.exists():
            for line in stdout.read_text().splitlines():
                if line.startswith("pid "):
                    return int(line.split()[1])
    return None


async def test_leader_sigkill_loses_no_update(substrate: LocalSubstrate) -> None:
    launched: dict[str, pb.TaskInfo] = {}
    framework = Recorder(policy=launch_per_agent(launched, 3, "serve"))
    assert substrate.zk is not None
    driver = FrameworkDriver(framework, framework_info("follower"), zk=substrate.zk,
                             cluster=substrate.cluster, call_timeout=20.0)
    async with driver:
        await async_poll_for(lambda: len(launched) == 3, 30, what="3 launches")
        await framework.wait_state(list(launched), "TASK_RUNNING")
        framework_id = driver.framework_id
        assert framework_id
        await async_poll_for(
            lambda: task_pid(substrate, launched["serve-0"], framework_id) is not None, 10,
            what="serve-0 to print its pid")
        doomed = task_pid(substrate, launched["serve-0"], framework_id)
        assert doomed is not None
        agent_pids = [d.pid for d in substrate.agent_daemons]
        old = await asyncio.to_thread(substrate.leader_index)
        assert old is not None
        subscriptions = driver.subscriptions

        substrate.kill_master(old)
        killed_at = time.monotonic()
        os.kill(doomed, signal.SIGKILL)  # dies while no master leads
        # A call made during the failover waits for the new leader and is retried there.
        await driver.kill("serve-1", launched["serve-1"].agent_id)

        async def new_leader() -> bool:
            index = await asyncio.to_thread(substrate.leader_index)
            return index is not None and index != old

        await async_poll_for(new_leader, 20, what="a standby to lead")
        took = time.monotonic() - killed_at
        assert took < 15, f"new leader after {took:.1f}s"
        await framework.wait_state(["serve-0"], "TASK_FAILED", timeout=30)
        await framework.wait_state(["serve-1"], "TASK_KILLED", timeout=30)
        assert driver.framework_id == framework_id
        assert driver.subscriptions > subscriptions
        assert set(framework.subscribed) == {framework_id}

        async def agents_back() -> bool:
            state = await cluster_state(substrate)
            return state is not None and sum(a.connected for a in state.agents) == 3

        await async_poll_for(agents_back, 30, what="3 agents on the new leader")
        assert [d.pid for d in substrate.agent_daemons] == agent_pids
        assert all(d.alive() for d in substrate.agent_daemons)
        assert not pid_alive(doomed)

        for task_id in launched:
            states = framework.states(task_id, source=pb.SOURCE_AGENT)
            assert states == sorted(set(states), key=ORDER.index), (task_id, states)
            assert "TASK_RUNNING" in states, (task_id, states)
        assert framework.states("serve-0", source=pb.SOURCE_AGENT)[-1] == "TASK_FAILED"
        assert framework.states("serve-1", source=pb.SOURCE_AGENT)[-1] == "TASK_KILLED"
        assert framework.latest("serve-2") == "TASK_RUNNING"
        failed = framework.updates["serve-0"][-1]
        assert failed.HasField("exit_code") and failed.exit_code == -signal.SIGKILL
        await driver.teardown()


async def test_a_frozen_leader_is_left_after_three_missed_heartbeats(
        substrate: LocalSubstrate) -> None:
    """SIGSTOP keeps the leader's sockets open but silent: only the heartbeat watchdog can
    tell. The driver must move to the standby that takes over once the frozen leader's
    ZooKeeper session expires."""
    framework = Recorder()
    assert substrate.zk is not None
    driver = FrameworkDriver(framework, framework_info("watchdog"), zk=substrate.zk,
                             cluster=substrate.cluster, call_timeout=20.0)
    async with driver:
        old = await asyncio.to_thread(substrate.leader_index)
        assert old is not None
        frozen = substrate.master_daemons[old]
        assert driver.master_address == frozen.address
        subscriptions = driver.subscriptions
        assert frozen.process is not None
        frozen.process.stop()
        try:
            await async_poll_for(lambda: driver.subscriptions > subscriptions, 30,
                                 what="the driver to subscribe to a new leader")
            assert driver.master_address != frozen.address
            assert driver.master_address in {d.address for d in substrate.master_daemons}
            await driver.revive()  # calls work on the new leader
        finally:
            frozen.process.cont()
        await driver.teardown()
