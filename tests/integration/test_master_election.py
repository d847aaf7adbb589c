"""Master election on real processes: one leader, standbys that redirect, fast failover."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler.deadline import free_port, poll_for
from scheduler.process import Process, spawn
from scheduler.registry import LEADER_METADATA_KEY, leading_master_sync
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from scheduler.zookeeper import ZooKeeperServer

CLUSTER = "elect"


def start_master(zk: str, log_dir: Path, name: str, *extra: str) -> tuple[Process, str]:
    address = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "scheduler.master", "--zk", zk, "--cluster", CLUSTER,
            "--listen", address, "--session-timeout", "2", "--agent-timeout", "2",
            "--heartbeat-interval", "0.5", "--allocation-interval", "0.2", *extra]
    return spawn(argv, name=name, log_dir=log_dir), address


@pytest.fixture
def masters(zk: str, tmp_path: Path) -> Iterator[dict[str, Process]]:
    started: dict[str, Process] = {}
    try:
        for i in range(3):
            process, address = start_master(zk, tmp_path, f"master{i}")
            started[address] = process
        yield started
    finally:
        for process in started.values():
            process.terminate(grace=5)


def get_state(address: str) -> pb.ClusterState:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.MasterStub(channel).GetState(pb.GetStateRequest(), timeout=2)


def serving(address: str) -> int:
    """The health status of the Master service; -1 while the process does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            status: int = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="scheduler.v1.Master"), timeout=2).status
            return status
    except grpc.RpcError:
        return -1


def answers(address: str) -> bool:
    try:
        get_state(address)
    except grpc.RpcError:
        return False
    return True


def leader(zk: str) -> str | None:
    return leading_master_sync(zk, CLUSTER)


def test_one_leader_and_standbys_redirect(zk: str, masters: dict[str, Process]) -> None:
    poll_for(lambda: leader(zk) in masters and answers(str(leader(zk))), 30,
             what="a leading master that answers")
    lead = str(leader(zk))
    state = get_state(lead)
    assert state.leader_address == lead
    assert state.cluster == CLUSTER
    assert serving(lead) == health_pb2.HealthCheckResponse.SERVING
    standbys = [a for a in masters if a != lead]
    poll_for(lambda: all(serving(a) == health_pb2.HealthCheckResponse.NOT_SERVING
                         for a in standbys), 10, what="standbys up")
    for standby in standbys:
        with pytest.raises(grpc.RpcError) as caught:
            get_state(standby)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        trailers = dict(error.trailing_metadata() or ())
        assert trailers.get(LEADER_METADATA_KEY) == lead
        assert lead in error.details()


def test_sigkill_of_the_leader_a_standby_leads_within_5s(
        zk: str, masters: dict[str, Process]) -> None:
    poll_for(lambda: leader(zk) in masters and answers(str(leader(zk))), 30,
             what="a leading master that answers")
    old = str(leader(zk))
    masters[old].kill()
    killed = time.monotonic()

    def new_leader_answers() -> bool:
        current = leader(zk)
        return current is not None and current != old and answers(current)

    poll_for(new_leader_answers, 10, interval=0.05, what="a new leader")
    took = time.monotonic() - killed
    assert took < 5.0, f"failover took {took:.2f}s"
    assert get_state(str(leader(zk))).leader_address != old


def unavailable(address: str) -> bool:
    try:
        get_state(address)
    except grpc.RpcError as exc:
        code: object = exc.code()
        return code == grpc.StatusCode.UNAVAILABLE
    return False


def test_a_suspended_session_stops_decisions(zk: str, zk_server: ZooKeeperServer,
                                             tmp_path: Path) -> None:
    process, address = start_master(zk, tmp_path, "gated")
    try:
        poll_for(lambda: leader(zk) == address and answers(address), 30,
                 what="the master to lead")
        zk_server.process.stop()  # SIGSTOP: the session is SUSPENDED, then maybe lost
        try:
            poll_for(lambda: unavailable(address), 10, what="the master to stop deciding")
        finally:
            zk_server.process.cont()
        poll_for(lambda: answers(address), 30, what="the master to lead again")
    finally:
        process.terminate(grace=5)
