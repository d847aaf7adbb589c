"""A test framework process on the SDK: launches N serve_port.py tasks, one per agent.

    python demo_framework.py --zk ZK --cluster NAME --tasks N [--framework-id ID]
        [--failover-timeout S]

Prints "subscribed <framework id>" once subscribed and "<task id> <STATE>" for every
update it receives (each acknowledged by the SDK), and runs until killed. With
--framework-id it fails over an earlier instance and reconciles instead of launching.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from scheduler.framework import Framework, FrameworkDriver
from scheduler.taskinfo import fits, task
from scheduler.v1 import scheduler_pb2 as pb

SERVE_PORT = [sys.executable, str(Path(__file__).resolve().parent / "serve_port.py")]


class Demo(Framework):
    def __init__(self, tasks: int) -> None:
        self.wanted = tasks
        self.launched: dict[str, str] = {}  # task id -> agent id

    async def on_subscribed(self, driver: FrameworkDriver, framework_id: str) -> None:
        print(f"subscribed {framework_id}", flush=True)

    async def on_offers(self, driver: FrameworkDriver, offers: list[pb.Offer]) -> None:
        for offer in offers:
            if (len(self.launched) >= self.wanted or offer.agent_id in self.launched.values()
                    or not fits(offer, cpus=0.1, mem=32, ports=1)):
                await driver.decline([offer.offer_id], refuse_seconds=60)
                continue
            info = task(f"demo-{len(self.launched)}", offer, SERVE_PORT, cpus=0.1, mem=32,
                        ports=1)
            self.launched[info.task_id] = offer.agent_id
            await driver.launch(offer, [info], refuse_seconds=60)

    async def on_update(self, driver: FrameworkDriver, status: pb.TaskStatus) -> None:
        print(f"{status.task_id} {pb.TaskState.Name(status.state)}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zk", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--framework-id", default="")
    parser.add_argument("--failover-timeout", type=float, default=60.0)
    args = parser.parse_args()
    demo = Demo(0 if args.framework_id else args.tasks)
    info = pb.FrameworkInfo(name="demo", role="*", framework_id=args.framework_id,
                            failover_timeout=args.failover_timeout)
    async with FrameworkDriver(demo, info, zk=args.zk, cluster=args.cluster) as driver:
        if args.framework_id:
            await driver.reconcile()
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main())
