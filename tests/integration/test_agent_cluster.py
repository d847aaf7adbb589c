"""The agent with a real master, a real ZooKeeper and real task processes, driven by the
framework SDK: task failure, kill, memory limit, health checks, agent restart and loss,
persistent volumes, sandbox reads."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from scheduler.deadline import async_poll_for, free_port, poll_for
from scheduler.framework import Framework, FrameworkDriver
from scheduler.process import Process, pid_alive, spawn
from scheduler.registry import leading_master_sync
from scheduler.taskinfo import task
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc

TASKS = Path(__file__).resolve().parents[1] / "tasks"
CLUSTER = "agenttest"
ROLE = "db"


def program(name: str, *args: str) -> list[str]:
    return [sys.executable, str(TASKS / name), *args]


class Recorder(Framework):
    def __init__(self) -> None:
        self.updates: list[pb.TaskStatus] = []
        self.offers: dict[str, pb.Offer] = {}
        self.raw: list[pb.TaskStatus] = []  # every UPDATE as it arrived, resends included

    def observe(self, event: pb.Event) -> None:
        if event.HasField("update"):
            self.raw.append(event.update.status)

    def raw_uuids(self, task_id: str) -> dict[str, set[bytes]]:
        """The uuids that arrived for each state of `task_id`, below the SDK's de-dup."""
        found: dict[str, set[bytes]] = {}
        for u in self.raw:
            if u.task_id == task_id and not u.HasField("healthy"):
                found.setdefault(pb.TaskState.Name(u.state), set()).add(bytes(u.uuid))
        return found

    async def on_offers(self, driver: FrameworkDriver, offers: list[pb.Offer]) -> None:
        self.offers.update((o.offer_id, o) for o in offers)

    async def on_rescind(self, driver: FrameworkDriver, offer_id: str) -> None:
        self.offers.pop(offer_id, None)

    async def on_update(self, driver: FrameworkDriver, status: pb.TaskStatus) -> None:
        self.updates.append(status)

    def states(self, task_id: str) -> list[str]:
        return [pb.TaskState.Name(u.state) for u in self.updates
                if u.task_id == task_id and not u.HasField("healthy")]

    def last(self, task_id: str) -> pb.TaskStatus:
        return [u for u in self.updates if u.task_id == task_id][-1]

    async def offer(self, timeout: float = 15.0) -> pb.Offer:
        await async_poll_for(lambda: bool(self.offers), timeout, what="an offer")
        return self.offers.pop(next(iter(self.offers)))

    async def reach(self, task_id: str, state: str, timeout: float = 15.0) -> None:
        await async_poll_for(lambda: state in self.states(task_id), timeout,
                             what=f"{task_id} {state} (seen {self.states(task_id)})")


@dataclass
class Cluster:
    zk: str
    root: Path
    masters: list[Process] = field(default_factory=list)
    agents: list[Process] = field(default_factory=list)
    ports_base: int = field(default_factory=lambda: random.randrange(40000, 60000, 100))

    def start_master(self, reregister_timeout: float = 30.0) -> Process:
        port = free_port()
        master = spawn(
            [sys.executable, "-m", "scheduler.master", "--zk", self.zk, "--cluster", CLUSTER,
             "--listen", f"127.0.0.1:{port}", "--agent-timeout", "1",
             "--agent-reregister-timeout", str(reregister_timeout),
             "--allocation-interval", "0.2", "--heartbeat-interval", "0.3",
             "--session-timeout", "2"],
            name=f"master{len(self.masters)}", log_dir=self.root / "logs")
        self.masters.append(master)
        poll_for(lambda: leading_master_sync(self.zk, CLUSTER) is not None, 20,
                 what="a leading master")
        return master

    def start_agent(self, index: int = 0) -> Process:
        base = self.ports_base + 20 * index
        agent = spawn(
            [sys.executable, "-m", "scheduler.agent", "--zk", self.zk, "--cluster", CLUSTER,
             "--work-dir", str(self.work_dir(index)), "--hostname", f"host{index}",
             "--resources", f"cpus:4;mem:1024;disk:1000;ports:[{base}-{base + 19}]",
             "--attributes", f"zone:z{index}", "--status-retry-interval", "0.3",
             "--kill-grace", "1"],
            name=f"agent{index}", log_dir=self.root / "logs")
        self.agents.append(agent)
        return agent

    def work_dir(self, index: int) -> Path:
        return self.root / f"agent{index}"

    def stop(self) -> None:
        for process in [*self.agents, *self.masters]:
            process.terminate(grace=5)


def kill_leftover_tasks(root: Path) -> None:
    """The agent leaves its tasks running on SIGTERM: stop the ones the test started (each
    task prints its pid; its process group is its wrapper's)."""
    for stdout in root.glob("agent*/sandboxes/*/*/stdout"):
        for line in stdout.read_text().splitlines():
            if line.startswith("pid ") and pid_alive(pid := int(line.split()[1])):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


@pytest.fixture
def cluster(zk: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zk, tmp_path)
    try:
        c.start_master()
        c.start_agent()
        yield c
    finally:
        c.stop()
        kill_leftover_tasks(tmp_path)


@pytest.fixture
async def framework(cluster: Cluster) -> AsyncIterator[tuple[FrameworkDriver, Recorder]]:
    recorder = Recorder()
    driver = FrameworkDriver(recorder, pb.FrameworkInfo(name="agent-test", role=ROLE,
                                                        failover_timeout=60),
                             zk=cluster.zk, cluster=CLUSTER, observe=recorder.observe)
    await driver.start(timeout=20)
    try:
        yield driver, recorder
    finally:
        await driver.close()


def task_pid(sandbox: Path) -> int:
    for line in (sandbox / "stdout").read_text().splitlines():
        if line.startswith("pid "):
            return int(line.split()[1])
    raise AssertionError(f"no pid in {sandbox}/stdout")


def sandbox(cluster: Cluster, driver: FrameworkDriver, task_id: str, index: int = 0) -> Path:
    return cluster.work_dir(index) / "sandboxes" / str(driver.framework_id) / task_id


async def printed_pid(cluster: Cluster, driver: FrameworkDriver, task_id: str) -> int:
    box = sandbox(cluster, driver, task_id)
    await async_poll_for(lambda: (box / "stdout").is_file()
                         and "pid " in (box / "stdout").read_text(), 10,
                         what=f"{task_id} to print its pid")
    return task_pid(box)


async def test_failed_killed_and_over_memory(
        cluster: Cluster, framework: tuple[FrameworkDriver, Recorder]) -> None:
    driver, rec = framework
    offer = await rec.offer()
    placed: list[pb.TaskInfo] = []
    for task_id, argv, mem in [("crash", program("serve_port.py"), 64),
                               ("victim", program("serve_port.py"), 64),
                               ("hog", program("alloc_memory.py", "300"), 64)]:
        placed.append(task(task_id, offer, argv, mem=mem, ports=1, placed=placed))
    await driver.launch(offer, placed, refuse_seconds=0.2)  # the rest returns soon
    for task_id in ("crash", "victim"):
        await rec.reach(task_id, "TASK_RUNNING")

    os.kill(await printed_pid(cluster, driver, "crash"), signal.SIGKILL)
    await rec.reach("crash", "TASK_FAILED")
    await driver.kill("victim", offer.agent_id)
    await rec.reach("victim", "TASK_KILLED")
    await rec.reach("hog", "TASK_FAILED", timeout=20)

    crash = rec.last("crash")
    assert (crash.exit_code, crash.reason) == (-9, pb.REASON_COMMAND_EXITED)
    hog = rec.last("hog")
    assert hog.reason == pb.REASON_MEMORY_LIMIT and "> limit 64 MiB" in hog.message
    # Acknowledged terminal tasks leave the checkpoint: from then on the agent resends
    # none of their updates.
    await async_poll_for(lambda: not list((cluster.work_dir(0) / "meta").glob("tasks/*/*")),
                         10, what="the checkpoint to forget acknowledged terminal tasks")
    # A later update on the same path (agent -> master -> framework, each stream in
    # order): every copy the agent sent before it has arrived once it has.
    marker_offer = await rec.offer()
    await driver.launch(marker_offer, [task("marker", marker_offer, program("exit_with.py",
                                                                              "0"))])
    await rec.reach("marker", "TASK_FINISHED")
    assert rec.states("crash") == ["TASK_STARTING", "TASK_RUNNING", "TASK_FAILED"]
    assert rec.states("victim") == ["TASK_STARTING", "TASK_RUNNING", "TASK_KILLED"]
    assert rec.states("hog")[-1] == "TASK_FAILED" and rec.states("hog").count("TASK_FAILED") == 1
    # Below the SDK's de-duplication: each state change is one update (one uuid) from the
    # agent, however often it was resent before its acknowledgement; none from the master.
    for task_id in ("crash", "victim", "hog"):
        uuids = rec.raw_uuids(task_id)
        assert list(uuids) == rec.states(task_id), (task_id, uuids)
        assert all(len(copies) == 1 for copies in uuids.values()), (task_id, uuids)
    assert {u.source for u in rec.raw} == {pb.SOURCE_AGENT}

    # The Agent service serves the sandbox output.
    state = None
    async with grpc.aio.insecure_channel(str(leading_master_sync(cluster.zk, CLUSTER))) as ch:
        state = await pb_grpc.MasterStub(ch).GetState(pb.GetStateRequest(), timeout=5)
    (agent_view,) = state.agents
    async with grpc.aio.insecure_channel(agent_view.info.address) as ch:
        stub = pb_grpc.AgentStub(ch)
        reply = await stub.ReadFile(pb.ReadFileRequest(task_id="victim", name="stdout"),
                                    timeout=5)
        assert reply.data.startswith(b"pid ") and reply.size == len(reply.data)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.ReadFile(pb.ReadFileRequest(task_id="nope", name="stdout"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_frozen_task_fails_its_grpc_health_check_and_is_killed(
        cluster: Cluster, framework: tuple[FrameworkDriver, Recorder]) -> None:
    driver, rec = framework
    offer = await rec.offer()
    check = pb.HealthCheck(kind=pb.HealthCheck.GRPC, interval_seconds=0.2, timeout_seconds=0.5,
                           consecutive_failures=2, grace_period_seconds=10)
    info = task("frozen", offer, program("grpc_health_server.py"), mem=128, ports=1,
                health_check=check, kill_grace_period_seconds=0.5)
    await driver.launch(offer, [info])
    await async_poll_for(lambda: any(u.task_id == "frozen" and u.HasField("healthy")
                                     and u.healthy for u in rec.updates), 20,
                         what="a healthy report")
    os.kill(await printed_pid(cluster, driver, "frozen"), signal.SIGSTOP)
    await async_poll_for(lambda: any(u.task_id == "frozen" and u.HasField("healthy")
                                     and not u.healthy for u in rec.updates), 20,
                         what="an unhealthy report")
    assert rec.states("frozen") == ["TASK_STARTING", "TASK_RUNNING"]  # reported, not killed
    await driver.kill("frozen", offer.agent_id)
    await rec.reach("frozen", "TASK_KILLED")


async def test_restarted_agent_recovers_its_tasks(
        cluster: Cluster, framework: tuple[FrameworkDriver, Recorder]) -> None:
    driver, rec = framework
    offer = await rec.offer()
    keep = task("keep", offer, program("serve_port.py"), ports=1)
    die = task("die", offer, program("serve_port.py"), ports=1, placed=[keep])
    await driver.launch(offer, [keep, die])
    await rec.reach("keep", "TASK_RUNNING")
    await rec.reach("die", "TASK_RUNNING")
    keep_pid = await printed_pid(cluster, driver, "keep")
    die_pid = await printed_pid(cluster, driver, "die")

    cluster.agents[0].kill()  # SIGKILL: the tasks live on
    await rec.reach("keep", "TASK_UNREACHABLE", timeout=10)
    os.kill(die_pid, signal.SIGKILL)  # dies while its agent is away
    cluster.start_agent()

    await async_poll_for(lambda: rec.states("keep")[-1:] == ["TASK_RUNNING"], 20,
                         what="keep RUNNING again")
    await rec.reach("die", "TASK_FAILED")
    assert rec.last("die").exit_code == -9  # its true end, from the wrapper's record
    assert rec.states("die") == ["TASK_STARTING", "TASK_RUNNING", "TASK_UNREACHABLE",
                                 "TASK_FAILED"]
    assert pid_alive(keep_pid) and task_pid(sandbox(cluster, driver, "keep")) == keep_pid
    assert "TASK_STARTING" not in rec.states("keep")[2:]  # never launched again
    assert rec.states("keep").count("TASK_STARTING") == 1
    # SIGTERM stops the agent cleanly and leaves its tasks running.
    agent = cluster.agents[-1]
    agent.signal(signal.SIGTERM)
    await async_poll_for(lambda: not agent.alive(), 10, what="the agent to stop")
    assert agent.wait(1) == 0
    assert pid_alive(keep_pid)


async def test_agent_gone_for_good_is_unreachable_then_lost(zk: str, tmp_path: Path) -> None:
    c = Cluster(zk, tmp_path)
    try:
        c.start_master(reregister_timeout=2)
        c.start_agent()
        rec = Recorder()
        async with FrameworkDriver(rec, pb.FrameworkInfo(name="t", role=ROLE),
                                   zk=zk, cluster=CLUSTER) as driver:
            offer = await rec.offer()
            await driver.launch(offer, [task("t1", offer, program("serve_port.py"), ports=1)])
            await rec.reach("t1", "TASK_RUNNING")
            c.agents[0].kill()
            await rec.reach("t1", "TASK_LOST", timeout=15)
            assert rec.states("t1")[-2:] == ["TASK_UNREACHABLE", "TASK_LOST"]
            assert rec.last("t1").reason == pb.REASON_AGENT_REMOVED
    finally:
        c.stop()
        kill_leftover_tasks(tmp_path)


async def test_persistent_volume_outlives_its_task(
        cluster: Cluster, framework: tuple[FrameworkDriver, Recorder]) -> None:
    driver, rec = framework
    offer = await rec.offer()
    reserved = pb.Resource(name="disk", scalar=100, role=ROLE)
    volume = pb.Resource(name="disk", scalar=100, role=ROLE,
                         volume=pb.Volume(persistence_id="vol1", container_path="data"))
    first = task("writer", offer, program("volume_appender.py"), volume=volume)
    await driver.accept([offer.offer_id], [
        pb.Operation(reserve=pb.Operation.Reserve(resources=[reserved])),
        pb.Operation(create=pb.Operation.Create(volumes=[volume])),
        pb.Operation(launch=pb.Operation.Launch(tasks=[first])),
    ])
    await rec.reach("writer", "TASK_RUNNING")
    volume_dir = cluster.work_dir(0) / "volumes" / ROLE / "vol1"
    await async_poll_for(lambda: (volume_dir / "runs.txt").is_file(), 10, what="a write")
    os.kill(await printed_pid(cluster, driver, "writer"), signal.SIGKILL)
    await rec.reach("writer", "TASK_FAILED")
    assert (volume_dir / "runs.txt").read_text().count("run by pid") == 1

    async def offer_with_volume() -> pb.Offer:
        while True:
            o = await rec.offer()
            if any(r.HasField("volume") for r in o.resources):
                return o
            await driver.decline([o.offer_id], refuse_seconds=0.1)

    offer = await asyncio.wait_for(offer_with_volume(), 20)
    (held,) = [r for r in offer.resources if r.HasField("volume")]
    again = task("writer2", offer, program("volume_appender.py"), volume=held)
    await driver.launch(offer, [again])
    await rec.reach("writer2", "TASK_RUNNING")
    out = sandbox(cluster, driver, "writer2") / "stdout"
    await async_poll_for(lambda: out.is_file() and out.read_text().count("run by pid") == 2,
                         10, what="the relaunch to see the first run's file")


async def test_agent_follows_a_new_leading_master(
        cluster: Cluster, framework: tuple[FrameworkDriver, Recorder]) -> None:
    driver, rec = framework
    offer = await rec.offer()
    await driver.launch(offer, [task("t1", offer, program("serve_port.py"), ports=1)])
    await rec.reach("t1", "TASK_RUNNING")  # the agent is attached
    # A standby joining the election is no leader change: the agent sees it and stays
    # attached (it registered once), so the task's states show no reconnection.
    old = leading_master_sync(cluster.zk, CLUSTER)
    standby = cluster.start_master()
    agent_log = cluster.agents[0].stderr_path
    await async_poll_for(lambda: f"its leader did not master={old} contenders=2"
                         in agent_log.read_text(), 15,
                         what="the agent to see the standby join the election")
    assert agent_log.read_text().count("registered id=") == 1
    assert rec.states("t1") == ["TASK_STARTING", "TASK_RUNNING"]
    cluster.masters[0].kill()
    await async_poll_for(lambda: leading_master_sync(cluster.zk, CLUSTER) not in (None, old),
                         15, interval=0.2, what="the standby to lead")
    assert standby.alive()
    # The agent re-registers with the new leader; its next update gets through it.
    await async_poll_for(lambda: driver.master_address not in ("", old), 15,
                         what="the framework to follow the new leader")
    os.kill(await printed_pid(cluster, driver, "t1"), signal.SIGKILL)
    await rec.reach("t1", "TASK_FAILED", timeout=20)
    assert rec.states("t1").count("TASK_FAILED") == 1
    assert rec.last("t1").exit_code == -9


async def test_pending_update_survives_agent_restart_without_a_master(
        cluster: Cluster, framework: tuple[FrameworkDriver, Recorder]) -> None:
    driver, rec = framework
    offer = await rec.offer()
    await driver.launch(offer, [task("t1", offer, program("serve_port.py"), ports=1)])
    await rec.reach("t1", "TASK_RUNNING")
    pid = await printed_pid(cluster, driver, "t1")
    cluster.masters[0].kill()  # nobody to send updates to, nobody to acknowledge them
    os.kill(pid, signal.SIGKILL)
    record = cluster.work_dir(0) / "meta" / "tasks" / str(driver.framework_id) / "t1.json"
    await async_poll_for(lambda: "TASK_FAILED" in record.read_text(), 10,
                         what="the FAILED update to be checkpointed")
    cluster.agents[0].kill()
    cluster.start_master()
    cluster.start_agent()
    await rec.reach("t1", "TASK_FAILED", timeout=30)
    assert rec.last("t1").exit_code == -9
    assert rec.states("t1").count("TASK_FAILED") == 1
    assert "TASK_LOST" not in rec.states("t1")
