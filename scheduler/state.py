"""The master's state machine: events in, actions out. Never does I/O.

The daemon (`scheduler.master`) turns gRPC calls, agent messages, stream ends and clock
ticks into calls on `MasterState`; each returns the list of `Action`s to carry out (send
a message to an agent, an event to a framework, write or delete a registry entry, close a
stream) in order. Time is always an explicit `now` (seconds); `tick(now)` fires every
deadline that has passed (agent silence, re-register timeout, framework failover
timeout, offer timeout) and `allocate(now)` runs one offer cycle.

Invariants:
- an agent's `used` is the sum of its non-terminal tasks' resources and `offered` the
  sum of its outstanding offers; `used + offered` is always contained in its `total`;
- a call that fails raises `CallError` (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION)
  before anything changes: a rejected ACCEPT leaves its offers outstanding;
- a task is in at most one of `tasks` (non-terminal) and `completed` (terminal, bounded);
- registry writes happen on admission, removal, launch and terminal updates, never on
  heartbeats, so ZooKeeper traffic is proportional to task churn.

The records, inputs, actions and errors are defined in `scheduler.master_records` and
re-exported here, so callers write `state.ToAgent`, `state.Status`, ...
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from scheduler.allocator import AgentSupply, FrameworkDemand, OfferFilters, allocate
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
)
from scheduler.resources import (
    Resource,
    ResourceError,
    Resources,
    create_volumes,
    destroy_volumes,
    reserve,
    unreserve,
)

# ------------------------------------------------------------------ the machine


class MasterState:
    """Everything the leading master knows, and every decision it makes."""

    def __init__(self, config: StateConfig) -> None:
        self.config = config
        self.agents: dict[str, Agent] = {}
        self.frameworks: dict[str, Framework] = {}
        self.tasks: dict[tuple[str, str], Task] = {}
        self.completed: OrderedDict[tuple[str, str], Task] = OrderedDict()
        self.offers: dict[str, Offer] = {}
        self.filters = OfferFilters()
        self.removed_agents: set[str] = set()
        self.removed_frameworks: set[str] = set()
        self._agent_conns: dict[int, str] = {}
        # Tasks a re-registered agent did not report: LOST unless it reports them by then.
        self._unconfirmed: dict[tuple[str, str], float] = {}
        self._framework_conns: dict[int, str] = {}
        self._counter = 0

    def _new_id(self, kind: str) -> str:
        self._counter += 1
        return f"{self.config.id_prefix}-{kind}{self._counter:04d}"

    # -- recovery -------------------------------------------------------------

    def recover(self, agents: dict[str, dict[str, Any]],
                frameworks: dict[str, dict[str, Any]], now: float) -> list[Action]:
        """Adopt a registry a previous leader wrote. Agents must re-register within the
        re-register timeout and frameworks re-subscribe within their failover timeout."""
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
                self.tasks[key] = Task(task_id=key[1], framework_id=key[0], agent_id=aid,
                                       resources=EMPTY, state="TASK_UNREACHABLE",
                                       recovering=True)
                agent.task_keys.add(key)
        return []

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
        for _, report in sorted(reported.items()):
            actions += self._adopt_task(agent, report, now)
        agent.used = _sum(self.tasks[k].resources for k in agent.task_keys)
        for fid in {k[0] for k in agent.task_keys}:
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
            actions.append(ToAgent(agent_id, KillTask(report.framework_id, report.task_id,
                                                      reason="REASON_AGENT_REMOVED")))
        actions.append(self._agent_entry(agent))
        return actions

    def _adopt_task(self, agent: Agent, report: AgentTaskReport, now: float) -> list[Action]:
        key = (report.framework_id, report.task_id)
        actions: list[Action] = []
        if report.framework_id not in self.frameworks:
            if report.framework_id in self.removed_frameworks:
                return [ToAgent(agent.agent_id, ShutdownFramework(report.framework_id))]
            self.frameworks[report.framework_id] = Framework(
                framework_id=report.framework_id, name="", role=report.framework_role or "*",
                principal="", failover_timeout=0.0, info=report.framework_info,
                registered_at=now, disconnected_at=now,
                grace=self.config.agent_reregister_timeout)
        task = self.tasks.get(key)
        if task is not None and task.agent_id != agent.agent_id:
            return []  # the same id on another agent: keep what we know
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
        actions.append(WriteAgent(agent.agent_id, None))
        return actions

    def agent_update(self, agent_id: str, status: Status, now: float) -> list[Action]:
        """A status update from an agent: record it and forward it to the framework."""
        agent = self.agents.get(agent_id)
        if agent is None or not agent.connected:
            return []
        agent.last_seen = now
        key = (status.framework_id, status.task_id)
        framework = self.frameworks.get(status.framework_id)
        if framework is None:
            # Nobody will acknowledge it: acknowledge for the departed framework.
            return [ToAgent(agent_id, Acknowledge(status.framework_id, status.task_id,
                                                  status.uuid))] if status.uuid else []
        actions: list[Action] = []
        self._unconfirmed.pop(key, None)
        task = self.tasks.get(key)
        if task is not None and task.agent_id == agent_id:
            task.reason, task.message = status.reason, status.message
            if status.healthy is not None:
                task.healthy = status.healthy
            if status.state in TERMINAL_STATES:
                actions += self._terminate(task, status, forward=False)
            else:
                task.state = status.state
        actions.append(ToFramework(status.framework_id, Update(status)))
        return actions

    # -- tasks ----------------------------------------------------------------

    def _charge(self, task: Task) -> None:
        """Count a launched task's resources as used by its agent and framework."""
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            agent.used = agent.used + task.resources
        framework = self.frameworks.get(task.framework_id)
        if framework is not None:
            framework.used = framework.used + _quantities(task.resources)

    def _uncharge(self, task: Task) -> None:
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            agent.used = agent.used - task.resources
        framework = self.frameworks.get(task.framework_id)
        if framework is not None:
            framework.used = framework.used - _quantities(task.resources)

    def _terminate(self, task: Task, status: Status, *, forward: bool = True) -> list[Action]:
        """Move a task to `completed` with `status`'s terminal state."""
        key = (task.framework_id, task.task_id)
        self._uncharge(task)
        task.state, task.reason, task.message = status.state, status.reason, status.message
        self.tasks.pop(key, None)
        self.completed[key] = task
        self.completed.move_to_end(key)
        while len(self.completed) > COMPLETED_KEPT:
            self.completed.popitem(last=False)
        actions: list[Action] = []
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            agent.task_keys.discard(key)
            actions.append(self._agent_entry(agent))
        if forward:
            actions.append(ToFramework(task.framework_id, Update(status)))
        return actions

    # -- frameworks -----------------------------------------------------------

    def subscribe(self, conn: int, framework_id: str, name: str, role: str, principal: str,
                  failover_timeout: float, info: bytes, now: float) -> list[Action]:
        """SUBSCRIBE on stream `conn`: a new framework, or a failover to this stream."""
        if framework_id in self.removed_frameworks:
            raise FailedPrecondition(f"framework {framework_id} was removed; subscribe "
                                     "with an empty id to register anew")
        actions: list[Action] = []
        framework = self.frameworks.get(framework_id) if framework_id else None
        if framework is None:
            framework_id = framework_id or self._new_id("fw")
            framework = Framework(framework_id=framework_id, name=name, role=role or "*",
                                  principal=principal, failover_timeout=failover_timeout,
                                  info=info, registered_at=now)
            self.frameworks[framework_id] = framework
            self._recharge(framework)
        else:
            if framework.conn is not None:
                self._framework_conns.pop(framework.conn, None)
                actions.append(CloseFrameworkConn(
                    framework.conn, "framework failed over to a new subscription"))
            actions += self._recover_offers(framework, rescind=False)
            framework.name, framework.principal = name, principal
            framework.role = role or framework.role
            framework.failover_timeout, framework.info = failover_timeout, info
        framework.conn, framework.disconnected_at, framework.grace = conn, None, 0.0
        framework.stream_id = self._new_id("stream")
        framework.suppressed = False
        self._framework_conns[conn] = framework_id
        actions.append(ToFramework(framework_id, Subscribed(framework_id, framework.stream_id)))
        actions.append(self._framework_entry(framework))
        return actions

    def _recharge(self, framework: Framework) -> None:
        framework.used = _sum(_quantities(t.resources) for k, t in self.tasks.items()
                              if k[0] == framework.framework_id)

    def framework_disconnected(self, conn: int, now: float) -> list[Action]:
        framework_id = self._framework_conns.pop(conn, None)
        framework = self.frameworks.get(framework_id or "")
        if framework is None or framework.conn != conn:
            return []
        framework.conn, framework.disconnected_at = None, now
        return self._recover_offers(framework, rescind=False)

    def _framework(self, framework_id: str, stream_id: str) -> Framework:
        framework = self.frameworks.get(framework_id)
        if framework is None:
            raise NotFound(f"unknown framework {framework_id!r}")
        if not framework.connected or framework.stream_id != stream_id:
            raise FailedPrecondition(
                f"stream {stream_id!r} is not framework {framework_id}'s current "
                "subscription; subscribe again")
        return framework

    def teardown(self, framework_id: str, stream_id: str, now: float) -> list[Action]:
        framework = self._framework(framework_id, stream_id)
        return self._remove_framework(framework, "framework torn down", now)

    def _remove_framework(self, framework: Framework, why: str, now: float) -> list[Action]:
        fid = framework.framework_id
        actions = self._recover_offers(framework, rescind=False)
        if framework.conn is not None:
            self._framework_conns.pop(framework.conn, None)
            actions.append(CloseFrameworkConn(framework.conn, why))
            framework.conn = None
        agents_with_tasks = set()
        for key in sorted(k for k in self.tasks if k[0] == fid):
            task = self.tasks[key]
            agents_with_tasks.add(task.agent_id)
            self._terminate(task, Status(task.task_id, fid, task.agent_id, "TASK_KILLED",
                                         reason="REASON_FRAMEWORK_REMOVED", message=why,
                                         timestamp=now), forward=False)
        for agent_id in sorted(agents_with_tasks):
            agent = self.agents.get(agent_id)
            if agent is not None:
                actions.append(ToAgent(agent_id, ShutdownFramework(fid)))
                actions.append(self._agent_entry(agent))
        del self.frameworks[fid]
        self.removed_frameworks.add(fid)
        self.filters.clear(fid)
        actions.append(WriteFramework(fid, None))
        return actions

    def suppress(self, framework_id: str, stream_id: str) -> list[Action]:
        self._framework(framework_id, stream_id).suppressed = True
        return []

    def revive(self, framework_id: str, stream_id: str) -> list[Action]:
        framework = self._framework(framework_id, stream_id)
        framework.suppressed = False
        self.filters.clear(framework_id)
        return []

    # -- offers ---------------------------------------------------------------

    def allocate(self, now: float) -> list[Action]:
        """One offer cycle: each agent's free resources to one framework, DRF order."""
        self.filters.expire(now)
        supplies = [AgentSupply(a.agent_id, a.free) for _, a in sorted(self.agents.items())
                    if a.connected]
        if not supplies:
            return []
        demands = [FrameworkDemand(f.framework_id, f.role, f.used + f.offered, f.suppressed)
                   for _, f in sorted(self.frameworks.items()) if f.connected]
        if not demands:
            return []
        grants = allocate(supplies, demands, self.total(), self.filters, now)
        by_framework: dict[str, list[Offer]] = {}
        for grant in grants:
            offer = Offer(self._new_id("offer"), grant.framework_id, grant.agent_id,
                          grant.resources, now)
            self.offers[offer.offer_id] = offer
            agent = self.agents[grant.agent_id]
            agent.offered = agent.offered + grant.resources
            framework = self.frameworks[grant.framework_id]
            framework.offered = framework.offered + _quantities(grant.resources)
            by_framework.setdefault(grant.framework_id, []).append(offer)
        actions: list[Action] = []
        for fid, offers in sorted(by_framework.items()):
            agents = [self.agents[o.agent_id] for o in offers]
            actions.append(ToFramework(fid, Offers(
                tuple(offers), tuple(dict(a.attributes) for a in agents),
                tuple(a.hostname for a in agents))))
        return actions

    def total(self) -> Resources:
        """The sum of the connected agents' totals (the DRF denominator)."""
        return _sum(a.total for a in self.agents.values() if a.connected)

    def _drop_offer(self, offer: Offer) -> None:
        self.offers.pop(offer.offer_id, None)
        agent = self.agents.get(offer.agent_id)
        if agent is not None:
            agent.offered = agent.offered - offer.resources
        framework = self.frameworks.get(offer.framework_id)
        if framework is not None:
            framework.offered = framework.offered - _quantities(offer.resources)

    def _rescind_agent_offers(self, agent: Agent) -> list[Action]:
        actions: list[Action] = []
        for offer in [o for o in self.offers.values() if o.agent_id == agent.agent_id]:
            self._drop_offer(offer)
            actions.append(ToFramework(offer.framework_id, Rescind(offer.offer_id)))
        return actions

    def _recover_offers(self, framework: Framework, *, rescind: bool) -> list[Action]:
        actions: list[Action] = []
        for offer in [o for o in self.offers.values()
                      if o.framework_id == framework.framework_id]:
            self._drop_offer(offer)
            if rescind:
                actions.append(ToFramework(offer.framework_id, Rescind(offer.offer_id)))
        return actions

    def _offers_of(self, framework: Framework, offer_ids: Sequence[str]) -> list[Offer]:
        if not offer_ids:
            raise InvalidArgument("no offer ids given")
        if len(set(offer_ids)) != len(offer_ids):
            raise InvalidArgument("an offer id is given twice")
        offers = []
        for offer_id in offer_ids:
            offer = self.offers.get(offer_id)
            if offer is None:
                raise NotFound(f"unknown offer {offer_id!r} (rescinded, declined or used)")
            if offer.framework_id != framework.framework_id:
                raise InvalidArgument(f"offer {offer_id!r} was made to another framework")
            offers.append(offer)
        if len({o.agent_id for o in offers}) > 1:
            raise InvalidArgument("offers come from more than one agent")
        return offers

    def decline(self, framework_id: str, stream_id: str, offer_ids: Sequence[str],
                refuse_seconds: float | None, now: float) -> list[Action]:
        """Return offers; unknown ids are ignored (the offer may have been rescinded)."""
        framework = self._framework(framework_id, stream_id)
        refuse = DEFAULT_REFUSE_SECONDS if refuse_seconds is None else refuse_seconds
        for offer_id in offer_ids:
            offer = self.offers.get(offer_id)
            if offer is None or offer.framework_id != framework.framework_id:
                continue
            self._drop_offer(offer)
            if refuse > 0:
                self.filters.refuse(framework_id, offer.agent_id, now + refuse,
                                    offer.resources)
        return []

    def accept(self, framework_id: str, stream_id: str, offer_ids: Sequence[str],
               operations: Sequence[Operation], refuse_seconds: float | None,
               now: float) -> list[Action]:
        """ACCEPT, validated as a whole: either every operation applies or nothing does."""
        framework = self._framework(framework_id, stream_id)
        offers = self._offers_of(framework, offer_ids)
        agent = self.agents.get(offers[0].agent_id)
        if agent is None or not agent.connected:
            raise NotFound(f"unknown agent {offers[0].agent_id!r} (gone or unreachable)")
        available = EMPTY
        for offer in offers:
            available = available + offer.resources
        total = agent.total
        launches: list[TaskSpec] = []
        seen: set[str] = set()
        for op in operations:
            try:
                if isinstance(op, Launch):
                    for spec in op.tasks:
                        self._check_task(framework, agent, spec, available, seen)
                        available = available - spec.resources
                        seen.add(spec.task_id)
                        launches.append(spec)
                    continue
                if isinstance(op, Reserve):
                    self._check_role(framework, op.resources, "RESERVE")
                    available = reserve(available, op.resources, framework.role,
                                        framework.principal)
                    total = reserve(total, op.resources, framework.role, framework.principal)
                elif isinstance(op, Unreserve):
                    self._check_role(framework, op.resources, "UNRESERVE")
                    available = unreserve(available, op.resources)
                    total = unreserve(total, op.resources)
                elif isinstance(op, Create):
                    self._check_role(framework, op.volumes, "CREATE")
                    available = create_volumes(available, op.volumes)
                    total = create_volumes(total, op.volumes)
                else:
                    self._check_role(framework, op.volumes, "DESTROY")
                    available = destroy_volumes(available, op.volumes)
                    total = destroy_volumes(total, op.volumes)
            except ResourceError as exc:
                raise InvalidArgument(str(exc)) from exc
        # Validated: commit.
        actions: list[Action] = []
        for offer in offers:
            self._drop_offer(offer)
        if total != agent.total:
            agent.total = total
            actions.append(ToAgent(agent.agent_id, CheckpointResources(total)))
        for spec in launches:
            task = Task(task_id=spec.task_id, framework_id=framework_id,
                        agent_id=agent.agent_id, resources=spec.resources,
                        state="TASK_STAGING", info=spec.info)
            key = (framework_id, spec.task_id)
            self.completed.pop(key, None)
            self.tasks[key] = task
            agent.task_keys.add(key)
            self._charge(task)
            actions.append(ToAgent(agent.agent_id, RunTask(
                framework.info, spec.info, framework_id, spec.task_id)))
        if launches:
            actions.append(self._agent_entry(agent))
        refuse = DEFAULT_REFUSE_SECONDS if refuse_seconds is None else refuse_seconds
        if refuse > 0 and not available.is_empty():
            self.filters.refuse(framework_id, agent.agent_id, now + refuse, available)
        return actions

    def _check_task(self, framework: Framework, agent: Agent, spec: TaskSpec,
                    available: Resources, seen: set[str]) -> None:
        if not spec.task_id:
            raise InvalidArgument("a task has an empty task id")
        if spec.agent_id and spec.agent_id != agent.agent_id:
            if spec.agent_id not in self.agents:
                raise NotFound(f"task {spec.task_id}: unknown agent {spec.agent_id!r}")
            raise InvalidArgument(f"task {spec.task_id}: agent {spec.agent_id} is not the "
                                  f"offers' agent {agent.agent_id}")
        if spec.task_id in seen or (framework.framework_id, spec.task_id) in self.tasks:
            raise InvalidArgument(f"task id {spec.task_id!r} is already used by a "
                                  "non-terminal task of this framework")
        if spec.resources.is_empty():
            raise InvalidArgument(f"task {spec.task_id} asks for no resources")
        if not available.contains(spec.resources):
            raise InvalidArgument(f"task {spec.task_id} asks for {spec.resources}; the "
                                  f"offers have {available} left")

    @staticmethod
    def _check_role(framework: Framework, resources: Resources, what: str) -> None:
        for item in resources:
            if item.role not in ("", "*", framework.role):
                raise InvalidArgument(f"{what}: role {item.role!r} is not the framework's "
                                      f"role {framework.role!r}")

    # -- task calls -----------------------------------------------------------

    def kill(self, framework_id: str, stream_id: str, task_id: str, agent_id: str,
             grace_period: float, now: float) -> list[Action]:
        self._framework(framework_id, stream_id)
        key = (framework_id, task_id)
        task = self.tasks.get(key)
        if task is None:
            done = self.completed.get(key)
            if done is None:
                raise NotFound(f"unknown task {task_id!r}")
            return [ToFramework(framework_id, Update(Status(
                task_id, framework_id, done.agent_id, done.state, reason=done.reason,
                message=done.message, timestamp=now)))]
        return [ToAgent(task.agent_id, KillTask(framework_id, task_id, grace_period))]

    def acknowledge(self, framework_id: str, stream_id: str, agent_id: str, task_id: str,
                    uuid: bytes) -> list[Action]:
        """Forward to the agent; it stops retrying that update and sends the next."""
        self._framework(framework_id, stream_id)
        if not uuid:
            raise InvalidArgument("acknowledge needs the update's uuid (master-made "
                                  "updates carry none and need no acknowledgement)")
        agent = self.agents.get(agent_id)
        if agent is None or not agent.connected:
            return []  # it resends the update when it is back
        return [ToAgent(agent_id, Acknowledge(framework_id, task_id, uuid))]

    def reconcile(self, framework_id: str, stream_id: str,
                  tasks: Sequence[tuple[str, str]], now: float) -> list[Action]:
        """Implicit (no tasks): an UPDATE for every task the master knows of the framework.
        Explicit: one per named task, TASK_UNKNOWN for those it knows nothing of; tasks
        of agents that have not re-registered after a master failover get no answer."""
        self._framework(framework_id, stream_id)
        if not tasks:
            keys = [k for k in sorted(self.tasks) if k[0] == framework_id]
            tasks = [(k[1], "") for k in keys]
        actions: list[Action] = []
        for task_id, agent_id in tasks:
            key = (framework_id, task_id)
            task = self.tasks.get(key) or self.completed.get(key)
            if task is not None and task.recovering:
                continue
            if task is None:
                actions.append(ToFramework(framework_id, Update(Status(
                    task_id, framework_id, agent_id, "TASK_UNKNOWN",
                    reason="REASON_RECONCILIATION", message="the master knows no such task",
                    timestamp=now))))
                continue
            actions.append(ToFramework(framework_id, Update(Status(
                task_id, framework_id, task.agent_id, task.state,
                reason="REASON_RECONCILIATION", message=task.message, timestamp=now,
                healthy=task.healthy))))
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

    # -- registry -------------------------------------------------------------

    def _agent_entry(self, agent: Agent) -> WriteAgent:
        return WriteAgent(agent.agent_id, {
            "hostname": agent.hostname, "address": agent.address,
            "attributes": dict(agent.attributes), "registered_at": agent.registered_at,
            "tasks": [{"framework_id": f, "task_id": t} for f, t in sorted(agent.task_keys)],
        })

    def _framework_entry(self, framework: Framework) -> WriteFramework:
        return WriteFramework(framework.framework_id, {
            "name": framework.name, "role": framework.role, "principal": framework.principal,
            "failover_timeout": framework.failover_timeout,
            "registered_at": framework.registered_at,
            "info": base64.b64encode(framework.info).decode(),
        })

    # -- views ----------------------------------------------------------------

    def framework_tasks(self, framework_id: str) -> Iterable[Task]:
        return (t for k, t in sorted(self.tasks.items()) if k[0] == framework_id)


def _plain(resources: Resources) -> Resources:
    """`resources` as unreserved capacity: no roles, no volumes."""
    return Resources.of(Resource(r.name, r.scalar, r.ranges) for r in resources)


def _quantities(resources: Resources) -> Resources:
    """The scalar part of `resources`: what adds up across agents (ports do not: the same
    port on two agents is two resources, but one range once summed)."""
    return Resources.of(item for item in resources if not item.ranges)


def _sum(items: Iterable[Resources]) -> Resources:
    total = EMPTY
    for item in items:
        total = total + item
    return total

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
]
