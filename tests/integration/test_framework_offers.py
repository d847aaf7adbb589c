"""End to end on real processes: one master, three agents, a framework on the SDK.

Launching from offers (used never beyond what was offered, each task's port answers),
DECLINE filters, SUPPRESS/REVIVE, and framework failover with reconciliation. The tests
share one substrate; each tears its framework down so the next starts from free agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from framework_harness import (
    TASKS_DIR,
    Recorder,
    answer,
    cluster_state,
    framework_info,
    launch_per_agent,
    port_of,
    start_substrate,
)

from scheduler.deadline import async_poll_for
from scheduler.framework import FrameworkDriver, FrameworkError
from scheduler.local import LocalSubstrate
from scheduler.process import spawn
from scheduler.taskinfo import task
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.wire import resources_from_pb
from scheduler.zookeeper import ZooKeeperServer

DEMO_FRAMEWORK = [sys.executable, str(TASKS_DIR / "demo_framework.py")]


@pytest.fixture(scope="module")
def substrate(zk_server: ZooKeeperServer,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSubstrate]:
    zk = f"{zk_server.address}/ringstore-test-{uuid.uuid4().hex}"
    substrate = start_substrate(tmp_path_factory.mktemp("substrate"), zk)
    try:
        yield substrate
    finally:
        substrate.stop()


async def serves(info: pb.TaskInfo) -> bool:
    """The serve_port.py task answers on its first port with its own task id."""
    reply = await asyncio.to_thread(answer, port_of(info), 1.0)
    return reply.strip() == f"hello from {info.task_id}"


async def agents_idle(substrate: LocalSubstrate) -> bool:
    state = await cluster_state(substrate)
    return state is not None and all(not a.used for a in state.agents)


@contextlib.asynccontextmanager
async def running(substrate: LocalSubstrate, framework: Recorder, info: pb.FrameworkInfo,
                  *, idle: bool = True) -> AsyncIterator[FrameworkDriver]:
    """A subscribed driver for `framework` (once the agents are idle, unless `idle` is
    False), torn down on the way out so the next test finds idle agents again."""
    assert substrate.zk is not None
    if idle:
        await async_poll_for(lambda: agents_idle(substrate), 30, what="idle agents")
    async with FrameworkDriver(framework, info, zk=substrate.zk,
                               cluster=substrate.cluster) as driver:
        try:
            yield driver
        finally:
            with contextlib.suppress(FrameworkError):  # already gone: the next test tells
                await driver.teardown()


async def test_tasks_launch_on_three_agents_within_their_offers(
        substrate: LocalSubstrate) -> None:
    launched: dict[str, pb.TaskInfo] = {}
    offers: dict[str, pb.Offer] = {}
    launch = launch_per_agent(launched, 3, "serve")

    async def one_per_agent(driver: FrameworkDriver, batch: list[pb.Offer]) -> None:
        offers.update((o.offer_id, o) for o in batch)
        await launch(driver, batch)

    framework = Recorder(policy=one_per_agent)
    async with running(substrate, framework, framework_info("launcher")):
        await async_poll_for(lambda: len(launched) == 3, 30, what="3 launches")
        tasks = list(launched)
        await framework.wait_state(tasks, "TASK_RUNNING")
        for info in launched.values():
            # Used never exceeds what was offered: the task is contained in its offer.
            offer = next(o for o in offers.values() if o.agent_id == info.agent_id)
            offered = resources_from_pb(offer.resources)
            assert offered.contains(resources_from_pb(info.resources))
            await async_poll_for(lambda i=info: serves(i), 10,
                                 what=f"{info.task_id} to answer on its port")
        state = await cluster_state(substrate)
        assert state is not None
        for agent in state.agents:
            total = resources_from_pb(agent.info.resources)
            used = resources_from_pb(agent.used)
            assert total.contains(used + resources_from_pb(agent.offered))
        assert {a.task.agent_id for a in state.tasks if a.state == pb.TASK_RUNNING
                and a.task.task_id in launched} == {a.info.agent_id for a in state.agents}
        for task_id in tasks:  # each state change once, in order
            states = framework.states(task_id, source=pb.SOURCE_AGENT)
            assert states == sorted(set(states), key=states.index)
            assert states[-1] == "TASK_RUNNING"


async def test_declined_offers_return_after_their_refuse_time(
        substrate: LocalSubstrate) -> None:
    refuse = 2.0
    declined: dict[str, float] = {}

    async def decline_first(driver: FrameworkDriver, offers: list[pb.Offer]) -> None:
        for offer in offers:
            if not declined:
                declined[offer.agent_id] = time.monotonic()
                await driver.decline([offer.offer_id], refuse_seconds=refuse)

    framework = Recorder(policy=decline_first)
    async with running(substrate, framework, framework_info("decliner")):
        await async_poll_for(lambda: bool(declined), 20, what="a first offer")
        (agent_id, at), = declined.items()

        def again() -> list[float]:
            return [t for t, o in framework.offers if o.agent_id == agent_id and t > at]

        await async_poll_for(lambda: bool(again()), refuse + 15,
                             what="the declined agent to be offered again")
        assert again()[0] - at >= refuse - 0.3


async def test_suppress_stops_offers_and_revive_restarts_them(
        substrate: LocalSubstrate) -> None:
    framework = Recorder()  # holds its offers
    async with running(substrate, framework, framework_info("suppressor")) as driver:
        await async_poll_for(lambda: len({o.agent_id for _, o in framework.offers}) == 3,
                             20, what="offers from 3 agents")
        await driver.suppress()
        await driver.decline([o.offer_id for _, o in framework.offers], refuse_seconds=0)
        quiet_from = time.monotonic()
        framework.offer_arrived.clear()
        with pytest.raises(TimeoutError):
            # 10 allocation intervals with free agents and no filter: no offer may come.
            await asyncio.wait_for(framework.offer_arrived.wait(), 2.0)
        assert not [t for t, _ in framework.offers if t > quiet_from]
        state = await cluster_state(substrate)
        assert state is not None
        assert [f.suppressed for f in state.frameworks
                if f.info.framework_id == driver.framework_id] == [True]
        await driver.revive()
        await asyncio.wait_for(framework.offer_arrived.wait(), 10.0)


async def test_framework_failover_keeps_tasks_and_reconciles_them(
        substrate: LocalSubstrate, tmp_path: Path) -> None:
    """The framework's process is SIGKILLed; a new one subscribes with its id."""
    await async_poll_for(lambda: agents_idle(substrate), 30, what="idle agents")
    assert substrate.zk is not None
    process = spawn([*DEMO_FRAMEWORK, "--zk", substrate.zk, "--cluster", substrate.cluster,
                     "--tasks", "1", "--failover-timeout", "60"],
                    name="demo-framework", log_dir=tmp_path)
    try:
        await async_poll_for(lambda: "demo-0 TASK_RUNNING" in process.stdout_path.read_text(),
                             30, what="the demo framework's task to run")
    finally:
        process.kill()  # the framework dies: no teardown
    printed = process.stdout_path.read_text().split()
    framework_id = printed[printed.index("subscribed") + 1]

    async def disconnected() -> pb.ClusterState | None:
        state = await cluster_state(substrate)
        ours = [] if state is None else [f.connected for f in state.frameworks
                                         if f.info.framework_id == framework_id]
        return state if ours == [False] else None

    await async_poll_for(disconnected, 10, what="the master to see the framework gone")
    state = await disconnected()
    assert state is not None
    survivors = [t for t in state.tasks if t.framework_id == framework_id]
    assert [(t.task.task_id, t.state) for t in survivors] == [("demo-0", pb.TASK_RUNNING)]
    launched = {"demo-0": survivors[0].task}

    second = Recorder()
    info = framework_info("demo", failover_timeout=60, framework_id=framework_id)
    async with running(substrate, second, info, idle=False) as again:
        assert again.framework_id == framework_id
        await async_poll_for(lambda: second.subscribed == [framework_id], 5,
                             what="on_subscribed")
        await again.reconcile()
        await second.wait_state(["demo-0"], "TASK_RUNNING", timeout=10)
        assert second.updates["demo-0"][-1].source == pb.SOURCE_MASTER
        assert await serves(launched["demo-0"])
        explicit = second.states("demo-0")
        await again.reconcile([("demo-0", launched["demo-0"].agent_id),
                               ("never-launched", launched["demo-0"].agent_id)])
        await async_poll_for(lambda: len(second.states("demo-0")) > len(explicit)
                             and bool(second.states("never-launched")), 10,
                             what="explicit reconciliation answers")
        assert second.latest("demo-0") == "TASK_RUNNING"
        assert second.latest("never-launched") == "TASK_UNKNOWN"



async def test_start_without_a_master_fails_in_one_line(zk: str) -> None:
    driver = FrameworkDriver(Recorder(), framework_info("lonely"), zk=zk, cluster="nobody")
    started = time.monotonic()
    with pytest.raises(FrameworkError) as caught:
        await driver.start(timeout=1.5)
    assert time.monotonic() - started < 10
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no leading master of cluster 'nobody'" in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(FrameworkError):
        await driver.revive()  # a closed driver refuses calls
    await driver.close()  # idempotent


async def test_bad_launches_are_refused_in_one_line_and_the_offer_stays(
        substrate: LocalSubstrate) -> None:
    framework = Recorder()  # holds its offers
    async with running(substrate, framework, framework_info("clumsy")) as driver:
        await async_poll_for(lambda: bool(framework.offers), 20, what="an offer")
        offer = framework.offers[0][1]
        greedy = task("greedy", offer, ["sleep", "60"], cpus=0.1, mem=32)
        greedy.resources[0].scalar = 1000.0  # more cpus than the offer holds
        with pytest.raises(FrameworkError) as too_big:
            await driver.launch(offer, [greedy])
        assert too_big.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "\n" not in str(too_big.value)
        with pytest.raises(FrameworkError) as unknown:
            await driver.accept(["no-such-offer"], [])
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        # Nothing changed: the same offer still launches a task that fits.
        fine = task("fine", offer, ["sleep", "60"], cpus=0.1, mem=32)
        await driver.launch(offer, [fine])
        await framework.wait_state(["fine"], "TASK_RUNNING")
        assert "greedy" not in framework.updates


async def test_subscribing_with_a_removed_framework_id_fails_in_one_line(
        substrate: LocalSubstrate) -> None:
    """The master answers SUBSCRIBE with an ERROR: start() raises it, not a timeout."""
    assert substrate.zk is not None
    async with FrameworkDriver(Recorder(), framework_info("doomed"), zk=substrate.zk,
                               cluster=substrate.cluster) as first:
        framework_id = first.framework_id
        assert framework_id
        await first.teardown()
    again = FrameworkDriver(Recorder(), framework_info("doomed", framework_id=framework_id),
                            zk=substrate.zk, cluster=substrate.cluster)
    started = time.monotonic()
    with pytest.raises(FrameworkError) as caught:
        await again.start(timeout=20)
    assert time.monotonic() - started < 10  # the refusal itself, not start()'s deadline
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    message = str(caught.value)
    assert message.startswith(f"SUBSCRIBE refused: framework {framework_id} was removed")
    assert "\n" not in message
    with pytest.raises(FrameworkError):
        await again.revive()  # stopped for good
