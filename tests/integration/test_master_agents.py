"""A real master with a real agent process running a real task: launch, agent loss and
return without relaunch, kill."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_harness import CLUSTER, Framework, cluster_state, start_master, task

from scheduler.deadline import async_poll_for, free_port, poll_for
from scheduler.process import Process, spawn
from scheduler.registry import leading_master_sync
from scheduler.v1 import scheduler_pb2 as pb

TASKS = Path(__file__).resolve().parents[1] / "tasks"


def start_agent(zk: str, work_dir: Path, log_dir: Path, port: int) -> Process:
    return spawn([sys.executable, "-m", "scheduler.cli", "agent", "--zk", zk, "--cluster",
                  CLUSTER, "--work-dir", str(work_dir), "--hostname", "real-0",
                  "--resources", f"cpus:2;mem:1024;disk:1000;ports:[{port}-{port}]",
                  "--attributes", "zone:a", "--status-retry-interval", "0.3",
                  "--session-timeout", "2"], name="agent", log_dir=log_dir)


@pytest.fixture
def master(zk: str, tmp_path: Path) -> Iterator[str]:
    process, address = start_master(zk, tmp_path, "master", reregister=8)
    try:
        poll_for(lambda: leading_master_sync(zk, CLUSTER) == address, 30,
                 what="the master to lead")
        yield address
    finally:
        process.terminate(grace=5)


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            return conn.recv(100).startswith(b"hello from web")
    except OSError:
        return False


async def test_real_agent_launch_loss_return_and_kill(zk: str, master: str,
                                                      tmp_path: Path) -> None:
    port = free_port()
    work_dir = tmp_path / "agent"
    agent = start_agent(zk, work_dir, tmp_path, port)
    framework = Framework(master)
    try:
        await framework.subscribe()
        offer = (await framework.next_event("offers", timeout=30)).offers.offers[0]
        web = task("web", f"cpus:1;mem:64;ports:[{port}-{port}]")
        web.command.argv[:] = [sys.executable, str(TASKS / "serve_port.py")]
        await framework.accept([offer.offer_id], web)
        running = await framework.wait_update("web", pb.TASK_RUNNING, timeout=30)
        assert running.source == pb.SOURCE_AGENT and running.uuid
        poll_for(lambda: answers(port), 10, what="the task's port")
        state = await cluster_state(framework.stub)
        [view] = state.tasks
        assert (view.state, view.hostname) == (pb.TASK_RUNNING, "real-0")
        assert view.agent_address

        agent.kill()
        unreachable = await framework.wait_update("web", pb.TASK_UNREACHABLE, timeout=15)
        assert unreachable.source == pb.SOURCE_MASTER
        assert answers(port)  # the task outlives its agent
        mark = len(framework.events)
        agent = start_agent(zk, work_dir, tmp_path, port)

        def back() -> bool:
            return any(e.WhichOneof("event") == "update" and e.update.status.task_id == "web"
                       and e.update.status.state == pb.TASK_RUNNING
                       for e in framework.events[mark:])
        await async_poll_for(back, 20, what="web reported RUNNING again")
        assert not [s for s in framework.updates("web") if s.state == pb.TASK_LOST]
        stdout = next(work_dir.glob("sandboxes/*/web/stdout")).read_text()
        assert stdout.count("listening") == 1  # not relaunched

        await framework.stub.Kill(pb.KillRequest(
            framework_id=framework.framework_id, stream_id=framework.stream_id,
            task_id="web"), timeout=5)
        await framework.wait_update("web", pb.TASK_KILLED, timeout=15)
        poll_for(lambda: not answers(port), 10, what="the task to stop serving")
    finally:
        await framework.close()
        agent.terminate(grace=5)
