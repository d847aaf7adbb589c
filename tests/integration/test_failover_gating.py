"""Session gating (DESIGN §7, issue 4 fencing): a leader whose ZooKeeper session is
SUSPENDED acknowledges no write and serves no LINEARIZABLE or LEASE read until it knows
its standing again (session CONNECTED and the map re-read), then serves again.

SUSPENDED is produced for real: this test's cluster runs a ZooKeeper server of its own (not
the session-wide one that other tests share), which the test freezes with SIGSTOP and
thaws with SIGCONT. A node logs every session state change and when it serves again; the
test reads those lines to know where the node stands, never sleeps to guess.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from scheduler.deadline import poll_for
from storage.chaos import key_in_partition, put_succeeds
from storage.client import Client
from storage.local import Leader, LocalCluster
from storage.v1 import kv_pb2, kv_pb2_grpc

GATED = {"UNAVAILABLE", "ABORTED"}  # "did not happen / may not have": never OK
SUSPENDED_LINE = "CONNECTED -> SUSPENDED"
SERVING_LINE = "serving again node="
PARTITIONS = 8


@pytest.fixture
def own_zk_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """3 nodes, RF=3, 8 partitions, one controller, and a ZooKeeper server of its own."""
    cluster = LocalCluster(tmp_path / "cluster", partitions=PARTITIONS)  # zk=None: its own
    try:
        cluster.start(timeout=90)
        yield cluster
    finally:
        cluster.stop()


def code_name(code: int) -> str:
    return next(c.name for c in grpc.StatusCode if c.value[0] == code)


def ask(stub: kv_pb2_grpc.KVStub, p: int, key: bytes, value: bytes
        ) -> dict[str, tuple[str, bytes]]:
    """Every kind of request on partition p (`key` is in it), straight to one node:
    {what: (gRPC code name, value read)}. `value` is unique per call."""
    out: dict[str, tuple[str, bytes]] = {}

    def request_id() -> kv_pb2.RequestId:
        return kv_pb2.RequestId(client_id=os.urandom(16), seq=time.time_ns())

    def call(what: str, method: Callable[..., Any], request: object) -> None:
        try:
            reply = method(request, timeout=5)
        except grpc.RpcError as err:
            out[what] = (err.code().name, b"")
            return
        if isinstance(reply, kv_pb2.BatchResponse):
            status = reply.results[0].status
            out[what] = (code_name(status.code) if status.code else "OK", b"")
        elif isinstance(reply, kv_pb2.GetResponse):
            out[what] = ("OK", reply.value)
        else:
            out[what] = ("OK", b"")

    call("put", stub.Put, kv_pb2.PutRequest(key=key, value=value, request_id=request_id()))
    call("batch put", stub.Batch, kv_pb2.BatchRequest(ops=[kv_pb2.Op(put=kv_pb2.PutRequest(
        key=key, value=value + b"-batch", request_id=request_id()))]))
    fresh = key_in_partition(p, PARTITIONS, f"gated-{value.decode()}-").encode()
    call("cas", stub.CompareAndSet, kv_pb2.CompareAndSetRequest(
        key=fresh, value=value, expect_absent=True, request_id=request_id()))
    for name, consistency in (("linearizable get", kv_pb2.LINEARIZABLE),
                              ("lease get", kv_pb2.LEASE), ("follower get", kv_pb2.FOLLOWER)):
        call(name, stub.Get, kv_pb2.GetRequest(key=key, consistency=consistency))
    return out


def count(path: Path, line: str) -> int:
    return path.read_text().count(line)


def test_suspended_leader_serves_nothing_until_it_knows_its_standing(
        own_zk_cluster: LocalCluster) -> None:
    cluster = own_zk_cluster
    p = cluster.partition_led_as_planned()  # no rebalancing moves it meanwhile
    key = key_in_partition(p, PARTITIONS, "gated-").encode()
    with Client(cluster.endpoints, timeout=10) as client:
        client.put(key, b"before")
        leader = cluster.leader_of(p)
        assert leader is not None
        node_log = cluster.log_dir / f"{leader.node_id}.stderr"
        channel = grpc.insecure_channel(leader.address)
        stub = kv_pb2_grpc.KVStub(channel)
        # With its session alive the leader answers every one of these requests.
        healthy = ask(stub, p, key, b"healthy")
        assert {what: code for what, (code, _) in healthy.items()} == dict.fromkeys(healthy, "OK")
        suspended_before = count(node_log, SUSPENDED_LINE)
        serving_before = count(node_log, SERVING_LINE)

        cluster.pause_zookeeper()
        try:
            poll_for(lambda: count(node_log, SUSPENDED_LINE) > suspended_before, 20,
                     interval=0.05, what=f"{leader.node_id} to see its session SUSPENDED")
            rounds: list[dict[str, tuple[str, bytes]]] = []
            frozen_until = time.monotonic() + 1.5
            while time.monotonic() < frozen_until:  # a few rounds while ZooKeeper is frozen
                rounds.append(ask(stub, p, key, f"while-suspended-{len(rounds)}".encode()))
        finally:
            cluster.resume_zookeeper()
        # Once ZooKeeper answers again, the node serves only after it has re-read the map:
        # until it logs that it serves again, it must still refuse.
        thawing: list[dict[str, tuple[str, bytes]]] = []

        def serving_again() -> bool:
            answers = ask(stub, p, key, f"after-thaw-{len(thawing)}".encode())
            if count(node_log, SERVING_LINE) > serving_before:
                return True  # answered before or after it served again: no claim on them
            thawing.append(answers)
            return False

        poll_for(serving_again, 30, interval=0.05,
                 what=f"{leader.node_id} to serve again after ZooKeeper returned")
        channel.close()

        served = [(i, what, code) for i, answers in enumerate(rounds + thawing)
                  for what, (code, _) in answers.items()
                  if what != "follower get" and code not in GATED]
        assert rounds and served == [], (
            f"{leader.node_id}, leading partition {p} with its ZooKeeper session not "
            f"known alive, answered (round, request, code): {served}; logs: {cluster.log_dir}")
        # It was alive all along: replica reads still answered, with the last write it had
        # acknowledged (the healthy round's batch put) and none of the refused ones.
        follower = {answers["follower get"] for answers in rounds}
        assert follower == {("OK", b"healthy-batch")}, follower
        print(f"{len(rounds)} rounds while SUSPENDED, {len(thawing)} while thawing, all refused")

        assert_serves_again(cluster, client, p, key, leader)


def assert_serves_again(cluster: LocalCluster, client: Client, p: int, key: bytes,
                        before: Leader) -> None:
    """The partition serves writes and LINEARIZABLE and LEASE reads again; and so does the
    old leader itself unless the controller moved the partition meanwhile."""
    poll_for(lambda: put_succeeds(client, key, b"after", timeout=2), 30, interval=0.1,
             what=f"a put to partition {p}")
    for consistency in ("linearizable", "lease"):
        item = client.get(key, consistency=consistency)
        assert item is not None and item.value == b"after", (consistency, item)
    now = cluster.leader_of(p)
    assert now is not None
    if (now.node_id, now.epoch) == (before.node_id, before.epoch):
        with grpc.insecure_channel(before.address) as channel:
            answers = ask(kv_pb2_grpc.KVStub(channel), p, key, b"direct")
        assert {what: code for what, (code, _) in answers.items()} == dict.fromkeys(
            answers, "OK"), answers
    cluster.wait_ready(60)
