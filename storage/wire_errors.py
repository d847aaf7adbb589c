"""The client's side of the error contract: a failed call on the wire -> a `storage.errors` error.

Role: read a gRPC status code and the `ErrorDetail` the server attaches (in the trailing
metadata `ringstore-error-bin` of a failed RPC, or in a batch item's `ItemStatus`) and
return the StorageError it stands for. The server's side is `storage.service.error_detail`.

Invariants:
- No I/O: it only reads statuses and messages it is given. It imports grpc for the
  `StatusCode` and `AioRpcError` types, kv_pb2 for `ErrorDetail` and asyncio only to ask
  which task is being cancelled (`call_cancelled`).
- Without a detail, the status code alone decides (ABORTED -> NotLeader, ...); a garbled
  detail is ignored rather than allowed to hide the status.
- DEADLINE_EXCEEDED and UNAVAILABLE stay non-definite: the write may have applied.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from storage.errors import (
    CasMismatch,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotLeader,
    StaleEpoch,
    StorageError,
    Unavailable,
    Version,
)
from storage.v1 import kv_pb2

__all__ = [
    "ERROR_METADATA_KEY",
    "call_cancelled",
    "error_from_status",
    "item_error",
    "rpc_error",
]

ERROR_METADATA_KEY = "ringstore-error-bin"

_STATUS_BY_VALUE: dict[int, grpc.StatusCode] = {s.value[0]: s for s in grpc.StatusCode}


def error_from_status(
    code: grpc.StatusCode, detail: kv_pb2.ErrorDetail | None, message: str
) -> StorageError:
    """The `storage.errors` class for a status code and its optional `ErrorDetail`."""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message or "deadline exceeded; may or may not have applied")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return InvalidArgument(message or "message over the 2 MiB limit")
    kind = detail.kind if detail is not None else kv_pb2.ERROR_KIND_UNSPECIFIED
    text = detail.message if detail is not None and detail.message else message
    partition = detail.partition if detail is not None else None
    unspecified = kind == kv_pb2.ERROR_KIND_UNSPECIFIED
    if kind == kv_pb2.INVALID or (unspecified and code is grpc.StatusCode.INVALID_ARGUMENT):
        return InvalidArgument(text, partition=partition)
    if kind == kv_pb2.NOT_LEADER or (unspecified and code is grpc.StatusCode.ABORTED):
        if detail is None:
            return NotLeader(text)
        return NotLeader(
            text,
            partition=partition,
            leader_id=detail.leader_id,
            leader_address=detail.leader_address,
            epoch=detail.epoch,
        )
    if kind == kv_pb2.CAS_MISMATCH or (
        unspecified and code is grpc.StatusCode.FAILED_PRECONDITION
    ):
        current = None
        if detail is not None and detail.current_found:
            current = Version(detail.current_version.epoch, detail.current_version.index)
        return CasMismatch(text or "compare-and-set mismatch", partition=partition, current=current)
    if kind == kv_pb2.STALE_EPOCH:
        return StaleEpoch(text, partition=partition, epoch=detail.epoch if detail else 0)
    if kind == kv_pb2.UNAVAILABLE or code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    ):
        return Unavailable(text, partition=partition)
    if kind == kv_pb2.INTERNAL or code is grpc.StatusCode.INTERNAL:
        return Internal(text, partition=partition)
    return StorageError(f"{code.name}: {text}", partition=partition)


def _detail_from_metadata(metadata: Any) -> kv_pb2.ErrorDetail | None:
    for key, value in metadata or ():
        if key == ERROR_METADATA_KEY and isinstance(value, bytes):
            detail = kv_pb2.ErrorDetail()
            try:
                detail.ParseFromString(value)
            except Exception:  # a garbled detail must not hide the status itself
                return None
            return detail
    return None


def rpc_error(exc: grpc.aio.AioRpcError, address: str) -> StorageError:
    """Translate a failed RPC (status + trailing `ringstore-error-bin`) into a StorageError."""
    code = exc.code()
    detail = _detail_from_metadata(exc.trailing_metadata())
    message = exc.details() or code.name
    if detail is None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        message = f"{address}: {message}"
    return error_from_status(code, detail, message)


def item_error(status: kv_pb2.ItemStatus) -> StorageError:
    """Translate one batch item's failed `ItemStatus` into a StorageError."""
    code = _STATUS_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)
    detail = status.detail if status.HasField("detail") else None
    return error_from_status(code, detail, detail.message if detail is not None else code.name)


def call_cancelled() -> bool:
    """A CancelledError came from the gRPC call (its channel was closed), not our task.

    The callers read it as Unavailable("the client was closed")."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0
