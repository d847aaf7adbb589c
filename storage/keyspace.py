"""How a partition's key space, request-id table and replica meta are encoded on disk.

Pure: byte layouts and the apply-time decisions that depend only on them. Never does I/O.

Invariants:
- A stored value record is `(epoch, index, expires_at_ms, value)`: the version of a value
  is the log position of the write that produced it, so every replica that applied the
  same log holds byte-identical records.
- A value whose `expires_at_ms` is not after a given instant is absent at that instant.
  Apply-time checks use the entry's `proposed_at_ms` (fixed by the leader), never the
  replica's clock, so CAS on an expiring key is decided the same way everywhere.
- The request-id table maps `(client id, seq)` to the result of the first application;
  a retried write finds it and returns the same result without applying again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from storage.errors import Version

_RECORD = struct.Struct(">QQQ")
_META = struct.Struct(">QQQQQ")
_RESULT = struct.Struct(">BQQBQQBQ")
_SEQ = struct.Struct(">Q")


@dataclass(frozen=True)
class ValueRecord:
    version: Version
    expires_at_ms: int
    value: bytes

    def live_at(self, now_ms: int) -> bool:
        return self.expires_at_ms == 0 or self.expires_at_ms > now_ms


def encode_record(epoch: int, index: int, expires_at_ms: int, value: bytes) -> bytes:
    return _RECORD.pack(epoch, index, expires_at_ms) + value


def decode_record(raw: bytes) -> ValueRecord:
    epoch, index, expires = _RECORD.unpack_from(raw)
    return ValueRecord(Version(epoch, index), expires, raw[_RECORD.size :])


def record_version(raw: bytes) -> tuple[int, int, int]:
    """`(epoch, index, expires_at_ms)` without copying the value."""
    epoch, index, expires = _RECORD.unpack_from(raw)
    return epoch, index, expires


class Outcome(IntEnum):
    OK = 0
    CAS_MISMATCH = 1


@dataclass(frozen=True)
class ApplyResult:
    """What applying one command produced; kept in the request-id table."""

    outcome: Outcome
    version: Version  # the log position of the command
    existed: bool = False  # delete: the key was present
    current: Version | None = None  # CAS mismatch: the version found (None: absent)
    applied_at_ms: int = 0


def encode_result(result: ApplyResult) -> bytes:
    cur = result.current
    return _RESULT.pack(
        int(result.outcome),
        result.version.epoch,
        result.version.index,
        1 if result.existed else 0,
        cur.epoch if cur else 0,
        cur.index if cur else 0,
        1 if cur else 0,
        result.applied_at_ms,
    )


def decode_result(raw: bytes) -> ApplyResult:
    outcome, epoch, index, existed, ce, ci, found, at = _RESULT.unpack(raw)
    return ApplyResult(
        Outcome(outcome),
        Version(epoch, index),
        bool(existed),
        Version(ce, ci) if found else None,
        at,
    )


def request_key(client_id: bytes, seq: int) -> bytes:
    return client_id + _SEQ.pack(seq)


def request_applied_at(raw: bytes) -> int:
    return decode_result(raw).applied_at_ms


@dataclass(frozen=True)
class ReplicaMeta:
    """Durable per-partition replica state (the engine's meta column family).

    `promised_epoch` only grows. `base` is the log position the retained log starts
    after (0.0 until a snapshot or log truncation moves it).
    """

    promised_epoch: int = 0
    commit_index: int = 0
    applied_index: int = 0
    base_epoch: int = 0
    base_index: int = 0


def meta_key(partition: int) -> bytes:
    return b"p" + partition.to_bytes(4, "big")


def encode_meta(meta: ReplicaMeta) -> bytes:
    return _META.pack(
        meta.promised_epoch, meta.commit_index, meta.applied_index, meta.base_epoch, meta.base_index
    )


def decode_meta(raw: bytes) -> ReplicaMeta:
    return ReplicaMeta(*_META.unpack(raw))


NODE_CLUSTER = b"node/cluster"
NODE_ID = b"node/id"
NODE_INCARNATION = b"node/incarnation"
