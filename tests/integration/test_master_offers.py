"""A real master process, simulated agents (the real agent protocol, no real tasks) and a
framework speaking raw gRPC: offers, launches, bad ACCEPTs, kills, reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from master_harness import CLUSTER, Framework, cluster_state, rejected, start_master, task

from scheduler.coord import Coordinator, read_tree
from scheduler.deadline import async_poll_for, poll_for
from scheduler.process import Process
from scheduler.registry import agents_path, frameworks_path, leading_master_sync
from scheduler.resources import Resources
from scheduler.simulated import SimulatedAgents
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from scheduler.wire import resources_from_pb

AGENT = Resources.parse("cpus:2;mem:1024;disk:1000;ports:[31000-31009]")


async def registry_versions(zk: str) -> dict[str, int]:
    """The znode version of every registry entry (agents and frameworks)."""
    coord = Coordinator(zk, name="test")
    await coord.start()
    try:
        out = {}
        for path in (agents_path(CLUSTER), frameworks_path(CLUSTER)):
            for name in await coord.children(path):
                found = await coord.get(f"{path}/{name}")
                if found is not None:
                    out[f"{path}/{name}"] = found[1].version
        return out
    finally:
        await coord.close()


@contextlib.asynccontextmanager
async def agent_and_framework(zk: str, master: str, prefix: str
                              ) -> AsyncIterator[Framework]:
    """One simulated agent (`framework.agents`) and a subscribed framework."""
    agents = SimulatedAgents(zk, CLUSTER, 1, AGENT, prefix=prefix)
    framework = Framework(master)
    try:
        await agents.start(timeout=30)
        await framework.subscribe()
        framework.agents = agents
        yield framework
    finally:
        await framework.close()
        await agents.close()


@dataclass
class Failover:
    """A standby beside the leader, a simulated agent, and a framework running t1 (launched
    on `offer`); `successor` is a framework client of the standby."""

    standby: str
    agents: SimulatedAgents
    framework: Framework
    successor: Framework
    offer: pb.Offer


@contextlib.asynccontextmanager
async def t1_and_a_standby(zk: str, master: str, tmp_path: Path, prefix: str
                           ) -> AsyncIterator[Failover]:
    standby, standby_address = start_master(zk, tmp_path, "standby", reregister=10)
    setup = Failover(standby_address, SimulatedAgents(zk, CLUSTER, 1, AGENT, prefix=prefix),
                     Framework(master), Framework(standby_address), pb.Offer())
    try:
        await setup.agents.start(timeout=30)
        await setup.framework.subscribe()
        setup.offer = (await setup.framework.next_event("offers")).offers.offers[0]
        await setup.framework.accept([setup.offer.offer_id], task("t1", "cpus:1;mem:128"))
        await setup.framework.wait_update("t1", pb.TASK_RUNNING)
        yield setup
    finally:
        await setup.successor.close()
        await setup.framework.close()
        await setup.agents.close()
        standby.terminate(grace=5)


@pytest.fixture
def leader(zk: str, tmp_path: Path) -> Iterator[tuple[Process, str]]:
    process, address = start_master(zk, tmp_path, "master", reregister=2)
    try:
        poll_for(lambda: leading_master_sync(zk, CLUSTER) == address, 30,
                 what="the master to lead")
        yield process, address
    finally:
        process.terminate(grace=5)


@pytest.fixture
def master(leader: tuple[Process, str]) -> str:
    return leader[1]


async def test_offers_launch_and_bad_accepts_change_nothing(zk: str, master: str) -> None:
    async with agent_and_framework(zk, master, "bad") as framework:
        offer = (await framework.next_event("offers")).offers.offers[0]
        assert resources_from_pb(offer.resources) == AGENT
        before = await cluster_state(framework.stub)
        f, s = framework.framework_id, framework.stream_id

        def launch(offer_ids: list[str], *tasks: pb.TaskInfo) -> Any:
            return framework.stub.Accept(pb.AcceptRequest(
                framework_id=f, stream_id=s, offer_ids=offer_ids,
                operations=[pb.Operation(launch=pb.Operation.Launch(tasks=tasks))]), timeout=5)

        too_big = await rejected(launch([offer.offer_id], task("big", "cpus:3;mem:10")),
                                 grpc.StatusCode.INVALID_ARGUMENT)
        assert "big" in too_big
        await rejected(launch([offer.offer_id], task("port", "cpus:1;ports:[40000-40000]")),
                       grpc.StatusCode.INVALID_ARGUMENT)
        await rejected(launch(["no-such-offer"], task("t", "cpus:1")), grpc.StatusCode.NOT_FOUND)
        await rejected(launch([offer.offer_id], task("t", "cpus:1", agent_id="no-such-agent")),
                       grpc.StatusCode.NOT_FOUND)
        # Two tasks whose sum exceeds the offer: refused as a whole, the first not launched.
        await rejected(launch([offer.offer_id], task("a", "cpus:1.5"), task("b", "cpus:1")),
                       grpc.StatusCode.INVALID_ARGUMENT)
        after = await cluster_state(framework.stub)
        assert after.agents == before.agents and not after.tasks

        # The offer is still good.
        mark = len(framework.events)
        await framework.accept([offer.offer_id], task("t1", "cpus:1;mem:256;ports:[31000-31000]"))
        running = await framework.wait_update("t1", pb.TASK_RUNNING)
        assert running.agent_id == offer.agent_id and running.uuid
        state = await cluster_state(framework.stub)
        assert [t.task.task_id for t in state.tasks] == ["t1"]
        assert state.tasks[0].state == pb.TASK_RUNNING
        assert state.tasks[0].hostname == "bad-0"
        used = resources_from_pb(state.agents[0].used)
        assert used == Resources.parse("cpus:1;mem:256;ports:[31000-31000]")
        assert state.frameworks[0].dominant_share == pytest.approx(0.5)

        # The rest comes back as a new offer; a reused task id is refused.
        second = (await framework.next_event("offers", after=mark)).offers.offers[0]
        assert resources_from_pb(second.resources) == AGENT - used
        await rejected(launch([second.offer_id], task("t1", "cpus:0.5")),
                       grpc.StatusCode.INVALID_ARGUMENT)
        await framework.accept([second.offer_id], task("t2", "cpus:0.5;mem:64"))
        await framework.wait_update("t2", pb.TASK_RUNNING)

        # KILL: known task -> KILLED; unknown task -> NOT_FOUND.
        mark = len(framework.events)
        await framework.stub.Kill(pb.KillRequest(framework_id=f, stream_id=s, task_id="t2"),
                                  timeout=5)
        await framework.wait_update("t2", pb.TASK_KILLED)
        await rejected(framework.stub.Kill(pb.KillRequest(
            framework_id=f, stream_id=s, task_id="nope"), timeout=5), grpc.StatusCode.NOT_FOUND)

        # The id of a task that ended is not reused: refused, nothing changed.
        third = (await framework.next_event("offers", after=mark)).offers.offers[0]
        before = await cluster_state(framework.stub)
        reused = await rejected(launch([third.offer_id], task("t2", "cpus:0.5")),
                                grpc.StatusCode.INVALID_ARGUMENT)
        assert "t2" in reused
        after = await cluster_state(framework.stub)
        assert after.agents == before.agents and after.tasks == before.tasks

        # RECONCILE: explicit (with an unknown id) and implicit.
        mark = len(framework.events)
        await framework.stub.Reconcile(pb.ReconcileRequest(
            framework_id=f, stream_id=s, tasks=[pb.ReconcileRequest.Task(task_id="t1"),
                                                pb.ReconcileRequest.Task(task_id="ghost")]),
            timeout=5)
        ghost = await framework.next_event("update", after=mark)
        await framework.wait_update("ghost", pb.TASK_UNKNOWN)
        assert ghost.update.status.reason == pb.REASON_RECONCILIATION
        mark = len(framework.events)
        await framework.stub.Reconcile(pb.ReconcileRequest(framework_id=f, stream_id=s),
                                       timeout=5)
        implicit = await framework.next_event("update", after=mark)
        assert implicit.update.status.task_id == "t1"
        assert implicit.update.status.state == pb.TASK_RUNNING

        # A stale stream id is refused.
        await rejected(framework.stub.Suppress(pb.FrameworkCall(
            framework_id=f, stream_id="stale"), timeout=5), grpc.StatusCode.FAILED_PRECONDITION)


async def test_decline_filters_suppress_and_revive(zk: str, master: str) -> None:
    async with agent_and_framework(zk, master, "dec") as framework:
        f, s = framework.framework_id, framework.stream_id
        offer = (await framework.next_event("offers")).offers.offers[0]
        versions = await registry_versions(zk)
        assert len(versions) == 2  # the agent and the framework
        loop = asyncio.get_running_loop()
        declined = loop.time()
        mark = len(framework.events)
        await framework.stub.Decline(pb.DeclineRequest(
            framework_id=f, stream_id=s, offer_ids=[offer.offer_id],
            filters=pb.Filters(refuse_seconds=1.5)), timeout=5)
        await framework.next_event("offers", after=mark, timeout=10)
        assert loop.time() - declined >= 1.4  # not before its refuse time

        await framework.stub.Suppress(pb.FrameworkCall(framework_id=f, stream_id=s), timeout=5)
        quiet = len(framework.events)
        latest = [e for e in framework.events if e.WhichOneof("event") == "offers"][-1]
        await framework.stub.Decline(pb.DeclineRequest(
            framework_id=f, stream_id=s, offer_ids=[latest.offers.offers[0].offer_id],
            filters=pb.Filters(refuse_seconds=0)), timeout=5)
        with pytest.raises(TimeoutError):
            await framework.next_event("offers", after=quiet, timeout=1.5)
        mark = len(framework.events)
        await framework.stub.Revive(pb.FrameworkCall(framework_id=f, stream_id=s), timeout=5)
        await framework.next_event("offers", after=mark, timeout=5)
        # Seconds of heartbeats, declines and offers wrote nothing to the registry.
        assert await registry_versions(zk) == versions


async def test_agent_gone_reports_unreachable_then_lost(zk: str, master: str) -> None:
    async with agent_and_framework(zk, master, "gone") as framework:
        offer = (await framework.next_event("offers")).offers.offers[0]
        await framework.accept([offer.offer_id], task("t1", "cpus:1"))
        await framework.wait_update("t1", pb.TASK_RUNNING)
        await framework.agents.close()
        unreachable = await framework.wait_update("t1", pb.TASK_UNREACHABLE)
        assert unreachable.source == pb.SOURCE_MASTER and not unreachable.uuid
        lost = await framework.wait_update("t1", pb.TASK_LOST)
        assert lost.reason == pb.REASON_AGENT_REMOVED
        failure = await framework.next_event("failure")
        assert failure.failure.agent_id == offer.agent_id
        state = await cluster_state(framework.stub)
        assert not state.agents


async def test_master_failover_keeps_agents_frameworks_and_tasks(
        zk: str, leader: tuple[Process, str], tmp_path: Path) -> None:
    process, master = leader
    async with t1_and_a_standby(zk, master, tmp_path, "fo") as setup:
        framework, successor, offer = setup.framework, setup.successor, setup.offer
        await framework.close()

        def registered() -> bool:  # the registry is written in the background
            entries = read_tree(zk, agents_path(CLUSTER))
            return b'"t1"' in entries.get(offer.agent_id, b"")
        poll_for(registered, 10, what="the registry to record t1")
        process.kill()
        await deciding(zk, setup.standby)
        await successor.subscribe(framework.framework_id)
        assert successor.framework_id == framework.framework_id

        async def running_again() -> bool:
            state = await cluster_state(successor.stub)
            return [(t.task.task_id, t.state) for t in state.tasks] == [
                ("t1", pb.TASK_RUNNING)] and all(a.connected for a in state.agents)
        await async_poll_for(running_again, 15, what="t1 reported by the new leader")
        state = await cluster_state(successor.stub)
        assert [a.info.agent_id for a in state.agents] == [offer.agent_id]
        mark = len(successor.events)
        await successor.stub.Reconcile(pb.ReconcileRequest(
            framework_id=successor.framework_id, stream_id=successor.stream_id), timeout=5)
        update = await successor.next_event("update", after=mark)
        assert (update.update.status.task_id, update.update.status.state) == (
            "t1", pb.TASK_RUNNING)


async def test_framework_failover_then_teardown(zk: str, master: str) -> None:
    async with agent_and_framework(zk, master, "ff") as first:
        offer = (await first.next_event("offers")).offers.offers[0]
        await first.accept([offer.offer_id], task("t1", "cpus:1"))
        await first.wait_update("t1", pb.TASK_RUNNING)
        second = Framework(master)
        try:
            await second.subscribe(first.framework_id)
            assert second.framework_id == first.framework_id
            error = await first.next_event("error")
            assert "failed over" in error.error.message
            await second.stub.Reconcile(pb.ReconcileRequest(
                framework_id=second.framework_id, stream_id=second.stream_id), timeout=5)
            reconciled = await second.wait_update("t1", pb.TASK_RUNNING)
            assert reconciled.reason == pb.REASON_RECONCILIATION
            assert len(await registry_versions(zk)) == 2

            await second.stub.Teardown(pb.FrameworkCall(
                framework_id=second.framework_id, stream_id=second.stream_id), timeout=5)
            await second.next_event("error")
            state = await cluster_state(second.stub)
            assert not state.frameworks

            async def freed() -> bool:  # once the agent reports its task killed
                return all(not a.used for a in (await cluster_state(second.stub)).agents)
            await async_poll_for(freed, 10, what="the agent's resources freed")
            # The agent's KILLED update is acknowledged by the master for the departed
            # framework, and the registry keeps a tombstone of the framework.
            poll_for(lambda: _removed(zk, frameworks_path(CLUSTER), second.framework_id), 10,
                     what="the framework's tombstone")
            # A removed framework cannot come back under its id.
            call = second.stub.Subscribe(pb.SubscribeRequest(framework=pb.FrameworkInfo(
                framework_id=second.framework_id, name="again")), timeout=5)
            refused: Any = await call.read()
            assert "removed" in refused.error.message
            call.cancel()
        finally:
            await second.close()


async def deciding(zk: str, address: str) -> None:
    """Wait until the master at `address` leads and decides (it wins the election before
    it has read the registry, and answers UNAVAILABLE until then)."""
    poll_for(lambda: leading_master_sync(zk, CLUSTER) == address, 15,
             what=f"{address} to lead")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MasterStub(channel)

        async def answers() -> bool:
            try:
                await stub.GetState(pb.GetStateRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return True
        await async_poll_for(answers, 15, what=f"{address} to decide")


def _removed(zk: str, path: str, name: str) -> bool:
    """Whether the registry entry `path`/`name` is a tombstone."""
    return b'"removed": true' in read_tree(zk, path).get(name, b"")


def _restarted(agents: SimulatedAgents) -> SimulatedAgents:
    """The same simulated agents (ids, running tasks, pending updates) on a new stream."""
    again = SimulatedAgents(agents.zk, agents.cluster, 0, AGENT)
    again.agents = agents.agents
    for agent in again.agents:
        agent.registered.clear()
    return again


async def test_a_kill_while_the_agent_is_away_reaches_it_when_it_returns(
        zk: str, tmp_path: Path) -> None:
    process, master = start_master(zk, tmp_path, "patient", reregister=20)
    agents = SimulatedAgents(zk, CLUSTER, 1, AGENT, prefix="away")
    framework = Framework(master)
    try:
        poll_for(lambda: leading_master_sync(zk, CLUSTER) == master, 30,
                 what="the master to lead")
        await agents.start(timeout=30)
        await framework.subscribe()
        offer = (await framework.next_event("offers")).offers.offers[0]
        await framework.accept([offer.offer_id], task("t1", "cpus:1"))
        await framework.wait_update("t1", pb.TASK_RUNNING)
        await agents.close()
        await framework.wait_update("t1", pb.TASK_UNREACHABLE)
        await framework.stub.Kill(pb.KillRequest(
            framework_id=framework.framework_id, stream_id=framework.stream_id,
            task_id="t1"), timeout=5)  # no stream to the agent: kept for its return
        assert "t1" in agents.agents[0]._running
        agents = _restarted(agents)
        await agents.start(timeout=30)
        killed = await framework.wait_update("t1", pb.TASK_KILLED, timeout=15)
        assert killed.source == pb.SOURCE_AGENT and killed.agent_id == offer.agent_id
        assert "t1" not in agents.agents[0]._running
    finally:
        await framework.close()
        await agents.close()
        process.terminate(grace=5)


async def test_a_removed_agent_stays_removed_across_a_master_failover(
        zk: str, leader: tuple[Process, str], tmp_path: Path) -> None:
    process, master = leader  # its agents have 2 s to come back
    async with t1_and_a_standby(zk, master, tmp_path, "rm") as setup:
        framework, successor, offer = setup.framework, setup.successor, setup.offer
        await setup.agents.close()  # away past the re-register timeout: removed, t1 LOST
        lost = await framework.wait_update("t1", pb.TASK_LOST, timeout=15)
        assert lost.reason == pb.REASON_AGENT_REMOVED
        poll_for(lambda: _removed(zk, agents_path(CLUSTER), offer.agent_id), 10,
                 what="the agent's tombstone")
        await framework.close()
        process.kill()
        await deciding(zk, setup.standby)
        await successor.subscribe(framework.framework_id)

        # The agent comes back to the new leader with its old id and t1 still running.
        agent = setup.agents.agents[0]
        assert agent.agent_id == offer.agent_id and "t1" in agent._running
        setup.agents = _restarted(setup.agents)
        await setup.agents.start(timeout=30)
        assert agent.agent_id != offer.agent_id  # a new id
        await async_poll_for(lambda: "t1" not in agent._running, 10,
                             what="the agent told to kill t1")

        async def settled() -> bool:
            state = await cluster_state(successor.stub)
            return (not state.tasks and [a.info.agent_id for a in state.agents]
                    == [agent.agent_id] and not state.agents[0].used)
        await async_poll_for(settled, 10, what="t1 killed and its resources free")
        assert not [s for s in successor.updates("t1") if s.state == pb.TASK_RUNNING]
