"""How long the substrate is leaderless after the leading master is SIGKILLed (opt-in:
pytest -m slow). Three masters, three agents, one subscribed framework; each round kills
the leader and measures until (a) another master answers GetState with every agent
connected again and (b) the framework has re-subscribed to it; then the killed master
is restarted as a standby. Prints median and max and writes every sample to
master-failover.json under the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import grpc
import pytest

from scheduler.deadline import async_poll_for
from scheduler.framework import Framework, FrameworkDriver
from scheduler.framework_errors import leader_hint
from scheduler.local import LocalSubstrate
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc

KILLS = int(os.environ.get("RINGSTORE_MASTER_KILLS", "10"))
SESSION = 3.0  # the master default


async def leading_state(addresses: list[str], dead: str) -> pb.ClusterState | None:
    """GetState from whichever live master answers as leader, None if none does."""
    for address in addresses:
        if address == dead:
            continue
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                return await pb_grpc.MasterStub(channel).GetState(
                    pb.GetStateRequest(), timeout=0.5)
            except grpc.aio.AioRpcError:
                continue
    return None


async def is_standby(address: str) -> bool:
    """Whether the master at `address` answers as a standby that names a leader."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await pb_grpc.MasterStub(channel).GetState(pb.GetStateRequest(), timeout=0.5)
        except grpc.aio.AioRpcError as exc:
            return exc.code() is grpc.StatusCode.UNAVAILABLE and bool(leader_hint(exc))
    return False


@pytest.mark.slow
@pytest.mark.timeout(60 * KILLS + 120)
async def test_master_failover_time(tmp_path: Path) -> None:
    substrate = LocalSubstrate(tmp_path / "substrate", agents=3, masters=3, verbose=False,
                               master_flags=("--session-timeout", str(SESSION)))
    leader_s: list[float] = []
    framework_s: list[float] = []
    try:
        substrate.start(timeout=90)
        addresses = [d.address for d in substrate.master_daemons if d.address]
        assert substrate.zk is not None
        info = pb.FrameworkInfo(name="failover-probe", role="probe", failover_timeout=120)
        async with FrameworkDriver(Framework(), info, zk=substrate.zk,
                                   cluster=substrate.cluster) as driver:
            for _ in range(KILLS):
                index = substrate.leader_index()
                assert index is not None
                dead = addresses[index]
                before = driver.subscriptions
                t0 = time.monotonic()
                substrate.kill_master(index)

                async def led(dead: str = dead) -> bool:
                    state = await leading_state(addresses, dead)
                    return state is not None and sum(a.connected for a in state.agents) >= 3

                def resubscribed(before: int = before, dead: str = dead) -> bool:
                    return driver.subscriptions > before and driver.master_address != dead

                await async_poll_for(led, 30, interval=0.02, what="a new leader")
                leader_s.append(time.monotonic() - t0)
                await async_poll_for(resubscribed, 30, interval=0.02,
                                     what="the framework to re-subscribe")
                framework_s.append(time.monotonic() - t0)
                substrate.restart_master(index)
                await async_poll_for(partial(is_standby, dead), 30, interval=0.1,
                                     what="the restarted master to stand by")
    finally:
        substrate.stop()
    stats = {
        "command": f"RINGSTORE_MASTER_KILLS={KILLS} flock /tmp/ringstore-bench.lock "
                   ".venv/bin/pytest -m slow tests/chaos/test_master_failover.py -s",
        "kills": len(leader_s),
        "master_session_timeout_s": SESSION,
        "leader_median_s": statistics.median(leader_s),
        "leader_max_s": max(leader_s),
        "framework_median_s": statistics.median(framework_s),
        "framework_max_s": max(framework_s),
        "leader_samples_s": leader_s,
        "framework_samples_s": framework_s,
    }
    (tmp_path / "master-failover.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"master failover over {len(leader_s)} kills: new leader with all agents median "
          f"{stats['leader_median_s']:.2f}s max {stats['leader_max_s']:.2f}s; framework "
          f"re-subscribed median {stats['framework_median_s']:.2f}s max "
          f"{stats['framework_max_s']:.2f}s; {tmp_path / 'master-failover.json'}")
    assert len(leader_s) == KILLS
