"""End to end DRF: a cpu-heavy and a memory-heavy framework compete for three agents.

Each launches one task per offer while its tasks fit (as Mesos example frameworks do), so
the allocator's order decides who grows. Once nothing more fits, their dominant shares
must be within one task's share of each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework_harness import Recorder, cluster_state, framework_info, start_substrate

from scheduler.deadline import async_poll_for
from scheduler.framework import FrameworkDriver
from scheduler.local import LocalSubstrate
from scheduler.taskinfo import fits, task
from scheduler.v1 import scheduler_pb2 as pb

AGENT = {"cpus": 2.0, "mem": 2048.0}
SHAPES = {"cpu-heavy": {"cpus": 0.5, "mem": 32.0}, "mem-heavy": {"cpus": 0.05, "mem": 512.0}}
SLEEP = ["sleep", "600"]


@pytest.fixture
def substrate(zk: str, tmp_path: Path) -> Iterator[LocalSubstrate]:
    substrate = start_substrate(tmp_path / "substrate", zk,
                                resources=f"cpus:{AGENT['cpus']};mem:{AGENT['mem']};disk:1024")
    try:
        yield substrate
    finally:
        substrate.stop()


class Greedy(Recorder):
    """Launches one task of its shape per offer while it fits; declines the rest.

    `blocked` holds the agents whose offer it could not use (agents only fill up here, so
    such an agent stays useless to it).
    """

    def __init__(self, name: str, counts: dict[str, int]) -> None:
        super().__init__()
        self.name = name
        self.shape = SHAPES[name]
        self.counts = counts
        self.launched: list[pb.TaskInfo] = []
        self.blocked: set[str] = set()
        self.last_launch = time.monotonic()
        self.policy = self.answer

    async def answer(self, driver: FrameworkDriver, offers: list[pb.Offer]) -> None:
        launched = False
        for offer in offers:
            if launched:
                # One task per round of offers: a framework that took every agent it was
                # offered at once would outrun DRF by the size of a round.
                await driver.decline([offer.offer_id], refuse_seconds=0)
                continue
            if not fits(offer, cpus=self.shape["cpus"], mem=self.shape["mem"]):
                self.blocked.add(offer.agent_id)
                await driver.decline([offer.offer_id], refuse_seconds=1)
                continue
            info = task(f"{self.name}-{len(self.launched)}", offer, SLEEP,
                        cpus=self.shape["cpus"], mem=self.shape["mem"])
            self.launched.append(info)
            self.counts[self.name] = len(self.launched)
            self.last_launch = time.monotonic()
            launched = True
            # The rest goes back at once, so the allocator decides who gets it next.
            await driver.launch(offer, [info], refuse_seconds=0)


def share(name: str, tasks: int, agents: int = 3) -> float:
    return max(tasks * SHAPES[name][r] / (AGENT[r] * agents) for r in AGENT)


async def test_dominant_shares_end_within_one_task(substrate: LocalSubstrate) -> None:
    assert substrate.zk is not None
    counts = {name: 0 for name in SHAPES}
    cpu, mem = (Greedy(name, counts) for name in SHAPES)
    drivers = [FrameworkDriver(f, framework_info(f.name), zk=substrate.zk,
                               cluster=substrate.cluster) for f in (cpu, mem)]
    # Both compete from the start: subscribe together.
    await asyncio.gather(*(d.start() for d in drivers))
    try:
        def settled() -> bool:  # nothing launched for 2 s (10 allocation intervals)
            quiet = time.monotonic() - max(cpu.last_launch, mem.last_launch)
            return bool(cpu.launched and mem.launched) and quiet > 2.0

        await async_poll_for(settled, 40, what="both frameworks to stop growing")
        print(f"tasks launched {counts}")
        one_task = max(share(name, 1) for name in SHAPES)
        # One may only be more than a task ahead where the other can no longer fit anything
        # (DRF is not asked to leave resources idle).
        shares = {f.name: share(f.name, len(f.launched)) for f in (cpu, mem)}
        for ahead, behind in ((cpu, mem), (mem, cpu)):
            if shares[ahead.name] - shares[behind.name] > one_task + 1e-9:
                assert len(behind.blocked) == len(substrate.agent_daemons), (shares, counts)
        state = await cluster_state(substrate)
        assert state is not None
        reported = {f.info.name: f.dominant_share for f in state.frameworks}
        for name, value in shares.items():
            assert abs(reported[name] - value) < 1e-6, (reported, shares)
    finally:
        for driver in drivers:
            await driver.teardown()
