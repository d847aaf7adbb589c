"""The agent's status updates: per task, a queue that is checkpointed before anything is
sent and drained only by the framework's acknowledgements.

Invariants:
- an update gets a fresh uuid and is in its task's checkpointed record
  (`TaskRecord.updates`, oldest first) before it is sent, so it survives a restart;
- per task only the oldest unacknowledged update (the head) is in flight: it is sent when
  it becomes the head, again every `retry_interval`, and at once after every registration
  with a master, until the acknowledgement of its uuid arrives. So a task's updates
  arrive in order, at least once, never lost; the SDK delivers each uuid once;
- an acknowledgement of anything but the head is a duplicate and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable

from google.protobuf import json_format

from scheduler.checkpoint import Checkpoint, TaskRecord
from scheduler.v1 import scheduler_pb2 as pb

__all__ = ["Outbox", "StatusUpdates"]

log = logging.getLogger(__name__)

# Messages to the master on the current Attach stream (None ends the stream).
Outbox = asyncio.Queue[pb.AgentMessage | None]


class StatusUpdates:
    """Every task's update queue; see the module docstring. `agent_id()` is the id the
    updates are sent under (a master may assign it after an update was made)."""

    def __init__(self, checkpoint: Checkpoint, retry_interval: float,
                 agent_id: Callable[[], str]) -> None:
        self.checkpoint = checkpoint
        self.retry_interval = retry_interval
        self.agent_id = agent_id
        self._outbox: Outbox | None = None
        self._sent_at: dict[tuple[str, str], tuple[str, float]] = {}  # head uuid, when

    def attached(self, outbox: Outbox, records: Iterable[TaskRecord]) -> None:
        """A master registered this agent: from now on send on `outbox`, every head at once."""
        self._outbox = outbox
        self._sent_at.clear()
        for record in records:
            self.send_head(record, force=True)

    def detached(self) -> None:
        """The stream to the master ended: keep every update until the next `attached`."""
        self._outbox = None

    def report(self, record: TaskRecord, state: str, *, reason: str = "", message: str = "",
               exit_code: int | None = None, healthy: bool | None = None) -> None:
        """Checkpoint a status update for `record`'s task, then send it when its turn comes."""
        status = pb.TaskStatus(
            task_id=record.task_id, framework_id=record.framework_id, agent_id=self.agent_id(),
            state=pb.TaskState.Value(state), source=pb.SOURCE_AGENT,
            reason=pb.StatusReason.Value(reason or "REASON_UNSPECIFIED"), message=message,
            uuid=uuid.uuid4().bytes, timestamp=time.time())
        if exit_code is not None:
            status.exit_code = exit_code
        if healthy is not None:
            status.healthy = healthy
        record.state = state
        record.updates.append({
            "uuid": status.uuid.hex(),
            "status": json_format.MessageToDict(status, preserving_proto_field_name=True)})
        self.checkpoint.save_task(record)
        log.info("status update task=%s/%s state=%s reason=%s message=%s", record.framework_id,
                 record.task_id, state, reason, message)
        self.send_head(record)

    def send_head(self, record: TaskRecord, *, force: bool = False) -> None:
        """Send `record`'s oldest unacknowledged update, unless it went out less than
        `retry_interval` ago (or `force`), or no master is attached."""
        key = (record.framework_id, record.task_id)
        if not record.updates or self._outbox is None:
            return
        head = record.updates[0]
        sent = self._sent_at.get(key)
        now = time.monotonic()
        if (not force and sent is not None and sent[0] == head["uuid"]
                and now - sent[1] < self.retry_interval):
            return
        status = json_format.ParseDict(head["status"], pb.TaskStatus())
        status.agent_id = self.agent_id()
        self._sent_at[key] = (head["uuid"], now)
        self._outbox.put_nowait(pb.AgentMessage(update=pb.AgentMessage.Update(status=status)))

    def acknowledged(self, record: TaskRecord, uuid_: bytes) -> bool:
        """Drop `record`'s head if `uuid_` names it and say so; False for a duplicate. The
        caller checkpoints the record (or forgets it) and sends the next head."""
        if not record.updates or record.updates[0]["uuid"] != uuid_.hex():
            return False
        record.updates.pop(0)
        self._sent_at.pop((record.framework_id, record.task_id), None)
        return True

    async def resend(self, records: Callable[[], Iterable[TaskRecord]]) -> None:
        """Forever: send every head that is due again."""
        while True:
            for record in list(records()):
                self.send_head(record)
            await asyncio.sleep(min(self.retry_interval / 4, 0.25))
