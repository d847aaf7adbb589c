"""The vocabulary of the master's state machine (`scheduler.state`): the records it keeps,
the inputs it takes, the actions it returns and the errors it raises. Pure data, no I/O,
no generated code.

Task states, reasons and sources are the proto enum names as strings ("TASK_RUNNING");
TaskInfo and FrameworkInfo travel as opaque serialized blobs beside the fields the
master reasons about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scheduler.resources import Resources

EMPTY = Resources()
TERMINAL_STATES = frozenset(
    {"TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_LOST", "TASK_ERROR"})
COMPLETED_KEPT = 1000
DEFAULT_REFUSE_SECONDS = 5.0


# ------------------------------------------------------------------ errors


class CallError(Exception):
    """A call refused as a whole; `code` names the gRPC status the daemon answers with."""

    code = "INVALID_ARGUMENT"


class InvalidArgument(CallError):
    code = "INVALID_ARGUMENT"


class NotFound(CallError):
    code = "NOT_FOUND"


class FailedPrecondition(CallError):
    code = "FAILED_PRECONDITION"


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class Status:
    """A task status update (TaskStatus without generated code)."""

    task_id: str
    framework_id: str
    agent_id: str
    state: str
    source: str = "SOURCE_MASTER"
    reason: str = "REASON_UNSPECIFIED"
    message: str = ""
    uuid: bytes = b""
    timestamp: float = 0.0
    healthy: bool | None = None
    exit_code: int | None = None


@dataclass
class Task:
    task_id: str
    framework_id: str
    agent_id: str
    resources: Resources
    state: str
    info: bytes = b""
    reason: str = "REASON_UNSPECIFIED"
    message: str = ""
    healthy: bool | None = None
    # The master told the framework TASK_UNREACHABLE: say RUNNING again if it returns.
    unreachable_reported: bool = False
    # Known only from the registry (after a master failover) until its agent re-registers.
    recovering: bool = False
    # The framework asked for a KILL: sent again whenever the agent re-registers, so a
    # KILL made while the agent was away still reaches it.
    kill: KillTask | None = None


@dataclass
class Agent:
    agent_id: str
    hostname: str
    address: str
    total: Resources
    attributes: dict[str, str]
    registered_at: float
    conn: int | None = None
    last_seen: float = 0.0
    unreachable_since: float | None = None
    # Read from the registry by a new leader; not yet re-registered.
    recovering: bool = False
    used: Resources = EMPTY
    offered: Resources = EMPTY
    task_keys: set[tuple[str, str]] = field(default_factory=set)
    # Tasks the agent holds that are nobody's any more (of a removed incarnation of the
    # agent or of a removed framework, or a second copy of a task held elsewhere): the
    # master told the agent to kill them, and their resources stay in `used` until the
    # agent reports them ended, so nothing new is offered their ports meanwhile.
    doomed: dict[tuple[str, str], Resources] = field(default_factory=dict)

    @property
    def connected(self) -> bool:
        return self.conn is not None

    @property
    def free(self) -> Resources:
        return self.total - self.used - self.offered


@dataclass
class Framework:
    framework_id: str
    name: str
    role: str
    principal: str
    failover_timeout: float
    info: bytes
    registered_at: float
    conn: int | None = None
    stream_id: str = ""
    suppressed: bool = False
    disconnected_at: float | None = None
    # After a master failover a framework gets at least the agents' re-register time to
    # come back, whatever its own failover timeout.
    grace: float = 0.0
    # Scalars only (cpus, mem, disk): ports of different agents do not add up.
    used: Resources = EMPTY
    offered: Resources = EMPTY

    @property
    def connected(self) -> bool:
        return self.conn is not None


@dataclass(frozen=True)
class Offer:
    offer_id: str
    framework_id: str
    agent_id: str
    resources: Resources
    created_at: float


@dataclass(frozen=True)
class AgentTaskReport:
    """A non-terminal task an agent says it holds when it (re-)registers."""

    framework_id: str
    framework_info: bytes
    framework_role: str
    task_id: str
    task_info: bytes
    resources: Resources
    state: str


@dataclass(frozen=True)
class TaskSpec:
    """A task in a LAUNCH operation."""

    task_id: str
    agent_id: str
    resources: Resources
    info: bytes


@dataclass(frozen=True)
class Launch:
    tasks: tuple[TaskSpec, ...]


@dataclass(frozen=True)
class Reserve:
    resources: Resources


@dataclass(frozen=True)
class Unreserve:
    resources: Resources


@dataclass(frozen=True)
class Create:
    volumes: Resources


@dataclass(frozen=True)
class Destroy:
    volumes: Resources


Operation = Launch | Reserve | Unreserve | Create | Destroy


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Registered:
    agent_id: str


@dataclass(frozen=True)
class RunTask:
    framework_info: bytes
    task_info: bytes
    framework_id: str
    task_id: str


@dataclass(frozen=True)
class KillTask:
    framework_id: str
    task_id: str
    grace_period: float = 0.0
    reason: str = "REASON_KILLED_BY_FRAMEWORK"


@dataclass(frozen=True)
class Acknowledge:
    framework_id: str
    task_id: str
    uuid: bytes


@dataclass(frozen=True)
class CheckpointResources:
    resources: Resources


@dataclass(frozen=True)
class ShutdownFramework:
    framework_id: str


AgentMessage = Registered | RunTask | KillTask | Acknowledge | CheckpointResources | \
    ShutdownFramework


@dataclass(frozen=True)
class Subscribed:
    framework_id: str
    stream_id: str


@dataclass(frozen=True)
class Offers:
    offers: tuple[Offer, ...]
    attributes: tuple[dict[str, str], ...]
    hostnames: tuple[str, ...]


@dataclass(frozen=True)
class Rescind:
    offer_id: str


@dataclass(frozen=True)
class Update:
    status: Status


@dataclass(frozen=True)
class Failure:
    agent_id: str


FrameworkEvent = Subscribed | Offers | Rescind | Update | Failure


@dataclass(frozen=True)
class ToAgent:
    """Send `message` on the agent's current stream (dropped if it has none)."""

    agent_id: str
    message: AgentMessage


@dataclass(frozen=True)
class ToFramework:
    """Send `event` on the framework's current stream (dropped if it has none)."""

    framework_id: str
    event: FrameworkEvent


@dataclass(frozen=True)
class CloseAgentConn:
    conn: int


@dataclass(frozen=True)
class CloseFrameworkConn:
    """Send an ERROR event with `message` on stream `conn`, then end it."""

    conn: int
    message: str


@dataclass(frozen=True)
class WriteAgent:
    """Write the agent's registry entry; `TOMBSTONE` entries mark removed agents, so a
    later leader does not take them back; None deletes the entry."""

    agent_id: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class WriteFramework:
    framework_id: str
    data: dict[str, Any] | None


Action = ToAgent | ToFramework | CloseAgentConn | CloseFrameworkConn | WriteAgent | \
    WriteFramework


@dataclass(frozen=True)
class StateConfig:
    agent_timeout: float = 5.0
    agent_reregister_timeout: float = 30.0
    offer_timeout: float = 30.0
    # Prefix of every id this master makes up; unique per leadership term.
    id_prefix: str = "m"
    # Tombstones of removed agents and frameworks older than this are deleted by the next
    # leader (Mesos keeps removed agents in its registry for two weeks too).
    removed_kept: float = 14 * 86400.0


def tombstone(now: float) -> dict[str, Any]:
    """The registry entry of a removed agent or framework."""
    return {"removed": True, "removed_at": now}


def is_tombstone(data: dict[str, Any]) -> bool:
    return bool(data.get("removed"))
