"""The cluster as the operator sees it: the leading master's `ClusterState`, read with
`cluster_state`, turned into JSON-able dicts and rich tables for `scheduler
status|agents|tasks`, and a task's sandbox output read from its agent.

Role: the operator API's client. `cluster_state` and `read_file` are the only functions
that do I/O (one short-lived ZooKeeper read and gRPC calls, each with a deadline); the
rest are pure functions of the state they are handed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from scheduler.coord import CoordError
from scheduler.registry import LEADER_METADATA_KEY, leading_master_sync
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc

TERMINAL_STATES = frozenset({
    pb.TASK_FINISHED, pb.TASK_FAILED, pb.TASK_KILLED, pb.TASK_LOST, pb.TASK_ERROR,
})
SCALARS = ("cpus", "mem", "disk")


class StatusError(Exception):
    """The state could not be read; the message is one line saying what to do."""


def _hint(exc: grpc.RpcError) -> str:
    trailers: Any = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    for key, value in trailers or ():
        if key == LEADER_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def cluster_state(zk: str, cluster: str, *, timeout: float = 5.0) -> pb.ClusterState:
    """GetState from the leading master (following a standby's pointer once)."""
    try:
        address = leading_master_sync(zk, cluster, timeout=timeout)
    except CoordError as exc:
        raise StatusError(f"cannot read ZooKeeper: {exc}") from None
    if not address:
        raise StatusError(f"no master leads cluster {cluster!r} (zk {zk}); "
                          "start one with 'scheduler master' or 'scheduler local up'")
    for _ in range(2):
        with grpc.insecure_channel(address) as channel:
            try:
                state: pb.ClusterState = pb_grpc.MasterStub(channel).GetState(
                    pb.GetStateRequest(), timeout=timeout)
                return state
            except grpc.RpcError as exc:
                hint = _hint(exc)
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code == grpc.StatusCode.UNAVAILABLE and hint and hint != address:
                    address = hint
                    continue
                detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                raise StatusError(f"master {address} did not answer GetState: "
                                  f"{(detail or str(code)).splitlines()[0]}") from None
    raise StatusError(f"no master of cluster {cluster!r} answered as leader; try again")


def find_task(state: pb.ClusterState, task_id: str) -> pb.TaskView:
    """The task's newest view (a live one over a terminal one); StatusError if unknown."""
    found = [t for t in state.tasks if t.task.task_id == task_id]
    if not found:
        raise StatusError(f"unknown task {task_id!r}; 'scheduler tasks' lists them")
    live = [t for t in found if t.state not in TERMINAL_STATES]
    return (live or found)[-1]


def read_file(address: str, task_id: str, name: str, offset: int, *,
              timeout: float = 5.0) -> tuple[bytes, int]:
    """A chunk of a task's sandbox file from its agent: (data, the file's size now)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply: pb.ReadFileResponse = pb_grpc.AgentStub(channel).ReadFile(
                pb.ReadFileRequest(task_id=task_id, name=name, offset=offset),
                timeout=timeout)
        except grpc.RpcError as exc:
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise StatusError(f"agent {address} could not read {name} of task {task_id}: "
                              f"{(detail or '').splitlines()[0] if detail else exc}") from None
    return reply.data, reply.size


def state_name(state: int) -> str:
    """"TASK_RUNNING" -> "RUNNING"."""
    return pb.TaskState.Name(state).removeprefix("TASK_")  # type: ignore[arg-type]


def reason_name(reason: int) -> str:
    if reason == pb.REASON_UNSPECIFIED:
        return ""
    return pb.StatusReason.Name(reason).removeprefix("REASON_")  # type: ignore[arg-type]


def totals(resources: Iterable[pb.Resource]) -> dict[str, float]:
    """Scalars summed by name (every role), plus "ports": how many ports."""
    out: dict[str, float] = {}
    for r in resources:
        if r.name == "ports":
            out["ports"] = out.get("ports", 0) + sum(g.end - g.begin + 1 for g in r.ranges)
        elif not r.HasField("volume"):
            out[r.name] = out.get(r.name, 0.0) + r.scalar
    return out


def _num(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 3)


def agent_dict(view: pb.AgentView) -> dict[str, Any]:
    total = totals(view.info.resources)
    used = totals(view.used)
    offered = totals(view.offered)
    names = sorted(set(total) | set(used))
    return {
        "agent_id": view.info.agent_id,
        "hostname": view.info.hostname,
        "address": view.info.address,
        "connected": view.connected,
        "attributes": {a.name: a.text for a in view.info.attributes},
        "total": {n: _num(total.get(n, 0)) for n in names},
        "used": {n: _num(used.get(n, 0)) for n in names},
        "offered": {n: _num(offered.get(n, 0)) for n in names},
        "free": {n: _num(total.get(n, 0) - used.get(n, 0)) for n in names},
    }


def framework_dict(view: pb.FrameworkView) -> dict[str, Any]:
    return {
        "framework_id": view.info.framework_id,
        "name": view.info.name,
        "role": view.info.role,
        "connected": view.connected,
        "suppressed": view.suppressed,
        "used": {n: _num(v) for n, v in sorted(totals(view.used).items())},
        "dominant_share": round(view.dominant_share, 4),
    }


def task_dict(view: pb.TaskView) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task_id": view.task.task_id,
        "name": view.task.name,
        "framework_id": view.framework_id,
        "agent_id": view.task.agent_id,
        "hostname": view.hostname,
        "agent_address": view.agent_address,
        "state": state_name(view.state),
        "reason": reason_name(view.reason),
        "message": view.message,
        "resources": {n: _num(v) for n, v in sorted(totals(view.task.resources).items())},
        "ports": [p for r in view.task.resources if r.name == "ports"
                  for g in r.ranges for p in range(g.begin, g.end + 1)][:64],
    }
    if view.HasField("healthy"):
        out["healthy"] = view.healthy
    return out


def state_dict(state: pb.ClusterState) -> dict[str, Any]:
    return {
        "cluster": state.cluster,
        "leader": state.leader_address,
        "agents": [agent_dict(a) for a in state.agents],
        "frameworks": [framework_dict(f) for f in state.frameworks],
        "tasks": [task_dict(t) for t in state.tasks],
    }


def _fraction(used: float | int, total: float | int) -> str:
    return f"{_num(used)}/{_num(total)}"


def agents_table(state: pb.ClusterState) -> Table:
    table = Table("agent", "host", "zone", "up", "cpus", "mem", "disk", "ports",
                  title="agents", caption="used/total; mem and disk in MiB")
    table.columns[0].no_wrap = True
    for a in (agent_dict(v) for v in state.agents):
        total, used = a["total"], a["used"]
        table.add_row(
            a["agent_id"], a["hostname"], a["attributes"].get("zone", ""),
            "yes" if a["connected"] else "NO",
            *(_fraction(used.get(n, 0), total.get(n, 0)) for n in (*SCALARS, "ports")))
    return table


def frameworks_table(state: pb.ClusterState) -> Table:
    table = Table("framework", "name", "role", "up", "suppressed", "cpus", "mem",
                  "share", title="frameworks", caption="share: dominant share (DRF)")
    table.columns[0].no_wrap = True
    for f in (framework_dict(v) for v in state.frameworks):
        table.add_row(f["framework_id"], f["name"], f["role"],
                      "yes" if f["connected"] else "NO", "yes" if f["suppressed"] else "no",
                      str(f["used"].get("cpus", 0)), str(f["used"].get("mem", 0)),
                      f"{f['dominant_share']:.3f}")
    return table


def tasks_table(state: pb.ClusterState) -> Table:
    table = Table("task", "framework", "agent", "host", "state", "reason", "ports",
                  title="tasks")
    table.columns[0].no_wrap = True
    for t in (task_dict(v) for v in state.tasks):
        health = "" if "healthy" not in t else (" healthy" if t["healthy"] else " UNHEALTHY")
        table.add_row(t["task_id"], t["framework_id"], t["agent_id"], t["hostname"],
                      t["state"] + health, t["reason"],
                      ",".join(str(p) for p in t["ports"][:8]))
    return table


def print_status(state: pb.ClusterState, console: Console) -> None:
    """The whole picture: leader, agents, frameworks, tasks."""
    console.print(f"cluster {state.cluster!r}, leading master {state.leader_address}")
    console.print(agents_table(state))
    console.print(frameworks_table(state))
    console.print(tasks_table(state))
