"""The master's books: the records the leading master keeps (agents, frameworks, tasks,
offers, filters) and the bookkeeping every decision shares: charging a task's resources
to its agent and framework, ending a task, dropping an offer, the registry entries.
Never does I/O.

`scheduler.framework_calls` adds the framework API on top, `scheduler.state` the agents'
events, recovery and time; `MasterState` is the whole machine.

Invariants (kept by every method here and above):
- an agent's `used` is the sum of its non-terminal tasks' resources and of its doomed
  ones (`Agent.doomed`), `offered` the sum of its outstanding offers, and `used + offered`
  is contained in its `total`; a framework's `used`/`offered` are the scalar parts of the
  same sums over its tasks and offers;
- a task is in at most one of `tasks` (non-terminal) and `completed` (terminal, bounded).
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Iterable

from scheduler.allocator import OfferFilters
from scheduler.master_records import (
    COMPLETED_KEPT,
    EMPTY,
    Action,
    Agent,
    FailedPrecondition,
    Framework,
    NotFound,
    Offer,
    Rescind,
    StateConfig,
    Status,
    Task,
    ToFramework,
    Update,
    WriteAgent,
    WriteFramework,
)
from scheduler.resources import Resources


class Books:
    """The leading master's records and the bookkeeping shared by its decisions."""

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


    def _charge(self, task: Task) -> None:
        """Count a launched task's resources as used by its agent and framework."""
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            agent.used = agent.used + task.resources
        framework = self.frameworks.get(task.framework_id)
        if framework is not None:
            framework.used = framework.used + quantities(task.resources)

    def _uncharge(self, task: Task) -> None:
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            agent.used = agent.used - task.resources
        framework = self.frameworks.get(task.framework_id)
        if framework is not None:
            framework.used = framework.used - quantities(task.resources)

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

    def _recharge(self, framework: Framework) -> None:
        framework.used = summed(quantities(t.resources) for k, t in self.tasks.items()
                                if k[0] == framework.framework_id)

    def _framework(self, framework_id: str, stream_id: str) -> Framework:
        framework = self.frameworks.get(framework_id)
        if framework is None:
            raise NotFound(f"unknown framework {framework_id!r}")
        if not framework.connected or framework.stream_id != stream_id:
            raise FailedPrecondition(
                f"stream {stream_id!r} is not framework {framework_id}'s current "
                "subscription; subscribe again")
        return framework

    def total(self) -> Resources:
        """The sum of the connected agents' totals (the DRF denominator)."""
        return summed(a.total for a in self.agents.values() if a.connected)

    def _drop_offer(self, offer: Offer) -> None:
        self.offers.pop(offer.offer_id, None)
        agent = self.agents.get(offer.agent_id)
        if agent is not None:
            agent.offered = agent.offered - offer.resources
        framework = self.frameworks.get(offer.framework_id)
        if framework is not None:
            framework.offered = framework.offered - quantities(offer.resources)

    def _rescind_agent_offers(self, agent: Agent) -> list[Action]:
        actions: list[Action] = []
        for offer in [o for o in self.offers.values() if o.agent_id == agent.agent_id]:
            self._drop_offer(offer)
            actions.append(ToFramework(offer.framework_id, Rescind(offer.offer_id)))
        return actions

    def _recover_offers(self, framework: Framework) -> None:
        """Take back every offer the framework holds (it is gone: nothing to rescind)."""
        for offer in [o for o in self.offers.values()
                      if o.framework_id == framework.framework_id]:
            self._drop_offer(offer)

    # -- registry -------------------------------------------------------------

    def _agent_entry(self, agent: Agent) -> WriteAgent:
        return WriteAgent(agent.agent_id, {
            "hostname": agent.hostname, "address": agent.address,
            "attributes": dict(agent.attributes), "registered_at": agent.registered_at,
            "tasks": [{"framework_id": f, "task_id": t} for f, t in sorted(agent.task_keys)],
            "doomed": [{"framework_id": f, "task_id": t} for f, t in sorted(agent.doomed)],
        })

    def _framework_entry(self, framework: Framework) -> WriteFramework:
        return WriteFramework(framework.framework_id, {
            "name": framework.name, "role": framework.role, "principal": framework.principal,
            "failover_timeout": framework.failover_timeout,
            "registered_at": framework.registered_at,
            "info": base64.b64encode(framework.info).decode(),
        })

    # -- views ----------------------------------------------------------------




def quantities(resources: Resources) -> Resources:
    """The scalar part of `resources`: what adds up across agents (ports do not: the same
    port on two agents is two resources, but one range once summed)."""
    return Resources.of(item for item in resources if not item.ranges)


def summed(items: Iterable[Resources]) -> Resources:
    total = EMPTY
    for item in items:
        total = total + item
    return total

