"""Catch-up of a follower that missed writes (DESIGN §6), on a real 3-node RF=3 cluster.

The nodes run with a small retained log (RINGSTORE_LOG_RETAIN_ENTRIES, inherited by the
node processes LocalCluster spawns), so a follower that misses more writes than that must
be sent snapshots; one that misses fewer catches up from the log. Afterwards every
replica of every partition reports the same digest of its key space and the same applied
index (the Replica service's Digest RPC). Every wait is bounded; nothing is mocked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from scheduler.deadline import poll_for
from scheduler.zookeeper import ZooKeeperServer
from storage.client import Client
from storage.errors import Version
from storage.local import LocalCluster
from storage.v1 import replica_pb2, replica_pb2_grpc

PARTITIONS = 16
RETAIN_ENTRIES = 1000
MISSED_WRITES = 100_000  # about 6,250 per partition: six times the retained log
BATCH = 1000  # the client splits it by leader and size limits


@pytest.fixture(scope="module")
def catchup_cluster(zk_server: ZooKeeperServer,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster whose nodes retain RETAIN_ENTRIES log entries per partition."""
    zk = f"{zk_server.address}/ringstore-test-{uuid.uuid4().hex}"
    cluster = LocalCluster(tmp_path_factory.mktemp("catchup"), zk=zk, partitions=PARTITIONS)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RINGSTORE_LOG_RETAIN_ENTRIES", str(RETAIN_ENTRIES))
        env.delenv("RINGSTORE_LOG_RETAIN_BYTES", raising=False)
        try:
            cluster.start(timeout=60)
            yield cluster  # restarted nodes inherit the environment too
        finally:
            cluster.stop()


def digests(cluster: LocalCluster) -> dict[str, list[tuple[bytes, int, int]]]:
    """(digest, applied index, keys) of every partition, per node."""
    out = {}
    for node_id, node in cluster.node_processes.items():
        with grpc.insecure_channel(node.address) as channel:
            stub = replica_pb2_grpc.ReplicaStub(channel)
            replies = [stub.Digest(replica_pb2.DigestRequest(partition=p), timeout=5)
                       for p in range(PARTITIONS)]
        out[node_id] = [(r.digest, r.applied_index, r.keys) for r in replies]
    return out


def wait_identical(cluster: LocalCluster, keys: int, timeout: float) -> float:
    """Poll until every replica of every partition has the same digest and applied index,
    and the partitions hold `keys` keys together; return the seconds it took."""
    started = time.monotonic()

    def identical() -> bool:
        try:
            found = digests(cluster)
        except grpc.RpcError:
            return False
        views = list(found.values())
        return all(v == views[0] for v in views) and sum(k for *_, k in views[0]) == keys

    poll_for(identical, timeout, interval=0.2,
             what="every replica of every partition to hold identical contents")
    return time.monotonic() - started


def write(client: Client, keys: list[bytes], deadline: float) -> None:
    """Put every key (value derived from it), retrying items that failed, until `deadline`."""
    pending = keys
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} writes still failing at the deadline")
        failed: list[bytes] = []
        for start in range(0, len(pending), BATCH):
            chunk = pending[start:start + BATCH]
            results = client.batch_put([(k, k[::-1] * 2) for k in chunk], timeout=10)
            failed += [k for k, r in zip(chunk, results, strict=True)
                       if not isinstance(r, Version)]
        pending = failed


def count_in_log(cluster: LocalCluster, node_id: str, text: str) -> int:
    process = cluster.node_processes[node_id].process
    assert process is not None
    return process.stderr_path.read_text(errors="replace").count(text)


def outage(cluster: LocalCluster, node_id: str, keys: list[bytes], timeout: float) -> None:
    """Stop `node_id`, write `keys` while it is down, start it again."""
    cluster.stop_node(node_id, grace=20)
    with Client([n.address for i, n in cluster.node_processes.items() if i != node_id],
                timeout=10) as client:
        write(client, keys, time.monotonic() + timeout)
    cluster.start_node(node_id)
    cluster.wait_ready(60)


def test_short_outage_catches_up_from_the_log(catchup_cluster: LocalCluster) -> None:
    total = 300
    with Client(catchup_cluster.endpoints, timeout=10) as client:
        write(client, [b"before-%04d" % i for i in range(total)], time.monotonic() + 30)
    snapshots_before = count_in_log(catchup_cluster, "n3", "snapshot installed")
    missed = [b"log-%04d" % i for i in range(400)]  # far fewer than the retained log
    outage(catchup_cluster, "n3", missed, 60)
    wait_identical(catchup_cluster, total + len(missed), 60)
    assert count_in_log(catchup_cluster, "n3", "snapshot installed") == snapshots_before


def test_long_outage_catches_up_by_snapshot(catchup_cluster: LocalCluster) -> None:
    """n3 misses MISSED_WRITES writes: far beyond every partition's retained log."""
    existing = sum(k for *_, k in digests(catchup_cluster)["n1"])
    snapshots_before = count_in_log(catchup_cluster, "n3", "snapshot installed")
    missed = [b"snap-%06d" % i for i in range(MISSED_WRITES)]
    started = time.monotonic()
    outage(catchup_cluster, "n3", missed, 90)
    restarted = time.monotonic()
    took = wait_identical(catchup_cluster, existing + len(missed), 60)
    installed = count_in_log(catchup_cluster, "n3", "snapshot installed") - snapshots_before
    print(f"\n{MISSED_WRITES} missed writes: written and n3 restarted in "
          f"{restarted - started:.1f}s, identical {took:.1f}s later; "
          f"{installed} snapshots installed on n3")
    # Every partition's leader compacted its log well past n3's position.
    assert installed >= PARTITIONS

