"""Substrate scale: one master, many simulated agents, one framework (issue 5, "Scale").

For each agent count (default 50, 200, 500) with TASKS_PER_AGENT tasks per agent:
  1. start a private ZooKeeper, one master, and the simulated agents (scheduler.simulated,
     up to 250 per process) — no real task processes;
  2. offer cycle: the framework suppresses, declines what it holds, REVIVEs at t0 and
     waits until it holds offers for every agent at t1; cycle = t1 - t0 (3 rounds; the
     master's allocation interval is part of it, 1 s unless --allocation-interval);
  3. launch: accept offers with small tasks until all tasks run (a burst); UPDATE latency =
     receive time - the simulated agent's state-change timestamp (same clock);
  4. kill every task at a paced --kill-rate, the same latency for KILLED;
  5. the master's CPU seconds (utime+stime) over launch and kill, its CPU share while
     idle for 5 s with every task running (the agents' heartbeats), and its peak RSS.

    flock /tmp/ringstore-bench.lock .venv/bin/python bench/substrate_scale.py \
        [--agents 50,200,500] [--out bench/results/substrate-scale.json]

Prints a table and writes the results (with this command) as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from scheduler.deadline import async_poll_for, free_port, poll_for
from scheduler.framework import Framework, FrameworkDriver
from scheduler.process import Process, spawn
from scheduler.resources import Resources
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.wire import resources_from_pb, resources_to_pb
from scheduler.zookeeper import ZooKeeperServer
from storage.bench import cpu_seconds, memory_mib

TASKS_PER_AGENT = 10
AGENTS_PER_PROCESS = 250
TASK = Resources.parse("cpus:0.1;mem:32")
QUIET = 0.5
IDLE = 5.0
CLUSTER = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_of(pid: int) -> float:
    seconds = cpu_seconds(pid)
    if seconds is None:
        raise RuntimeError(f"the master (pid {pid}) is gone")
    return seconds


class Recorder(Framework):
    """Holds offers, records UPDATE latencies by state."""

    def __init__(self) -> None:
        self.offers: dict[str, pb.Offer] = {}
        self.latency: dict[int, list[float]] = {}
        self.states: dict[str, int] = {}

    async def on_offers(self, driver: FrameworkDriver, offers: list[pb.Offer]) -> None:
        for offer in offers:
            self.offers[offer.offer_id] = offer

    async def on_rescind(self, driver: FrameworkDriver, offer_id: str) -> None:
        self.offers.pop(offer_id, None)

    async def on_update(self, driver: FrameworkDriver, status: pb.TaskStatus) -> None:
        if status.timestamp:
            self.latency.setdefault(status.state, []).append(time.time() - status.timestamp)
        self.states[status.task_id] = status.state

    def agents_offered(self) -> set[str]:
        return {o.agent_id for o in self.offers.values()}

    def count(self, state: int) -> int:
        return sum(1 for s in self.states.values() if s == state)


async def wait_until(recorder: Recorder, predicate: Any, timeout: float) -> None:
    try:
        await async_poll_for(predicate, timeout, interval=0.01)
    except TimeoutError:
        counts = Counter(pb.TaskState.Name(s) for s in recorder.states.values())  # type: ignore[arg-type]
        raise TimeoutError(f"condition not met in {timeout}s; task states {dict(counts)}") from None


async def drive(zk: str, agents: int, master_pid: int, kill_rate: float) -> dict[str, Any]:
    recorder = Recorder()
    info = pb.FrameworkInfo(name="scale-bench", role="bench", failover_timeout=60)
    async with FrameworkDriver(recorder, info, zk=zk, cluster=CLUSTER,
                               call_timeout=30.0) as driver:
        cycles = []
        for _ in range(3):
            await driver.suppress()
            await asyncio.sleep(QUIET)  # offers already on their way arrive before t0
            if recorder.offers:
                await driver.decline(list(recorder.offers), refuse_seconds=0)
                recorder.offers.clear()
            t0 = time.monotonic()
            await driver.revive()
            await wait_until(recorder, lambda: len(recorder.agents_offered()) >= agents, 60)
            cycles.append(time.monotonic() - t0)
        cpu0 = cpu_of(master_pid)
        total = agents * TASKS_PER_AGENT
        launched = 0
        t_launch = time.monotonic()
        while launched < total:
            await wait_until(recorder, lambda: bool(recorder.offers), 60)
            offers = list(recorder.offers.values())
            recorder.offers.clear()
            for offer in offers:
                tasks: list[pb.TaskInfo] = []
                free = resources_from_pb(offer.resources)
                while launched + len(tasks) < total and free.contains(TASK):
                    free = free - TASK
                    tasks.append(pb.TaskInfo(
                        task_id=f"t{launched + len(tasks)}", name="sim",
                        agent_id=offer.agent_id, resources=resources_to_pb(TASK),
                        command=pb.CommandInfo(argv=["true"]),
                    ))
                    if len(tasks) >= TASKS_PER_AGENT:
                        break
                if tasks:
                    await driver.launch(offer, tasks, refuse_seconds=0)
                    launched += len(tasks)
                else:
                    await driver.decline([offer.offer_id], refuse_seconds=60)
        await wait_until(recorder, lambda: recorder.count(pb.TASK_RUNNING) >= total, 120)
        launch_seconds = time.monotonic() - t_launch
        idle0 = cpu_of(master_pid)
        await asyncio.sleep(IDLE)  # measuring the idle cost: heartbeats of every agent
        idle_cpu = (cpu_of(master_pid) - idle0) / IDLE
        t_kill = time.monotonic()
        for i, task_id in enumerate(list(recorder.states)):
            pause = t_kill + i / kill_rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)  # pacing the kills, not synchronization
            await driver.kill(task_id, "")
        await wait_until(recorder, lambda: recorder.count(pb.TASK_KILLED) >= total, 120)
        kill_seconds = time.monotonic() - t_kill
        cpu1 = cpu_of(master_pid)
    running = [x * 1000 for x in recorder.latency.get(pb.TASK_RUNNING, [])]
    killed = [x * 1000 for x in recorder.latency.get(pb.TASK_KILLED, [])]
    both = running + killed
    return {
        "agents": agents,
        "tasks": total,
        "offer_cycle_s": {"median": statistics.median(cycles), "max": max(cycles),
                          "rounds": cycles},
        # RUNNING: every task launched at once (a burst); KILLED: kills paced at kill_rate/s.
        "update_latency_ms": {
            "burst_running": {"p50": percentile(running, 0.5), "p99": percentile(running, 0.99),
                              "count": len(running)},
            "paced_killed": {"p50": percentile(killed, 0.5), "p99": percentile(killed, 0.99),
                             "count": len(killed), "rate_per_s": kill_rate},
            "all": {"p50": percentile(both, 0.5), "p99": percentile(both, 0.99)},
        },
        "launch_s": launch_seconds,
        "kill_s": kill_seconds,
        "master_cpu_s_launch_and_kill": cpu1 - cpu0 - idle_cpu * IDLE,
        "master_peak_rss_mib": memory_mib(master_pid).get("hwm_mib", float("nan")),
        "master_idle_cpu_fraction": idle_cpu,
    }


def ready(process: Process) -> bool:
    return "ready" in process.stdout_path.read_text()


def run_one(agents: int, allocation_interval: float, kill_rate: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ringstore-scale-"))
    processes: list[Process] = []
    try:
        with ZooKeeperServer(work / "zk") as zookeeper:
            zk = f"{zookeeper.address}/ringstore"
            try:
                master = spawn(
                    [sys.executable, "-m", "scheduler.cli", "-v", "master", "--zk", zk,
                     "--cluster", CLUSTER, "--listen", f"127.0.0.1:{free_port()}",
                     "--allocation-interval", str(allocation_interval),
                     "--offer-timeout", "300", "--agent-timeout", "30"],
                    name="master", log_dir=work / "logs")
                processes.append(master)
                for start in range(0, agents, AGENTS_PER_PROCESS):
                    count = min(AGENTS_PER_PROCESS, agents - start)
                    processes.append(spawn(
                        [sys.executable, "-m", "scheduler.simulated", "--zk", zk,
                         "--cluster", CLUSTER, "--count", str(count),
                         "--prefix", f"sim{start}"],
                        name=f"agents-{start}", log_dir=work / "logs"))
                for process in processes[1:]:
                    poll_for(partial(ready, process), timeout=180,
                             what=f"{process.name} registered")
                result = asyncio.run(drive(zk, agents, master.pid, kill_rate))
            finally:
                for process in reversed(processes):
                    process.terminate(grace=5)
    except BaseException:
        print(f"failed; logs kept in {work / 'logs'}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="50,200,500")
    parser.add_argument("--allocation-interval", type=float, default=1.0)
    parser.add_argument("--kill-rate", type=float, default=200.0,
                        help="kills per second in the paced phase")
    parser.add_argument("--out", type=Path, default=Path("bench/results/substrate-scale.json"))
    args = parser.parse_args()
    results = []
    for agents in (int(a) for a in args.agents.split(",")):
        result = run_one(agents, args.allocation_interval, args.kill_rate)
        results.append(result)
        lat = result["update_latency_ms"]
        print(f"agents={agents:4d} tasks={result['tasks']:5d} "
              f"offer_cycle={result['offer_cycle_s']['median']:.2f}s "
              f"update burst p50/p99={lat['burst_running']['p50']:.0f}/"
              f"{lat['burst_running']['p99']:.0f}ms "
              f"paced p50/p99={lat['paced_killed']['p50']:.0f}/"
              f"{lat['paced_killed']['p99']:.0f}ms "
              f"master cpu={result['master_cpu_s_launch_and_kill']:.1f}s "
              f"idle={100 * result['master_idle_cpu_fraction']:.0f}% "
              f"rss={result['master_peak_rss_mib']:.0f}MiB", flush=True)
    record = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
