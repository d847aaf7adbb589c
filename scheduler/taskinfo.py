"""TaskInfo, the task a framework launches: built from an offer by a framework (`task`,
`fits`, `offered`), read back into the executor's `TaskSpec` by the agent (`task_spec`).

No I/O of its own (it only translates). Invariants:
- `task` takes resources only from its offer, beyond what the tasks already `placed` in
  the same offer hold (distinct ports), and raises ValueError when the task does not fit;
- `task_spec` accepts only ids that can name a sandbox directory and resources that
  parse, raising ValueError (ResourceError) otherwise: the agent reports such a task
  TASK_FAILED / REASON_INVALID and launches nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scheduler.executor import TaskSpec, VolumeMount, expand_ports
from scheduler.health import HealthSpec
from scheduler.offers import valid_id
from scheduler.resources import UNRESERVED, Range, Resource, Resources
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.wire import resources_from_pb, resources_to_pb

__all__ = ["fits", "offered", "task", "task_spec"]


# -- frameworks: tasks from offers -----------------------------------------------------


def _left(offer: pb.Offer, placed: Sequence[pb.TaskInfo]) -> Resources:
    """What `offer` holds (volumes aside) beyond the tasks already `placed` in it."""
    left = resources_from_pb(offer.resources).without_volumes()
    for info in placed:
        left = left - resources_from_pb(info.resources).without_volumes()
    return left


def _port_count(left: Resources) -> int:
    return sum(r.end - r.begin + 1 for r in left.ranges("ports"))


def fits(offer: pb.Offer, *, cpus: float = 0.0, mem: float = 0.0, disk: float = 0.0,
         ports: int = 0, placed: Sequence[pb.TaskInfo] = ()) -> bool:
    """Whether a task of this shape fits in what `offer` holds beyond the tasks `placed`
    in it already."""
    left = _left(offer, placed)
    eps = 1e-9
    return (cpus <= left.scalar("cpus") + eps and mem <= left.scalar("mem") + eps
            and disk <= left.scalar("disk") + eps and ports <= _port_count(left))


def _role_of(offer: pb.Offer, name: str) -> str:
    """The role a task should ask for `name` with: reserved if the offer has it so."""
    for r in offer.resources:
        if r.name == name and r.role not in ("", UNRESERVED) and not r.HasField("volume"):
            return r.role
    return UNRESERVED


def task(
    task_id: str,
    offer: pb.Offer,
    argv: Sequence[str],
    *,
    cpus: float = 0.1,
    mem: float = 32.0,
    disk: float = 0.0,
    ports: int = 0,
    env: Mapping[str, str] | None = None,
    volume: pb.Resource | None = None,
    name: str = "",
    health_check: pb.HealthCheck | None = None,
    kill_grace_period_seconds: float = 0.0,
    labels: Mapping[str, str] | None = None,
    placed: Sequence[pb.TaskInfo] = (),
) -> pb.TaskInfo:
    """A TaskInfo for `argv` on `offer`'s agent, with resources taken from the offer.

    Ports are the lowest `ports` ones the offer holds that no task in `placed` (tasks
    already carved out of the same offer) uses. Scalars take the role the offer reserves
    them for, if any. `volume` is a persistent-volume disk resource from the offer.
    Raises ValueError if the task does not fit.
    """
    if not fits(offer, cpus=cpus, mem=mem, disk=disk, ports=ports, placed=placed):
        raise ValueError(
            f"task {task_id} (cpus {cpus}, mem {mem}, disk {disk}, {ports} ports) does not "
            f"fit in offer {offer.offer_id} from agent {offer.agent_id}")
    items = [Resource(n, v, role=_role_of(offer, n))
             for n, v in (("cpus", cpus), ("mem", mem), ("disk", disk)) if v > 0]
    if ports:
        chosen = _left(offer, placed).first_ports(ports)
        items.append(Resource("ports", ranges=tuple(Range(p, p) for p in chosen),
                              role=_role_of(offer, "ports")))
    resources = resources_to_pb(Resources.of(items))
    if volume is not None:
        resources.append(volume)
    info = pb.TaskInfo(
        task_id=task_id, name=name or task_id, agent_id=offer.agent_id,
        resources=resources,
        command=pb.CommandInfo(argv=list(argv), environment=dict(env or {})),
        kill_grace_period_seconds=kill_grace_period_seconds,
        labels=dict(labels or {}),
    )
    if health_check is not None:
        info.health_check.CopyFrom(health_check)
    return info


def offered(offer: pb.Offer) -> dict[str, float]:
    """The scalars an offer holds by name, and "ports": how many, for accounting."""
    held = resources_from_pb(offer.resources).without_volumes()
    totals = {r.name: held.scalar(r.name) for r in held if r.name != "ports"}
    return {**totals, "ports": float(_port_count(held))} if held.ranges("ports") else totals


# -- agents: the executor's view of a task ----------------------------------------------


def task_spec(
    framework_id: str,
    task: pb.TaskInfo,
    *,
    volume_path: Callable[[str, str], Path],
    kill_grace: float,
) -> TaskSpec:
    """What the executor needs to run `task`. `volume_path(role, persistence_id)` is where
    a persistent volume lives; `kill_grace` applies when the task names none.

    Raises ValueError (ResourceError) on ids or resources that do not fit.
    """
    for ident in (framework_id, task.task_id):
        if not valid_id(ident):
            raise ValueError(f"id {ident!r} cannot name a sandbox directory")
    resources = resources_from_pb(task.resources)
    ports = tuple(expand_ports((r.begin, r.end) for r in resources.ranges("ports")))
    volumes = tuple(
        VolumeMount(v.volume.persistence_id, v.volume.container_path,
                    volume_path(v.role, v.volume.persistence_id))
        for v in resources.volumes() if v.volume is not None)
    health = None
    check = task.health_check
    if task.HasField("health_check") and check.kind != pb.HealthCheck.KIND_UNSPECIFIED:
        health = HealthSpec(
            kind=pb.HealthCheck.Kind.Name(check.kind), argv=tuple(check.argv),
            port=check.port or (ports[0] if ports else 0), grpc_service=check.grpc_service,
            delay=check.delay_seconds, interval=check.interval_seconds or 10.0,
            timeout=check.timeout_seconds or 20.0,
            consecutive_failures=check.consecutive_failures or 3,
            grace=check.grace_period_seconds, kill_on_failure=check.kill_on_failure)
    mem = resources.scalar("mem")
    return TaskSpec(framework_id, task.task_id, tuple(task.command.argv),
                    dict(task.command.environment), ports, volumes,
                    mem_mib=mem or None,
                    kill_grace=task.kill_grace_period_seconds or kill_grace,
                    health=health)
