"""The framework SDK: subscribe to the leading master, receive events, make calls.

A framework subclasses `Framework` and overrides the callbacks it cares about; a
`FrameworkDriver` runs it. The driver:

- finds the leading master through ZooKeeper (scheduler.registry), or through the
  leader a standby names in the "ringstore-leader" trailer when it refuses a call;
- subscribes, and keeps the subscription alive by itself: when the event stream ends or
  breaks, or 3 heartbeat intervals pass without any event, it finds the (new) leader and
  subscribes again with the same framework id; callbacks continue on the new stream;
- delivers events to the callbacks one at a time, in the order the master sent them, from
  one task of its own (so a callback may make calls, even during a failover), and
  acknowledges an UPDATE that carries a uuid after `on_update` returns; an update whose
  uuid it has already acknowledged is acknowledged again but not delivered again, so the
  framework sees each state change of a task once (scheduler.framework_events);
- makes every call with a deadline (`call_timeout`). A call made while no subscription is
  live waits for one (within that deadline); a call that fails because the master went
  away is retried against the new leader when that is safe (everything but ACCEPT, whose
  offers die with the master that made them; scheduler.framework_errors decides);
- stops for good on an ERROR event (another driver failed over this framework, or the
  master removed it), also one that answers SUBSCRIBE instead of SUBSCRIBED (a removed
  framework id): `on_error` is called (or, during `start()`, `start()` raises it as a
  FrameworkError with the master's one line) and later calls fail with
  FAILED_PRECONDITION.

`close()` ends the subscription without tearing the framework down: the master keeps its
tasks for its failover timeout, and a new driver with the same framework id takes over.
TaskInfos for a LAUNCH are built from offers with scheduler.taskinfo (`task`, `fits`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from scheduler.coord import CoordError, Coordinator
from scheduler.deadline import async_poll_for
from scheduler.framework_errors import (
    FATAL_SUBSCRIBE_CODES,
    FrameworkError,
    call_failure,
    leader_hint,
    one_line,
)
from scheduler.framework_events import EventDelivery
from scheduler.registry import leading_master
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from scheduler.v1.scheduler_pb2_grpc import MasterAsyncStub

__all__ = ["Framework", "FrameworkDriver", "FrameworkError"]

log = logging.getLogger(__name__)


MISSED_HEARTBEATS = 3
SUBSCRIBE_TIMEOUT = 3.0  # seconds for a master to answer SUBSCRIBE with SUBSCRIBED
# A master restarted at the same address must be reachable again within a second, not
# after gRPC's default reconnect backoff (up to two minutes).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Framework:
    """Callbacks a framework overrides; the defaults do nothing. Called one at a time."""

    async def on_subscribed(self, driver: FrameworkDriver, framework_id: str) -> None:
        """Called after every (re-)subscription, also after a master failover."""

    async def on_offers(self, driver: FrameworkDriver, offers: list[pb.Offer]) -> None:
        pass

    async def on_rescind(self, driver: FrameworkDriver, offer_id: str) -> None:
        pass

    async def on_update(self, driver: FrameworkDriver, status: pb.TaskStatus) -> None:
        """A task's state changed (or a reconciliation answer). Acknowledged on return."""

    async def on_failure(self, driver: FrameworkDriver, agent_id: str) -> None:
        pass

    async def on_error(self, driver: FrameworkDriver, message: str) -> None:
        """The master ended this subscription for good; the driver has stopped."""


class FrameworkDriver:
    """Runs a `Framework` against the cluster's leading master; see the module docstring.

    Must be started and used from one event loop.
    """

    def __init__(
        self,
        framework: Framework,
        info: pb.FrameworkInfo,
        *,
        zk: str,
        cluster: str,
        call_timeout: float = 5.0,
        observe: Callable[[pb.Event], None] | None = None,
    ) -> None:
        self.framework = framework
        # Sees every event (heartbeats aside) as it arrives, before anything is
        # de-duplicated or dropped: for tracing, and for tests that count resends.
        self.observe = observe
        self.info = pb.FrameworkInfo()
        self.info.CopyFrom(info)
        self.zk = zk
        self.cluster = cluster
        self.call_timeout = call_timeout
        self.framework_id: str | None = info.framework_id or None
        self.stream_id = ""
        self.master_address = ""
        self.heartbeat_interval = 1.0
        self.subscriptions = 0  # how many SUBSCRIBED events this driver has seen
        self._coord: Coordinator | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: MasterAsyncStub | None = None
        self._channel_address = ""
        self._hint = ""
        self._subscribed = asyncio.Event()
        self._stopped = asyncio.Event()
        self._fatal: FrameworkError | None = None
        self._delivery = EventDelivery(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Connect to ZooKeeper and subscribe; return once SUBSCRIBED (else raise
        FrameworkError: DEADLINE_EXCEEDED, or the master's refusal)."""
        if self._tasks:
            raise RuntimeError("FrameworkDriver.start called twice")
        self._coord = Coordinator(self.zk, name=f"framework-{self.info.name}")
        try:
            await asyncio.wait_for(self._coord.start(timeout=timeout), timeout)
        except (CoordError, TimeoutError) as exc:
            await self.close()
            raise FrameworkError(grpc.StatusCode.UNAVAILABLE,
                                 f"cannot reach ZooKeeper at {self.zk}: {exc}") from None
        self._tasks = [
            asyncio.create_task(self._subscribe_loop(), name="framework-subscribe"),
            asyncio.create_task(self._delivery.run(), name="framework-dispatch"),
        ]
        try:
            await self._wait_subscribed(time.monotonic() + timeout)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """End the subscription (not the framework: no teardown). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopped.set()
        self._subscribed.clear()
        current = asyncio.current_task()
        everything = [*self._tasks, *self._delivery.acks_in_flight()]
        for t in everything:
            if t is not current:
                t.cancel()
        for t in everything:
            if t is not current:
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
        await self._drop_channel()
        if self._coord is not None:
            await self._coord.close()
        log.info("framework driver closed framework=%s", self.framework_id)

    async def __aenter__(self) -> FrameworkDriver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    # -- calls ------------------------------------------------------------------------

    async def accept(
        self,
        offer_ids: Sequence[str],
        operations: Sequence[pb.Operation],
        refuse_seconds: float = 5.0,
    ) -> None:
        """Apply `operations` in order to the offers (all from one agent); what is left
        returns to the pool, refused to this framework for `refuse_seconds`."""
        await self._call(
            lambda stub, fid, sid, left: stub.Accept(pb.AcceptRequest(
                framework_id=fid, stream_id=sid, offer_ids=list(offer_ids),
                operations=list(operations),
                filters=pb.Filters(refuse_seconds=refuse_seconds)), timeout=left),
            safe=False, what="ACCEPT")

    async def launch(
        self, offer: pb.Offer, tasks: Sequence[pb.TaskInfo], refuse_seconds: float = 5.0
    ) -> None:
        """ACCEPT one offer with one LAUNCH of `tasks`."""
        operation = pb.Operation(launch=pb.Operation.Launch(tasks=list(tasks)))
        await self.accept([offer.offer_id], [operation], refuse_seconds)

    async def decline(self, offer_ids: Sequence[str], refuse_seconds: float = 5.0) -> None:
        await self._call(
            lambda stub, fid, sid, left: stub.Decline(pb.DeclineRequest(
                framework_id=fid, stream_id=sid, offer_ids=list(offer_ids),
                filters=pb.Filters(refuse_seconds=refuse_seconds)), timeout=left),
            safe=True, what="DECLINE")

    async def kill(self, task_id: str, agent_id: str, grace_period_seconds: float = 0.0) -> None:
        await self._call(
            lambda stub, fid, sid, left: stub.Kill(pb.KillRequest(
                framework_id=fid, stream_id=sid, task_id=task_id, agent_id=agent_id,
                grace_period_seconds=grace_period_seconds), timeout=left),
            safe=True, what="KILL")

    async def reconcile(self, tasks: Sequence[tuple[str, str]] = ()) -> None:
        """Ask for the state of `(task_id, agent_id)` pairs; empty: of every task."""
        named = [pb.ReconcileRequest.Task(task_id=t, agent_id=a) for t, a in tasks]
        await self._call(
            lambda stub, fid, sid, left: stub.Reconcile(pb.ReconcileRequest(
                framework_id=fid, stream_id=sid, tasks=named), timeout=left),
            safe=True, what="RECONCILE")

    async def revive(self) -> None:
        """Clear this framework's offer filters and resume offers."""
        await self._framework_call("Revive")

    async def suppress(self) -> None:
        """Stop offers to this framework until REVIVE."""
        await self._framework_call("Suppress")

    async def teardown(self) -> None:
        """Remove the framework: the master kills its tasks. Then close the driver."""
        await self._framework_call("Teardown")
        await self.close()

    async def _framework_call(self, method: str) -> None:
        """REVIVE, SUPPRESS or TEARDOWN: calls that name only the framework."""
        await self._call(
            lambda stub, fid, sid, left: getattr(stub, method)(
                pb.FrameworkCall(framework_id=fid, stream_id=sid), timeout=left),
            safe=True, what=method.upper())

    async def acknowledge(self, status: pb.TaskStatus) -> None:
        """Acknowledge an update (the driver does this itself after `on_update`)."""
        await self._call(
            lambda stub, fid, sid, left: stub.Acknowledge(pb.AcknowledgeRequest(
                framework_id=fid, stream_id=sid, agent_id=status.agent_id,
                task_id=status.task_id, uuid=status.uuid), timeout=left),
            safe=True, what="ACKNOWLEDGE")

    async def _call(
        self,
        send: Callable[[MasterAsyncStub, str, str, float], Awaitable[Any]],
        *,
        safe: bool,
        what: str,
    ) -> None:
        deadline = time.monotonic() + self.call_timeout
        while True:
            await self._wait_subscribed(deadline)
            stub, fid, sid = self._stub, self.framework_id or "", self.stream_id
            generation = self.subscriptions
            assert stub is not None
            try:
                await send(stub, fid, sid, max(0.01, deadline - time.monotonic()))
                return
            except grpc.aio.AioRpcError as exc:
                stale = generation != self.subscriptions or not self._subscribed.is_set()
                error = call_failure(exc, what=what, safe=safe, stale=stale,
                                     timeout=self.call_timeout,
                                     out_of_time=time.monotonic() >= deadline)
                if error is not None:
                    raise error from None
                log.info("call retried after failover call=%s code=%s framework=%s",
                         what, exc.code().name, fid)
                hint = leader_hint(exc)
                if hint:
                    self._hint = hint
                # Give the subscribe loop a moment to move to the new leader, then retry
                # with whatever subscription is current (the loop may not have noticed).
                await self._moved_on(generation, min(deadline, time.monotonic() + 1.0))

    async def _moved_on(self, generation: int, until: float) -> None:
        """Return once a subscription newer than `generation` exists (or the driver
        stopped), or at `until`, whichever comes first."""

        def moved() -> bool:
            return self.subscriptions != generation or self._stopped.is_set()

        try:
            await async_poll_for(moved, max(0.0, until - time.monotonic()), interval=0.05,
                                 what="a new subscription")
        except TimeoutError:
            pass

    async def _wait_subscribed(self, deadline: float) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._subscribed.is_set():
            return
        waiters = [asyncio.ensure_future(self._subscribed.wait()),
                   asyncio.ensure_future(self._stopped.wait())]
        try:
            await asyncio.wait(waiters, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise FrameworkError(grpc.StatusCode.FAILED_PRECONDITION, "the driver is closed")
        if not self._subscribed.is_set():
            raise FrameworkError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"no leading master of cluster {self.cluster!r} (zk "
                                 f"{self.zk}) answered SUBSCRIBE in time; is one running?")

    # -- the subscription -------------------------------------------------------------

    async def _find_master(self) -> str | None:
        if self._hint:
            hint, self._hint = self._hint, ""
            return hint
        assert self._coord is not None
        try:
            return await asyncio.wait_for(leading_master(self._coord, self.cluster),
                                          self.call_timeout)
        except (CoordError, TimeoutError) as exc:
            log.info("cannot read the master election framework=%s error=%s",
                     self.framework_id, exc)
            return None

    async def _connect(self, address: str) -> MasterAsyncStub:
        if self._stub is None or self._channel_address != address:
            await self._drop_channel()
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channel_address = address
            self._stub = pb_grpc.MasterStub(self._channel)
        assert self._stub is not None
        return self._stub

    async def _drop_channel(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        self._channel_address = ""
        if channel is not None:
            await channel.close(grace=None)

    async def _subscribe_loop(self) -> None:
        delay = 0.1
        while not self._stopped.is_set():
            address = await self._find_master()
            if address:
                try:
                    if await self._follow(address):
                        delay = 0.1
                except grpc.aio.AioRpcError as exc:
                    await self._subscribe_failed(address, exc)
                except TimeoutError:
                    log.warning("master silent framework=%s master=%s missed_heartbeats=%s",
                                self.framework_id, address, MISSED_HEARTBEATS)
                # The channel stays open: calls in flight on it (a TEARDOWN that ended
                # the stream, say) finish; it is replaced when the leader moves.
                self._subscribed.clear()
            if self._stopped.is_set():
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    async def _subscribe_failed(self, address: str, exc: grpc.aio.AioRpcError) -> None:
        code = exc.code()
        hint = leader_hint(exc)
        if hint and hint != address:
            self._hint = hint
        if code in FATAL_SUBSCRIBE_CODES:
            await self._stop_fatal(FrameworkError(code, f"SUBSCRIBE refused: {one_line(exc)}"))
            return
        log.info("subscription ended framework=%s master=%s code=%s detail=%s",
                 self.framework_id, address, code.name, one_line(exc))

    async def _follow(self, address: str) -> bool:
        """Subscribe at `address` and queue its events until the stream ends (False if
        it never said SUBSCRIBED). Raises TimeoutError when the master goes silent."""
        stub = await self._connect(address)
        info = pb.FrameworkInfo()
        info.CopyFrom(self.info)
        info.framework_id = self.framework_id or ""
        stream = stub.Subscribe(pb.SubscribeRequest(framework=info))
        generation = -1
        try:
            # A live leader answers SUBSCRIBED at once; a frozen one (or a dead one whose
            # election node has not expired yet) never does: try the next lookup soon.
            silence = max(SUBSCRIBE_TIMEOUT, MISSED_HEARTBEATS * self.heartbeat_interval)
            while True:
                event = await asyncio.wait_for(stream.read(), silence)
                if event is grpc.aio.EOF:
                    log.info("event stream closed framework=%s master=%s",
                             self.framework_id, address)
                    return generation >= 0
                assert isinstance(event, pb.Event)
                kind = event.WhichOneof("event")
                if self.observe is not None and kind != "heartbeat":
                    self.observe(event)
                if kind == "error":
                    # Before SUBSCRIBED it is the master's answer to SUBSCRIBE (a removed
                    # framework id, say): subscribing again would be refused again.
                    await self._master_error(event, subscribed=generation >= 0)
                    return generation >= 0
                if kind == "subscribed":
                    generation = self._on_subscribed(event.subscribed, address)
                    silence = MISSED_HEARTBEATS * self.heartbeat_interval
                elif generation < 0:
                    log.warning("event before SUBSCRIBED ignored kind=%s", kind)
                    continue
                if kind != "heartbeat":
                    self._delivery.put(generation, event)
        finally:
            stream.cancel()

    def _on_subscribed(self, subscribed: pb.Event.Subscribed, address: str) -> int:
        self.framework_id = subscribed.framework_id
        self.stream_id = subscribed.stream_id
        self.master_address = subscribed.master_address or address
        if subscribed.heartbeat_interval_seconds > 0:
            self.heartbeat_interval = subscribed.heartbeat_interval_seconds
        self.subscriptions += 1
        self._subscribed.set()
        log.info("subscribed framework=%s master=%s stream=%s subscription=%s",
                 self.framework_id, self.master_address, self.stream_id, self.subscriptions)
        return self.subscriptions

    async def _master_error(self, event: pb.Event, *, subscribed: bool) -> None:
        """The master's ERROR: stop for good. `on_error` hears of it once the framework has
        been subscribed; during `start()` the refusal is what `start()` raises."""
        lines = event.error.message.splitlines()
        message = lines[0] if lines else "no reason given"
        what = "the master ended the subscription" if subscribed else "SUBSCRIBE refused"
        if self.subscriptions > 0:
            self._delivery.put(self.subscriptions, event)
        await self._stop_fatal(FrameworkError(grpc.StatusCode.FAILED_PRECONDITION,
                                              f"{what}: {message}"), notify=False)

    async def _stop_fatal(self, error: FrameworkError, *, notify: bool = True) -> None:
        log.warning("framework driver stopped framework=%s reason=%s", self.framework_id, error)
        self._fatal = error
        self._subscribed.clear()
        self._stopped.set()
        if notify:
            self._delivery.put(self.subscriptions,
                               pb.Event(error=pb.Event.Error(message=str(error))))
