"""The master's translations between protobuf messages and `scheduler.state` records.

Conversions only: no decisions, no I/O. Everything that arrives from the wire is checked
here for shape (a resource list that does not parse raises `state.InvalidArgument` with a
one-line message), so `MasterState` sees only domain values. The operator view
(`cluster_state`) is built here from the state's records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from scheduler import state as st
from scheduler.allocator import FrameworkDemand, dominant_shares
from scheduler.resources import ResourceError, Resources
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.wire import attributes_from_pb, attributes_to_pb, resources_from_pb, resources_to_pb


def resources(items: Iterable[pb.Resource], what: str) -> Resources:
    try:
        return resources_from_pb(items)
    except ResourceError as exc:
        raise st.InvalidArgument(f"{what}: {exc}") from exc


def attributes(items: Iterable[pb.Attribute]) -> dict[str, str]:
    try:
        return attributes_from_pb(items)
    except ResourceError as exc:
        raise st.InvalidArgument(f"attributes: {exc}") from exc


def enum_name(enum: type[pb.TaskState] | type[pb.StatusReason] | type[pb.StatusSource],
              value: int) -> str:
    try:
        return enum.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return enum.Name(0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ statuses


def status_from_pb(message: pb.TaskStatus) -> st.Status:
    return st.Status(
        task_id=message.task_id, framework_id=message.framework_id,
        agent_id=message.agent_id, state=enum_name(pb.TaskState, message.state),
        source=enum_name(pb.StatusSource, message.source) if message.source
        else "SOURCE_AGENT",
        reason=enum_name(pb.StatusReason, message.reason), message=message.message,
        uuid=message.uuid, timestamp=message.timestamp,
        healthy=message.healthy if message.HasField("healthy") else None,
        exit_code=message.exit_code if message.HasField("exit_code") else None)


def status_to_pb(status: st.Status) -> pb.TaskStatus:
    message = pb.TaskStatus(
        task_id=status.task_id, framework_id=status.framework_id, agent_id=status.agent_id,
        state=pb.TaskState.Value(status.state), source=pb.StatusSource.Value(status.source),
        reason=pb.StatusReason.Value(status.reason), message=status.message,
        uuid=status.uuid, timestamp=status.timestamp)
    if status.healthy is not None:
        message.healthy = status.healthy
    if status.exit_code is not None:
        message.exit_code = status.exit_code
    return message


# ------------------------------------------------------------------ agent protocol


def agent_task_reports(tasks: Sequence[pb.AgentTask]) -> list[st.AgentTaskReport]:
    return [st.AgentTaskReport(
        framework_id=t.framework.framework_id,
        framework_info=t.framework.SerializeToString(),
        framework_role=t.framework.role or "*",
        task_id=t.task.task_id, task_info=t.task.SerializeToString(),
        resources=resources(t.task.resources, f"task {t.task.task_id}"),
        state=enum_name(pb.TaskState, t.state)) for t in tasks]


def framework_info(blob: bytes, framework_id: str) -> pb.FrameworkInfo:
    info = pb.FrameworkInfo.FromString(blob)
    info.framework_id = framework_id
    return info


def agent_message(message: st.AgentMessage, heartbeat_interval: float) -> pb.MasterMessage:
    if isinstance(message, st.Registered):
        return pb.MasterMessage(registered=pb.MasterMessage.Registered(
            agent_id=message.agent_id, heartbeat_interval_seconds=heartbeat_interval))
    if isinstance(message, st.RunTask):
        return pb.MasterMessage(run_task=pb.MasterMessage.RunTask(
            framework=framework_info(message.framework_info, message.framework_id),
            task=pb.TaskInfo.FromString(message.task_info)))
    if isinstance(message, st.KillTask):
        return pb.MasterMessage(kill_task=pb.MasterMessage.KillTask(
            framework_id=message.framework_id, task_id=message.task_id,
            grace_period_seconds=message.grace_period,
            reason=pb.StatusReason.Value(message.reason)))
    if isinstance(message, st.Acknowledge):
        return pb.MasterMessage(acknowledge=pb.MasterMessage.Acknowledge(
            framework_id=message.framework_id, task_id=message.task_id, uuid=message.uuid))
    if isinstance(message, st.CheckpointResources):
        return pb.MasterMessage(checkpoint_resources=pb.MasterMessage.CheckpointResources(
            resources=resources_to_pb(message.resources)))
    return pb.MasterMessage(shutdown_framework=pb.MasterMessage.ShutdownFramework(
        framework_id=message.framework_id))


# ------------------------------------------------------------------ framework API


def framework_event(event: st.FrameworkEvent, heartbeat_interval: float,
                    master_address: str) -> pb.Event:
    if isinstance(event, st.Subscribed):
        return pb.Event(subscribed=pb.Event.Subscribed(
            framework_id=event.framework_id, stream_id=event.stream_id,
            heartbeat_interval_seconds=heartbeat_interval, master_address=master_address))
    if isinstance(event, st.Offers):
        return pb.Event(offers=pb.Event.Offers(offers=[
            pb.Offer(offer_id=o.offer_id, framework_id=o.framework_id, agent_id=o.agent_id,
                     hostname=hostname, resources=resources_to_pb(o.resources),
                     attributes=attributes_to_pb(attrs))
            for o, attrs, hostname in zip(event.offers, event.attributes, event.hostnames,
                                          strict=True)]))
    if isinstance(event, st.Rescind):
        return pb.Event(rescind=pb.Event.Rescind(offer_id=event.offer_id))
    if isinstance(event, st.Update):
        return pb.Event(update=pb.Event.Update(status=status_to_pb(event.status)))
    return pb.Event(failure=pb.Event.Failure(agent_id=event.agent_id))


def error_event(message: str) -> pb.Event:
    return pb.Event(error=pb.Event.Error(message=message))


def heartbeat_event() -> pb.Event:
    return pb.Event(heartbeat=pb.Event.Heartbeat())


def operations(items: Sequence[pb.Operation], agent_id: str) -> list[st.Operation]:
    """ACCEPT's operations; tasks without an agent id get the offers' `agent_id`."""
    out: list[st.Operation] = []
    for op in items:
        kind = op.WhichOneof("operation")
        if kind == "launch":
            specs = []
            for task in op.launch.tasks:
                if not task.agent_id:
                    task.agent_id = agent_id
                specs.append(st.TaskSpec(
                    task.task_id, task.agent_id,
                    resources(task.resources, f"task {task.task_id}"),
                    task.SerializeToString()))
            out.append(st.Launch(tuple(specs)))
        elif kind == "reserve":
            out.append(st.Reserve(resources(op.reserve.resources, "reserve")))
        elif kind == "unreserve":
            out.append(st.Unreserve(resources(op.unreserve.resources, "unreserve")))
        elif kind == "create":
            out.append(st.Create(resources(op.create.volumes, "create")))
        elif kind == "destroy":
            out.append(st.Destroy(resources(op.destroy.volumes, "destroy")))
        else:
            raise st.InvalidArgument("an operation names no kind (launch, reserve, ...)")
    return out


# ------------------------------------------------------------------ operator API


def cluster_state(state: st.MasterState, leader: str, cluster: str) -> pb.ClusterState:
    out = pb.ClusterState(leader_address=leader, cluster=cluster)
    for agent in sorted(state.agents.values(), key=lambda a: a.agent_id):
        out.agents.append(pb.AgentView(
            info=pb.AgentInfo(agent_id=agent.agent_id, hostname=agent.hostname,
                              address=agent.address, resources=resources_to_pb(agent.total),
                              attributes=attributes_to_pb(agent.attributes)),
            connected=agent.connected, used=resources_to_pb(agent.used),
            offered=resources_to_pb(agent.offered), registered_at=agent.registered_at))
    demands = [FrameworkDemand(f.framework_id, f.role, f.used, f.suppressed)
               for f in state.frameworks.values()]
    shares = dominant_shares(demands, state.total())
    for framework in sorted(state.frameworks.values(), key=lambda f: f.framework_id):
        info = (framework_info(framework.info, framework.framework_id) if framework.info
                else pb.FrameworkInfo(framework_id=framework.framework_id,
                                      name=framework.name, role=framework.role))
        out.frameworks.append(pb.FrameworkView(
            info=info, connected=framework.connected, suppressed=framework.suppressed,
            used=resources_to_pb(framework.used),
            dominant_share=shares.get(framework.framework_id, 0.0)))
    for task in [*state.tasks.values(), *state.completed.values()]:
        where = state.agents.get(task.agent_id)
        task_info = (pb.TaskInfo.FromString(task.info) if task.info
                     else pb.TaskInfo(task_id=task.task_id, agent_id=task.agent_id))
        view = pb.TaskView(
            task=task_info, framework_id=task.framework_id, state=pb.TaskState.Value(task.state),
            hostname=where.hostname if where else "",
            agent_address=where.address if where else "",
            reason=pb.StatusReason.Value(task.reason), message=task.message)
        if task.healthy is not None:
            view.healthy = task.healthy
        out.tasks.append(view)
    return out
