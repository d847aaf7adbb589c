"""Thin gRPC servicers of a storage node: protobuf <-> domain calls, errors -> status codes.

The servicers validate input (storage.limits), translate requests into log commands or
reads on `storage.replica.Replicas`, and translate `StorageError`s into gRPC status
codes with a serialized `ErrorDetail` in the trailing metadata `ringstore-error-bin`.
They hold no replication logic. Every handler is bounded by the caller's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import grpc

from storage import limits
from storage.errors import (
    CasMismatch,
    DeadlineExceeded,
    InvalidArgument,
    NotLeader,
    StaleEpoch,
    StorageError,
    Unavailable,
    Version,
)
from storage.keyspace import ApplyResult, Outcome, ValueRecord
from storage.replica import Replicas
from storage.v1 import kv_pb2, kv_pb2_grpc, replica_pb2, replica_pb2_grpc

log = logging.getLogger(__name__)

ERROR_METADATA_KEY = "ringstore-error-bin"
DEFAULT_PAGE = 100
T = TypeVar("T")

_KIND = {
    InvalidArgument: kv_pb2.INVALID,
    NotLeader: kv_pb2.NOT_LEADER,
    CasMismatch: kv_pb2.CAS_MISMATCH,
    Unavailable: kv_pb2.UNAVAILABLE,
    StaleEpoch: kv_pb2.STALE_EPOCH,
}
_CONSISTENCIES = {kv_pb2.CONSISTENCY_UNSPECIFIED, kv_pb2.LINEARIZABLE, kv_pb2.LEASE,
                  kv_pb2.FOLLOWER}


class NodeView(Protocol):
    """What the servicers need to know about the node (implemented by StorageNode)."""

    node_id: str
    draining: bool

    @property
    def map_version(self) -> int: ...

    def partition_of(self, key: bytes) -> int: ...

    @property
    def partition_count(self) -> int: ...

    def map_message(self) -> kv_pb2.PartitionMap: ...


def error_detail(err: StorageError, map_version: int) -> kv_pb2.ErrorDetail:
    detail = kv_pb2.ErrorDetail(
        kind=_KIND.get(type(err), kv_pb2.INTERNAL), message=err.message,
        partition=err.partition or 0, map_version=map_version,
    )
    if isinstance(err, NotLeader):
        detail.leader_id = err.leader_id
        detail.leader_address = err.leader_address
        detail.epoch = err.epoch
    elif isinstance(err, CasMismatch) and err.current is not None:
        detail.current_found = True
        detail.current_version.epoch = err.current.epoch
        detail.current_version.index = err.current.index
    return detail


def status_code(err: StorageError) -> grpc.StatusCode:
    code: grpc.StatusCode = getattr(grpc.StatusCode, err.code, grpc.StatusCode.UNKNOWN)
    return code


def _remaining(context: grpc.aio.ServicerContext[object, object]) -> float:
    left = context.time_remaining()
    return 30.0 if left is None else max(0.0, left - 0.01)


def _version(v: Version) -> kv_pb2.Version:
    return kv_pb2.Version(epoch=v.epoch, index=v.index)


def _check_consistency(value: int) -> int:
    if value not in _CONSISTENCIES:
        raise InvalidArgument(f"unknown consistency {value}: use LINEARIZABLE, LEASE or FOLLOWER")
    return value or kv_pb2.LINEARIZABLE


def _check_request_id(rid: kv_pb2.RequestId) -> None:
    limits.check_client_id(rid.client_id)


WriteRequest = kv_pb2.PutRequest | kv_pb2.DeleteRequest | kv_pb2.CompareAndSetRequest


class Operations:
    """Request messages -> log commands and reads. Raises StorageError subclasses.

    Each write is validated and turned into a `Command` synchronously (`command()`), so a
    batch submits all its writes without a task per item; its response is built from
    the `ApplyResult` (`respond()`)."""

    def __init__(self, view: NodeView, replicas: Replicas) -> None:
        self.view = view
        self.replicas = replicas

    def command(self, req: WriteRequest) -> tuple[int, replica_pb2.Command]:
        """Validate a write and build its log command; returns (partition, command)."""
        limits.check_key(req.key)
        if self.view.draining:
            raise Unavailable("this node is handing its leadership to another replica; "
                              "retry shortly")
        _check_request_id(req.request_id)
        now = _now_ms()
        if isinstance(req, kv_pb2.DeleteRequest):
            cmd = replica_pb2.Command(kind=replica_pb2.Command.DELETE, key=req.key,
                                      request_id=req.request_id, proposed_at_ms=now)
            return self.view.partition_of(req.key), cmd
        limits.check_value(req.value)
        limits.check_ttl(req.ttl_ms)
        expires = now + req.ttl_ms if req.ttl_ms else 0
        if isinstance(req, kv_pb2.PutRequest):
            cmd = replica_pb2.Command(
                kind=replica_pb2.Command.PUT, key=req.key, value=req.value,
                request_id=req.request_id, proposed_at_ms=now, expires_at_ms=expires)
            return self.view.partition_of(req.key), cmd
        which = req.WhichOneof("expected")
        if which is None:
            raise InvalidArgument("compare-and-set needs expected_version or expect_absent")
        if which == "expect_absent" and not req.expect_absent:
            raise InvalidArgument("expect_absent must be true when given")
        if which == "expected_version" and (
            req.expected_version.epoch == 0 or req.expected_version.index == 0
        ):
            raise InvalidArgument(
                f"malformed expected version {req.expected_version.epoch}."
                f"{req.expected_version.index}: versions start at 1.1; use expect_absent")
        cmd = replica_pb2.Command(
            kind=replica_pb2.Command.CAS, key=req.key, value=req.value, delete=req.delete,
            expect_absent=which == "expect_absent", request_id=req.request_id,
            proposed_at_ms=now, expires_at_ms=expires)
        if which == "expected_version":
            cmd.expected_version.CopyFrom(req.expected_version)
        return self.view.partition_of(req.key), cmd

    @staticmethod
    def respond(req: WriteRequest, p: int, result: ApplyResult) -> kv_pb2.OpResult:
        """The item result of an applied write (a CAS mismatch raises CasMismatch)."""
        version = _version(result.version)
        if isinstance(req, kv_pb2.PutRequest):
            return kv_pb2.OpResult(put=kv_pb2.PutResponse(version=version))
        if isinstance(req, kv_pb2.DeleteRequest):
            return kv_pb2.OpResult(delete=kv_pb2.DeleteResponse(existed=result.existed,
                                                                version=version))
        _raise_mismatch(result, p)
        return kv_pb2.OpResult(cas=kv_pb2.CompareAndSetResponse(version=version))

    async def write(self, req: WriteRequest) -> kv_pb2.OpResult:
        p, cmd = self.command(req)
        return self.respond(req, p, await self.replicas.write(p, cmd))

    def read_key(self, req: kv_pb2.GetRequest) -> tuple[int, int]:
        """Validate a get; returns (partition, consistency)."""
        limits.check_key(req.key)
        return self.view.partition_of(req.key), _check_consistency(req.consistency)

    async def get(self, req: kv_pb2.GetRequest) -> kv_pb2.GetResponse:
        p, consistency = self.read_key(req)
        await self.replicas.read_barrier(p, consistency)
        return _get_response(self.replicas.read_local(p, [req.key])[0])

    def failed(self, err: StorageError) -> kv_pb2.OpResult:
        return kv_pb2.OpResult(status=kv_pb2.ItemStatus(
            code=status_code(err).value[0], detail=error_detail(err, self.view.map_version)))

    async def batch(self, ops: Sequence[kv_pb2.Op]) -> list[kv_pb2.OpResult]:
        """Answer every item; errors become the item's status, never the batch's. Writes
        are submitted together (one group commit); gets of one partition and consistency
        share one read barrier and one multi-get."""
        sizes = []
        for op in ops:
            which = op.WhichOneof("op")
            item = getattr(op, which) if which else None
            sizes.append(len(getattr(item, "key", b"")) + len(getattr(item, "value", b"")))
        limits.check_batch(sizes)
        results: list[kv_pb2.OpResult | None] = [None] * len(ops)
        writes: list[tuple[int, WriteRequest, int, asyncio.Future[ApplyResult]]] = []
        reads: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
        for i, op in enumerate(ops):
            which = op.WhichOneof("op")
            try:
                if which == "get":
                    p, consistency = self.read_key(op.get)
                    reads.setdefault((p, consistency), []).append((i, op.get.key))
                elif which in ("put", "delete", "cas"):
                    req: WriteRequest = getattr(op, which)
                    p, cmd = self.command(req)
                    writes.append((i, req, p, self.replicas.submit(p, cmd)))
                else:
                    raise InvalidArgument("batch item with no operation")
            except StorageError as err:
                results[i] = self.failed(err)
        groups = [self._read_group(p, c, items, results) for (p, c), items in reads.items()]
        await asyncio.gather(*(w[3] for w in writes), *groups, return_exceptions=True)
        for i, req, p, future in writes:
            exc = future.exception()
            try:
                if exc is not None:
                    raise exc
                results[i] = self.respond(req, p, future.result())
            except StorageError as err:
                results[i] = self.failed(err)
        return [r if r is not None else self.failed(Unavailable("no result")) for r in results]

    async def _read_group(self, p: int, consistency: int, items: list[tuple[int, bytes]],
                          results: list[kv_pb2.OpResult | None]) -> None:
        try:
            await self.replicas.read_barrier(p, consistency)
        except StorageError as err:
            failed = self.failed(err)
            for i, _ in items:
                results[i] = failed
            return
        records = self.replicas.read_local(p, [key for _, key in items])
        for (i, _), record in zip(items, records, strict=True):
            results[i] = kv_pb2.OpResult(get=_get_response(record))


def _get_response(record: ValueRecord | None) -> kv_pb2.GetResponse:
    if record is None:
        return kv_pb2.GetResponse(found=False)
    return kv_pb2.GetResponse(found=True, value=record.value, version=_version(record.version))


def _raise_mismatch(result: ApplyResult, p: int) -> None:
    if result.outcome == Outcome.CAS_MISMATCH:
        found = f"version {result.current}" if result.current else "no value"
        raise CasMismatch(f"compare-and-set failed: the key holds {found}", partition=p,
                          current=result.current)


class KVService(kv_pb2_grpc.KVServicer):
    """The public API. Each handler: validate, call Operations, map errors."""

    def __init__(self, view: NodeView, replicas: Replicas) -> None:
        self.view = view
        self.ops = Operations(view, replicas)
        self.replicas = replicas

    def _header(self) -> kv_pb2.ResponseHeader:
        return kv_pb2.ResponseHeader(map_version=self.view.map_version,
                                     node_id=self.view.node_id)

    async def _run(self, context: grpc.aio.ServicerContext[object, object],
                   call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(_remaining(context)):
                return await call()
        except TimeoutError:
            err: StorageError = DeadlineExceeded(
                "deadline exceeded before the operation completed; it may or may not have "
                "been applied")
        except StorageError as exc:
            err = exc
        await context.abort(
            status_code(err), err.message,
            trailing_metadata=((ERROR_METADATA_KEY,
                                error_detail(err, self.view.map_version).SerializeToString()),),
        )
        raise AssertionError("abort returns by raising")

    async def Put(self, request: kv_pb2.PutRequest,
                  context: grpc.aio.ServicerContext[object, object]) -> kv_pb2.PutResponse:
        result = await self._run(context, lambda: self.ops.write(request))
        result.put.header.CopyFrom(self._header())
        return result.put

    async def Get(self, request: kv_pb2.GetRequest,
                  context: grpc.aio.ServicerContext[object, object]) -> kv_pb2.GetResponse:
        response = await self._run(context, lambda: self.ops.get(request))
        response.header.CopyFrom(self._header())
        return response

    async def Delete(self, request: kv_pb2.DeleteRequest,
                     context: grpc.aio.ServicerContext[object, object]
                     ) -> kv_pb2.DeleteResponse:
        result = await self._run(context, lambda: self.ops.write(request))
        result.delete.header.CopyFrom(self._header())
        return result.delete

    async def CompareAndSet(self, request: kv_pb2.CompareAndSetRequest,
                            context: grpc.aio.ServicerContext[object, object]
                            ) -> kv_pb2.CompareAndSetResponse:
        result = await self._run(context, lambda: self.ops.write(request))
        result.cas.header.CopyFrom(self._header())
        return result.cas

    async def Batch(self, request: kv_pb2.BatchRequest,
                    context: grpc.aio.ServicerContext[object, object]
                    ) -> kv_pb2.BatchResponse:
        results = await self._run(context, lambda: self.ops.batch(request.ops))
        return kv_pb2.BatchResponse(results=results, header=self._header())

    async def BatchPut(self, request: kv_pb2.BatchPutRequest,
                       context: grpc.aio.ServicerContext[object, object]
                       ) -> kv_pb2.BatchPutResponse:
        ops = [kv_pb2.Op(put=item) for item in request.items]
        results = await self._run(context, lambda: self.ops.batch(ops))
        return kv_pb2.BatchPutResponse(results=results, header=self._header())

    async def BatchGet(self, request: kv_pb2.BatchGetRequest,
                       context: grpc.aio.ServicerContext[object, object]
                       ) -> kv_pb2.BatchGetResponse:
        ops = [kv_pb2.Op(get=kv_pb2.GetRequest(key=k, consistency=request.consistency))
               for k in request.keys]
        results = await self._run(context, lambda: self.ops.batch(ops))
        return kv_pb2.BatchGetResponse(results=results, header=self._header())

    async def Scan(self, request: kv_pb2.ScanRequest,
                   context: grpc.aio.ServicerContext[object, object]
                   ) -> AsyncIterator[kv_pb2.ScanPage]:
        async def barrier() -> int:
            if request.partition >= self.view.partition_count:
                raise InvalidArgument(f"partition {request.partition} does not exist: the "
                                      f"ring has {self.view.partition_count} partitions")
            if request.page_size > limits.MAX_SCAN_PAGE:
                raise InvalidArgument(f"page size {request.page_size} is over "
                                      f"{limits.MAX_SCAN_PAGE}")
            if request.end_key and request.end_key <= request.start_key:
                raise InvalidArgument("end_key must be after start_key")
            consistency = _check_consistency(request.consistency)
            await self.replicas.read_barrier(request.partition, consistency)
            return request.page_size or DEFAULT_PAGE

        page_size = await self._run(context, barrier)
        start = request.start_key
        remaining = request.limit or -1
        while True:
            want = page_size if remaining < 0 else min(page_size, remaining)
            rows = self.replicas.scan(request.partition, start, request.end_key or None, want + 1)
            more = len(rows) > want
            rows = rows[:want]
            page_bytes = 0
            for cut, (key, record) in enumerate(rows):
                page_bytes += len(key) + (0 if request.keys_only else len(record.value))
                if cut and page_bytes > limits.MAX_SCAN_PAGE_BYTES:
                    rows, more = rows[:cut], True
                    break
            page = kv_pb2.ScanPage(header=self._header())
            for key, record in rows:
                page.items.add(key=key, value=b"" if request.keys_only else record.value,
                               version=_version(record.version))
            if remaining > 0:
                remaining -= len(rows)
            last_page = not more or remaining == 0
            if not last_page:
                page.next_key = rows[-1][0] + b"\x00"
                start = page.next_key
            yield page
            if last_page:
                return

    async def GetMap(self, request: kv_pb2.GetMapRequest,
                     context: grpc.aio.ServicerContext[object, object]
                     ) -> kv_pb2.PartitionMap:
        return self.view.map_message()


class ReplicaService(replica_pb2_grpc.ReplicaServicer):
    """The internal replica protocol; the decisions live in Replicas/replication."""

    def __init__(self, replicas: Replicas, incarnation: str) -> None:
        self.replicas = replicas
        self.incarnation = incarnation

    async def Append(self, request: replica_pb2.AppendBatchRequest,
                     context: grpc.aio.ServicerContext[object, object]
                     ) -> replica_pb2.AppendBatchResponse:
        return self.replicas.handle_append(request)

    async def Promise(self, request: replica_pb2.PromiseRequest,
                      context: grpc.aio.ServicerContext[object, object]
                      ) -> replica_pb2.PromiseResponse:
        return self.replicas.handle_promise(request, self.incarnation)

    async def Digest(self, request: replica_pb2.DigestRequest,
                     context: grpc.aio.ServicerContext[object, object]
                     ) -> replica_pb2.DigestResponse:
        return self.replicas.digest(request.partition)

    async def InstallSnapshot(self, request_iterator: AsyncIterator[replica_pb2.SnapshotChunk],
                              context: grpc.aio.ServicerContext[object, object]
                              ) -> replica_pb2.InstallSnapshotResponse:
        return await self.replicas.install_snapshot(request_iterator)


def _now_ms() -> int:
    return int(time.time() * 1000)
