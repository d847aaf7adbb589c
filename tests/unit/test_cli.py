"""The `storage` CLI with click's CliRunner against a real test gRPC server on 127.0.0.1.

The server is a tiny synchronous KVServicer over a dict (threads, so CliRunner's blocking
call does not starve it). It serves a one-partition map and answers errors the way a node
does: a status code plus a serialized ErrorDetail in the `ringstore-error-bin` trailer.
Key `invalid!` gets the server's INVALID_ARGUMENT; key `down!` gets UNAVAILABLE.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from storage import limits
from storage.cli import MISSING_ADDRESS, main
from storage.client import ERROR_METADATA_KEY
from storage.v1 import kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(60)

CLEAN_ENV = {"RINGSTORE_ENDPOINTS": None, "RINGSTORE_ZK": None, "RINGSTORE_CLUSTER": None}


class DictKV(kv_pb2_grpc.KVServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[bytes, tuple[bytes, kv_pb2.Version]] = {}
        self.index = 0
        self.address = ""

    def _check(self, key: bytes, context: Any) -> None:
        for trigger, code, kind in ((b"invalid!", grpc.StatusCode.INVALID_ARGUMENT,
                                     kv_pb2.INVALID),
                                    (b"down!", grpc.StatusCode.UNAVAILABLE, kv_pb2.UNAVAILABLE)):
            if key == trigger:
                detail = kv_pb2.ErrorDetail(kind=kind, message=f"the node says no to {key!r}")
                context.set_trailing_metadata(((ERROR_METADATA_KEY,
                                                detail.SerializeToString()),))
                context.abort(code, detail.message)

    def _next(self) -> kv_pb2.Version:
        self.index += 1
        return kv_pb2.Version(epoch=1, index=self.index)

    def Put(self, request: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        self._check(request.key, context)
        with self.lock:
            version = self._next()
            self.data[request.key] = (request.value, version)
        return kv_pb2.PutResponse(version=version)

    def Get(self, request: kv_pb2.GetRequest, context: Any) -> kv_pb2.GetResponse:
        self._check(request.key, context)
        found = self.data.get(request.key)
        if found is None:
            return kv_pb2.GetResponse(found=False)
        return kv_pb2.GetResponse(found=True, value=found[0], version=found[1])

    def Delete(self, request: kv_pb2.DeleteRequest, context: Any) -> kv_pb2.DeleteResponse:
        self._check(request.key, context)
        with self.lock:
            existed = self.data.pop(request.key, None) is not None
            return kv_pb2.DeleteResponse(existed=existed, version=self._next())

    def CompareAndSet(self, request: kv_pb2.CompareAndSetRequest,
                      context: Any) -> kv_pb2.CompareAndSetResponse:
        self._check(request.key, context)
        with self.lock:
            current = self.data.get(request.key)
            if request.HasField("expect_absent"):
                ok = current is None
            else:
                ok = current is not None and current[1] == request.expected_version
            if not ok:
                detail = kv_pb2.ErrorDetail(kind=kv_pb2.CAS_MISMATCH, message="mismatch",
                                            current_found=current is not None)
                if current is not None:
                    detail.current_version.CopyFrom(current[1])
                context.set_trailing_metadata(((ERROR_METADATA_KEY,
                                                detail.SerializeToString()),))
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "mismatch")
            version = self._next()
            if request.delete:
                del self.data[request.key]
            else:
                self.data[request.key] = (request.value, version)
        return kv_pb2.CompareAndSetResponse(version=version)

    def Scan(self, request: kv_pb2.ScanRequest, context: Any) -> Iterator[kv_pb2.ScanPage]:
        keys = sorted(k for k in self.data if k >= request.start_key
                      and (not request.end_key or k < request.end_key))
        if request.limit:
            keys = keys[: request.limit]
        page = kv_pb2.ScanPage()
        for k in keys:
            page.items.add(key=k, value=self.data[k][0], version=self.data[k][1])
        yield page

    def GetMap(self, request: kv_pb2.GetMapRequest, context: Any) -> kv_pb2.PartitionMap:
        return kv_pb2.PartitionMap(
            version=3, partitions=1, replication=1, cluster="test",
            entries=[kv_pb2.PartitionInfo(id=0, epoch=2, leader="n0", replicas=["n0"],
                                          learners=["n1"])],
            nodes=[kv_pb2.NodeInfo(id="n0", address=self.address, domain="z1", state="up",
                                   live=True)],
        )


@pytest.fixture
def node() -> Iterator[DictKV]:
    servicer = DictKV()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    kv_pb2_grpc.add_KVServicer_to_server(servicer, server)
    servicer.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield servicer
    finally:
        server.stop(0).wait(5)


def run(node: DictKV | None, *args: str, input: bytes | str | None = None,
        env: dict[str, str | None] | None = None) -> Result:
    argv = list(args)
    if node is not None:
        argv += ["--endpoints", node.address]
    return CliRunner().invoke(main, argv, input=input, env={**CLEAN_ENV, **(env or {})})


def one_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_put_then_get_prints_the_raw_value(node: DictKV) -> None:
    put = run(node, "put", "greeting", "hello")
    assert put.exit_code == 0, put.stderr
    assert put.stdout.strip() == "1.1"
    got = run(node, "get", "greeting")
    assert got.exit_code == 0 and got.stdout_bytes == b"hello"


def test_put_reads_stdin_and_files(node: DictKV, tmp_path: Any) -> None:
    assert run(node, "put", "k", input=b"from stdin").exit_code == 0
    assert node.data[b"k"][0] == b"from stdin"
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x00\xff binary")
    assert run(node, "put", "b", "--file", str(blob), "--ttl", "30").exit_code == 0
    assert node.data[b"b"][0] == b"\x00\xff binary"
    both = run(node, "put", "b", "v", "--file", str(blob))
    assert both.exit_code == 2


def test_get_json_shape_and_base64_for_binary_values(node: DictKV) -> None:
    run(node, "put", "text", "héllo")
    got = run(node, "get", "text", "-o", "json")
    assert json.loads(got.stdout) == {"key": "text", "value": "héllo", "version": "1.1"}
    node.data[b"bin"] = (b"\xff\xfe", kv_pb2.Version(epoch=4, index=2))
    raw = json.loads(run(node, "get", "bin", "--output", "json").stdout)
    assert raw == {"key": "bin", "value": base64.b64encode(b"\xff\xfe").decode(),
                   "encoding": "base64", "version": "4.2"}


def test_get_of_a_missing_key_exits_1(node: DictKV) -> None:
    result = run(node, "get", "nope", "--consistency", "follower")
    assert result.exit_code == 1
    assert "not found" in one_line(result) and result.stdout == ""


def test_no_endpoints_and_no_zookeeper_exits_2() -> None:
    result = run(None, "get", "k")
    assert result.exit_code == 2
    assert MISSING_ADDRESS in one_line(result)
    assert MISSING_ADDRESS == ("give --endpoints HOST:PORT[,...] or --zk HOST:PORT "
                               "(or set RINGSTORE_ENDPOINTS / RINGSTORE_ZK)")


def test_endpoints_come_from_the_environment(node: DictKV) -> None:
    run(node, "put", "k", "v")
    result = run(None, "get", "k", env={"RINGSTORE_ENDPOINTS": node.address})
    assert result.exit_code == 0 and result.stdout_bytes == b"v"


def test_usage_errors_exit_2(node: DictKV) -> None:
    assert run(node, "get", "k", "--consistency", "eventual").exit_code == 2
    assert run(node, "cas", "k", "v", "--expect", "nonsense").exit_code == 2
    assert run(node, "cas", "k", "v", "--expect", "0.5").exit_code == 2
    assert run(node, "cas", "k", "v").exit_code == 2  # neither --expect nor --expect-absent
    assert run(node, "cas", "k", "v", "--expect", "1.1", "--expect-absent").exit_code == 2
    assert run(node, "cas", "k", "v", "--expect", "1.1", "--delete").exit_code == 2
    assert run(node, "get", "k", "-o", "yaml").exit_code == 2
    assert node.data == {}


def test_invalid_arguments_exit_2_with_one_line(node: DictKV, tmp_path: Any) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (limits.MAX_VALUE_BYTES + 1))
    too_big = run(node, "put", "k", "--file", str(big))
    assert too_big.exit_code == 2 and "1 MiB" in one_line(too_big)
    server_says = run(node, "put", "invalid!", "v")
    assert server_says.exit_code == 2 and "says no" in one_line(server_says)


def test_cas_succeeds_then_reports_the_current_version(node: DictKV) -> None:
    first = run(node, "cas", "k", "v1", "--expect-absent")
    assert first.exit_code == 0 and first.stdout.strip() == "1.1"
    second = run(node, "cas", "k", "v2", "--expect", "1.1")
    assert second.exit_code == 0 and second.stdout.strip() == "1.2"
    stale = run(node, "cas", "k", "v3", "--expect", "1.1")
    assert stale.exit_code == 1
    assert "1.2" in one_line(stale) and "--expect 1.2" in one_line(stale)
    exists = run(node, "cas", "k", "v3", "--expect-absent")
    assert exists.exit_code == 1 and "1.2" in one_line(exists)
    deleted = run(node, "cas", "k", "--expect", "1.2", "--delete")
    assert deleted.exit_code == 0 and b"k" not in node.data
    absent = run(node, "cas", "k", "v", "--expect", "1.2")
    assert absent.exit_code == 1 and "does not exist" in one_line(absent)


def test_delete_exits_1_when_nothing_was_there(node: DictKV) -> None:
    run(node, "put", "k", "v")
    assert run(node, "delete", "k").exit_code == 0
    missing = run(node, "delete", "k")
    assert missing.exit_code == 1 and "not found" in one_line(missing)


def test_scan_as_table_and_json_lines(node: DictKV) -> None:
    for i in range(5):
        run(node, "put", f"k{i}", f"v{i}")
    lines = run(node, "scan", "-o", "json", "--limit", "3", "--start", "k1").stdout.splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["k1", "k2", "k3"]
    assert json.loads(lines[0]) == {"key": "k1", "value": "v1", "version": "1.2"}
    table = run(node, "scan", "--partition", "0", "--end", "k2")
    assert table.exit_code == 0
    assert "k0" in table.stdout and "v1" in table.stdout and "k2" not in table.stdout
    assert run(node, "scan", "--partition", "7").exit_code == 2


def test_map_as_table_and_json(node: DictKV) -> None:
    table = run(node, "map")
    assert table.exit_code == 0, table.stderr
    assert "n0" in table.stdout and node.address in table.stdout and "n1" in table.stdout
    data = json.loads(run(node, "map", "-o", "json").stdout)
    assert data["version"] == 3 and data["partitions"] == 1 and data["cluster"] == "test"
    assert data["entries"] == [{"partition": 0, "epoch": 2, "leader": "n0",
                                "replicas": ["n0"], "learners": ["n1"]}]
    assert data["nodes"][0]["address"] == node.address and data["nodes"][0]["live"] is True


def test_an_unreachable_cluster_exits_1_with_what_to_do() -> None:
    result = run(None, "get", "k", "--endpoints", "127.0.0.1:1", "--timeout", "0.5")
    assert result.exit_code == 1
    line = one_line(result)
    assert "127.0.0.1:1" in line and "--endpoints" in line


def test_an_unavailable_write_says_it_may_have_applied(node: DictKV) -> None:
    result = run(node, "put", "down!", "v", "--timeout", "0.3")
    assert result.exit_code == 1
    assert "may or may not have been applied" in one_line(result)


def test_the_group_carries_the_data_commands() -> None:
    assert {"put", "get", "delete", "cas", "scan", "map"} <= set(main.commands)
    assert run(None, "-v", "--help").exit_code == 0
