"""A storage node: lifecycle, identity, ZooKeeper membership, and the gRPC server.

Start-up order (each step is a precondition of the next):
1. open the engine: RocksDB's lock on the data directory means no second process can
   serve it (EngineLocked -> refuse to start);
2. check the directory's identity (cluster, node id); a fresh directory gets a new
   incarnation id;
3. join ZooKeeper: a `live/<node>` left by a dead session of *this* directory is
   deleted at once (we hold the lock, so its owner is gone); a live node of another
   incarnation means another process serves this node id -> refuse to start;
4. serve gRPC (KV, Replica, health, reflection), then register `live/<node>`;
5. follow the partition map and node records; every change re-assigns roles.

A node whose directory is empty while ZooKeeper records another incarnation for its id
(a wiped disk) answers no Promise and counts in no quorum (DESIGN §6, incarnations).

Session gating: from the moment the ZooKeeper session is not CONNECTED (SUSPENDED, LOST)
until it is CONNECTED again *and* the map has been re-read from ZooKeeper since, the
node's leaders acknowledge no write and serve no LINEARIZABLE or LEASE read
(`Replicas.set_serving`): only then does the node know its standing.

Status: INIT -> RUNNING -> CLOSING -> CLOSED; `close()` is idempotent.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from scheduler.coord import Coordinator, NodeExists
from scheduler.deadline import async_poll_for
from storage import directory, limits
from storage.directory import NodeRecord, Paths
from storage.engine import Engine, EngineLocked
from storage.keyspace import NODE_CLUSTER, NODE_ID, NODE_INCARNATION
from storage.partition import PartitionMap, partition_of
from storage.peers import Peers
from storage.replica import Replicas, Tuning
from storage.service import KVService, ReplicaService
from storage.snapshot import DEFAULT_RETAIN_BYTES, DEFAULT_RETAIN_ENTRIES
from storage.v1 import kv_pb2, kv_pb2_grpc, replica_pb2_grpc

log = logging.getLogger(__name__)


class NodeError(Exception):
    """The node cannot start; the message says why and what to do."""


class Status(enum.Enum):
    INIT = "init"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class NodeOptions:
    node_id: str
    listen: str
    data_dir: Path
    zk: str
    cluster: str = "default"
    domain: str = ""
    sync: bool = False
    session_timeout: float = 4.0
    advertise: str = ""
    retain_entries: int = DEFAULT_RETAIN_ENTRIES  # log retention per partition
    retain_bytes: int = DEFAULT_RETAIN_BYTES


class StorageNode:
    """One storage node process. `async with StorageNode(options) as node: ...`."""

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.node_id = options.node_id
        self.paths = Paths(options.cluster)
        self.status = Status.INIT
        self.address = ""
        self.incarnation = ""
        self.engine: Engine | None = None
        self.coord: Coordinator | None = None
        self.replicas: Replicas | None = None
        self.peers = Peers()
        self.server: grpc.aio.Server | None = None
        self.map: PartitionMap | None = None
        self.nodes: dict[str, NodeRecord] = {}
        self.live: set[str] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_again = False
        self._session_epoch = 0  # +1 at every ZooKeeper state change
        self._standing_epoch = -1  # the one in which a map re-read must end to serve
        self._stopped = asyncio.Event()
        self._register_task: asyncio.Task[None] | None = None
        self.draining = False  # leadership is being handed off: refuse new writes

    # -- NodeView (for the servicers) -------------------------------------------------

    @property
    def map_version(self) -> int:
        return self.map.version if self.map else 0

    @property
    def partition_count(self) -> int:
        return self.map.partitions if self.map else 0

    def partition_of(self, key: bytes) -> int:
        if self.map is None:
            from storage.errors import Unavailable
            raise Unavailable("the partition map is not created yet; is the controller running?")
        return partition_of(key, self.map.partitions)

    def map_message(self) -> kv_pb2.PartitionMap:
        message = kv_pb2.PartitionMap(cluster=self.options.cluster)
        if self.map is not None:
            message.version = self.map.version
            message.partitions = self.map.partitions
            message.replication = self.map.replication
            for a in self.map.assignments:
                message.entries.add(id=a.partition, epoch=a.epoch, leader=a.leader or "",
                                    replicas=a.replicas, learners=a.learners)
        for node_id, record in sorted(self.nodes.items()):
            message.nodes.add(id=node_id, address=record.address, domain=record.domain,
                              state=record.state, live=node_id in self.live)
        return message

    def hint(self, p: int) -> tuple[str, str, int]:
        if self.map is None or p >= len(self.map.assignments):
            return "", "", 0
        a = self.map.assignments[p]
        leader = a.leader or ""
        record = self.nodes.get(leader)
        return leader, record.address if record else "", a.epoch

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> StorageNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        opts = self.options
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = Engine.open(opts.data_dir / "db", sync=opts.sync)
        except EngineLocked as exc:
            raise NodeError(f"data directory {opts.data_dir} is in use by another process "
                            f"({exc}); stop it first") from exc
        fresh = self._check_identity(self.engine)
        self.coord = Coordinator(opts.zk, session_timeout=opts.session_timeout,
                                 name=f"node-{self.node_id}")
        await self.coord.start()
        await self._claim_live_name()
        voter = await self._check_incarnation(fresh)
        self.replicas = Replicas(self.engine, self.node_id, self.peers, hint=self.hint,
                                 voter=voter, tuning=Tuning(retain_entries=opts.retain_entries,
                                                            retain_bytes=opts.retain_bytes))
        await self._serve()
        await self._register()
        self.coord.on_state(self._on_session_state)
        self.coord.on_session_restart(self._on_session_restart)
        self.replicas.start()
        self.coord.watch_data(self.paths.partitions, lambda *_: self._schedule_refresh())
        self.coord.watch_children(self.paths.nodes, lambda _: self._schedule_refresh())
        self.coord.watch_children(self.paths.live, lambda _: self._schedule_refresh())
        self.coord.watch_data(self.paths.node(self.node_id), self._on_own_record)
        self.status = Status.RUNNING
        log.info("node running node=%s address=%s incarnation=%s voter=%s data_dir=%s "
                 "session_timeout_ms=%s", self.node_id, self.address, self.incarnation, voter,
                 opts.data_dir, self.coord.session_timeout_ms)

    def _check_identity(self, engine: Engine) -> bool:
        """Refuse a directory of another cluster or node; stamp a fresh one. True if fresh."""
        opts = self.options
        cluster = engine.get_meta(NODE_CLUSTER)
        node_id = engine.get_meta(NODE_ID)
        incarnation = engine.get_meta(NODE_INCARNATION)
        if cluster is not None and cluster.decode() != opts.cluster:
            raise NodeError(f"data directory {opts.data_dir} belongs to cluster "
                            f"{cluster.decode()!r}, not {opts.cluster!r}; use another directory")
        if node_id is not None and node_id.decode() != self.node_id:
            raise NodeError(f"data directory {opts.data_dir} belongs to node "
                            f"{node_id.decode()!r}, not {self.node_id!r}")
        if incarnation is not None:
            self.incarnation = incarnation.decode()
            return False
        self.incarnation = uuid.uuid4().hex
        batch = engine.batch()
        batch.put_meta(NODE_CLUSTER, opts.cluster.encode())
        batch.put_meta(NODE_ID, self.node_id.encode())
        batch.put_meta(NODE_INCARNATION, self.incarnation.encode())
        engine.write(batch)
        return True

    async def _claim_live_name(self) -> None:
        assert self.coord is not None
        found = await self.coord.get_json(self.paths.live_node(self.node_id))
        if found is None:
            return
        data, _ = found
        if data.get("incarnation") == self.incarnation:
            # Our own directory, whose lock we hold: the session that wrote this is dead.
            log.info("removing stale live node of a previous run node=%s pid=%s",
                     self.node_id, data.get("pid"))
            await self.coord.delete(self.paths.live_node(self.node_id))
            return
        raise NodeError(f"node id {self.node_id!r} is already live (pid {data.get('pid')} at "
                        f"{data.get('address')}); refusing to start a second process for it")

    async def _check_incarnation(self, fresh: bool) -> bool:
        """Whether this directory may vote: it must be the incarnation ZooKeeper records."""
        assert self.coord is not None
        found = await self.coord.get_json(self.paths.node(self.node_id))
        if found is None:
            return True
        recorded = str(found[0].get("incarnation", ""))
        if recorded and recorded != self.incarnation:
            log.warning("data directory incarnation %s differs from the recorded %s "
                        "node=%s: joining as a learner, voting in no quorum",
                        self.incarnation, recorded, self.node_id)
            return False
        return True

    async def _serve(self) -> None:
        assert self.replicas is not None
        server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        kv_pb2_grpc.add_KVServicer_to_server(KVService(self, self.replicas), server)
        replica_pb2_grpc.add_ReplicaServicer_to_server(
            ReplicaService(self.replicas, self.incarnation), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection([
            "storage.v1.KV", "storage.v1.Replica", reflection.SERVICE_NAME,
            health.SERVICE_NAME], server)
        port = server.add_insecure_port(self.options.listen)
        if port == 0:
            raise NodeError(f"cannot listen on {self.options.listen}")
        host = self.options.listen.rsplit(":", 1)[0] or "127.0.0.1"
        self.address = self.options.advertise or f"{host}:{port}"
        await server.start()
        self.server = server
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("storage.v1.KV", health_pb2.HealthCheckResponse.SERVING)

    async def _register(self) -> None:
        assert self.coord is not None
        record = {"address": self.address, "domain": self.options.domain or self.node_id,
                  "state": "up"}
        found = await self.coord.get_json(self.paths.node(self.node_id))
        if found is None:
            record["incarnation"] = self.incarnation
            try:
                await self.coord.create_json(self.paths.node(self.node_id), record, makepath=True)
            except NodeExists:
                return await self._register()
        else:
            data, version = found
            data.update(record)
            data.setdefault("incarnation", self.incarnation)
            await self.coord.set_json(self.paths.node(self.node_id), data, version)
        live = {"address": self.address, "incarnation": self.incarnation, "pid": os.getpid()}
        try:
            await self.coord.create_json(self.paths.live_node(self.node_id), live,
                                         ephemeral=True, makepath=True)
        except NodeExists:
            await self._claim_live_name()
            await self.coord.create_json(self.paths.live_node(self.node_id), live,
                                         ephemeral=True, makepath=True)
        self._schedule_refresh()

    def _on_own_record(self, data: bytes | None, _stat: object) -> None:
        """Vote once the controller records this directory's incarnation (promotion)."""
        if data is None or self.replicas is None or self.replicas.voter:
            return
        try:
            recorded = json.loads(data).get("incarnation")
        except ValueError:
            return
        if recorded == self.incarnation:
            log.info("promoted: this data directory now votes node=%s incarnation=%s",
                     self.node_id, self.incarnation)
            self.replicas.set_voter(True)

    async def hand_off(self, timeout: float = 10.0) -> None:
        """Move every leadership of this node to a caught-up follower before stopping.

        New writes are refused (UNAVAILABLE, retriable) while in-flight ones commit and
        followers catch up; then `leaving/<node>` asks the controller to move each
        leadership through the Promise path. Bounded by `timeout`; a node that cannot hand
        off in time stops anyway and its partitions fail over."""
        if self.replicas is None or self.coord is None or not self.replicas.led_partitions():
            return
        replicas = self.replicas
        if not replicas.can_hand_off(self.live):
            log.warning("no live follower to take over; stopping without hand-off node=%s",
                        self.node_id)
            return
        started = time.monotonic()
        self.draining = True
        log.info("handing off leadership node=%s partitions=%d", self.node_id,
                 len(replicas.led_partitions()))
        try:
            await async_poll_for(lambda: replicas.followers_caught_up(self.live),
                                 min(2.0, timeout / 2), interval=0.01,
                                 what="followers to catch up")
        except TimeoutError:
            log.warning("followers not caught up; handing off anyway node=%s", self.node_id)
        try:
            await self.coord.create(self.paths.leaving_node(self.node_id), ephemeral=True,
                                    makepath=True)
        except NodeExists:
            pass
        try:
            await async_poll_for(lambda: not replicas.led_partitions(),
                                 max(0.1, timeout - (time.monotonic() - started)),
                                 interval=0.02, what="leadership to move")
            log.info("leadership handed off node=%s in %.2fs", self.node_id,
                     time.monotonic() - started)
        except TimeoutError:
            log.warning("leadership hand-off timed out node=%s still_leading=%d",
                        self.node_id, len(replicas.led_partitions()))

    def _on_session_restart(self) -> None:
        # The old session's ephemeral nodes are gone: register liveness again.
        self._register_task = asyncio.create_task(self._register(), name="re-register")

    def _on_session_state(self, state: str) -> None:
        if self.replicas is None:
            return
        self._session_epoch += 1
        if state != "CONNECTED":
            self.replicas.set_serving(False, state)
            return
        # Serve again only once a map read that began after this reconnection has ended.
        self._standing_epoch = self._session_epoch
        self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if self.status in (Status.CLOSING, Status.CLOSED):
            return
        if self._refresh_task is not None and not self._refresh_task.done():
            self._refresh_again = True
            return
        self._refresh_task = asyncio.create_task(self._refresh(), name="map-refresh")

    async def _refresh(self) -> None:
        """Re-read nodes and the partition map; re-assign every role that changed."""
        assert self.coord is not None and self.replicas is not None
        while True:
            self._refresh_again = False
            began = self._session_epoch
            try:
                view = await directory.read_view(self.coord, self.paths)
            except Exception:
                log.exception("reading the cluster view failed node=%s", self.node_id)
                await asyncio.sleep(0.5)
                self._refresh_again = True
            else:
                self.nodes = view.nodes
                self.live = set(view.live)
                self.peers.update({n: r.address for n, r in view.nodes.items()})
                self.peers.update({n: str(d.get("address", "")) for n, d in view.live.items()})
                if view.map is not None and (self.map is None
                                             or view.map.version >= self.map.version):
                    old = self.map
                    self.map = view.map
                    for a in view.map.assignments:
                        if old is None or old.assignments[a.partition] != a:
                            self.replicas.assign(a)
                if began == self._session_epoch == self._standing_epoch \
                        and self.coord.connected:
                    self.replicas.set_serving(True, "ZooKeeper session connected, map re-read")
            if not self._refresh_again or self.status in (Status.CLOSING, Status.CLOSED):
                return

    async def close(self, timeout: float = 5.0) -> None:
        if self.status in (Status.CLOSING, Status.CLOSED):
            await self._stopped.wait()
            return
        self.status = Status.CLOSING
        try:
            if self.coord is not None:
                try:
                    await asyncio.wait_for(
                        self.coord.delete(self.paths.live_node(self.node_id)), timeout / 4)
                except Exception:
                    log.warning("could not remove live node node=%s", self.node_id)
            if self.server is not None:
                await self.server.stop(grace=timeout / 2)
            if self.replicas is not None:
                await self.replicas.close()
            await self.peers.close()
            if self._refresh_task is not None:
                self._refresh_task.cancel()
                await asyncio.gather(self._refresh_task, return_exceptions=True)
            if self.coord is not None:
                await self.coord.close()
            if self.engine is not None:
                self.engine.close()
        finally:
            self.status = Status.CLOSED
            self._stopped.set()
            log.info("node closed node=%s", self.node_id)


async def run_node(options: NodeOptions) -> None:
    """Run a node until SIGTERM/SIGINT, then close it gracefully."""
    node = StorageNode(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        print(json.dumps({"node": node.node_id, "address": node.address, "pid": os.getpid()}),
              flush=True)
        await stop.wait()
        await node.hand_off()
    finally:
        await node.close()


