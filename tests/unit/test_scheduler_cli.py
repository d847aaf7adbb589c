"""The `scheduler` CLI without a cluster: command wiring, one-line failures, rendering of a
ClusterState (scheduler.status), and the task builder (scheduler.taskinfo.task)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from scheduler import cli
from scheduler import status as st
from scheduler.local import read_state, stop_recorded
from scheduler.resources import Resources
from scheduler.taskinfo import fits, offered, task
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.wire import resources_from_pb


def resources(cpus: float, mem: float, ports: tuple[int, int] | None = None,
              role: str = "*") -> list[pb.Resource]:
    out = [pb.Resource(name="cpus", scalar=cpus, role=role),
           pb.Resource(name="mem", scalar=mem, role=role)]
    if ports is not None:
        out.append(pb.Resource(name="ports", role=role,
                               ranges=[pb.Range(begin=ports[0], end=ports[1])]))
    return out


def cluster() -> pb.ClusterState:
    agent = pb.AgentView(
        info=pb.AgentInfo(agent_id="a1", hostname="h1", address="127.0.0.1:1",
                          resources=resources(2, 1024, (31000, 31009)),
                          attributes=[pb.Attribute(name="zone", text="a")]),
        connected=True, used=resources(0.5, 256, (31000, 31000)))
    framework = pb.FrameworkView(info=pb.FrameworkInfo(framework_id="f1", name="demo"),
                                 connected=True, used=resources(0.5, 256),
                                 dominant_share=0.25)
    running = pb.TaskView(task=pb.TaskInfo(task_id="t1", agent_id="a1",
                                           resources=resources(0.5, 256, (31000, 31000))),
                          framework_id="f1", state=pb.TASK_RUNNING, hostname="h1",
                          agent_address="127.0.0.1:1")
    failed = pb.TaskView(task=pb.TaskInfo(task_id="t1", agent_id="a1"), framework_id="f1",
                         state=pb.TASK_FAILED, reason=pb.REASON_COMMAND_EXITED)
    return pb.ClusterState(leader_address="127.0.0.1:9", cluster="c", agents=[agent],
                           frameworks=[framework], tasks=[failed, running])


def test_help_lists_every_command_even_before_the_daemons_exist() -> None:
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for name in ("master", "agent", "status", "agents", "tasks", "logs", "local"):
        assert name in result.output


def test_a_missing_daemon_module_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.LAZY_COMMANDS, "master", ("scheduler.no_such_module", "command"))
    result = CliRunner().invoke(cli.main, ["master", "--zk", "x"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "scheduler.no_such_module" in result.output


@pytest.mark.parametrize(("flag", "value", "reason"), [
    ("--resources", "cpus:x", "cpus: 'x' is not a number"),
    ("--resources", "cpus:1;ports:[9-2]", "ports"),
    ("--attributes", "zone", "expected name:value"),
    ("--attributes", "zone:a;zone:b", "given twice"),
])
def test_a_malformed_agent_flag_fails_in_one_line_and_changes_nothing(
        tmp_path: Path, flag: str, value: str, reason: str) -> None:
    work_dir = tmp_path / "agent"
    result = CliRunner().invoke(cli.main, ["agent", "--zk", "127.0.0.1:1", "--work-dir",
                                           str(work_dir), flag, value])
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {flag} {value!r} is malformed: ") and reason in line
    assert "write it like" in line
    assert not work_dir.exists()


def test_read_commands_need_zookeeper() -> None:
    result = CliRunner().invoke(cli.main, ["status"], env={"RINGSTORE_ZK": ""})
    assert result.exit_code == 2
    assert "--zk" in result.output


def test_state_dict_reports_free_and_used_per_agent() -> None:
    data = st.state_dict(cluster())
    agent = data["agents"][0]
    assert agent["total"] == {"cpus": 2, "mem": 1024, "ports": 10}
    assert agent["used"] == {"cpus": 0.5, "mem": 256, "ports": 1}
    assert agent["free"] == {"cpus": 1.5, "mem": 768, "ports": 9}
    assert agent["attributes"] == {"zone": "a"}
    assert data["frameworks"][0]["dominant_share"] == 0.25
    assert [t["state"] for t in data["tasks"]] == ["FAILED", "RUNNING"]
    assert data["tasks"][0]["reason"] == "COMMAND_EXITED"
    assert data["tasks"][1]["ports"] == [31000]
    json.dumps(data)  # JSON-able as it stands


def test_tables_render_every_agent_framework_and_task() -> None:
    console = Console(width=200, record=True)
    st.print_status(cluster(), console)
    text = console.export_text()
    assert "127.0.0.1:9" in text
    assert "0.5/2" in text and "256/1024" in text
    assert "demo" in text and "RUNNING" in text and "COMMAND_EXITED" in text


def test_find_task_prefers_the_live_view_and_names_unknown_tasks() -> None:
    assert st.find_task(cluster(), "t1").state == pb.TASK_RUNNING
    with pytest.raises(st.StatusError, match="unknown task 'nope'"):
        st.find_task(cluster(), "nope")


def offer() -> pb.Offer:
    return pb.Offer(offer_id="o1", agent_id="a1",
                    resources=resources(1, 512, (31000, 31002)))


def test_task_takes_distinct_ports_from_the_offer() -> None:
    first = task("t1", offer(), ["sleep", "1"], cpus=0.25, mem=128, ports=2,
                 env={"A": "1"})
    second = task("t2", offer(), ["sleep", "1"], cpus=0.25, mem=128, ports=1,
                  placed=[first])
    assert first.agent_id == "a1" and dict(first.command.environment) == {"A": "1"}
    first_ports = [(r.begin, r.end) for x in first.resources if x.name == "ports"
                   for r in x.ranges]
    second_ports = [(r.begin, r.end) for x in second.resources if x.name == "ports"
                    for r in x.ranges]
    assert first_ports == [(31000, 31001)] and second_ports == [(31002, 31002)]
    assert not fits(offer(), ports=1, placed=[first, second])
    assert fits(offer(), cpus=0.5, mem=256, placed=[first, second])
    assert not fits(offer(), cpus=0.75, placed=[first, second])


def test_task_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit in offer o1"):
        task("big", offer(), ["true"], cpus=2)
    assert offered(offer()) == {"cpus": 1, "mem": 512, "ports": 3}


def test_task_keeps_the_role_the_offer_reserved() -> None:
    reserved = pb.Offer(offer_id="o2", agent_id="a1",
                        resources=resources(1, 512, (31000, 31000), role="storage"))
    info = task("t", reserved, ["true"], cpus=1, mem=512, ports=1)
    assert {r.role for r in info.resources} == {"storage"}


def test_local_down_without_a_substrate_is_a_no_op(tmp_path: Path) -> None:
    assert read_state(tmp_path) is None
    assert stop_recorded(tmp_path) == []
    result = CliRunner().invoke(cli.main, ["local", "down", "--work-dir", str(tmp_path)])
    assert result.exit_code == 0 and "no running local substrate" in result.output
    result = CliRunner().invoke(cli.main, ["local", "status", "--work-dir", str(tmp_path)])
    assert result.exit_code == 1


def test_task_resources_are_valid_domain_resources() -> None:
    info = task("t", offer(), ["true"], cpus=1, mem=512, ports=3)
    assert resources_from_pb(info.resources) == Resources.parse(
        "cpus:1;mem:512;ports:[31000-31002]")
