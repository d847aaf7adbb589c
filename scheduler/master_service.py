"""The Master gRPC service: adapts framework calls, agent streams and operator reads to
the leading master's `MasterState`, through the daemon (`scheduler.master.Master`).

Only adaptation lives here: protobuf in, one state-machine event, actions handed to the
daemon to carry out, protobuf out. Invariants:
- a call is answered only by a deciding leader; otherwise UNAVAILABLE with the leader's
  address in the trailing metadata `registry.LEADER_METADATA_KEY` and in the message;
- a refused call (`state.CallError`) is answered with its gRPC code and one line, and
  changed nothing;
- a stream (Subscribe, Attach) lives as long as its `Conn` and the leadership term that
  opened it; when quiet for a heartbeat interval it carries a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from scheduler import master_messages as msgs
from scheduler import registry
from scheduler import state as st
from scheduler.coord import CoordError
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from scheduler.master import Master

log = logging.getLogger(__name__)

CODES = {"INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
         "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
         "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION}
LEADER_LOOKUP_TIMEOUT = 2.0
AGENT_QUEUE = 1_000_000


CLOSE = object()


class Conn:
    """One stream's outgoing queue (bounded); `close` ends the stream after what is queued."""

    def __init__(self, conn_id: int, limit: int) -> None:
        self.id, self.limit = conn_id, limit
        self._items: deque[object] = deque()
        self._ready = asyncio.Event()
        self.closed = False

    def send(self, item: object) -> bool:
        """Queue `item`; False when the queue is full (the caller drops the stream)."""
        if self.closed:
            return True
        if len(self._items) >= self.limit:
            return False
        self._items.append(item)
        self._ready.set()
        return True

    def close(self, last: object | None = None) -> None:
        if not self.closed and last is not None:
            self._items.append(last)
        self.closed = True
        self._items.append(CLOSE)
        self._ready.set()

    async def next(self, timeout: float) -> object | None:
        """The next item, `CLOSE` at the end, None when `timeout` passes with nothing."""
        if not self._items:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
            if not self._items:
                return None
        return self._items.popleft()


class MasterService(pb_grpc.MasterServicer):
    """The servicer; one per master process, for all its leadership terms."""

    def __init__(self, master: Master) -> None:
        self.master = master

    async def _leader(self, context: grpc.aio.ServicerContext[Any, Any]) -> st.MasterState:
        """The state to act on, or abort with UNAVAILABLE naming the leader."""
        state = self.master.deciding()
        if state is not None:
            return state
        if self.master.state is not None:
            leader = self.master.address
            why = "the leading master's ZooKeeper session is suspended; try again"
        else:
            try:
                found: str | None = await asyncio.wait_for(
                    registry.leading_master(self.master.coord, self.master.options.cluster),
                    LEADER_LOOKUP_TIMEOUT)
                leader = found or ""
            except (CoordError, TimeoutError):
                leader = ""
            why = f"not the leading master; the leader is {leader or 'unknown'}"
        await context.abort(grpc.StatusCode.UNAVAILABLE, why,
                            trailing_metadata=((registry.LEADER_METADATA_KEY, leader),))
        raise AssertionError("abort returns no value")

    async def _call(self, context: grpc.aio.ServicerContext[Any, Any],
                    decide: Callable[[st.MasterState], list[st.Action]],
                    *, wake: bool = False) -> pb.CallResponse:
        state = await self._leader(context)
        try:
            actions = decide(state)
        except st.CallError as exc:
            await context.abort(CODES[exc.code], str(exc))
        self.master.execute(state, actions)
        if wake:
            self.master.wake.set()
        return pb.CallResponse()

    async def _stream(self, state: st.MasterState, conn: Conn,
                      heartbeat: Callable[[], Any]) -> AsyncIterator[Any]:
        """Yield `conn`'s items until it closes, a heartbeat whenever it is quiet."""
        while state is self.master.state:
            item = await conn.next(self.master.options.heartbeat_interval)
            if item is CLOSE:
                return
            yield heartbeat() if item is None else item

    # -- gRPC: framework API -------------------------------------------------------

    async def Subscribe(self, request: pb.SubscribeRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.Event]:
        state = await self._leader(context)
        info = request.framework
        conn = self.master.new_conn(self.master.options.framework_queue)
        try:
            actions = state.subscribe(conn.id, info.framework_id, info.name, info.role,
                                      info.principal, info.failover_timeout,
                                      info.SerializeToString(), time.time())
        except st.CallError as exc:
            self.master.conns.pop(conn.id, None)
            yield msgs.error_event(str(exc))
            return
        self.master.execute(state, actions)
        self.master.wake.set()
        framework_id = next(a.event.framework_id for a in actions
                            if isinstance(a, st.ToFramework)
                            and isinstance(a.event, st.Subscribed))
        log.info("framework subscribed framework=%s name=%s conn=%d", framework_id, info.name,
                 conn.id)
        try:
            async for event in self._stream(state, conn, msgs.heartbeat_event):
                yield event
        finally:
            self.master.conns.pop(conn.id, None)
            if state is self.master.state:
                log.info("framework stream ended framework=%s conn=%d", framework_id, conn.id)
                self.master.execute(state, state.framework_disconnected(conn.id, time.time()))

    async def Accept(self, request: pb.AcceptRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.CallResponse:
        def decide(state: st.MasterState) -> list[st.Action]:
            first = state.offers.get(request.offer_ids[0]) if request.offer_ids else None
            ops = msgs.operations(request.operations, first.agent_id if first else "")
            actions = state.accept(request.framework_id, request.stream_id,
                                   list(request.offer_ids), ops, _refuse(request),
                                   time.time())
            launched = [a.message.task_id for a in actions if isinstance(a, st.ToAgent)
                        and isinstance(a.message, st.RunTask)]
            log.info("accepted framework=%s offers=%s tasks=%s", request.framework_id,
                     list(request.offer_ids), launched)
            return actions
        return await self._call(context, decide, wake=True)

    async def Decline(self, request: pb.DeclineRequest,
                      context: grpc.aio.ServicerContext[Any, Any]) -> pb.CallResponse:
        return await self._call(context, lambda s: s.decline(
            request.framework_id, request.stream_id, list(request.offer_ids),
            _refuse(request), time.time()), wake=True)

    async def Kill(self, request: pb.KillRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> pb.CallResponse:
        log.info("kill framework=%s task=%s", request.framework_id, request.task_id)
        return await self._call(context, lambda s: s.kill(
            request.framework_id, request.stream_id, request.task_id, request.agent_id,
            request.grace_period_seconds, time.time()))

    async def Acknowledge(self, request: pb.AcknowledgeRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.CallResponse:
        return await self._call(context, lambda s: s.acknowledge(
            request.framework_id, request.stream_id, request.agent_id, request.task_id,
            request.uuid))

    async def Reconcile(self, request: pb.ReconcileRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.CallResponse:
        return await self._call(context, lambda s: s.reconcile(
            request.framework_id, request.stream_id,
            [(t.task_id, t.agent_id) for t in request.tasks], time.time()))

    async def Revive(self, request: pb.FrameworkCall,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.CallResponse:
        return await self._call(context, lambda s: s.revive(
            request.framework_id, request.stream_id), wake=True)

    async def Suppress(self, request: pb.FrameworkCall,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.CallResponse:
        return await self._call(context, lambda s: s.suppress(
            request.framework_id, request.stream_id))

    async def Teardown(self, request: pb.FrameworkCall,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.CallResponse:
        log.info("teardown framework=%s", request.framework_id)
        return await self._call(context, lambda s: s.teardown(
            request.framework_id, request.stream_id, time.time()), wake=True)

    # -- gRPC: agent protocol ------------------------------------------------------

    async def Attach(self, request_iterator: AsyncIterator[pb.AgentMessage],
                     context: grpc.aio.ServicerContext[Any, Any]
                     ) -> AsyncIterator[pb.MasterMessage]:
        state = await self._leader(context)
        messages = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(anext(messages), self.master.options.agent_timeout)
        except (TimeoutError, StopAsyncIteration):
            return
        if first.WhichOneof("message") != "register":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message on Attach must be Register")
        info = first.register.info
        conn = self.master.new_conn(AGENT_QUEUE)
        try:
            actions = state.register_agent(
                conn.id, info.agent_id, info.hostname, info.address,
                msgs.resources(info.resources, "agent resources"),
                msgs.attributes(info.attributes),
                msgs.agent_task_reports(first.register.tasks), time.time())
        except st.CallError as exc:
            self.master.conns.pop(conn.id, None)
            await context.abort(CODES[exc.code], str(exc))
        self.master.execute(state, actions)
        self.master.wake.set()
        agent_id = state.agent_of(conn.id)
        log.info("agent registered agent=%s hostname=%s address=%s tasks=%d conn=%d",
                 agent_id, info.hostname, info.address, len(first.register.tasks), conn.id)
        reader = asyncio.create_task(self._read_agent(state, conn, agent_id, messages))
        try:
            async for message in self._stream(
                    state, conn, lambda: pb.MasterMessage(heartbeat=pb.MasterMessage.Heartbeat())):
                yield message
        finally:
            reader.cancel()
            self.master.conns.pop(conn.id, None)
            if state is self.master.state:
                log.info("agent stream ended agent=%s conn=%d", agent_id, conn.id)
                self.master.execute(state, state.agent_disconnected(conn.id, time.time()))

    async def _read_agent(self, state: st.MasterState, conn: Conn, agent_id: str,
                          messages: AsyncIterator[pb.AgentMessage]) -> None:
        try:
            async for message in messages:
                if state is not self.master.state or conn.closed:
                    break
                kind = message.WhichOneof("message")
                now = time.time()
                if kind == "heartbeat":
                    state.agent_heartbeat(agent_id, now)
                elif kind == "update" and self.master.deciding() is state:
                    status = msgs.status_from_pb(message.update.status)
                    log.debug("update agent=%s framework=%s task=%s state=%s", agent_id,
                              status.framework_id, status.task_id, status.state)
                    self.master.execute(state, state.agent_update(agent_id, status, now))
                    if status.state in st.TERMINAL_STATES:
                        self.master.wake.set()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.info("agent stream broke agent=%s error=%s", agent_id, exc)
        except Exception:
            log.exception("agent stream failed agent=%s", agent_id)
        conn.close()

    # -- gRPC: operator API ----------------------------------------------------------

    async def GetState(self, request: pb.GetStateRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.ClusterState:
        state = await self._leader(context)
        return msgs.cluster_state(state, self.master.address, self.master.options.cluster)


def _refuse(request: pb.AcceptRequest | pb.DeclineRequest) -> float | None:
    return request.filters.refuse_seconds if request.HasField("filters") else None
