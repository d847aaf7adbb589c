"""Dominant resource fairness: which framework each agent's free resources are offered to.

A miniature of Mesos's hierarchical allocator, called by the master once per allocation
cycle with a snapshot of who has what. Pure: never does I/O, never reads a clock (`now` is
an argument), and the same arguments always give the same grants.

Invariants of `allocate`:
- a grant holds exactly what the agent has free that is allocatable to the framework's role
  (unreserved plus reserved for that role), so grants never exceed an agent's free
  resources and reserved resources only go to their role;
- each agent's free resources go to at most one framework per cycle;
- agents are visited in id order; each goes to the eligible framework with the lowest
  dominant share (ties: lowest framework id), and that framework's share is recomputed
  with the grant before the next agent;
- suppressed frameworks, and frameworks whose filter covers what the agent has for them,
  get nothing; an agent with nothing worth offering (under MIN_CPUS cpus and under
  MIN_MEM mem) is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scheduler.resources import Resources

# Below both of these an agent's leftovers are not worth an offer (as in Mesos).
MIN_CPUS = 0.01
MIN_MEM = 32.0


@dataclass(frozen=True)
class FrameworkDemand:
    """A framework as the allocator sees it.

    `allocated` is what it uses plus what it holds in outstanding offers.
    """

    framework_id: str
    role: str
    allocated: Resources
    suppressed: bool = False


@dataclass(frozen=True)
class AgentSupply:
    """An agent's free resources: its total minus used minus offered."""

    agent_id: str
    free: Resources


@dataclass(frozen=True)
class Grant:
    """Offer `resources` of `agent_id` to `framework_id`."""

    framework_id: str
    agent_id: str
    resources: Resources


@dataclass(frozen=True)
class _Filter:
    until: float
    # None: everything on the agent; otherwise only offers within these resources.
    resources: Resources | None


class OfferFilters:
    """Refusals by (framework, agent) with an expiry: what DECLINE and ACCEPT leave behind.

    A filter made with `resources` only holds while what the agent could offer the
    framework is within them, so resources freed later on that agent lift it (as in Mesos).
    The only mutable object of this module; the master owns one.
    """

    def __init__(self) -> None:
        self._filters: dict[tuple[str, str], _Filter] = {}

    def refuse(
        self,
        framework_id: str,
        agent_id: str,
        until: float,
        resources: Resources | None = None,
    ) -> None:
        """Refuse offers from `agent_id` to `framework_id` until `until` (replaces any)."""
        self._filters[(framework_id, agent_id)] = _Filter(until, resources)

    def refused(
        self,
        framework_id: str,
        agent_id: str,
        now: float,
        offerable: Resources | None = None,
    ) -> bool:
        """Whether an offer of `offerable` (default: anything) is filtered at `now`."""
        f = self._filters.get((framework_id, agent_id))
        if f is None or f.until <= now:
            return False
        if f.resources is None or offerable is None:
            return True
        return f.resources.contains(offerable)

    def clear(self, framework_id: str) -> None:
        """Drop every filter of a framework (REVIVE, or the framework is gone)."""
        for key in [k for k in self._filters if k[0] == framework_id]:
            del self._filters[key]

    def forget_agent(self, agent_id: str) -> None:
        """Drop every filter on an agent that is gone."""
        for key in [k for k in self._filters if k[1] == agent_id]:
            del self._filters[key]

    def expire(self, now: float) -> None:
        """Drop the filters that no longer hold at `now`."""
        for key in [k for k, f in self._filters.items() if f.until <= now]:
            del self._filters[key]

    def __len__(self) -> int:
        return len(self._filters)


def worth_offering(r: Resources) -> bool:
    """Whether `r` is enough to make an offer of (at least MIN_CPUS cpus or MIN_MEM mem)."""
    return r.scalar("cpus") >= MIN_CPUS or r.scalar("mem") >= MIN_MEM


def dominant_shares(frameworks: Iterable[FrameworkDemand], total: Resources) -> dict[str, float]:
    """Each framework's dominant share of `total` (for the operator view)."""
    return {f.framework_id: f.allocated.dominant_share(total) for f in frameworks}


def allocate(
    agents: Sequence[AgentSupply],
    frameworks: Sequence[FrameworkDemand],
    total: Resources,
    filters: OfferFilters,
    now: float,
) -> list[Grant]:
    """One allocation cycle: the grants to turn into offers, in the order they were made."""
    candidates = sorted((f for f in frameworks if not f.suppressed), key=lambda f: f.framework_id)
    allocated = {f.framework_id: f.allocated for f in candidates}
    shares = {f.framework_id: f.allocated.dominant_share(total) for f in candidates}
    grants: list[Grant] = []
    for agent in sorted(agents, key=lambda a: a.agent_id):
        by_role: dict[str, Resources] = {}
        best: tuple[float, str] | None = None
        best_offer = Resources()
        for f in candidates:
            offerable = by_role.get(f.role)
            if offerable is None:
                offerable = by_role[f.role] = agent.free.allocatable_to(f.role)
            if not worth_offering(offerable):
                continue
            if filters.refused(f.framework_id, agent.agent_id, now, offerable):
                continue
            rank = (shares[f.framework_id], f.framework_id)
            if best is None or rank < best:
                best, best_offer = rank, offerable
        if best is None:
            continue
        framework_id = best[1]
        allocated[framework_id] = allocated[framework_id] + best_offer
        shares[framework_id] = allocated[framework_id].dominant_share(total)
        grants.append(Grant(framework_id, agent.agent_id, best_offer))
    return grants
