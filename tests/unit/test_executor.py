"""The pure parts of scheduler.executor and scheduler.health: environment, ports, volume
names, terminal outcome, health tally."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from scheduler.executor import (
    TaskSpec,
    VolumeMount,
    expand_ports,
    outcome,
    task_environment,
    volume_env_name,
)
from scheduler.health import HealthSpec, HealthTally, Verdict
from scheduler.task_process import ExitStatus


def test_expand_ports() -> None:
    assert expand_ports([(31000, 31002), (32000, 32000)]) == [31000, 31001, 31002, 32000]
    assert expand_ports([]) == []


@given(st.lists(st.tuples(st.integers(1, 60000), st.integers(0, 20)), max_size=5))
def test_expand_ports_counts(ranges: list[tuple[int, int]]) -> None:
    spans = [(b, b + n) for b, n in ranges]
    assert len(expand_ports(spans)) == sum(n + 1 for _, n in ranges)


def test_volume_env_name() -> None:
    assert volume_env_name("data") == "VOLUME_DATA"
    assert volume_env_name("/var/lib-db/x.1") == "VOLUME_VAR_LIB_DB_X_1"


def test_task_environment() -> None:
    spec = TaskSpec(
        framework_id="fw", task_id="t1", argv=("x",), environment={"A": "1", "HOME": "/h"},
        ports=(31000, 31005),
        volumes=(VolumeMount("p1", "data", Path("/w/volumes/r/p1")),),
    )
    env = task_environment(spec, sandbox=Path("/sb"), agent_id="ag",
                           base={"PATH": "/bin", "HOME": "/root", "PORT0": "stale"})
    assert env == {
        "PATH": "/bin", "HOME": "/h", "A": "1",
        "PORT0": "31000", "PORT1": "31005", "PORTS": "31000,31005",
        "SANDBOX": "/sb", "TASK_ID": "t1", "AGENT_ID": "ag", "FRAMEWORK_ID": "fw",
        "VOLUME_DATA": "/sb/data",
    }


def test_outcome_of_exits() -> None:
    ok = outcome(ExitStatus(0), kill_reason="", kill_message="", leader_code=0)
    assert (ok.state, ok.reason, ok.exit_code) == ("TASK_FINISHED", "REASON_COMMAND_EXITED", 0)
    failed = outcome(ExitStatus(3), kill_reason="", kill_message="", leader_code=3)
    assert (failed.state, failed.exit_code, failed.message) == ("TASK_FAILED", 3,
                                                               "exited with status 3")
    signalled = outcome(ExitStatus(-9), kill_reason="", kill_message="", leader_code=None)
    assert signalled.state == "TASK_FAILED" and signalled.message == "killed by SIGKILL"
    launch = outcome(ExitStatus(127, "cannot launch nope: No such file or directory"),
                     kill_reason="", kill_message="", leader_code=127)
    assert (launch.state, launch.reason) == ("TASK_FAILED", "REASON_LAUNCH_FAILED")


def test_outcome_of_kills() -> None:
    mem = outcome(ExitStatus(-9), kill_reason="REASON_MEMORY_LIMIT",
                  kill_message="used 70 MiB > limit 64 MiB", leader_code=None)
    assert (mem.state, mem.reason, mem.message) == (
        "TASK_FAILED", "REASON_MEMORY_LIMIT", "used 70 MiB > limit 64 MiB")
    killed = outcome(ExitStatus(-15), kill_reason="REASON_KILLED_BY_FRAMEWORK",
                     kill_message="", leader_code=None)
    assert (killed.state, killed.message) == ("TASK_KILLED", "killed by SIGTERM")
    health = outcome(None, kill_reason="REASON_HEALTH_CHECK_FAILED", kill_message="hc",
                     leader_code=-9)
    assert (health.state, health.reason) == ("TASK_FAILED", "REASON_HEALTH_CHECK_FAILED")


def test_outcome_without_a_recorded_status() -> None:
    unknown = outcome(None, kill_reason="", kill_message="", leader_code=None)
    assert unknown.state == "TASK_FAILED" and unknown.exit_code is None
    assert "unknown" in unknown.message
    wrapper = outcome(None, kill_reason="", kill_message="", leader_code=-9)
    assert "SIGKILL" in wrapper.message


def test_health_tally_threshold_and_recovery() -> None:
    tally = HealthTally(HealthSpec("TCP", consecutive_failures=2), started=0.0)
    assert tally.record(True, 1) is Verdict.HEALTHY
    assert tally.record(True, 2) is Verdict.NONE
    assert tally.record(False, 3) is Verdict.NONE
    assert tally.record(False, 4) is Verdict.UNHEALTHY
    assert tally.record(False, 5) is Verdict.NONE  # reported once
    assert tally.record(True, 6) is Verdict.HEALTHY


def test_health_tally_grace_period() -> None:
    tally = HealthTally(HealthSpec("TCP", consecutive_failures=1, grace=10), started=0.0)
    assert tally.record(False, 5) is Verdict.NONE  # in grace: not counted
    assert tally.failures == 0
    assert tally.record(False, 11) is Verdict.UNHEALTHY
    early = HealthTally(HealthSpec("TCP", consecutive_failures=1, grace=10), started=0.0)
    assert early.record(True, 1) is Verdict.HEALTHY
    assert early.record(False, 2) is Verdict.UNHEALTHY  # a success ends the grace
