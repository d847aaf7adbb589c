"""The master daemon: the thin shell around `scheduler.state.MasterState`.

Every master serves gRPC (Master, grpc.health.v1 — "scheduler.v1.Master" SERVING only on
the deciding leader — and reflection) and contends in the ZooKeeper election
(`registry.master_election`, data: its advertised address). Only the leader decides; a
standby answers every call with UNAVAILABLE, the leader's address in the trailing
metadata key `registry.LEADER_METADATA_KEY` and in the message. The gRPC adaptation is
`scheduler.master_service`, the protobuf conversions `scheduler.master_messages`; this
module owns the process: election, leadership term, timers, registry writes, and carrying
out the state machine's actions.

Invariants:
- all state lives in one `MasterState`, touched only from the event loop; each call,
  message, stream end and timer tick feeds it one event and carries out the actions it
  returns, in order;
- leadership is gated on the ZooKeeper session: while SUSPENDED the master answers
  UNAVAILABLE and makes no decision; on LOST (or SUSPENDED longer than the session
  timeout) it steps down, ends every stream and campaigns again with a fresh state that
  it rebuilds from the registry;
- the registry (agents, frameworks) is written only by the leader, in the background,
  latest value per entry, in the order decided, so ZooKeeper writes follow task launches
  and terminations, never heartbeats; a clean stop (SIGTERM) writes what is queued, within
  `REGISTRY_FLUSH`, before resigning;
- events to a framework go through a bounded queue; a framework that does not keep up
  loses its stream (it re-subscribes and reconciles) rather than the master's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scheduler import master_messages as msgs
from scheduler import registry
from scheduler import state as st
from scheduler.coord import CoordError, Coordinator, NoNode
from scheduler.master_service import Conn, MasterService
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = "scheduler.v1.Master"
REGISTRY_RETRY = 0.5
# How long a clean stop waits for the registry writes of its term before resigning.
REGISTRY_FLUSH = 3.0


@dataclass(frozen=True)
class MasterOptions:
    zk: str
    cluster: str = "default"
    listen: str = "127.0.0.1:5050"
    advertise: str = ""
    agent_timeout: float = 5.0
    agent_reregister_timeout: float = 30.0
    allocation_interval: float = 1.0
    offer_timeout: float = 30.0
    heartbeat_interval: float = 1.0
    session_timeout: float = 3.0
    framework_queue: int = 10_000


class MasterError(Exception):
    """The master cannot start (its address is taken, ZooKeeper is unreachable)."""


class Status(enum.Enum):
    INIT = "init"
    STANDBY = "standby"
    LEADING = "leading"
    PAUSED = "paused"
    CLOSED = "closed"


class Master:
    """A master process; see the module docstring."""

    def __init__(self, options: MasterOptions) -> None:
        self.options = options
        self.coord = Coordinator(options.zk, session_timeout=options.session_timeout,
                                 name=f"master-{os.getpid()}")
        self.address = options.advertise
        self.status = Status.INIT
        self.state: st.MasterState | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self.conns: dict[int, Conn] = {}
        self._next_conn = 0
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self.wake = asyncio.Event()
        self._paused_since: float | None = None
        # Registry writes not yet made, latest value per path, in the order of their
        # latest change (a write moves its path to the end).
        self._registry: dict[str, dict[str, Any] | None] = {}
        self._registry_ready = asyncio.Event()
        self._registry_drained = asyncio.Event()
        self._registry_drained.set()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_MasterServicer_to_server(MasterService(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE, reflection.SERVICE_NAME, health.SERVICE_NAME], server)
        try:
            port = server.add_insecure_port(self.options.listen)
        except RuntimeError as exc:
            raise MasterError(f"cannot listen on {self.options.listen}: {exc}") from exc
        host = self.options.listen.rsplit(":", 1)[0]
        self.address = self.options.advertise or (
            f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}")
        await server.start()
        self._server = server
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.coord.start()
        self.coord.on_state(self._on_zk_state)
        self.status = Status.STANDBY
        log.info("master serving address=%s cluster=%s", self.address, self.options.cluster)

    async def run(self) -> None:
        """Campaign, lead until leadership ends, campaign again; until `stop()`."""
        try:
            while not self._stop.is_set():
                election = registry.master_election(self.coord, self.options.cluster,
                                                    self.address)
                try:
                    if not await election.campaign(self._stop):
                        break
                except CoordError as exc:
                    log.warning("campaign interrupted: %s", exc)
                    await asyncio.sleep(REGISTRY_RETRY)
                    continue
                try:
                    await self._lead()
                except CoordError as exc:
                    log.warning("leadership interrupted: %s", exc)
                finally:
                    await self._step_down()
                if self._stop.is_set():
                    with contextlib.suppress(CoordError):
                        await election.resign()
        finally:
            await self.close()

    def stop(self) -> None:
        """Ask `run()` to step down and return (from a signal handler, say)."""
        self._stop.set()
        self._lost.set()

    async def __aenter__(self) -> Master:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace: float = 1.0) -> None:
        """Stop serving and leave ZooKeeper (a standby takes over at once). Idempotent."""
        if self.status is Status.CLOSED:
            return
        self.status = Status.CLOSED
        self._end_streams()
        if self._server is not None:
            await self._server.stop(grace)
        await self.coord.close()

    def _on_zk_state(self, zk_state: str) -> None:
        if zk_state == "CONNECTED":
            self._paused_since = None
            # After LOST, CONNECTED is a new session that holds no election node: the
            # term is over even before `_lead` wakes up to step down.
            if self.status is Status.PAUSED and not self._lost.is_set():
                self.status = Status.LEADING
                log.info("zookeeper session back: deciding again address=%s", self.address)
        elif zk_state == "SUSPENDED":
            self._paused_since = time.monotonic()
            if self.status is Status.LEADING:
                self.status = Status.PAUSED
                log.warning("zookeeper session suspended: no decisions address=%s",
                            self.address)
        else:
            self._lost.set()
            if self.status is Status.LEADING:
                self.status = Status.PAUSED

    # -- leadership ------------------------------------------------------------

    async def _lead(self) -> None:
        self._lost.clear()
        agents = await self._read_registry(registry.agents_path(self.options.cluster))
        frameworks = await self._read_registry(registry.frameworks_path(self.options.cluster))
        config = st.StateConfig(agent_timeout=self.options.agent_timeout,
                                agent_reregister_timeout=self.options.agent_reregister_timeout,
                                offer_timeout=self.options.offer_timeout,
                                id_prefix=uuid.uuid4().hex[:12])
        state = st.MasterState(config)
        actions = state.recover(agents, frameworks, time.time())
        self.state = state
        self._tasks = [asyncio.create_task(loop(), name=loop.__name__) for loop in
                       (self._tick_loop, self._allocate_loop, self._registry_loop)]
        self.execute(state, actions)
        # The session may have been lost while the registry was read.
        self.status = (Status.LEADING if self.coord.connected and not self._lost.is_set()
                       else Status.PAUSED)
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("master leading address=%s agents=%d frameworks=%d", self.address,
                 len(agents), len(frameworks))
        await self._lost.wait()

    async def _step_down(self) -> None:
        was_leading = self.state is not None
        self.state = None
        if self._stop.is_set() and self._registry and self.coord.connected:
            # A clean stop still holds the election: let the writes of this term land
            # (removals above all), or the next leader would report them LOST again.
            log.info("writing the registry before stepping down entries=%d",
                     len(self._registry))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._registry_drained.wait(), REGISTRY_FLUSH)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._registry:
            log.warning("registry writes dropped at step-down entries=%d", len(self._registry))
        self._registry.clear()
        self._registry_drained.set()
        self._end_streams()
        if self.status is not Status.CLOSED:
            self.status = Status.STANDBY
            await self._health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if was_leading:
            log.warning("master stepped down address=%s", self.address)

    def _end_streams(self) -> None:
        for conn in list(self.conns.values()):
            conn.close()

    async def _read_registry(self, path: str) -> dict[str, dict[str, Any]]:
        """Every entry under `path`, read together: a new leader waits on this."""
        names = await self.coord.children(path)
        found = await asyncio.gather(*(self.coord.get_json(f"{path}/{n}") for n in names))
        return {n: f[0] for n, f in zip(names, found, strict=True) if f is not None}

    def deciding(self) -> st.MasterState | None:
        return self.state if self.status is Status.LEADING else None

    async def _tick_loop(self) -> None:
        interval = min(0.25, self.options.heartbeat_interval / 4, self.options.agent_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            if (self._paused_since is not None and time.monotonic() - self._paused_since
                    > self.options.session_timeout):
                log.warning("zookeeper session suspended too long: stepping down")
                self._lost.set()
                return
            state = self.deciding()
            if state is not None:
                self.execute(state, state.tick(time.time()))

    async def _allocate_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.options.allocation_interval)
            self.wake.clear()
            state = self.deciding()
            if state is not None:
                started = time.perf_counter()
                actions = state.allocate(time.time())
                self.execute(state, actions)
                log.debug("allocation cycle offers=%d seconds=%.4f", len(actions),
                          time.perf_counter() - started)
            await asyncio.sleep(0.05)  # at most ~20 cycles a second however often woken

    async def _registry_loop(self) -> None:
        """Write the queued entries oldest first. A failed write stays first, so an agent's
        entry listing a framework's tasks never lands after that framework's removal."""
        while True:
            await self._registry_ready.wait()
            self._registry_ready.clear()
            while self._registry:
                if not self.coord.connected:
                    await asyncio.sleep(REGISTRY_RETRY)
                    continue
                path, data = next(iter(self._registry.items()))
                try:
                    await self._write(path, data)
                except CoordError as exc:
                    log.warning("registry write failed path=%s error=%s", path, exc)
                    await asyncio.sleep(REGISTRY_RETRY)
                    continue
                if path in self._registry and self._registry[path] is data:
                    del self._registry[path]  # not changed again while it was written
            self._registry_drained.set()

    async def _write(self, path: str, data: dict[str, Any] | None) -> None:
        if data is None:
            await self.coord.delete(path)
            return
        try:
            await self.coord.set_json(path, data)
        except NoNode:
            await self.coord.create_json(path, data, makepath=True)

    # -- actions ---------------------------------------------------------------

    def execute(self, state: st.MasterState, actions: list[st.Action]) -> None:
        if state is not self.state:
            return
        later: list[st.Action] = []
        for action in actions:
            if isinstance(action, st.ToAgent):
                agent = state.agents.get(action.agent_id)
                conn = self.conns.get(agent.conn) if agent and agent.conn is not None else None
                if conn is not None and not conn.send(
                        msgs.agent_message(action.message, self.options.heartbeat_interval)):
                    log.warning("agent stream full: dropping it agent=%s", action.agent_id)
                    conn.close()
            elif isinstance(action, st.ToFramework):
                _log_event(action)
                framework = state.frameworks.get(action.framework_id)
                if framework is None or framework.conn is None:
                    continue
                conn = self.conns.get(framework.conn)
                event = msgs.framework_event(action.event, self.options.heartbeat_interval,
                                             self.address)
                if conn is not None and not conn.send(event):
                    log.warning("framework too slow: ending its stream framework=%s queued=%d",
                                action.framework_id, conn.limit)
                    conn.close()
                    later += state.framework_disconnected(conn.id, time.time())
            elif isinstance(action, st.CloseAgentConn):
                if (conn := self.conns.get(action.conn)) is not None:
                    conn.close()
            elif isinstance(action, st.CloseFrameworkConn):
                if (conn := self.conns.get(action.conn)) is not None:
                    conn.close(msgs.error_event(action.message))
            elif isinstance(action, st.WriteAgent):
                self._queue_write(registry.agent_path(self.options.cluster, action.agent_id),
                                  action.data)
            else:
                self._queue_write(registry.framework_path(
                    self.options.cluster, action.framework_id), action.data)
        if later:
            self.execute(state, later)

    def _queue_write(self, path: str, data: dict[str, Any] | None) -> None:
        self._registry.pop(path, None)  # to the end: writes land in the order decided
        self._registry[path] = data
        self._registry_drained.clear()
        self._registry_ready.set()

    def new_conn(self, limit: int) -> Conn:
        self._next_conn += 1
        conn = Conn(self._next_conn, limit)
        self.conns[conn.id] = conn
        return conn

def _log_event(action: st.ToFramework) -> None:
    """Log the master's own verdicts on tasks and agents (the rest is the agents' news)."""
    event = action.event
    if isinstance(event, st.Update) and event.status.source == "SOURCE_MASTER" and \
            event.status.reason != "REASON_RECONCILIATION":
        status = event.status
        log.info("task %s framework=%s task=%s agent=%s reason=%s", status.state,
                 status.framework_id, status.task_id, status.agent_id, status.reason)
    elif isinstance(event, st.Failure):
        log.warning("agent removed agent=%s framework=%s", event.agent_id, action.framework_id)


async def run_master(options: MasterOptions) -> None:
    """Run a master until SIGTERM or SIGINT."""
    master = Master(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.stop)
    try:
        await master.start()
    except BaseException:
        await master.close(grace=0)
        raise
    await master.run()


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _seconds(default: float, what: str, help: str) -> Callable[[Any], Any]:
    return click.option(f"--{what}", type=click.FloatRange(min=0.05), default=default,
                        show_default=True, help=help)


@click.command("master")
@click.option("--zk", envvar="RINGSTORE_ZK", required=True,
              help="ZooKeeper connect string host:port[,...][/chroot].")
@click.option("--cluster", envvar="RINGSTORE_CLUSTER", default="default", show_default=True)
@click.option("--listen", envvar="RINGSTORE_LISTEN", default="127.0.0.1:5050",
              show_default=True, help="HOST:PORT for gRPC (port 0: any free port).")
@click.option("--advertise", envvar="RINGSTORE_ADVERTISE", default="",
              help="HOST:PORT others reach this master at (default: the listen address).")
@_seconds(5.0, "agent-timeout", "Seconds of silence after which an agent is unreachable.")
@_seconds(30.0, "agent-reregister-timeout",
          "Seconds an unreachable agent has to come back before its tasks are LOST.")
@_seconds(1.0, "allocation-interval", "Seconds between offer cycles.")
@_seconds(30.0, "offer-timeout", "Seconds before an unanswered offer is rescinded.")
@_seconds(1.0, "heartbeat-interval",
          "Seconds between heartbeats to agents and frameworks.")
@click.option("--session-timeout", type=click.FloatRange(1.0, 60.0), default=3.0,
              show_default=True, help="ZooKeeper session timeout in seconds.")
@click.option("-v", "--verbose", count=True, help="-v info (the default), -vv debug.")
def command(zk: str, cluster: str, listen: str, advertise: str, agent_timeout: float,
            agent_reregister_timeout: float, allocation_interval: float,
            offer_timeout: float, heartbeat_interval: float, session_timeout: float,
            verbose: int) -> None:
    """Run a scheduler master (leader-elected) until SIGTERM."""
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO,
                        format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    options = MasterOptions(
        zk=zk, cluster=cluster, listen=listen, advertise=advertise,
        agent_timeout=agent_timeout, agent_reregister_timeout=agent_reregister_timeout,
        allocation_interval=allocation_interval, offer_timeout=offer_timeout,
        heartbeat_interval=heartbeat_interval, session_timeout=session_timeout)
    try:
        asyncio.run(run_master(options))
    except (CoordError, MasterError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    command()
