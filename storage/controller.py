"""The ring controller: the only writer of the partition map (DESIGN §5, §6 failover).

One controller leads at a time (ZooKeeper election under `storage/controller`); others
wait. The leader:
- creates the cluster config (Q, RF) once;
- places partitions with `storage.partition.plan` once the expected nodes are live;
- chooses every partition leader through the Promise path: (1) reserve epoch e+1 with
  a versioned write (epochs are never reused, even across controller crashes), (2) ask
  the replicas to promise e+1, (3) from a majority that promised pick the replica with
  the highest last (epoch, index), (4) write it with a versioned write;
- re-runs that path for every partition whose leader's liveness node is gone, whose
  leader refuses connections, or whose leader it suspects (`FailureDetector`: a health
  probe every `probe_interval`; a killed process refuses at once, a frozen one is
  suspected once its probes have timed out in a row for `suspect_after` seconds — either
  way failover need not wait for the node's ZooKeeper session to expire, and the Promise
  majority keeps it safe whatever triggered it);
- moves leadership away from a node that announces it is leaving (`leaving/<node>`,
  written by a node on SIGTERM once its followers have caught up), so a rolling restart
  needs no failover;
- promotes a rejoined node whose data directory is a new incarnation (a wiped disk) once
  every partition it holds has caught up with its leader: only then does the node vote.

Every map write is a compare-and-set on the znode version, so a deposed controller that
still runs can never overwrite its successor's decisions. While the ZooKeeper session
is SUSPENDED or LOST the controller makes no decision, and gathers no suspicion: once
it is CONNECTED again every node must stay silent for a whole new window to be suspected.

Failpoint (tests only): with `RINGSTORE_FAILPOINT_HOLD_LEADER_WRITE=<seconds>` in its
environment, a controller that fails a partition over away from a named leader logs
`failpoint: holding ... partition=<p>` once a majority has promised the new epoch, and
waits that long before writing the leader, so a test can kill it mid-failover
(tests/integration/test_controller_failover.py). Neither the first placement, nor a
hand-off, nor a successor that finds the epoch reserved with no leader holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler.coord import CoordError, Coordinator, Election, NodeExists, VersionConflict
from storage import directory
from storage.directory import NodeRecord, Paths
from storage.failure_detector import FailureDetector, Probe
from storage.partition import (
    DEFAULT_PARTITIONS,
    DEFAULT_REPLICATION,
    Assignment,
    Member,
    PartitionMap,
    check_partition_count,
    plan,
)
from storage.peers import Peers
from storage.replication import LogPosition, choose_leader, majority
from storage.v1 import replica_pb2

log = logging.getLogger(__name__)

PROMISE_TIMEOUT = 1.0
ELECTION_CONCURRENCY = 32
PROBE_TIMEOUT = 0.5
HOLD_FAILPOINT = "RINGSTORE_FAILPOINT_HOLD_LEADER_WRITE"


@dataclass(frozen=True)
class ControllerOptions:
    zk: str
    cluster: str = "default"
    partitions: int = DEFAULT_PARTITIONS
    replication: int = DEFAULT_REPLICATION
    expect_nodes: int = 3
    controller_id: str = ""
    session_timeout: float = 4.0
    interval: float = 1.0
    probe_interval: float = 0.25
    # A node whose health probes have all timed out for this long is suspected and its
    # leaderships fail over. Above the lease (1 s), which the followers make a failover
    # wait out anyway; half the nodes' session timeout, so a SIGSTOPped leader is
    # replaced about 2 s sooner than by its session's expiry; and 4x the probe timeout,
    # so only a node that answered nothing for 2 s (3 probes in a row), not one slowed
    # by a loaded machine, is suspected (docs/architecture.md, failure detection).
    suspect_after: float = 2.0
    rebalance_interval: float = 5.0


class Controller:
    """A controller process: contends for leadership, then reconciles the map."""

    def __init__(self, options: ControllerOptions) -> None:
        check_partition_count(options.partitions)
        if options.replication < 1:
            raise ValueError("replication must be at least 1")
        self.options = options
        self.id = options.controller_id or f"controller-{os.getpid()}"
        self.paths = Paths(options.cluster)
        self.coord = Coordinator(options.zk, session_timeout=options.session_timeout,
                                 name=self.id)
        self.peers = Peers()
        self.leading = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._electing: set[int] = set()
        self.detector = FailureDetector(options.suspect_after)
        self._live: set[str] = set()
        self._hold = float(os.environ.get(HOLD_FAILPOINT) or 0)  # seconds; tests only
        self._last_rebalance = 0.0
        self._announced = False

    async def run(self) -> None:
        await self.coord.start()
        self.coord.on_state(self._on_state)
        election = Election(self.coord, self.paths.controller,
                            json.dumps({"id": self.id, "pid": os.getpid()}).encode())
        for path in (self.paths.live, self.paths.nodes, self.paths.leaving):
            self.coord.watch_children(path, lambda _: self._wake.set())
        try:
            while not self._stop.is_set():
                if not await election.campaign(self._stop):
                    break
                self.leading = True
                self._announced = False
                self.detector = FailureDetector(self.options.suspect_after)
                log.info("controller leading id=%s", self.id)
                probe = asyncio.create_task(self._probe_loop(), name="probe")
                try:
                    await self._lead()
                finally:
                    probe.cancel()
                    await asyncio.gather(probe, return_exceptions=True)
                self.leading = False
        finally:
            await self.peers.close()
            await self.coord.close()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _on_state(self, state: str) -> None:
        if state != "CONNECTED" and self.leading:
            log.warning("controller session %s: pausing decisions id=%s", state, self.id)
        if state == "LOST":
            self.leading = False
        if state != "CONNECTED":
            self.detector.reset()
        self._wake.set()

    async def _lead(self) -> None:
        while self.leading and not self._stop.is_set():
            self._wake.clear()
            if self.coord.connected:
                try:
                    await self.reconcile()
                except CoordError as exc:
                    log.warning("reconcile interrupted: %s", exc)
                except Exception:
                    log.exception("reconcile failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.options.interval)
            except TimeoutError:
                pass

    async def reconcile(self) -> None:
        """One pass: config, initial placement, leaders for partitions that lack one."""
        config = await self._ensure_config()
        view = await directory.read_view(self.coord, self.paths)
        self.peers.update({n: r.address for n, r in view.nodes.items()})
        self._live = {n for n in view.live if n in view.nodes}
        live = self._live - self.detector.down
        pmap = view.map
        if pmap is None:
            members = [Member(n, view.nodes[n].domain) for n in sorted(live)
                       if view.nodes[n].state == "up"]
            if len(members) < self.options.expect_nodes:
                log.info("waiting for nodes live=%d expected=%d", len(members),
                         self.options.expect_nodes)
                return
            await self._create_map(config, members)
            pmap = await directory.read_map(self.coord, self.paths)
            if pmap is None:
                return
        elif not self._announced:
            # A predecessor may have written a leader and died before bumping the map
            # version; bump once so every node re-reads the map it may have missed.
            await self._bump_version()
        self._announced = True
        orphaned = [a.partition for a in pmap.assignments
                    if (a.leader is None or a.leader not in live)
                    and a.partition not in self._electing]
        if orphaned:
            await self._elect_all(orphaned, live, set())
        leaving = set(await self.coord.children(self.paths.leaving)) & live
        handing = [a.partition for a in pmap.assignments
                   if a.leader in leaving and a.partition not in self._electing]
        if handing:
            log.info("moving leadership off leaving nodes=%s partitions=%d", sorted(leaving),
                     len(handing))
            await self._elect_all(handing, live, leaving)
        await self._promote(view.nodes, view.live, pmap, live)
        if not orphaned and not handing:
            # Not back to a node suspected lately: one that froze may freeze again.
            now = asyncio.get_running_loop().time()
            shaky = self.detector.recently_suspected(now, 2 * self.options.rebalance_interval)
            await self._rebalance_leaders(pmap, live - leaving - shaky)

    async def _rebalance_leaders(self, pmap: PartitionMap, live: set[str]) -> None:
        """Move leaderships back to their planned replica (the first of each set) where a
        node leads more than one partition beyond it, a few at a time and at most every
        `rebalance_interval`, through the hand-off path (no lease wait, no failover)."""
        now = asyncio.get_running_loop().time()
        if now - self._last_rebalance < self.options.rebalance_interval:
            return
        counts = dict.fromkeys(live, 0)
        for a in pmap.assignments:
            if a.leader in counts:
                counts[a.leader] += 1
        moves: list[Assignment] = []
        for a in pmap.assignments:
            preferred = a.replicas[0] if a.replicas else None
            if (a.leader in counts and preferred in counts and preferred != a.leader
                    and counts[a.leader] > counts[preferred] + 1 and len(moves) < 4):
                counts[a.leader] -= 1
                counts[preferred] += 1
                moves.append(a)
        if not moves:
            return
        self._last_rebalance = now
        log.info("rebalancing leaders moves=%s",
                 [(a.partition, a.leader, a.replicas[0]) for a in moves])
        for a in moves:
            assert a.leader is not None
            await self._elect_all([a.partition], live, {a.leader})

    async def _ensure_config(self) -> dict[str, Any]:
        found = await directory.read_config(self.coord, self.paths)
        if found is not None:
            if (found.get("partitions"), found.get("replication")) != (
                    self.options.partitions, self.options.replication):
                log.debug("cluster config exists partitions=%s replication=%s",
                          found.get("partitions"), found.get("replication"))
            return found
        config = {"partitions": self.options.partitions,
                  "replication": self.options.replication,
                  "created": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            await self.coord.create_json(self.paths.config, config, makepath=True)
            log.info("created cluster config %s", config)
        except NodeExists:
            found = await directory.read_config(self.coord, self.paths)
            assert found is not None
            return found
        return config

    async def _create_map(self, config: dict[str, Any], members: list[Member]) -> None:
        q, rf = int(config["partitions"]), int(config["replication"])
        placement = plan(None, members, q, rf)
        await self.coord.ensure(self.paths.partitions)
        existing = set(await self.coord.children(self.paths.partitions))
        for p in range(q):
            if f"{p:04d}" in existing:
                continue
            a = Assignment(p, 0, None, placement[p], ())
            try:
                await self.coord.create_json(self.paths.partition(p), a.to_json())
            except NodeExists:
                pass
        await self._bump_version()
        log.info("placed %d partitions on %d nodes replication=%d", q, len(members), rf)

    async def _elect_all(self, partitions: list[int], live: set[str], avoid: set[str]) -> None:
        gate = asyncio.Semaphore(ELECTION_CONCURRENCY)

        async def one(p: int) -> bool:
            async with gate:
                return await self.elect(p, live, avoid)

        self._electing.update(partitions)
        try:
            results = await asyncio.gather(*(one(p) for p in partitions),
                                           return_exceptions=True)
        finally:
            self._electing.difference_update(partitions)
        changed = False
        for p, result in zip(partitions, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("election failed partition=%d error=%r", p, result)
            changed = changed or result is True
        if changed:
            await self._bump_version()
        # Partitions still without a leader are retried on the next pass (every
        # `interval`, or sooner when membership changes), not in a tight loop.

    async def elect(self, p: int, live: set[str], avoid: set[str] | None = None) -> bool:
        """Choose partition p's leader in a fresh epoch. True once the map names one.

        Replicas in `avoid` (leaving nodes) are chosen only when no other replica holds
        the highest log position among those that promised."""
        found = await self.coord.get_json(self.paths.partition(p))
        if found is None:
            return False
        data, version = found
        current = Assignment.from_json(p, data)
        voters = [n for n in current.replicas if n in live]
        if len(voters) < majority(len(current.replicas)):
            log.warning("partition unavailable: live replicas below a majority partition=%d "
                        "live=%s replicas=%s", p, voters, current.replicas)
            return False
        if not self.coord.connected or not self.leading:
            return False
        epoch = current.epoch + 1
        reserved = Assignment(p, epoch, None, current.replicas, current.learners)
        version = await self.coord.set_json(self.paths.partition(p), reserved.to_json(), version)
        promised = await self._promises(p, epoch, current, avoid or set())
        if len(promised) < majority(len(current.replicas)):
            log.warning("no promise majority partition=%d epoch=%d promised=%s", p, epoch,
                        sorted(promised))
            return False
        best = max(promised.values())
        preferred = {n: pos for n, pos in promised.items()
                     if n not in (avoid or set()) and n in live}
        leader = choose_leader(preferred if preferred and max(preferred.values()) == best
                               else promised, current.replicas)
        chosen = Assignment(p, epoch, leader, current.replicas, current.learners)
        if self._hold and current.leader and not avoid:
            log.warning("failpoint: holding before writing the leader partition=%d epoch=%d "
                        "seconds=%s", p, epoch, self._hold)
            await asyncio.sleep(self._hold)
        if not self.coord.connected or not self.leading:
            return False
        try:
            await self.coord.set_json(self.paths.partition(p), chosen.to_json(), version)
        except VersionConflict:
            log.warning("partition changed under the controller partition=%d", p)
            return False
        log.info("leader chosen partition=%d epoch=%d leader=%s positions=%s", p, epoch, leader,
                 {n: f"{pos.epoch}.{pos.index}" for n, pos in promised.items()})
        return True

    async def _promises(self, p: int, epoch: int, a: Assignment, leaving: set[str]
                        ) -> dict[str, LogPosition]:
        """Ask every replica to promise `epoch`; return once a majority did (or all answered).

        In a hand-off (the current leader is leaving and alive) the leader is asked first:
        once it has promised it serves no LEASE read, so the others are told they need not
        wait out the lease they granted it."""
        request = replica_pb2.PromiseRequest(partition=p, epoch=epoch, replicas=a.replicas,
                                             learners=a.learners)
        need = majority(len(a.replicas))
        granted: dict[str, LogPosition] = {}
        first: list[str] = []
        if a.leader and a.leader in leaving:
            node, response = await self._ask_promise(a.leader, request)
            if response is not None and response.promised:
                granted[node] = LogPosition(response.last_epoch, response.last_index)
                request.leader_released = True
                first.append(node)
        others = [n for n in a.replicas if n not in first]
        pending = {asyncio.ensure_future(self._ask_promise(n, request)) for n in others}
        try:
            while pending and len(granted) < need:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    node, response = task.result()
                    if response is not None and response.promised:
                        granted[node] = LogPosition(response.last_epoch, response.last_index)
                    elif response is not None:
                        log.info("promise refused partition=%d epoch=%d node=%s reason=%s", p,
                                 epoch, node, response.reason)
        finally:
            for task in pending:
                task.cancel()
        return granted

    async def _ask_promise(self, node: str, request: replica_pb2.PromiseRequest
                           ) -> tuple[str, replica_pb2.PromiseResponse | None]:
        """One replica's answer, waiting out a running lease (bounded); None if unreachable."""
        stub = self.peers.stub(node)
        if stub is None:
            return node, None
        for _ in range(8):
            try:
                response = await stub.Promise(request, timeout=PROMISE_TIMEOUT)
            except grpc.aio.AioRpcError:
                return node, None
            self.detector.heard_from(node)
            if response.promised or not response.retry_after_ms:
                return node, response
            await asyncio.sleep(min(response.retry_after_ms / 1000, 2.0))
        return node, None

    async def _probe_loop(self) -> None:
        """Health-probe every live node each `probe_interval`; feed the failure detector
        and reconcile at once when the set of nodes taken as down changes."""
        loop = asyncio.get_running_loop()
        detector = self.detector
        while self.leading:
            await asyncio.sleep(self.options.probe_interval)
            nodes = sorted(self._live)  # one snapshot: reconcile may replace _live meanwhile
            sent_at = loop.time()
            try:
                results = await asyncio.gather(*(self._probe(n) for n in nodes))
            except Exception:
                log.exception("probe round failed")
                continue
            now = loop.time()
            before = detector.down
            was_suspected, was_refusing = detector.suspected, detector.refusing
            detector.observe(sent_at, now, dict(zip(nodes, results, strict=True)),
                             count_silence=self.coord.connected)
            if detector.refusing - was_refusing:
                log.warning("nodes refuse connections: %s",
                            sorted(detector.refusing - was_refusing))
            for node in sorted(detector.suspected - was_suspected):
                log.warning("suspecting node=%s: no probe answered for %.2fs", node,
                            detector.silent_for(node, now))
            for node in sorted(was_suspected - detector.suspected):
                log.info("node no longer suspected node=%s: %s", node,
                         "it answers again" if node in nodes else "it is no longer live")
            if detector.down != before:
                self._wake.set()

    async def _probe(self, node: str) -> Probe:
        """One health check of `node`, bounded by PROBE_TIMEOUT."""
        channel = self.peers.channel(node)
        if channel is None:
            return Probe.ANSWERED  # no address yet: nothing to judge by
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return Probe.REFUSED
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Probe.SILENT
            # Any other status came from the node's server: it is running.
        return Probe.ANSWERED

    async def _promote(self, nodes: dict[str, NodeRecord], live: dict[str, dict[str, Any]],
                       pmap: PartitionMap, serving: set[str]) -> None:
        """Record the incarnation of a rejoined node once it has caught up everywhere."""
        for node, data in live.items():
            record = nodes.get(node)
            incarnation = str(data.get("incarnation", ""))
            if record is None or not incarnation or record.incarnation == incarnation:
                continue
            if await self._caught_up(node, pmap, serving):
                found = await self.coord.get_json(self.paths.node(node))
                if found is None:
                    continue
                updated, version = found
                updated["incarnation"] = incarnation
                try:
                    await self.coord.set_json(self.paths.node(node), updated, version)
                    log.info("promoted node=%s incarnation=%s", node, incarnation)
                except VersionConflict:
                    self._wake.set()

    async def _caught_up(self, node: str, pmap: PartitionMap, serving: set[str]) -> bool:
        stub = self.peers.stub(node)
        if stub is None:
            return False
        for a in pmap.assignments:
            if node not in a.replicas and node not in a.learners:
                continue
            leader = self.peers.stub(a.leader) if a.leader in serving and a.leader else None
            if leader is None:
                return False
            try:
                theirs = await leader.Digest(replica_pb2.DigestRequest(partition=a.partition),
                                             timeout=PROMISE_TIMEOUT * 5)
                ours = await stub.Digest(replica_pb2.DigestRequest(partition=a.partition),
                                         timeout=PROMISE_TIMEOUT * 5)
            except grpc.aio.AioRpcError:
                return False
            if ours.last_index < theirs.applied_index:
                return False
        return True

    async def _bump_version(self) -> None:
        for _ in range(10):
            found = await self.coord.get_json(self.paths.partitions)
            data, version = found if found is not None else ({}, -1)
            data["version"] = int(data.get("version", 0)) + 1
            try:
                await self.coord.set_json(self.paths.partitions, data, version)
                return
            except VersionConflict:
                continue


async def run_controller(options: ControllerOptions) -> None:
    controller = Controller(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, controller.stop)
    await controller.run()
