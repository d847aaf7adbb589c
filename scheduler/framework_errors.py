"""How the framework SDK reads a master's answers: which refusals are for good, which
mean "the master went away, find the leader and retry", and the one-line FrameworkError
a framework sees.

Decisions on gRPC status codes; no calls are made here. Invariants:
- a FrameworkError's message is one line and names the call;
- only calls that are safe to repeat are retried (ACCEPT is not: its offers die with the
  master that made them), only while their deadline lasts, and only when the master went
  away or the refusal came from a subscription that has since been replaced;
- DEADLINE_EXCEEDED is never retried: the call's own deadline has passed.
"""

from __future__ import annotations

import grpc

from scheduler.registry import LEADER_METADATA_KEY

__all__ = [
    "FATAL_SUBSCRIBE_CODES",
    "MASTER_GONE_CODES",
    "FrameworkError",
    "call_failure",
    "leader_hint",
    "one_line",
]

# Codes with which a master refuses for good: re-subscribing would be refused again.
FATAL_SUBSCRIBE_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
})
# Codes meaning "this master cannot serve you now": find the leader and try again.
MASTER_GONE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
})


class FrameworkError(Exception):
    """A call the master refused (or that could not be made in time).

    `code` is the gRPC status code; the message is one line.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def retriable(self) -> bool:
        return self.code in MASTER_GONE_CODES or self.code == grpc.StatusCode.DEADLINE_EXCEEDED


def leader_hint(exc: grpc.aio.AioRpcError) -> str:
    """The leader a standby named in its refusal ("" if none)."""
    metadata = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == LEADER_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def one_line(exc: grpc.aio.AioRpcError) -> str:
    details = (exc.details() or exc.code().name).splitlines()
    return details[0] if details else exc.code().name


def call_failure(exc: grpc.aio.AioRpcError, *, what: str, safe: bool, stale: bool,
                 timeout: float, out_of_time: bool) -> FrameworkError | None:
    """The error a failed call `what` ends with, or None: retry it on the current leader.

    `safe`: the call may be repeated; `stale`: it was refused as FAILED_PRECONDITION by a
    subscription that is no longer current; `out_of_time`: its deadline has passed.
    """
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return FrameworkError(code, f"{what} timed out after {timeout}s: {one_line(exc)}")
    stale = stale and code == grpc.StatusCode.FAILED_PRECONDITION
    if not safe or not (code in MASTER_GONE_CODES or stale):
        return FrameworkError(code, f"{what} failed: {one_line(exc)}")
    if out_of_time:
        return FrameworkError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"{what} timed out after {timeout}s during a master failover: "
                              f"{one_line(exc)}")
    return None
