"""Helpers for the master's integration tests: a master process, and a framework that
speaks raw gRPC (Subscribe stream, calls) and records every event it receives."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from scheduler.deadline import free_port
from scheduler.process import Process, spawn
from scheduler.resources import Resources
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from scheduler.wire import resources_to_pb

CLUSTER = "offers"


def start_master(zk: str, log_dir: Path, name: str, reregister: float) -> tuple[Process, str]:
    address = f"127.0.0.1:{free_port()}"
    process = spawn(
        [sys.executable, "-m", "scheduler.master", "--zk", zk, "--cluster", CLUSTER,
         "--listen", address, "--session-timeout", "2", "--agent-timeout", "2",
         "--agent-reregister-timeout", str(reregister), "--heartbeat-interval", "0.5",
         "--allocation-interval", "0.2", "--offer-timeout", "30"],
        name=name, log_dir=log_dir)
    return process, address


class Framework:
    """A framework on a raw Subscribe stream; events are collected in `events`."""

    def __init__(self, address: str, name: str = "test") -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.MasterStub(self.channel)
        self.name = name
        self.events: list[pb.Event] = []
        self.framework_id = ""
        self.stream_id = ""
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.auto_ack = True
        self.agents: Any = None  # what a test attaches (e.g. its simulated agents)

    async def subscribe(self, framework_id: str = "") -> None:
        self.events = []
        self._call = self.stub.Subscribe(pb.SubscribeRequest(framework=pb.FrameworkInfo(
            framework_id=framework_id, name=self.name, role="web", failover_timeout=30)))
        self._reader = asyncio.create_task(self._read(self._call))
        event = await self.next_event("subscribed")
        self.framework_id = event.subscribed.framework_id
        self.stream_id = event.subscribed.stream_id

    async def _read(self, call: AsyncIterator[pb.Event]) -> None:
        async for event in call:
            self.events.append(event)
            status = event.update.status
            if event.WhichOneof("event") == "update" and status.uuid and self.auto_ack:
                await self.stub.Acknowledge(pb.AcknowledgeRequest(
                    framework_id=self.framework_id, stream_id=self.stream_id,
                    agent_id=status.agent_id, task_id=status.task_id, uuid=status.uuid),
                    timeout=5)

    async def next_event(self, kind: str, timeout: float = 10.0, after: int = 0) -> pb.Event:
        async def found() -> pb.Event:
            while True:
                for event in self.events[after:]:
                    if event.WhichOneof("event") == kind:
                        return event
                await asyncio.sleep(0.02)
        return await asyncio.wait_for(found(), timeout)

    def updates(self, task_id: str) -> list[pb.TaskStatus]:
        return [e.update.status for e in self.events if e.WhichOneof("event") == "update"
                and e.update.status.task_id == task_id]

    async def wait_update(self, task_id: str, state: int, timeout: float = 10.0
                          ) -> pb.TaskStatus:
        async def found() -> pb.TaskStatus:
            while True:
                for status in self.updates(task_id):
                    if status.state == state:
                        return status
                await asyncio.sleep(0.02)
        return await asyncio.wait_for(found(), timeout)

    async def accept(self, offer_ids: list[str], *tasks: pb.TaskInfo,
                     refuse: float = 0.0) -> None:
        await self.stub.Accept(pb.AcceptRequest(
            framework_id=self.framework_id, stream_id=self.stream_id, offer_ids=offer_ids,
            operations=[pb.Operation(launch=pb.Operation.Launch(tasks=tasks))],
            filters=pb.Filters(refuse_seconds=refuse)), timeout=5)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()


def task(task_id: str, resources: str, agent_id: str = "") -> pb.TaskInfo:
    return pb.TaskInfo(task_id=task_id, name=task_id, agent_id=agent_id,
                       resources=resources_to_pb(Resources.parse(resources)),
                       command=pb.CommandInfo(argv=["true"]))


async def cluster_state(stub: Any) -> pb.ClusterState:
    state: pb.ClusterState = await stub.GetState(pb.GetStateRequest(), timeout=5)
    return state


async def rejected(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = caught.value.details() or ""
    assert "\n" not in details and details
    return details


