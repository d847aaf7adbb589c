"""Helpers for the end-to-end framework tests: a substrate on the session's ZooKeeper and a
test framework that records every event it receives.

Not a test module (no `test_` prefix); imported by tests/integration/test_framework_*.py.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.deadline import async_poll_for
from scheduler.framework import Framework, FrameworkDriver
from scheduler.local import LocalSubstrate
from scheduler.status import StatusError
from scheduler.taskinfo import fits, task
from scheduler.v1 import scheduler_pb2 as pb

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
SERVE_PORT = [sys.executable, str(TASKS_DIR / "serve_port.py")]

# Short intervals so the tests see offers, heartbeats and retries quickly.
MASTER_FLAGS = ("--allocation-interval", "0.2", "--heartbeat-interval", "0.5",
                "--agent-timeout", "5", "--agent-reregister-timeout", "30",
                "--offer-timeout", "60", "--session-timeout", "2")
AGENT_FLAGS = ("--status-retry-interval", "0.5", "--kill-grace", "1")


def start_substrate(work_dir: Path, zk: str, *, masters: int = 1, agents: int = 3,
                    resources: str = "cpus:2;mem:2048;disk:4096") -> LocalSubstrate:
    """A substrate on the test's ZooKeeper chroot, with a random block of task ports."""
    substrate = LocalSubstrate(
        work_dir, agents=agents, masters=masters, zk=zk, cluster="e2e",
        agent_resources=resources, port_base=random.randrange(20000, 28000, 100),
        master_flags=MASTER_FLAGS, agent_flags=AGENT_FLAGS)
    try:
        substrate.start(timeout=60)
    except BaseException:
        substrate.stop()
        raise
    return substrate


async def cluster_state(substrate: LocalSubstrate) -> pb.ClusterState | None:
    """GetState off the event loop (the call blocks); None while no leader answers."""
    try:
        return await asyncio.to_thread(substrate.state, 3.0)
    except StatusError:
        return None


OfferPolicy = Callable[[FrameworkDriver, list[pb.Offer]], Awaitable[None]]


@dataclass
class Recorder(Framework):
    """Records every event; `policy` (if set) answers offers, otherwise they are held."""

    policy: OfferPolicy | None = None
    offers: list[tuple[float, pb.Offer]] = field(default_factory=list)
    updates: dict[str, list[pb.TaskStatus]] = field(default_factory=lambda: defaultdict(list))
    rescinded: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    subscribed: list[str] = field(default_factory=list)
    offer_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_subscribed(self, driver: FrameworkDriver, framework_id: str) -> None:
        self.subscribed.append(framework_id)

    async def on_offers(self, driver: FrameworkDriver, offers: list[pb.Offer]) -> None:
        now = time.monotonic()
        self.offers.extend((now, o) for o in offers)
        self.offer_arrived.set()
        if self.policy is not None:
            await self.policy(driver, offers)

    async def on_rescind(self, driver: FrameworkDriver, offer_id: str) -> None:
        self.rescinded.append(offer_id)

    async def on_update(self, driver: FrameworkDriver, status: pb.TaskStatus) -> None:
        copy = pb.TaskStatus()
        copy.CopyFrom(status)
        self.updates[status.task_id].append(copy)

    async def on_failure(self, driver: FrameworkDriver, agent_id: str) -> None:
        self.failures.append(agent_id)

    async def on_error(self, driver: FrameworkDriver, message: str) -> None:
        self.errors.append(message)

    def states(self, task_id: str, *, source: int | None = None) -> list[str]:
        return [pb.TaskState.Name(s.state) for s in self.updates.get(task_id, [])
                if source is None or s.source == source]

    def latest(self, task_id: str) -> str | None:
        found = self.updates.get(task_id)
        return pb.TaskState.Name(found[-1].state) if found else None

    async def wait_state(self, task_ids: list[str], state: str, timeout: float = 30.0) -> None:
        await async_poll_for(lambda: all(state in self.states(t) for t in task_ids), timeout,
                             what=f"{task_ids} to reach {state}: "
                                  f"{ {t: self.states(t) for t in task_ids} }")


def launch_per_agent(launched: dict[str, pb.TaskInfo], count: int, prefix: str, *,
                     argv: list[str] = SERVE_PORT, cpus: float = 0.5, mem: float = 64,
                     ports: int = 1) -> OfferPolicy:
    """A policy: launch tasks `<prefix>-0`, `<prefix>-1`... one per agent, until `count`
    are launched (recorded in `launched`); decline every other offer for a minute."""

    async def policy(driver: FrameworkDriver, offers: list[pb.Offer]) -> None:
        for offer in offers:
            used = {t.agent_id for t in launched.values()}
            if (len(launched) >= count or offer.agent_id in used
                    or not fits(offer, cpus=cpus, mem=mem, ports=ports)):
                await driver.decline([offer.offer_id], refuse_seconds=60)
                continue
            info = task(f"{prefix}-{len(launched)}", offer, argv, cpus=cpus, mem=mem,
                        ports=ports)
            launched[info.task_id] = info
            await driver.launch(offer, [info], refuse_seconds=60)

    return policy


def framework_info(name: str, *, role: str = "*", failover_timeout: float = 60.0,
                   framework_id: str = "") -> pb.FrameworkInfo:
    return pb.FrameworkInfo(name=name, role=role, failover_timeout=failover_timeout,
                            framework_id=framework_id)


def port_of(info: pb.TaskInfo) -> int:
    for r in info.resources:
        if r.name == "ports":
            return int(r.ranges[0].begin)
    raise AssertionError(f"task {info.task_id} has no port")


def answer(port: int, timeout: float = 2.0) -> str:
    """The line a serve_port.py task answers a connection with ("" if none)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            return conn.recv(256).decode(errors="replace")
    except OSError:
        return ""
