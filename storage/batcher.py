"""Coalescing, the sending side: concurrent calls to one leader leave together in Batch RPCs.

Role: a `Batcher` per client owns one `storage.coalescing.Lane` per leader address and
sends what the lanes decide. A caller that finds a free slot sends its own batch inline;
calls arriving while every slot is in flight queue, and a drain task sends them back to
back when a slot frees. `batch_rpc` is the one Batch RPC, used for `batch_put`/`batch_get`
too. `storage.client.AsyncClient` owns the Batcher, the channels and the retries.

Not pure: it owns the callers' asyncio futures, the deadline timers (`Expiry`), the drain
tasks and the Batch RPCs. The decisions (who leaves together) are `storage.coalescing`'s.

Invariants:
- Per leader address at most `max_in_flight` Batch RPCs are in flight; calls behind them
  queue and leave together (<= MAX_BATCH_ITEMS ops and the byte budget).
- A Batch RPC gets the latest deadline of its callers (capped at MAX_RPC_TIMEOUT); a
  caller whose own deadline passes while queued gets DeadlineExceeded.
- Every caller of a batch is answered: a result, the RPC's error, or Internal for a bug.
- `close()` fails the calls still queued and cancels the drain tasks.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from storage.coalescing import OP_OVERHEAD_BYTES, Lane
from storage.errors import DeadlineExceeded, Internal, StorageError, Unavailable
from storage.v1 import kv_pb2
from storage.wire_errors import call_cancelled, item_error, rpc_error

if TYPE_CHECKING:
    from storage.v1.kv_pb2_grpc import KVAsyncStub

__all__ = ["MAX_RPC_TIMEOUT", "Batcher", "Expiry", "Pending"]

log = logging.getLogger(__name__)

MAX_RPC_TIMEOUT = 300.0  # cap on one Batch RPC's deadline (each caller keeps its own)


class Pending:
    """One coalesced call waiting in (or sent by) a lane. Shell, not pure: it holds the
    caller's asyncio future (a `storage.coalescing.Call` for the lane's decisions)."""

    __slots__ = ("deadline", "future", "op", "size")

    def __init__(
        self, op: kv_pb2.Op, size: int, deadline: float, future: asyncio.Future[kv_pb2.OpResult]
    ) -> None:
        self.op = op
        self.size = size
        self.deadline = deadline
        self.future = future


def _expire(future: asyncio.Future[kv_pb2.OpResult]) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("deadline exceeded while waiting for a batch"))


class Expiry:
    """Coarse deadline timers for queued calls: the calls whose deadlines fall in one slot
    share one timer, fired at the slot's end (never before a deadline, at most one slot
    after). One TimerHandle per call would cost more than the rest of the call's hot path."""

    __slots__ = ("_loop", "_slot", "_slots")

    def __init__(self, loop: asyncio.AbstractEventLoop, slot: float = 0.005) -> None:
        self._loop = loop
        self._slot = slot
        self._slots: dict[int, set[asyncio.Future[kv_pb2.OpResult]]] = {}

    def watch(
        self, deadline: float, future: asyncio.Future[kv_pb2.OpResult]
    ) -> set[asyncio.Future[kv_pb2.OpResult]]:
        """Expire `future` at its deadline; discard it from the returned set once answered."""
        slot = int(deadline / self._slot) + 1
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
            self._loop.call_at(slot * self._slot, self._fire, slot)
        members.add(future)
        return members

    def _fire(self, slot: int) -> None:
        for future in self._slots.pop(slot, ()):
            _expire(future)


class Batcher:
    """A client's lanes, one per leader address, and the Batch RPCs that empty them.

    Bound to the client's event loop by `bind()` before the first call.
    """

    def __init__(
        self,
        *,
        stub: Callable[[str], KVAsyncStub],
        saw_header: Callable[[kv_pb2.ResponseHeader, str], None],
        max_in_flight: int = 1,
    ) -> None:
        self._stub = stub
        self._saw_header = saw_header
        self._max_in_flight = max_in_flight
        self._lanes: dict[str, Lane[Pending]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._expiry: Expiry | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use `loop`, the one the client started on, for futures, timers and tasks."""
        self._loop = loop

    def close(self) -> list[asyncio.Task[None]]:
        """Fail the queued calls and cancel the drain tasks; return them for the owner to await."""
        for lane in self._lanes.values():
            while lane.queue:
                pending = lane.queue.popleft()
                if not pending.future.done():
                    pending.future.set_exception(Unavailable("the client was closed"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def send(
        self, address: str, op: kv_pb2.Op, kind: str, size: int, deadline: float
    ) -> Any:
        """Send one operation in the lane of `address`; its typed reply (PutResponse, ...)."""
        lane = self._lanes.get(address)
        if lane is None:
            lane = self._lanes[address] = Lane(self._max_in_flight)
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[kv_pb2.OpResult] = loop.create_future()
        pending = Pending(op, size + OP_OVERHEAD_BYTES, deadline, future)
        batch = lane.offer(pending)
        if batch is not None:
            await self._flush(address, lane, batch)  # our own RPC, sent inline: no task
            result = future.result()
        else:
            expiry = self._expiry
            if expiry is None:
                expiry = self._expiry = Expiry(loop)
            watched = expiry.watch(deadline, future)
            try:
                result = await future
            finally:
                watched.discard(future)
        if result.status.code:
            raise item_error(result.status)
        return getattr(result, kind)

    async def _flush(self, address: str, lane: Lane[Pending], batch: list[Pending]) -> None:
        """Send the caller's own batch inline, then hand the lane's queue to a drain task."""
        try:
            await self._send_lane_batch(address, batch)
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        finally:
            following = lane.complete()
            if following:
                self._spawn(self._drain(address, lane, following))

    async def _drain(self, address: str, lane: Lane[Pending], batch: list[Pending]) -> None:
        """Send queued batches back to back until the lane's queue is empty."""
        try:
            while batch:
                await self._send_lane_batch(address, batch)
                # One loop turn for the callers just answered to queue their next calls, so
                # they leave in the next batch instead of a batch of one after it.
                await asyncio.sleep(0)
                batch = lane.complete()
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(Unavailable("the client was closed"))
            raise

    async def _send_lane_batch(self, address: str, batch: list[Pending]) -> None:
        deadline = max(p.deadline for p in batch)
        if deadline <= self._now():
            for p in batch:
                _expire(p.future)
            return
        try:
            results = await self.batch_rpc(address, [p.op for p in batch], deadline)
        except StorageError as err:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(copy.copy(err))
            return
        except Exception as exc:  # a bug must not strand the callers of this batch
            log.exception("batch to %s failed", address)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(Internal(f"client error sending a batch: {exc!r}"))
            return
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)

    async def batch_rpc(
        self, address: str, ops: Sequence[kv_pb2.Op], deadline: float
    ) -> Sequence[kv_pb2.OpResult]:
        """One Batch RPC; bisects when the reply would exceed the message cap."""
        timeout = min(deadline - self._now(), MAX_RPC_TIMEOUT)
        if timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the batch was sent")
        stub = self._stub(address)
        try:
            response = await stub.Batch(kv_pb2.BatchRequest(ops=ops), timeout=timeout)
        except grpc.aio.UsageError:
            raise Unavailable("the client was closed") from None
        except asyncio.CancelledError:
            if not call_cancelled():
                raise
            raise Unavailable("the client was closed") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and len(ops) > 1:
                # Many large values in one reply: split; each half is answered on its own.
                half = len(ops) // 2
                first = await self.batch_rpc(address, ops[:half], deadline)
                return [*first, *await self.batch_rpc(address, ops[half:], deadline)]
            raise rpc_error(exc, address) from None
        self._saw_header(response.header, address)
        if len(response.results) != len(ops):
            raise Internal(
                f"{address} answered {len(response.results)} results for {len(ops)} operations"
            )
        return response.results

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
