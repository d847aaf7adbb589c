"""The framework API of the master's state machine: SUBSCRIBE (and failover), TEARDOWN,
SUPPRESS, REVIVE, the offer cycle, DECLINE, ACCEPT (validated by `scheduler.offers`),
KILL, ACKNOWLEDGE, RECONCILE. Never does I/O.

Every call names the framework and its current stream id; a refused call raises
`CallError` before anything changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.allocator import AgentSupply, FrameworkDemand, allocate
from scheduler.master_books import Books, quantities
from scheduler.master_records import (
    DEFAULT_REFUSE_SECONDS,
    Acknowledge,
    Action,
    CheckpointResources,
    CloseFrameworkConn,
    FailedPrecondition,
    Framework,
    InvalidArgument,
    KillTask,
    NotFound,
    Offer,
    Offers,
    Operation,
    RunTask,
    ShutdownFramework,
    Status,
    Subscribed,
    Task,
    ToAgent,
    ToFramework,
    Update,
    WriteFramework,
    tombstone,
)
from scheduler.offers import offers_of, plan_accept


class FrameworkCalls(Books):
    """What frameworks ask of the master."""

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
            self._recover_offers(framework)
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

    def framework_disconnected(self, conn: int, now: float) -> list[Action]:
        framework_id = self._framework_conns.pop(conn, None)
        framework = self.frameworks.get(framework_id or "")
        if framework is None or framework.conn != conn:
            return []
        framework.conn, framework.disconnected_at = None, now
        self._recover_offers(framework)
        return []

    def teardown(self, framework_id: str, stream_id: str, now: float) -> list[Action]:
        framework = self._framework(framework_id, stream_id)
        return self._remove_framework(framework, "framework torn down", now)

    def _remove_framework(self, framework: Framework, why: str, now: float) -> list[Action]:
        fid = framework.framework_id
        self._recover_offers(framework)
        actions: list[Action] = []
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
            holder = self.agents.get(task.agent_id)
            if holder is not None and holder.connected:
                # Its process lives until the agent has killed it: its ports stay taken.
                holder.doomed[key] = task.resources
                holder.used = holder.used + task.resources
        for agent_id in sorted(agents_with_tasks):
            agent = self.agents.get(agent_id)
            if agent is not None:
                actions.append(ToAgent(agent_id, ShutdownFramework(fid)))
                actions.append(self._agent_entry(agent))
        del self.frameworks[fid]
        self.removed_frameworks.add(fid)
        self.filters.clear(fid)
        actions.append(WriteFramework(fid, tombstone(now)))
        return actions

    def suppress(self, framework_id: str, stream_id: str) -> list[Action]:
        self._framework(framework_id, stream_id).suppressed = True
        return []

    def revive(self, framework_id: str, stream_id: str) -> list[Action]:
        framework = self._framework(framework_id, stream_id)
        framework.suppressed = False
        self.filters.clear(framework_id)
        return []

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
            framework.offered = framework.offered + quantities(grant.resources)
            by_framework.setdefault(grant.framework_id, []).append(offer)
        actions: list[Action] = []
        for fid, offers in sorted(by_framework.items()):
            agents = [self.agents[o.agent_id] for o in offers]
            actions.append(ToFramework(fid, Offers(
                tuple(offers), tuple(dict(a.attributes) for a in agents),
                tuple(a.hostname for a in agents))))
        return actions

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
        """ACCEPT, validated as a whole (`scheduler.offers`): every operation applies or
        nothing does."""
        framework = self._framework(framework_id, stream_id)
        offers = offers_of(framework, self.offers, offer_ids)
        agent = self.agents.get(offers[0].agent_id)
        if agent is None or not agent.connected:
            raise NotFound(f"unknown agent {offers[0].agent_id!r} (gone or unreachable)")
        plan = plan_accept(
            framework, agent, offers, operations,
            task_id_used=lambda t: (framework_id, t) in self.tasks
            or (framework_id, t) in self.completed,
            agent_known=lambda a: a in self.agents)
        actions: list[Action] = []
        for offer in offers:
            self._drop_offer(offer)
        if plan.total != agent.total:
            agent.total = plan.total
            actions.append(ToAgent(agent.agent_id, CheckpointResources(plan.total)))
        for spec in plan.launches:
            task = Task(task_id=spec.task_id, framework_id=framework_id,
                        agent_id=agent.agent_id, resources=spec.resources,
                        state="TASK_STAGING", info=spec.info)
            key = (framework_id, spec.task_id)
            self.tasks[key] = task
            agent.task_keys.add(key)
            self._charge(task)
            actions.append(ToAgent(agent.agent_id, RunTask(
                framework.info, spec.info, framework_id, spec.task_id)))
        if plan.launches:
            actions.append(self._agent_entry(agent))
        refuse = DEFAULT_REFUSE_SECONDS if refuse_seconds is None else refuse_seconds
        if refuse > 0 and not plan.left.is_empty():
            self.filters.refuse(framework_id, agent.agent_id, now + refuse, plan.left)
        return actions

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
        # Kept on the task: if the agent is away the message is dropped, and it is sent
        # again when the agent re-registers.
        task.kill = KillTask(framework_id, task_id, grace_period)
        return [ToAgent(task.agent_id, task.kill)]

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
