"""The replicated data plane on a real 3-node RF=3 cluster (real ZooKeeper, processes, gRPC).

Every wait is bounded; nothing is mocked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest

from scheduler.deadline import poll_for
from scheduler.process import spawn
from storage.client import Client
from storage.errors import CasMismatch, InvalidArgument, Version
from storage.local import LocalCluster
from storage.partition import partition_of
from storage.v1 import kv_pb2, kv_pb2_grpc

MIB = 1024 * 1024


def leader_and_follower(cluster: LocalCluster, key: bytes) -> tuple[str, str]:
    pmap = cluster.partition_map()
    assert pmap is not None
    address = {n.id: n.address for n in pmap.nodes}
    entry = pmap.entries[partition_of(key, pmap.partitions)]
    follower = next(r for r in entry.replicas if r != entry.leader)
    return address[entry.leader], address[follower]


def stored(cluster: LocalCluster, key: bytes) -> bytes | None:
    """The key's value as a routed, linearizable read sees it (whoever leads now)."""
    with Client(cluster.endpoints, timeout=15) as client:
        item = client.get(key)
    return None if item is None else item.value


def stub(address: str) -> kv_pb2_grpc.KVStub:
    return kv_pb2_grpc.KVStub(grpc.insecure_channel(address))


def test_put_get_delete_cas_scan_batch(shared_cluster: LocalCluster) -> None:
    with Client(shared_cluster.endpoints, timeout=10) as client:
        v1 = client.put(b"alpha", b"one")
        item = client.get(b"alpha")
        assert item is not None and item.value == b"one" and item.version == v1

        v2 = client.cas(b"alpha", b"two", expected=v1)
        assert v2 != v1
        with pytest.raises(CasMismatch) as mismatch:
            client.cas(b"alpha", b"three", expected=v1)
        assert mismatch.value.current == v2
        assert client.get(b"alpha").value == b"two"  # type: ignore[union-attr]

        assert client.cas(b"fresh", b"x", expected=None)
        with pytest.raises(CasMismatch):
            client.cas(b"fresh", b"y", expected=None)

        assert client.delete(b"alpha") is True
        assert client.get(b"alpha") is None
        assert client.delete(b"alpha") is False

        keys = [f"batch-{i:03d}".encode() for i in range(100)]
        versions = client.batch_put([(k, k[::-1]) for k in keys])
        assert all(isinstance(v, Version) for v in versions)
        items = client.batch_get(keys)
        assert [i.value for i in items if i is not None and not isinstance(i, Exception)] == [
            k[::-1] for k in keys]

        scanned = {i.key: i.value for i in client.scan()}
        assert all(scanned[k] == k[::-1] for k in keys)
        assert b"alpha" not in scanned and scanned[b"fresh"] == b"x"
        pmap = client.get_map()
        p = partition_of(keys[0], pmap.partitions)
        in_partition = [i.key for i in client.scan(partition=p)]
        assert in_partition == sorted(in_partition) and keys[0] in in_partition
        assert all(partition_of(k, pmap.partitions) == p for k in in_partition)
        limited = list(client.scan(partition=p, limit=1))
        assert len(limited) == 1


def test_written_through_one_node_read_through_another(shared_cluster: LocalCluster) -> None:
    key = b"cross-node"
    done: list[tuple[kv_pb2.PutResponse, str]] = []

    def put_through_leader() -> bool:
        # The controller may move a leadership (rebalancing) between lookup and put.
        leader, follower = leader_and_follower(shared_cluster, key)
        try:
            reply = stub(leader).Put(kv_pb2.PutRequest(key=key, value=b"v"), timeout=15)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            return False
        done.append((reply, follower))
        return True

    poll_for(put_through_leader, 30, what="a put through the partition leader")
    put, follower = done[0]
    # A client bootstrapped only from the follower reads it linearizably (it is routed).
    with Client([follower], timeout=10) as client:
        got = client.get(key)
        assert got is not None and got.value == b"v"
        assert (got.version.epoch, got.version.index) == (put.version.epoch, put.version.index)
    # The follower itself has applied it (FOLLOWER reads, possibly stale: poll).
    def visible() -> bool:
        reply = stub(follower).Get(kv_pb2.GetRequest(key=key, consistency=kv_pb2.FOLLOWER),
                                   timeout=15)
        return reply.found and reply.value == b"v"
    poll_for(visible, 10, what="the follower to apply the write")


def test_non_leader_answers_not_leader_with_hint(shared_cluster: LocalCluster) -> None:
    key = b"hinted"
    leader, follower = leader_and_follower(shared_cluster, key)
    with pytest.raises(grpc.RpcError) as failure:
        stub(follower).Put(kv_pb2.PutRequest(key=key, value=b"v"), timeout=15)
    assert failure.value.code() == grpc.StatusCode.ABORTED
    detail = dict(failure.value.trailing_metadata() or ())["ringstore-error-bin"]
    parsed = kv_pb2.ErrorDetail.FromString(detail)
    assert parsed.kind == kv_pb2.NOT_LEADER and parsed.leader_address == leader
    assert stored(shared_cluster, key) is None  # refused before anything was appended


BAD_PUTS = [
    pytest.param(b"", b"v", id="empty-key"),
    pytest.param(b"k" * 4097, b"v", id="key-over-4096"),
    pytest.param(b"big-value", b"v" * (MIB + 1), id="value-over-1MiB"),
]


@pytest.mark.parametrize(("key", "value"), BAD_PUTS)
def test_server_rejects_bad_input_and_stores_nothing(shared_cluster: LocalCluster, key: bytes,
                                                     value: bytes) -> None:
    leader = leader_and_follower(shared_cluster, key or b"x")[0]
    with pytest.raises(grpc.RpcError) as failure:
        stub(leader).Put(kv_pb2.PutRequest(key=key, value=value), timeout=15)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if key and len(key) <= 4096:
        assert stored(shared_cluster, key) is None
    with Client(shared_cluster.endpoints, timeout=15) as client, pytest.raises(InvalidArgument):
        client.put(key, value)


def test_bad_requests_get_invalid_argument(shared_cluster: LocalCluster) -> None:
    key = b"bad-requests"
    leader = leader_and_follower(shared_cluster, key)[0]
    kv = stub(leader)
    cases = {
        "unknown consistency": lambda: kv.Get(kv_pb2.GetRequest(key=key, consistency=7),
                                              timeout=15),
        "cas without expectation": lambda: kv.CompareAndSet(
            kv_pb2.CompareAndSetRequest(key=key, value=b"v"), timeout=15),
        "cas with version 0.0": lambda: kv.CompareAndSet(
            kv_pb2.CompareAndSetRequest(key=key, value=b"v",
                                        expected_version=kv_pb2.Version()), timeout=15),
        "batch of 129": lambda: kv.BatchPut(kv_pb2.BatchPutRequest(items=[
            kv_pb2.PutRequest(key=b"b%d" % i, value=b"v") for i in range(129)]), timeout=15),
        "batch over 2 MiB": lambda: kv.BatchPut(kv_pb2.BatchPutRequest(items=[
            kv_pb2.PutRequest(key=b"big%d" % i, value=b"v" * (MIB - 100)) for i in range(3)]),
            timeout=15),
        "scan of a partition that does not exist": lambda: list(kv.Scan(
            kv_pb2.ScanRequest(partition=4096), timeout=15)),
    }
    for name, call in cases.items():
        with pytest.raises(grpc.RpcError) as failure:
            call()
        assert failure.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                         grpc.StatusCode.RESOURCE_EXHAUSTED), name
    assert stored(shared_cluster, key) is None
    with Client(shared_cluster.endpoints, timeout=15) as client:
        assert client.get(b"b0") is None and client.get(b"big0") is None


def test_message_over_2mib_is_resource_exhausted(shared_cluster: LocalCluster) -> None:
    key = b"huge"
    leader = leader_and_follower(shared_cluster, key)[0]
    big = 4 * MIB
    options = [("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)]
    with grpc.insecure_channel(leader, options=options) as channel:
        kv = kv_pb2_grpc.KVStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            kv.Put(kv_pb2.PutRequest(key=key, value=b"v" * (3 * MIB)), timeout=15)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stored(shared_cluster, key) is None
    with Client(shared_cluster.endpoints, timeout=15) as client:
        # The client splits a large batch by size; each item answers for itself.
        results = client.batch_put([(b"huge%d" % i, b"v" * (MIB - 64)) for i in range(3)])
        assert all(isinstance(r, Version) for r in results)
        got = client.get(b"huge2")
        assert got is not None and len(got.value) == MIB - 64


def test_restarted_node_serves_its_data_again(cluster: LocalCluster) -> None:
    with Client(cluster.endpoints, timeout=10) as client:
        keys = [f"restart-{i}".encode() for i in range(50)]
        for k in keys:
            client.put(k, k + b"-before")
        cluster.stop_node("n1", grace=10)
        # Writes go on while n1 is down (2 of 3 replicas are a majority).
        poll_for(lambda: _put_ok(client, b"during", b"x"), 30,
                 what="writes to resume after n1 stopped")
        cluster.start_node("n1")
        cluster.wait_ready(60)
        for k in keys:
            got = client.get(k)
            assert got is not None and got.value == k + b"-before"
    n1 = cluster.node_processes["n1"].address

    def n1_has_everything() -> bool:
        for k in [*keys, b"during"]:
            try:
                reply = stub(n1).Get(kv_pb2.GetRequest(key=k, consistency=kv_pb2.FOLLOWER),
                                     timeout=15)
            except grpc.RpcError:
                return False
            if not reply.found:
                return False
        return True
    poll_for(n1_has_everything, 30, what="n1 to hold every key again")


def _put_ok(client: Client, key: bytes, value: bytes) -> bool:
    try:
        client.put(key, value, timeout=2)
    except Exception:
        return False
    return True


def node_argv(zk: str, cluster: str, node_id: str, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "storage", "node", "--zk", zk, "--cluster", cluster,
            "--node-id", node_id, "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"]


def test_refuses_second_process_for_a_node(shared_cluster: LocalCluster, tmp_path: Path) -> None:
    zk = str(shared_cluster.zk)
    running = shared_cluster.node_processes["n2"]
    cases = {
        "same-data-directory": running.data_dir,
        "same-node-id": tmp_path / "other",
    }
    for name, data_dir in cases.items():
        process = spawn(node_argv(zk, shared_cluster.cluster, "n2", data_dir), name=name,
                        log_dir=tmp_path / "logs")
        code = process.wait(30)
        assert code is not None and code != 0, name
        assert "error:" in process.stderr_path.read_text(), name
    with Client(shared_cluster.endpoints, timeout=15) as client:
        client.put(b"still-serving", b"yes")


def test_refuses_another_clusters_directory(shared_cluster: LocalCluster,
                                            tmp_path: Path) -> None:
    zk = str(shared_cluster.zk)
    data_dir = tmp_path / "probe-data"
    probe = spawn(node_argv(zk, "another", "p1", data_dir), name="probe",
                  log_dir=tmp_path / "logs")
    try:
        poll_for(lambda: '"address"' in probe.stdout_path.read_text(), 30,
                 what="the probe node of cluster 'another' to start")
    finally:
        probe.terminate(10)
    wrong = spawn(node_argv(zk, shared_cluster.cluster, "p1", data_dir), name="wrong",
                  log_dir=tmp_path / "logs")
    assert wrong.wait(30) not in (None, 0)
    assert "belongs to cluster 'another'" in wrong.stderr_path.read_text()
