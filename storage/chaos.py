"""Chaos testing: a recorded workload, a seeded nemesis, and the run that checks them.

Role: the test toolkit for DESIGN §6's promises (§11), shipped with the code. `Workload`
drives concurrent clients over a small, rotating set of keys and records every operation
in the `storage.checker` history format; `Nemesis` applies faults from a schedule computed
up front from a seed (SIGKILL a node, SIGSTOP a partition leader past the ZooKeeper session
timeout, SIGKILL a controller) and undoes each; `run_chaos` runs both against a
`LocalCluster`, writes `history.jsonl` and `nemesis.jsonl`, and checks the history.
`measure_failover` times how long a partition stays unwritable after its leader dies.

Invariants:
- a record's status follows DESIGN §6: an error that proves the operation did not happen
  (`StorageError.definite`) is `fail`, except that a CAS mismatch is an ok cas with
  `cas_ok` false; every other error is `info`. `call`/`return` are `time.monotonic_ns()`
  taken right around the client call;
- every written value is unique (`<client>-<seq>`), as the checker requires;
- the schedule depends on the seed and the cluster's shape only; what depends on the
  cluster's state (which node leads a partition, which controller is active) is resolved
  when the fault is applied, and logged;
- faults never overlap; every fault is undone before the run ends, then the run waits
  (bounded) until every partition has a serving leader again;
- every wait is bounded: an operation by its timeout plus a guard, the run by its
  duration, recovery by a timeout. The nemesis's sleeps are its schedule, not
  synchronisation.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scheduler.deadline import poll_for
from storage.checker import Report, check
from storage.client import AsyncClient, Client, Item
from storage.errors import CasMismatch, StorageError
from storage.local import LocalCluster
from storage.partition import partition_of

__all__ = [
    "ACTIONS",
    "ChaosResult",
    "Fault",
    "Keys",
    "Nemesis",
    "Workload",
    "key_in_partition",
    "measure_failover",
    "plan_faults",
    "put_succeeds",
    "run_chaos",
]

log = logging.getLogger(__name__)

Record = dict[str, Any]

OP_TIMEOUT = 2.0  # each client call's deadline
GUARD = 3.0  # past its deadline, a call the client did not end is abandoned (as info)
MIX: tuple[tuple[str, float], ...] = (
    ("read", 0.40), ("write", 0.30), ("cas", 0.25), ("delete", 0.05))

KILL_NODE, PAUSE_LEADER, KILL_CONTROLLER = "kill-node", "pause-leader", "kill-controller"
ACTIONS: tuple[str, ...] = (KILL_NODE, PAUSE_LEADER, KILL_CONTROLLER)
WEIGHTS = {KILL_NODE: 0.4, PAUSE_LEADER: 0.4, KILL_CONTROLLER: 0.2}
READY_TIMEOUT = 60.0  # how long the cluster may take to serve every partition again


# --- the workload -----------------------------------------------------------------------


class Keys:
    """The active keys: `size` slots; a key retires after `uses` operations and a fresh key
    takes its slot, so that each key's history stays small enough to check."""

    def __init__(self, size: int, uses: int, prefix: str) -> None:
        self._numbers = itertools.count()
        self._prefix = prefix
        self._uses = uses
        self.slots = [self._fresh() for _ in range(size)]
        self._left = [uses] * size

    def _fresh(self) -> str:
        return f"{self._prefix}{next(self._numbers)}"

    def pick(self, rng: random.Random, cost: int = 1) -> str:
        i = rng.randrange(len(self.slots))
        key = self.slots[i]
        self._left[i] -= cost
        if self._left[i] <= 0:
            self.slots[i], self._left[i] = self._fresh(), self._uses
        return key


@dataclass
class Workload:
    """`clients` concurrent clients, each its own `AsyncClient`, doing one operation at a
    time until `duration_s` has passed or `max_ops` operations were issued."""

    endpoints: Sequence[str]
    clients: int = 8
    duration_s: float = 60.0
    max_ops: int = 10_000_000
    keys: int = 12
    ops_per_key: int = 200
    op_timeout: float = OP_TIMEOUT
    coalesce: bool = True
    seed: int = 0
    key_prefix: str = "chaos-"
    history: list[Record] = field(default_factory=list, init=False)
    started_ns: int = field(default=0, init=False)
    _issued: int = field(default=0, init=False)
    _in_flight: dict[int, Record] = field(default_factory=dict, init=False)

    async def run(self) -> list[Record]:
        """Run every client to the end; return the history (completed ops, in completion
        order; ops still in flight if cancelled are recorded with return None)."""
        keys = Keys(self.keys, self.ops_per_key, self.key_prefix)
        self.started_ns = time.monotonic_ns()
        deadline = time.monotonic() + self.duration_s
        try:
            await asyncio.gather(*(self._client(f"c{i}", keys, deadline)
                                   for i in range(self.clients)))
        finally:
            self.history.extend(self._in_flight.values())  # pending: return None, info
            self._in_flight.clear()
        return self.history

    async def _client(self, name: str, keys: Keys, deadline: float) -> None:
        rng = random.Random(f"{self.seed}/{name}")
        kinds, weights = zip(*MIX, strict=True)
        client = AsyncClient(list(self.endpoints), coalesce=self.coalesce,
                             timeout=self.op_timeout)
        try:
            for seq in itertools.count():
                if time.monotonic() >= deadline or self._issued >= self.max_ops:
                    return
                kind = rng.choices(kinds, weights)[0]
                key = keys.pick(rng, cost=2 if kind == "cas" else 1)
                value = f"{name}-{seq}"
                if kind == "cas":
                    read, item = await self._op(client, name, "read", key, None)
                    if read["status"] != "ok":
                        continue
                    await self._op(client, name, "cas", key, value, read["value"], item)
                else:
                    await self._op(client, name, kind, key, None if kind in ("read", "delete")
                                   else value)
        finally:
            await client.close()

    async def _op(self, client: AsyncClient, name: str, kind: str, key: str,
                  value: str | None, expect: str | None = None,
                  expected: Item | None = None) -> tuple[Record, Item | None]:
        """Run and record one operation; return its record and, for a read, the item."""
        self._issued += 1
        record: Record = {"client": name, "key": key, "op": kind, "value": value,
                          "expect": expect, "call": 0, "return": None, "status": "info",
                          "output": "", "cas_ok": None}
        self._in_flight[id(record)] = record
        item: Item | None = None
        record["call"] = time.monotonic_ns()
        try:
            call = self._call(client, kind, key, value, expected)
            result = await asyncio.wait_for(call, self.op_timeout + GUARD)
            record["return"] = time.monotonic_ns()
            record["status"] = "ok"
            if kind == "read":
                item = result if isinstance(result, Item) else None
                record["value"] = item.value.decode() if item is not None else None
                record["output"] = str(item.version) if item is not None else "absent"
            else:
                record["output"] = str(result)
            if kind == "cas":
                record["cas_ok"] = True
        except CasMismatch as err:
            record["return"] = time.monotonic_ns()
            record["status"], record["cas_ok"] = ("ok", False) if kind == "cas" else ("fail", None)
            record["output"] = f"CasMismatch: {err} (current {err.current})"
        except StorageError as err:
            record["return"] = time.monotonic_ns()
            record["status"] = "fail" if err.definite else "info"
            record["output"] = f"{type(err).__name__}: {err}"
        except Exception as err:  # a guard timeout, a client bug: the outcome is unknown
            record["return"] = time.monotonic_ns()
            record["output"] = f"{type(err).__name__}: {err}"
        del self._in_flight[id(record)]
        self.history.append(record)
        return record, item

    @staticmethod
    async def _call(client: AsyncClient, kind: str, key: str, value: str | None,
                    expected: Item | None) -> object:
        if kind == "read":
            return await client.get(key)
        if kind == "delete":
            return await client.delete(key)
        assert value is not None
        if kind == "write":
            return await client.put(key, value)
        return await client.cas(key, value, expected=expected.version if expected else None)


# --- the nemesis ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One planned fault. `target`: a node id (kill-node), `p<partition>` (pause that
    partition's leader), or `active|<index>` (kill the active controller; the index is
    the fallback when the active one cannot be told)."""

    action: str
    target: str
    gap_s: float  # quiet time before the fault, once the cluster is ready again
    hold_s: float  # how long the fault lasts before it is undone


def plan_faults(seed: int, *, count: int, nodes: Sequence[str], partitions: int,
                controllers: int, session_timeout: float,
                actions: Sequence[str] = ACTIONS) -> list[Fault]:
    """The fault schedule: a function of the seed and the cluster's shape only."""
    rng = random.Random(seed)
    usable = [a for a in actions if a != KILL_CONTROLLER or controllers > 0]
    faults = []
    for _ in range(count):
        action = rng.choices(usable, [WEIGHTS[a] for a in usable])[0]
        gap = round(rng.uniform(1.0, 4.0), 2)
        if action == KILL_NODE:
            target, hold = rng.choice(list(nodes)), rng.uniform(0.5, 4.0)
        elif action == PAUSE_LEADER:
            target, hold = f"p{rng.randrange(partitions)}", session_timeout + rng.uniform(1, 3)
        else:
            target, hold = f"active|{rng.randrange(controllers)}", rng.uniform(0.5, 3.0)
        faults.append(Fault(action, target, gap, round(hold, 2)))
    return faults


class Nemesis:
    """Applies a seeded schedule of faults to a `LocalCluster`, one at a time, and undoes
    each. Cluster calls block, so they run in a worker thread."""

    def __init__(self, cluster: LocalCluster, seed: int, *, quiet_s: float = 8.0,
                 actions: Sequence[str] = ACTIONS, count: int = 1000) -> None:
        self.cluster = cluster
        self.seed = seed
        self.quiet_s = quiet_s
        self.schedule = plan_faults(
            seed, count=count, nodes=sorted(cluster.node_processes),
            partitions=cluster.partitions, controllers=len(cluster.controller_processes),
            session_timeout=cluster.session_timeout, actions=actions) if actions else []
        self.events: list[Record] = []
        self.applied = 0
        self.first_fault_ns: int | None = None
        self.recovered: bool | None = None
        self.crashed: list[str] = []  # processes found dead that no fault had killed
        self._undo: list[tuple[str, str, Callable[[], object]]] = []

    def _log(self, action: str, target: str, **detail: Any) -> None:
        event = {"time": time.monotonic_ns(), "action": action, "target": target, **detail}
        self.events.append(event)
        log.info("nemesis %s", " ".join(f"{k}={v}" for k, v in event.items()))

    async def run(self, until: float) -> None:
        """Apply faults until the next would not be undone by `until` (monotonic seconds),
        then heal everything and wait for the cluster to be ready."""
        self._log("schedule", "", seed=self.seed,
                  faults=[asdict(f) for f in self.schedule[:50]])
        try:
            for i, fault in enumerate(self.schedule):
                gap = self.quiet_s if i == 0 else fault.gap_s
                if time.monotonic() + gap + fault.hold_s > until:
                    break
                await asyncio.sleep(gap)
                if not await self._apply(fault):
                    continue
                await asyncio.sleep(fault.hold_s)
                await self._heal()
                if not await self._ready(READY_TIMEOUT):
                    break  # do not pile faults onto a cluster that did not recover
        finally:
            await self._heal()
            self.recovered = await self._ready(READY_TIMEOUT)

    async def _apply(self, fault: Fault) -> bool:
        cluster = self.cluster
        if fault.action == KILL_NODE:
            node = fault.target
            if not cluster.node_alive(node):
                self._log("skip", node, why="not running")
                return False
            await self._fault(KILL_NODE, node, lambda: cluster.kill_node(node),
                              "restart-node", lambda: cluster.start_node(node))
        elif fault.action == PAUSE_LEADER:
            p = int(fault.target[1:])
            leader = await asyncio.to_thread(cluster.leader_of, p)
            if leader is None:
                self._log("skip", fault.target, why="no leader in the map")
                return False
            node = leader.node_id
            await self._fault(PAUSE_LEADER, node, lambda: cluster.pause_node(node),
                              "resume-node", lambda: cluster.resume_node(node),
                              partition=p, epoch=leader.epoch, hold_s=fault.hold_s)
        else:
            active = await asyncio.to_thread(cluster.active_controller)
            index = active if active is not None else int(fault.target.split("|")[1])
            await self._fault(KILL_CONTROLLER, f"controller-{index + 1}",
                              lambda: cluster.kill_controller(index), "restart-controller",
                              lambda: cluster.restart_controller(index),
                              active=active is not None)
        return True

    async def _fault(self, action: str, target: str, do: Callable[[], object], undo_action: str,
                     undo: Callable[[], object], **detail: Any) -> None:
        self._undo.append((undo_action, target, undo))
        if self.first_fault_ns is None:
            self.first_fault_ns = time.monotonic_ns()
        self._log(action, target, **detail)
        await asyncio.to_thread(do)
        self.applied += 1

    async def _heal(self) -> None:
        """Undo every applied fault, newest first; then make sure every process runs."""
        while self._undo:
            action, target, undo = self._undo.pop()
            await asyncio.to_thread(undo)
            self._log(action, target)
        cluster = self.cluster
        for node in sorted(cluster.paused):
            await asyncio.to_thread(cluster.resume_node, node)
            self._log("resume-node", node)
        for node in sorted(cluster.node_processes):
            if not cluster.node_alive(node):
                self.crashed.append(node)
                self._log("crashed", node, log=str(cluster.log_dir / f"{node}.stderr"))
                await asyncio.to_thread(cluster.start_node, node)
                self._log("restart-node", node)
        for index in range(len(cluster.controller_processes)):
            if not cluster.controller_alive(index):
                name = f"controller-{index + 1}"
                self.crashed.append(name)
                self._log("crashed", name, log=str(cluster.log_dir / f"{name}.stderr"))
                await asyncio.to_thread(cluster.restart_controller, index)
                self._log("restart-controller", name)

    async def _ready(self, timeout: float) -> bool:
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.cluster.wait_ready, timeout)
        except TimeoutError:
            self._log("not-ready", "cluster", waited_s=timeout)
            return False
        self._log("ready", "cluster", waited_s=round(time.monotonic() - started, 2))
        return True


# --- the run ----------------------------------------------------------------------------


@dataclass
class ChaosResult:
    seed: int
    duration_s: float
    history_path: Path
    nemesis_path: Path
    counts: dict[str, dict[str, int]]  # op kind -> ok/fail/info (cas also: mismatch)
    acknowledged_writes: int  # ok writes and deletes, successful cas
    ok_ops_per_s_before_fault: float
    faults_applied: int
    recovered: bool  # every partition served again after the last fault
    crashed: list[str]  # processes that died without being killed (a bug)
    report: Report

    def summary(self) -> str:
        counts = "; ".join(f"{kind} " + " ".join(f"{s}={n}" for s, n in by.items())
                           for kind, by in self.counts.items())
        return (f"seed={self.seed} duration={self.duration_s:.1f}s "
                f"faults={self.faults_applied} recovered={self.recovered} "
                f"crashed={self.crashed} "
                f"ok/s before first fault={self.ok_ops_per_s_before_fault:.0f} "
                f"acknowledged writes={self.acknowledged_writes}\n{counts}\n"
                f"{self.report.summary()}\nhistory: {self.history_path}")


def _tally(history: Sequence[Record], started_ns: int,
           first_fault_ns: int | None) -> tuple[dict[str, dict[str, int]], int, float]:
    counts = {kind: {"ok": 0, "fail": 0, "info": 0} for kind, _ in MIX}
    counts["cas"]["mismatch"] = 0
    acknowledged = 0
    end = first_fault_ns or max((r["return"] or 0 for r in history), default=started_ns)
    before = 0
    for r in history:
        counts[r["op"]][r["status"]] += 1
        ok = r["status"] == "ok"
        if r["op"] == "cas" and r["cas_ok"] is False:
            counts["cas"]["mismatch"] += 1
        elif ok and r["op"] != "read":
            acknowledged += 1
        if ok and r["return"] <= end:
            before += 1
    rate = before / max((end - started_ns) / 1e9, 1e-9)
    return counts, acknowledged, rate


def _write_jsonl(path: Path, records: Sequence[Record]) -> None:
    with path.open("w") as out:
        for record in records:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")


def run_chaos(cluster: LocalCluster, *, seed: int, duration_s: float, clients: int,
              out_dir: Path, coalesce: bool = True, keys: int = 12,
              actions: Sequence[str] = ACTIONS, quiet_s: float = 8.0, recovery_s: float = 5.0,
              check_budget_s: float = 30.0) -> ChaosResult:
    """Run the workload and the nemesis together for `duration_s`, write `history.jsonl`
    and `nemesis.jsonl` under `out_dir`, check the history, and return the counts and the
    checker's report. The first fault comes after `quiet_s` (the baseline throughput);
    the last is undone at least `recovery_s` before the workload stops. `actions` ()
    runs the workload alone."""
    print(f"chaos: seed={seed} duration={duration_s}s clients={clients} "
          f"nodes={len(cluster.node_processes)} (replay with RINGSTORE_CHAOS_SEED={seed})",
          flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = Workload(cluster.endpoints, clients=clients, duration_s=duration_s, keys=keys,
                        coalesce=coalesce, seed=seed)
    nemesis = Nemesis(cluster, seed, quiet_s=quiet_s, actions=actions)

    async def both() -> list[object]:
        until = time.monotonic() + duration_s - recovery_s
        return list(await asyncio.gather(workload.run(), nemesis.run(until),
                                         return_exceptions=True))

    outcomes = asyncio.run(both())
    history_path, nemesis_path = out_dir / "history.jsonl", out_dir / "nemesis.jsonl"
    _write_jsonl(history_path, workload.history)
    _write_jsonl(nemesis_path, nemesis.events)
    print(f"chaos: history at {history_path}", flush=True)
    try:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        report = check(workload.history, time_budget_s=check_budget_s)
    except BaseException:
        (out_dir / "error.txt").write_text(f"seed={seed}\n{traceback.format_exc()}")
        raise
    counts, acknowledged, rate = _tally(workload.history, workload.started_ns,
                                        nemesis.first_fault_ns)
    result = ChaosResult(seed, duration_s, history_path, nemesis_path, counts, acknowledged,
                         rate, nemesis.applied, bool(nemesis.recovered), nemesis.crashed, report)
    (out_dir / "summary.txt").write_text(result.summary() + "\n")
    return result


# --- failover time ----------------------------------------------------------------------


def key_in_partition(partition: int, partitions: int, prefix: str) -> str:
    """The first key `<prefix><n>` that falls in `partition`."""
    for n in itertools.count():
        key = f"{prefix}{n}"
        if partition_of(key.encode(), partitions) == partition:
            return key
    raise AssertionError("unreachable")


def measure_failover(cluster: LocalCluster, kills: int, seed: int,
                     timeout: float = 60.0, fault: str = "kill") -> list[float]:
    """SIGKILL (fault="kill") or SIGSTOP (fault="pause") the leader of a (seeded) random
    partition `kills` times; for each, the seconds from the fault until a put to that
    partition succeeds again. The node is restarted (or resumed) and the cluster made
    ready between faults."""
    rng = random.Random(seed)
    times: list[float] = []
    with Client(cluster.endpoints, timeout=1.0) as client:
        for i in range(kills):
            p = rng.randrange(cluster.partitions)
            key = key_in_partition(p, cluster.partitions, f"failover-{seed}-{i}-")
            put_ok = functools.partial(put_succeeds, client, key)
            poll_for(put_ok, timeout, interval=0.01, what=f"a put to partition {p}")
            leader = cluster.leader_of(p)
            assert leader is not None, f"partition {p} has no leader"
            killed = time.monotonic()
            if fault == "pause":
                cluster.pause_node(leader.node_id)
            else:
                cluster.kill_node(leader.node_id)
            poll_for(put_ok, timeout, interval=0.01,
                     what=f"a put to partition {p} after a {fault} of its leader "
                          f"{leader.node_id}")
            times.append(time.monotonic() - killed)
            log.info("failover fault=%s partition=%d leader=%s seconds=%.2f", fault, p,
                     leader.node_id, times[-1])
            if fault == "pause":
                cluster.resume_node(leader.node_id)
            else:
                cluster.start_node(leader.node_id)
            cluster.wait_ready(READY_TIMEOUT)
    return times


def put_succeeds(client: Client, key: str | bytes, value: str | bytes = "x", *,
                 timeout: float | None = None) -> bool:
    """One put; whether it was acknowledged (a predicate for `poll_for`)."""
    try:
        client.put(key, value, timeout=timeout)
    except StorageError:
        return False
    return True
