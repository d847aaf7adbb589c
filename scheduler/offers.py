"""ACCEPT, validated whole: what a framework's operations on its offers would do, worked
out without changing anything. Pure: never does I/O, never mutates its arguments.

`plan_accept` checks the offers (they exist, are the caller's, come from one agent) and
applies the operations in order to what the offers hold and to the agent's total (each
must fit what the previous ones left; task ids are unused), then returns the outcome for
`scheduler.state.MasterState.accept` to commit. Any refusal raises `CallError` first, so
a refused ACCEPT changes nothing and its offers stay valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scheduler.master_books import summed
from scheduler.master_records import (
    Agent,
    Create,
    Framework,
    InvalidArgument,
    Launch,
    NotFound,
    Offer,
    Operation,
    Reserve,
    TaskSpec,
    Unreserve,
)
from scheduler.resources import (
    UNRESERVED,
    ResourceError,
    Resources,
    create_volumes,
    destroy_volumes,
    reserve,
    unreserve,
)


@dataclass(frozen=True)
class AcceptPlan:
    launches: tuple[TaskSpec, ...]
    total: Resources  # the agent's total after RESERVE, UNRESERVE, CREATE, DESTROY
    left: Resources  # what the offers hold that no operation took


def offers_of(framework: Framework, offers: Mapping[str, Offer],
              offer_ids: Sequence[str]) -> list[Offer]:
    """The named offers: all outstanding, made to `framework`, from one agent."""
    if not offer_ids:
        raise InvalidArgument("no offer ids given")
    if len(set(offer_ids)) != len(offer_ids):
        raise InvalidArgument("an offer id is given twice")
    found = []
    for offer_id in offer_ids:
        offer = offers.get(offer_id)
        if offer is None:
            raise NotFound(f"unknown offer {offer_id!r} (rescinded, declined or used)")
        if offer.framework_id != framework.framework_id:
            raise InvalidArgument(f"offer {offer_id!r} was made to another framework")
        found.append(offer)
    if len({o.agent_id for o in found}) > 1:
        raise InvalidArgument("offers come from more than one agent")
    return found


def plan_accept(framework: Framework, agent: Agent, offers: Sequence[Offer],
                operations: Sequence[Operation], *, task_id_used: Callable[[str], bool],
                agent_known: Callable[[str], bool]) -> AcceptPlan:
    """Apply `operations` to `offers` of `agent` on paper. `task_id_used(id)`: whether the
    framework has used that task id before; `agent_known(id)`: whether an agent exists."""
    available = summed(o.resources for o in offers)
    total = agent.total
    launches: list[TaskSpec] = []
    seen: set[str] = set()
    for op in operations:
        try:
            if isinstance(op, Launch):
                for spec in op.tasks:
                    _check_task(agent, spec, available,
                                lambda t: t in seen or task_id_used(t), agent_known)
                    available = available - spec.resources
                    seen.add(spec.task_id)
                    launches.append(spec)
                continue
            if isinstance(op, Reserve):
                _check_role(framework, op.resources, "RESERVE")
                available = reserve(available, op.resources, framework.role,
                                    framework.principal)
                total = reserve(total, op.resources, framework.role, framework.principal)
            elif isinstance(op, Unreserve):
                _check_role(framework, op.resources, "UNRESERVE")
                available = unreserve(available, op.resources)
                total = unreserve(total, op.resources)
            elif isinstance(op, Create):
                _check_role(framework, op.volumes, "CREATE")
                available = create_volumes(available, op.volumes)
                total = create_volumes(total, op.volumes)
            else:
                _check_role(framework, op.volumes, "DESTROY")
                available = destroy_volumes(available, op.volumes)
                total = destroy_volumes(total, op.volumes)
        except ResourceError as exc:
            raise InvalidArgument(str(exc)) from exc
    return AcceptPlan(tuple(launches), total, available)


MAX_ID_LENGTH = 255


def valid_id(ident: str) -> bool:
    """Whether a framework or task id can name a directory of its own (an agent keeps a
    task's sandbox and checkpoint under its ids): not empty, at most 255 characters, no
    '/' or NUL, not '.' or '..' (as Mesos requires of task ids)."""
    return (0 < len(ident) <= MAX_ID_LENGTH and "/" not in ident and "\0" not in ident
            and ident not in (".", ".."))


def _check_task(agent: Agent, spec: TaskSpec, available: Resources,
                task_id_used: Callable[[str], bool], agent_known: Callable[[str], bool]) -> None:
    if not spec.task_id:
        raise InvalidArgument("a task has an empty task id")
    if not valid_id(spec.task_id):
        raise InvalidArgument(f"task id {spec.task_id[:64]!r} cannot name a sandbox: ids are "
                              f"1..{MAX_ID_LENGTH} characters, without '/' or NUL, not '.' "
                              "or '..'")
    if spec.agent_id and spec.agent_id != agent.agent_id:
        if not agent_known(spec.agent_id):
            raise NotFound(f"task {spec.task_id}: unknown agent {spec.agent_id!r}")
        raise InvalidArgument(f"task {spec.task_id}: agent {spec.agent_id} is not the "
                              f"offers' agent {agent.agent_id}")
    if task_id_used(spec.task_id):
        # Never reused, even once terminal: an agent may still resend the old task's
        # updates, which would then be taken for the new one's (Mesos refuses too).
        raise InvalidArgument(f"task id {spec.task_id!r} is already used by this "
                              "framework; task ids are not reused")
    if spec.resources.is_empty():
        raise InvalidArgument(f"task {spec.task_id} asks for no resources")
    if not available.contains(spec.resources):
        raise InvalidArgument(f"task {spec.task_id} asks for {spec.resources}; the "
                              f"offers have {available} left")


def _check_role(framework: Framework, resources: Resources, what: str) -> None:
    for item in resources:
        if item.role not in (UNRESERVED, framework.role):
            raise InvalidArgument(f"{what}: role {item.role!r} is not the framework's "
                                  f"role {framework.role!r}")
