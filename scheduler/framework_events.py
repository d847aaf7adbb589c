"""Delivering the master's events to a framework's callbacks (the SDK's dispatch loop).

`FrameworkDriver` queues every event it reads (with the subscription it came on) and one
`EventDelivery` task hands them to the `Framework`. Invariants:
- callbacks run one at a time, in the order the events arrived, from that one task; a
  callback that raises is logged and delivery goes on;
- an UPDATE that carries a uuid is delivered once: a uuid already delivered (the newest
  ACKED_MEMORY are remembered) is acknowledged again but not delivered again;
- an UPDATE is acknowledged after its callback returns, in a task beside the loop, so a
  slow acknowledgement holds back no other event; a failed one is left to the agent,
  which resends the update until an acknowledgement reaches it;
- OFFERS that came on an earlier subscription are dropped: they died with it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

from scheduler.framework_errors import FrameworkError
from scheduler.v1 import scheduler_pb2 as pb

if TYPE_CHECKING:
    from scheduler.framework import FrameworkDriver

__all__ = ["ACKED_MEMORY", "EventDelivery"]

log = logging.getLogger(__name__)

ACKED_MEMORY = 100_000  # uuids remembered to suppress duplicate updates


class EventDelivery:
    """The queue of `driver`'s events and the loop (`run`) that delivers them."""

    def __init__(self, driver: FrameworkDriver) -> None:
        self.driver = driver
        self._queue: asyncio.Queue[tuple[int, pb.Event]] = asyncio.Queue()
        self._delivered: collections.OrderedDict[tuple[str, bytes], None] = (
            collections.OrderedDict()
        )
        self._acks: set[asyncio.Task[None]] = set()  # acknowledgements in flight

    def put(self, subscription: int, event: pb.Event) -> None:
        """Queue `event`, which arrived on the driver's `subscription`-th subscription."""
        self._queue.put_nowait((subscription, event))

    def acks_in_flight(self) -> list[asyncio.Task[None]]:
        return list(self._acks)

    async def run(self) -> None:
        """Deliver events until cancelled."""
        while True:
            subscription, event = await self._queue.get()
            try:
                await self._dispatch(subscription, event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("framework callback failed framework=%s event=%s",
                              self.driver.framework_id, event.WhichOneof("event"))

    async def _dispatch(self, subscription: int, event: pb.Event) -> None:
        driver, fw = self.driver, self.driver.framework
        kind = event.WhichOneof("event")
        if kind == "subscribed":
            await fw.on_subscribed(driver, event.subscribed.framework_id)
        elif kind == "offers":
            if subscription != driver.subscriptions:
                return  # offers die with the subscription (and master) that made them
            await fw.on_offers(driver, list(event.offers.offers))
        elif kind == "rescind":
            await fw.on_rescind(driver, event.rescind.offer_id)
        elif kind == "update":
            await self._deliver_update(event.update.status)
        elif kind == "failure":
            await fw.on_failure(driver, event.failure.agent_id)
        elif kind == "error":
            await fw.on_error(driver, event.error.message)

    async def _deliver_update(self, status: pb.TaskStatus) -> None:
        if not status.uuid:
            await self.driver.framework.on_update(self.driver, status)
            return
        key = (status.task_id, bytes(status.uuid))
        if key not in self._delivered:
            await self.driver.framework.on_update(self.driver, status)
            self._delivered[key] = None
            while len(self._delivered) > ACKED_MEMORY:
                self._delivered.popitem(last=False)
        else:
            log.debug("duplicate update acknowledged again task=%s", status.task_id)
        ack = asyncio.create_task(self._acknowledge_quietly(status))
        self._acks.add(ack)
        ack.add_done_callback(self._acks.discard)

    async def _acknowledge_quietly(self, status: pb.TaskStatus) -> None:
        try:
            await self.driver.acknowledge(status)
        except FrameworkError as exc:
            # The agent resends unacknowledged updates; the next copy is acknowledged.
            log.info("acknowledge failed task=%s error=%s", status.task_id, exc)
