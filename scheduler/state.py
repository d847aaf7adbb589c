"""The master's state machine: events in, actions out. Never does I/O.

The daemon (`scheduler.master`) turns gRPC calls, agent messages, stream ends and clock
ticks into calls on `MasterState`; each returns the list of `Action`s to carry out (send
a message to an agent, an event to a framework, write or delete a registry entry, close a
stream) in order. Time is always an explicit `now` (seconds); `tick(now)` fires every
deadline that has passed (agent silence, re-register timeout, framework failover
timeout, offer timeout) and `allocate(now)` runs one offer cycle.

Invariants:
- an agent's `used` is the sum of its non-terminal tasks' resources and of its doomed
  ones (tasks it holds that are nobody's, being killed: `Agent.doomed`), and `offered`
  the sum of its outstanding offers; `used + offered` is always contained in its `total`;
- a call that fails raises `CallError` (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION)
  before anything changes: a rejected ACCEPT leaves its offers outstanding;
- a task is in at most one of `tasks` (non-terminal) and `completed` (terminal, bounded);
  a task id is not used twice by one framework while the master remembers it;
- a removed agent or framework stays removed, across failovers too: its registry entry
  becomes a tombstone; a returning removed agent gets a new id and kills its old tasks;
- a KILL is kept on its task and sent again each time the task's agent re-registers;
- registry writes happen on admission, removal, launch and terminal updates, never on
  heartbeats, so ZooKeeper traffic is proportional to task churn.

The machine is built in layers, one module each: `scheduler.master_books` (the records
and the bookkeeping every decision shares), `scheduler.framework_calls` (the framework
API, with ACCEPT validated by `scheduler.offers`) and this module (agents' events,
recovery from the registry, time). The records, inputs, actions and errors are defined
in `scheduler.master_records` and re-exported here, so callers write `state.ToAgent`,
`state.Status`, ...
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

from scheduler.framework_calls import FrameworkCalls
from scheduler.master_books import summed
from scheduler.master_records import (
    COMPLETED_KEPT,
    DEFAULT_REFUSE_SECONDS,
    EMPTY,
    TERMINAL_STATES,
    Acknowledge,
    Action,
    Agent,
    AgentMessage,
    AgentTaskReport,
    CallError,
    CheckpointResources,
    CloseAgentConn,
    CloseFrameworkConn,
    Create,
    Destroy,
    FailedPrecondition,
    Failure,
    Framework,
    FrameworkEvent,
    InvalidArgument,
    KillTask,
    Launch,
    NotFound,
    Offer,
    Offers,
    Operation,
    Registered,
    Rescind,
    Reserve,
    RunTask,
    ShutdownFramework,
    StateConfig,
    Status,
    Subscribed,
    Task,
    TaskSpec,
    ToAgent,
    ToFramework,
    Unreserve,
    Update,
    WriteAgent,
    WriteFramework,
    is_tombstone,
    tombstone,
)
from scheduler.resources import Resource, ResourceError, Resources

# ------------------------------------------------------------------ the machine


class MasterState(FrameworkCalls):
    """Everything the leading master knows, and every decision it makes."""

    # -- recovery -------------------------------------------------------------

    def recover(self, agents: dict[str, dict[str, Any]],
                frameworks: dict[str, dict[str, Any]], now: float) -> list[Action]:
        """Adopt a registry a previous leader wrote. Agents must re-register within the
        re-register timeout and frameworks re-subscribe within their failover timeout;
        removed ones stay removed (tombstones), and tombstones past `removed_kept` go."""
        actions: list[Action] = []
        frameworks = self._bury(frameworks, self.removed_frameworks,
                                lambda fid: WriteFramework(fid, None), now, actions)
        agents = self._bury(agents, self.removed_agents, lambda aid: WriteAgent(aid, None),
                            now, actions)
        for fid, data in frameworks.items():
            self.frameworks[fid] = Framework(
                framework_id=fid, name=str(data.get("name", "")),
                role=str(data.get("role", "*")) or "*", principal=str(data.get("principal", "")),
                failover_timeout=float(data.get("failover_timeout", 0.0)),
                info=base64.b64decode(str(data.get("info", ""))),
                registered_at=float(data.get("registered_at", now)), disconnected_at=now,
                grace=self.config.agent_reregister_timeout)
        for aid, data in agents.items():
            agent = Agent(agent_id=aid, hostname=str(data.get("hostname", "")),
                          address=str(data.get("address", "")), total=EMPTY,
                          attributes=dict(data.get("attributes", {})),
                          registered_at=float(data.get("registered_at", now)),
                          unreachable_since=now, recovering=True)
            self.agents[aid] = agent
            for entry in data.get("tasks", []):
                key = (str(entry["framework_id"]), str(entry["task_id"]))
                if key[0] in self.removed_frameworks:
                    continue  # killed with its framework; the entry was not rewritten yet
                # A framework with no entry may still come back (its entry's write may
                # have failed): the task waits for its agent like the others.
                self.tasks[key] = Task(task_id=key[1], framework_id=key[0], agent_id=aid,
                                       resources=EMPTY, state="TASK_UNREACHABLE",
                                       recovering=True)
                agent.task_keys.add(key)
            for entry in data.get("doomed", []):
                # Still to be killed if the agent reports it (resources: from its report).
                agent.doomed[(str(entry["framework_id"]), str(entry["task_id"]))] = EMPTY
        return actions

    def _bury(self, entries: dict[str, dict[str, Any]], removed: set[str],
              forget: Callable[[str], Action], now: float,
              actions: list[Action]) -> dict[str, dict[str, Any]]:
        """The live `entries`; tombstones' names go to `removed`, or, once older than
        `removed_kept`, their entries are deleted (`forget`)."""
        live = {}
        for name, data in entries.items():
            if not is_tombstone(data):
                live[name] = data
            elif now - float(data.get("removed_at", now)) > self.config.removed_kept:
                actions.append(forget(name))
            else:
                removed.add(name)
        return live

    # -- agents ---------------------------------------------------------------

    def register_agent(self, conn: int, agent_id: str, hostname: str, address: str,
                       total: Resources, attributes: dict[str, str],
                       reports: Sequence[AgentTaskReport], now: float) -> list[Action]:
        """An agent's Register on stream `conn`: admit it, or take it back with its tasks."""
        actions: list[Action] = []
        if not agent_id or agent_id in self.removed_agents:
            return self._admit(conn, hostname, address, total, attributes, reports, now)
        agent = self.agents.get(agent_id)
        if agent is None:
            # Unknown but never removed by us: an agent a previous leader admitted just
            # before it died. Take it with its id and its tasks.
            agent = Agent(agent_id=agent_id, hostname=hostname, address=address, total=total,
                          attributes=dict(attributes), registered_at=now)
            self.agents[agent_id] = agent
        if agent.conn is not None and agent.conn != conn:
            self._agent_conns.pop(agent.conn, None)
            actions.append(CloseAgentConn(agent.conn))
        actions += self._rescind_agent_offers(agent)
        total, resend = self._checkpointed_total(agent, total)
        agent.hostname, agent.address, agent.attributes = hostname, address, dict(attributes)
        agent.total = total
        agent.conn, agent.last_seen = conn, now
        agent.unreachable_since, agent.recovering = None, False
        self._agent_conns[conn] = agent_id
        actions.append(ToAgent(agent_id, Registered(agent_id)))
        if resend:
            actions.append(ToAgent(agent_id, CheckpointResources(total)))
        reported = {(r.framework_id, r.task_id): r for r in reports}
        for key in sorted(agent.task_keys - set(reported)):
            # Not among the agent's live tasks: it ended while we were apart (its terminal
            # update is on its way) or it never arrived. Wait one agent timeout for news.
            self._unconfirmed[key] = now + self.config.agent_timeout
        for key in set(agent.doomed) - set(reported):
            del agent.doomed[key]  # ended while we were apart
        for _, report in sorted(reported.items()):
            actions += self._adopt_task(agent, report, now)
        agent.used = summed(self.tasks[k].resources for k in agent.task_keys)
        agent.used = self._charge_doomed(agent, agent.doomed)
        for fid in sorted({k[0] for k in agent.task_keys}):
            if fid in self.frameworks:  # one whose registry entry was never written may not be
                self._recharge(self.frameworks[fid])
        actions.append(self._agent_entry(agent))
        return actions

    @staticmethod
    def _checkpointed_total(agent: Agent, reported: Resources) -> tuple[Resources, bool]:
        """The total to adopt for a returning agent, and whether to checkpoint it again.

        The agent's capacity is its own, but reservations and volumes are the master's
        decisions: if the agent reports others than this master made (a
        CheckpointResources lost on a broken stream), the master's stand and are sent again.
        A recovering agent (new leader) is taken at its word."""
        if agent.recovering or reported == agent.total:
            return reported, False
        ours = agent.total - agent.total.unreserved()
        if reported - reported.unreserved() == ours:
            return reported, False
        try:
            total = _plain(reported) - _plain(ours) + ours
        except ResourceError:
            return reported, False  # the agent shrank below our reservations: its word
        return total, total != reported

    def _admit(self, conn: int, hostname: str, address: str, total: Resources,
               attributes: dict[str, str], reports: Sequence[AgentTaskReport],
               now: float) -> list[Action]:
        agent_id = self._new_id("agent")
        agent = Agent(agent_id=agent_id, hostname=hostname, address=address, total=total,
                      attributes=dict(attributes), registered_at=now, conn=conn,
                      last_seen=now)
        self.agents[agent_id] = agent
        self._agent_conns[conn] = agent_id
        actions: list[Action] = [ToAgent(agent_id, Registered(agent_id))]
        for report in reports:
            # Tasks of a removed agent were reported LOST: they must not keep running.
            actions += self._doom(agent, report, "REASON_AGENT_REMOVED")
        agent.used = self._charge_doomed(agent, agent.doomed)
        actions.append(self._agent_entry(agent))
        return actions

    @staticmethod
    def _doom(agent: Agent, report: AgentTaskReport, reason: str) -> list[Action]:
        """Tell the agent to kill a task that is nobody's; its resources stay taken until
        the agent reports it ended (see `Agent.doomed`)."""
        agent.doomed[(report.framework_id, report.task_id)] = report.resources
        return [ToAgent(agent.agent_id, KillTask(report.framework_id, report.task_id,
                                                 reason=reason))]

    @staticmethod
    def _charge_doomed(agent: Agent, doomed: dict[tuple[str, str], Resources]) -> Resources:
        """`agent.used` with the doomed tasks' resources added; one whose resources do not
        fit what is left of the agent (an agent that over-reports) is not counted."""
        used = agent.used
        for key in sorted(doomed):
            if (agent.total - agent.offered).contains(used + doomed[key]):
                used = used + doomed[key]
            else:
                doomed[key] = EMPTY
        return used

    def _adopt_task(self, agent: Agent, report: AgentTaskReport, now: float) -> list[Action]:
        key = (report.framework_id, report.task_id)
        actions: list[Action] = []
        if key in agent.doomed:
            return self._doom(agent, report, "REASON_AGENT_REMOVED")  # not dead yet: again
        if report.framework_id not in self.frameworks:
            if report.framework_id in self.removed_frameworks:
                return self._doom(agent, report, "REASON_FRAMEWORK_REMOVED")
            self.frameworks[report.framework_id] = Framework(
                framework_id=report.framework_id, name="", role=report.framework_role or "*",
                principal="", failover_timeout=0.0, info=report.framework_info,
                registered_at=now, disconnected_at=now,
                grace=self.config.agent_reregister_timeout)
        task = self.tasks.get(key)
        if task is not None and task.agent_id != agent.agent_id:
            # The same id on another agent: that copy is the framework's, this one goes.
            return self._doom(agent, report, "REASON_INVALID")
        if task is None:
            task = Task(task_id=report.task_id, framework_id=report.framework_id,
                        agent_id=agent.agent_id, resources=EMPTY, state=report.state)
            self.completed.pop(key, None)
            self.tasks[key] = task
            agent.task_keys.add(key)
        # A report may be thin (no resources): what the master launched stays the truth.
        if not report.resources.is_empty():
            task.resources = report.resources
        task.info = task.info or report.task_info
        # Changes the framework has not seen yet are still pending on the agent, which
        # resends them; only what the master itself said (UNREACHABLE) needs correcting.
        task.state, task.recovering = report.state, False
        if task.unreachable_reported:
            task.unreachable_reported = False
            actions.append(ToFramework(task.framework_id, Update(Status(
                task.task_id, task.framework_id, agent.agent_id, task.state,
                message="agent re-registered", timestamp=now))))
        if task.kill is not None:
            actions.append(ToAgent(agent.agent_id, task.kill))  # asked while it was away
        return actions

    def agent_of(self, conn: int) -> str:
        """The agent whose current stream is `conn` ("" if none)."""
        return self._agent_conns.get(conn, "")

    def agent_heartbeat(self, agent_id: str, now: float) -> list[Action]:
        agent = self.agents.get(agent_id)
        if agent is not None and agent.connected:
            agent.last_seen = now
        return []

    def agent_disconnected(self, conn: int, now: float) -> list[Action]:
        """Stream `conn` ended; if it was its agent's current stream the agent is away."""
        agent_id = self._agent_conns.pop(conn, None)
        agent = self.agents.get(agent_id or "")
        if agent is None or agent.conn != conn:
            return []
        return self._unreachable(agent, now)

    def _unreachable(self, agent: Agent, now: float) -> list[Action]:
        actions: list[Action] = []
        if agent.conn is not None:
            self._agent_conns.pop(agent.conn, None)
            actions.append(CloseAgentConn(agent.conn))
        agent.conn, agent.unreachable_since = None, now
        actions += self._rescind_agent_offers(agent)
        for key in sorted(agent.task_keys):
            task = self.tasks[key]
            task.unreachable_reported = True
            task.state = "TASK_UNREACHABLE"
            actions.append(ToFramework(task.framework_id, Update(Status(
                task.task_id, task.framework_id, agent.agent_id, "TASK_UNREACHABLE",
                reason="REASON_AGENT_DISCONNECTED", message="agent unreachable",
                timestamp=now))))
        return actions

    def _remove_agent(self, agent: Agent, now: float) -> list[Action]:
        actions: list[Action] = []
        for key in sorted(agent.task_keys):
            task = self.tasks[key]
            actions += self._terminate(task, Status(
                task.task_id, task.framework_id, agent.agent_id, "TASK_LOST",
                reason="REASON_AGENT_REMOVED",
                message="agent did not re-register in time", timestamp=now))
        del self.agents[agent.agent_id]
        self.removed_agents.add(agent.agent_id)
        self.filters.forget_agent(agent.agent_id)
        for fid in sorted(self.frameworks):
            if self.frameworks[fid].connected:
                actions.append(ToFramework(fid, Failure(agent.agent_id)))
        actions.append(WriteAgent(agent.agent_id, tombstone(now)))
        return actions

    def agent_update(self, agent_id: str, status: Status, now: float) -> list[Action]:
        """A status update from an agent: record it and forward it to the framework."""
        agent = self.agents.get(agent_id)
        if agent is None or not agent.connected:
            return []
        agent.last_seen = now
        key = (status.framework_id, status.task_id)
        framework = self.frameworks.get(status.framework_id)
        if key in agent.doomed or framework is None:
            # Nobody's task: the framework was told LOST (or left), or holds the task
            # elsewhere. Acknowledge for it; a doomed task's end frees its resources.
            if key in agent.doomed and status.state in TERMINAL_STATES:
                agent.used = agent.used - agent.doomed.pop(key)
            return [ToAgent(agent_id, Acknowledge(status.framework_id, status.task_id,
                                                  status.uuid))] if status.uuid else []
        actions: list[Action] = []
        task = self.tasks.get(key)
        if task is not None and task.agent_id == agent_id:
            self._unconfirmed.pop(key, None)
            task.reason, task.message = status.reason, status.message
            if status.healthy is not None:
                task.healthy = status.healthy
            if status.state in TERMINAL_STATES:
                actions += self._terminate(task, status, forward=False)
            else:
                task.state = status.state
        actions.append(ToFramework(status.framework_id, Update(status)))
        return actions

    # -- time -----------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Fire every deadline that has passed by `now`."""
        actions: list[Action] = []
        cfg = self.config
        for agent in sorted(self.agents.values(), key=lambda a: a.agent_id):
            if agent.connected and now - agent.last_seen > cfg.agent_timeout:
                actions += self._unreachable(agent, now)
            elif (not agent.connected and agent.unreachable_since is not None
                  and now - agent.unreachable_since > cfg.agent_reregister_timeout):
                actions += self._remove_agent(agent, now)
        for framework in sorted(self.frameworks.values(), key=lambda f: f.framework_id):
            if (framework.disconnected_at is not None
                    and now - framework.disconnected_at
                    > max(framework.failover_timeout, framework.grace)):
                actions += self._remove_framework(
                    framework, "failover timeout passed", now)
        for key, deadline in sorted(self._unconfirmed.items()):
            task = self.tasks.get(key)
            holder = self.agents.get(task.agent_id) if task is not None else None
            if task is None or holder is None or not holder.connected:
                del self._unconfirmed[key]  # settled, or the agent is away again
            elif now > deadline:
                del self._unconfirmed[key]
                actions += self._terminate(task, Status(
                    task.task_id, task.framework_id, task.agent_id, "TASK_LOST",
                    reason="REASON_AGENT_RESTARTED",
                    message="the agent re-registered without this task", timestamp=now))
        for offer in sorted(self.offers.values(), key=lambda o: o.offer_id):
            if now - offer.created_at > cfg.offer_timeout:
                self._drop_offer(offer)
                actions.append(ToFramework(offer.framework_id, Rescind(offer.offer_id)))
        return actions


def _plain(resources: Resources) -> Resources:
    """`resources` as unreserved capacity: no roles, no volumes."""
    return Resources.of(Resource(r.name, r.scalar, r.ranges) for r in resources)



__all__ = [
    "COMPLETED_KEPT",
    "DEFAULT_REFUSE_SECONDS",
    "EMPTY",
    "TERMINAL_STATES",
    "Acknowledge",
    "Action",
    "Agent",
    "AgentMessage",
    "AgentTaskReport",
    "CallError",
    "CheckpointResources",
    "CloseAgentConn",
    "CloseFrameworkConn",
    "Create",
    "Destroy",
    "FailedPrecondition",
    "Failure",
    "Framework",
    "FrameworkEvent",
    "InvalidArgument",
    "KillTask",
    "Launch",
    "MasterState",
    "NotFound",
    "Offer",
    "Offers",
    "Operation",
    "Registered",
    "Rescind",
    "Reserve",
    "RunTask",
    "ShutdownFramework",
    "StateConfig",
    "Status",
    "Subscribed",
    "Task",
    "TaskSpec",
    "ToAgent",
    "ToFramework",
    "Unreserve",
    "Update",
    "WriteAgent",
    "WriteFramework",
    "is_tombstone",
    "tombstone",
]

