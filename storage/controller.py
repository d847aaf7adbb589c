"""The ring controller: the only writer of the partition map (DESIGN §5, §6 failover).

One controller leads at a time (ZooKeeper election under `storage/controller`); others
wait. The leader:
- creates the cluster config (Q, RF) once;
- places partitions with `storage.partition.plan` once the expected nodes are live;
- chooses every partition leader through the Promise path: (1) reserve epoch e+1 with
  a versioned write (epochs are never reused, even across controller crashes), (2) ask
  the replicas to promise e+1, (3) from a majority that promised pick the replica with
  the highest last (epoch, index), (4) write it with a versioned write;
- re-runs that path for every partition whose leader's liveness node is gone.

Every map write is a compare-and-set on the znode version, so a deposed controller that
still runs can never overwrite its successor's decisions. While the ZooKeeper session
is SUSPENDED or LOST the controller makes no decision.
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

from scheduler.coord import CoordError, Coordinator, Election, NodeExists, VersionConflict
from storage import directory
from storage.directory import Paths
from storage.partition import (
    DEFAULT_PARTITIONS,
    DEFAULT_REPLICATION,
    Assignment,
    Member,
    check_partition_count,
    plan,
)
from storage.peers import Peers
from storage.replication import LogPosition, choose_leader, majority
from storage.v1 import replica_pb2

log = logging.getLogger(__name__)

PROMISE_TIMEOUT = 1.0
ELECTION_CONCURRENCY = 32


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

    async def run(self) -> None:
        await self.coord.start()
        self.coord.on_state(self._on_state)
        election = Election(self.coord, self.paths.controller,
                            json.dumps({"id": self.id, "pid": os.getpid()}).encode())
        try:
            while not self._stop.is_set():
                if not await election.campaign(self._stop):
                    break
                self.leading = True
                log.info("controller leading id=%s", self.id)
                self.coord.watch_children(self.paths.live, lambda _: self._wake.set())
                self.coord.watch_children(self.paths.nodes, lambda _: self._wake.set())
                await self._lead()
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
        self._wake.set()

    async def _lead(self) -> None:
        while self.leading and not self._stop.is_set():
            if self.coord.connected:
                try:
                    await self.reconcile()
                except CoordError as exc:
                    log.warning("reconcile interrupted: %s", exc)
                except Exception:
                    log.exception("reconcile failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.options.interval)
            except TimeoutError:
                pass

    async def reconcile(self) -> None:
        """One pass: config, initial placement, leaders for partitions that lack one."""
        config = await self._ensure_config()
        view = await directory.read_view(self.coord, self.paths)
        self.peers.update({n: r.address for n, r in view.nodes.items()})
        live = {n for n in view.live if n in view.nodes}
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
        orphaned = [a for a in pmap.assignments
                    if (a.leader is None or a.leader not in live)
                    and a.partition not in self._electing]
        if orphaned:
            await self._elect_all([a.partition for a in orphaned], live)

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

    async def _elect_all(self, partitions: list[int], live: set[str]) -> None:
        gate = asyncio.Semaphore(ELECTION_CONCURRENCY)

        async def one(p: int) -> bool:
            async with gate:
                return await self.elect(p, live)

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
        if not all(r is True for r in results):
            self._wake.set()

    async def elect(self, p: int, live: set[str]) -> bool:
        """Choose partition p's leader in a fresh epoch. True once the map names one."""
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
        promised = await self._promises(p, epoch, current)
        if len(promised) < majority(len(current.replicas)):
            log.warning("no promise majority partition=%d epoch=%d promised=%s", p, epoch,
                        sorted(promised))
            return False
        leader = choose_leader(promised, current.replicas)
        chosen = Assignment(p, epoch, leader, current.replicas, current.learners)
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

    async def _promises(self, p: int, epoch: int, a: Assignment) -> dict[str, LogPosition]:
        """Ask every replica to promise `epoch`; return once a majority did (or all answered)."""
        request = replica_pb2.PromiseRequest(partition=p, epoch=epoch, replicas=a.replicas,
                                             learners=a.learners)
        need = majority(len(a.replicas))
        granted: dict[str, LogPosition] = {}

        async def ask(node: str) -> tuple[str, replica_pb2.PromiseResponse | None]:
            stub = self.peers.stub(node)
            if stub is None:
                return node, None
            for _ in range(8):
                try:
                    response = await stub.Promise(request, timeout=PROMISE_TIMEOUT)
                except grpc.aio.AioRpcError:
                    return node, None
                if response.promised or not response.retry_after_ms:
                    return node, response
                await asyncio.sleep(min(response.retry_after_ms / 1000, 2.0))
            return node, None

        pending = {asyncio.ensure_future(ask(n)) for n in a.replicas}
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
