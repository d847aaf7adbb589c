"""The storage error hierarchy and the one table that maps it to gRPC status codes.

Every error says whether a client may retry it (`retriable`) and whether it proves the
operation did not happen (`definite`). INVALID_ARGUMENT, NOT_LEADER and CAS mismatch are
definite: nothing was stored. UNAVAILABLE, DEADLINE_EXCEEDED and UNKNOWN are not: the
write may or may not have been applied (a history records them as `info`).

Pure: no I/O, no grpc import. The servicers and the client translate with
`grpc_code_name()` / `from_code_name()` at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Version:
    """The log position `(epoch, index)` of the write that produced a value."""

    epoch: int
    index: int

    def __str__(self) -> str:
        return f"{self.epoch}.{self.index}"

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse `EPOCH.INDEX` (as printed by `str()`); ValueError on anything else."""
        parts = text.strip().split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"malformed version {text!r}: expected EPOCH.INDEX, e.g. 3.1042")
        return cls(int(parts[0]), int(parts[1]))


class StorageError(Exception):
    """Base of all Ringstore storage errors."""

    code = "UNKNOWN"  # the gRPC status code name this error travels as
    retriable = False
    definite = False  # True: the operation certainly did not take effect

    def __init__(self, message: str, *, partition: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.partition = partition


class InvalidArgument(StorageError):
    """The request breaks a limit or is malformed; nothing was stored."""

    code = "INVALID_ARGUMENT"
    definite = True


class NotLeader(StorageError):
    """This node does not lead the key's partition; refused before anything was appended."""

    code = "ABORTED"
    retriable = True
    definite = True

    def __init__(
        self,
        message: str,
        *,
        partition: int | None = None,
        leader_id: str = "",
        leader_address: str = "",
        epoch: int = 0,
    ) -> None:
        super().__init__(message, partition=partition)
        self.leader_id = leader_id
        self.leader_address = leader_address
        self.epoch = epoch


class CasMismatch(StorageError):
    """A compare-and-set found another version; nothing was written."""

    code = "FAILED_PRECONDITION"
    definite = True

    def __init__(
        self, message: str, *, partition: int | None = None, current: Version | None = None
    ) -> None:
        super().__init__(message, partition=partition)
        self.current = current  # None: the key is absent


class Unavailable(StorageError):
    """No serving leader, no quorum, or the node is shutting down; may or may not have applied."""

    code = "UNAVAILABLE"
    retriable = True


class StaleEpoch(StorageError):
    """A replica was asked to act in an epoch it has been fenced from."""

    code = "FAILED_PRECONDITION"
    definite = True

    def __init__(self, message: str, *, partition: int | None = None, epoch: int = 0) -> None:
        super().__init__(message, partition=partition)
        self.epoch = epoch


class DeadlineExceeded(StorageError):
    """The caller's deadline passed; the operation may or may not have applied."""

    code = "DEADLINE_EXCEEDED"
    retriable = False


class Internal(StorageError):
    """A bug or an unexpected failure; the operation may or may not have applied."""

    code = "INTERNAL"


# The one table: error class -> gRPC status code name (kept on the classes as `code`)
# and the reverse direction for errors that arrive without a detail.
CODE_TO_ERROR: dict[str, type[StorageError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "ABORTED": NotLeader,
    "FAILED_PRECONDITION": CasMismatch,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "INTERNAL": Internal,
    "UNKNOWN": StorageError,
    "RESOURCE_EXHAUSTED": InvalidArgument,
}
