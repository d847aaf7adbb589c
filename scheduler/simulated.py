"""Simulated agents for scale measurements: many agents in one process, none of which
starts a real task.

Each simulated agent speaks the real agent protocol (Master.Attach) to the leading
master: it registers with its resources, heartbeats, answers RunTask at once with a
TASK_RUNNING update and KillTask with TASK_KILLED. Updates carry a uuid and are resent
until acknowledged, strictly in order per task, like the real agent's. An update's
timestamp is the moment of the state change, so a framework on the same machine can
measure state change → UPDATE latency from it.

Not for production: no sandbox, no checkpoint, nothing survives the process.

    python -m scheduler.simulated --zk ZK --cluster NAME --count 200 \
        --resources "cpus:8;mem:16384;disk:100000;ports:[31000-31999]"

prints `ready N` on stdout once all N agents are registered and runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

import click
import grpc

from scheduler.coord import Coordinator
from scheduler.registry import leading_master
from scheduler.resources import Resources
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from scheduler.wire import attributes_to_pb, resources_to_pb

log = logging.getLogger(__name__)

HEARTBEAT = 1.0
RETRY = 1.0
MAX_MESSAGE = 4 * 1024 * 1024


class SimulatedAgent:
    """One agent: a registration, a heartbeat, and an in-order update queue per task."""

    def __init__(self, name: str, resources: Resources, attributes: dict[str, str]) -> None:
        self.name = name
        self.info = pb.AgentInfo(
            hostname=name,
            resources=resources_to_pb(resources),
            attributes=attributes_to_pb(attributes),
        )
        self.agent_id = ""
        self.registered = asyncio.Event()
        # task id -> updates not yet acknowledged, oldest first; only the head is sent.
        self._pending: dict[str, deque[pb.TaskStatus]] = {}
        self._frameworks: dict[str, pb.FrameworkInfo] = {}  # task id -> its framework
        self._running: dict[str, pb.TaskInfo] = {}  # task id -> task, while running
        self._outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()

    async def run(self, stub: pb_grpc.MasterAsyncStub) -> None:
        """One Attach stream; returns (or raises) when it ends."""
        self._outbox = asyncio.Queue()
        call = stub.Attach(self._outgoing())
        async for message in call:
            self._handle(message)

    async def _outgoing(self) -> AsyncIterator[pb.AgentMessage]:
        info = pb.AgentInfo()
        info.CopyFrom(self.info)
        info.agent_id = self.agent_id
        tasks = [
            pb.AgentTask(framework=self._frameworks[t], task=task, state=pb.TASK_RUNNING)
            for t, task in sorted(self._running.items())
        ]
        yield pb.AgentMessage(register=pb.AgentMessage.Register(info=info, tasks=tasks))
        last_resend = time.monotonic()
        while True:
            try:
                message = await asyncio.wait_for(self._outbox.get(), HEARTBEAT)
            except TimeoutError:
                message = pb.AgentMessage(heartbeat=pb.AgentMessage.Heartbeat())
            yield message
            if time.monotonic() - last_resend >= RETRY:
                last_resend = time.monotonic()
                # A snapshot: acknowledgements change the queues while this waits at yield.
                heads = [queue[0] for queue in self._pending.values() if queue]
                for status in heads:
                    yield pb.AgentMessage(update=pb.AgentMessage.Update(status=status))

    def _handle(self, message: pb.MasterMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "registered":
            self.agent_id = message.registered.agent_id
            self.registered.set()
        elif kind == "run_task":
            task = message.run_task.task
            self._frameworks[task.task_id] = message.run_task.framework
            self._running[task.task_id] = task
            self._report(task.task_id, pb.TASK_RUNNING)
        elif kind == "kill_task":
            if self._running.pop(message.kill_task.task_id, None) is not None:
                self._report(message.kill_task.task_id, pb.TASK_KILLED)
        elif kind == "shutdown_framework":
            framework = message.shutdown_framework.framework_id
            for task_id in sorted(self._running):
                if self._frameworks[task_id].framework_id == framework:
                    del self._running[task_id]
                    self._report(task_id, pb.TASK_KILLED)
        elif kind == "acknowledge":
            queue = self._pending.get(message.acknowledge.task_id)
            if queue and queue[0].uuid == message.acknowledge.uuid:
                queue.popleft()
                if queue:
                    self._send(queue[0])
                else:
                    del self._pending[message.acknowledge.task_id]

    def _report(self, task_id: str, state: pb.TaskState.ValueType) -> None:
        status = pb.TaskStatus(
            task_id=task_id,
            framework_id=self._frameworks[task_id].framework_id,
            agent_id=self.agent_id,
            state=state,
            source=pb.SOURCE_AGENT,
            uuid=uuid.uuid4().bytes,
            timestamp=time.time(),
        )
        queue = self._pending.setdefault(task_id, deque())
        queue.append(status)
        if len(queue) == 1:
            self._send(status)

    def _send(self, status: pb.TaskStatus) -> None:
        self._outbox.put_nowait(pb.AgentMessage(update=pb.AgentMessage.Update(status=status)))


class SimulatedAgents:
    """`count` simulated agents sharing one channel to the leading master; each
    re-attaches (with its id and running tasks) whenever its stream ends."""

    def __init__(self, zk: str, cluster: str, count: int, resources: Resources,
                 *, prefix: str = "sim", zones: tuple[str, ...] = ("a", "b", "c")) -> None:
        self.zk = zk
        self.cluster = cluster
        self.agents = [
            SimulatedAgent(f"{prefix}-{i}", resources, {"zone": zones[i % len(zones)]})
            for i in range(count)
        ]
        self._coord = Coordinator(zk, session_timeout=10.0, name="simulated")
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._address = ""

    async def start(self, timeout: float = 120.0) -> None:
        await self._coord.start()
        self._tasks = [asyncio.create_task(self._keep(agent)) for agent in self.agents]
        await asyncio.wait_for(
            asyncio.gather(*(agent.registered.wait() for agent in self.agents)), timeout
        )

    async def _stub(self) -> pb_grpc.MasterAsyncStub:
        address = await leading_master(self._coord, self.cluster)
        if not address:
            raise ConnectionError("no leading master")
        if address != self._address or self._channel is None:
            if self._channel is not None:
                await self._channel.close()
            self._channel = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ])
            self._address = address
        return pb_grpc.MasterStub(self._channel)

    async def _keep(self, agent: SimulatedAgent) -> None:
        while True:
            try:
                await agent.run(await self._stub())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken stream or no leader: look again shortly
                log.warning("agent=%s stream ended: %r", agent.name, exc)
            await asyncio.sleep(0.5)  # backoff before re-attaching, not synchronization

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        await self._coord.close()


async def _serve(zk: str, cluster: str, count: int, resources: Resources, prefix: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agents = SimulatedAgents(zk, cluster, count, resources, prefix=prefix)
    try:
        await agents.start()
        print(f"ready {count}", flush=True)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await agents.close()


@click.command()
@click.option("--zk", envvar="RINGSTORE_ZK", required=True)
@click.option("--cluster", envvar="RINGSTORE_CLUSTER", default="default", show_default=True)
@click.option("--count", type=click.IntRange(1, 5000), required=True)
@click.option("--resources", "resources_text",
              default="cpus:8;mem:16384;disk:100000;ports:[31000-31999]", show_default=True)
@click.option("--prefix", default="sim", show_default=True, help="Hostname prefix.")
def main(zk: str, cluster: str, count: int, resources_text: str, prefix: str) -> None:
    """Run COUNT simulated agents until SIGTERM."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(zk, cluster, count, Resources.parse(resources_text), prefix))


if __name__ == "__main__":
    main()
