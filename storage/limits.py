"""Request limits (DESIGN §4) and the validation every entry point applies first.

Pure: raises `InvalidArgument` with a message that names the limit; never does I/O.
The same checks run in the client (fail fast) and in the servicer (the authority).
"""

from __future__ import annotations

from collections.abc import Sequence

from storage.errors import InvalidArgument

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1024 * 1024
MAX_BATCH_ITEMS = 128
MAX_BATCH_BYTES = 2 * 1024 * 1024
# The gRPC message cap on both ends, servers included: the 2 MiB payload limit plus room
# for protobuf framing of a full batch. A larger message gets gRPC's RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024 + 64 * 1024
# Node-to-node Append batches stay under this (one entry may exceed it alone: a full
# 1 MiB value plus its key still fits in MAX_MESSAGE_BYTES).
MAX_APPEND_BATCH_BYTES = 1536 * 1024
# A scan page holds at most this many value bytes (and at least one item).
MAX_SCAN_PAGE_BYTES = 1024 * 1024
MAX_TTL_MS = 10 * 365 * 24 * 3600 * 1000
MAX_CLIENT_ID_BYTES = 64
MAX_SCAN_PAGE = 1000


def check_key(key: bytes) -> None:
    if not key:
        raise InvalidArgument("empty key: keys are 1..4096 bytes")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidArgument(f"key of {len(key)} bytes is over the limit of {MAX_KEY_BYTES} bytes")


def check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"value of {len(value)} bytes is over the limit of {MAX_VALUE_BYTES} bytes (1 MiB)"
        )


def check_ttl(ttl_ms: int) -> None:
    if ttl_ms < 0 or ttl_ms > MAX_TTL_MS:
        raise InvalidArgument(f"ttl of {ttl_ms} ms is outside 0..{MAX_TTL_MS} ms")


def check_client_id(client_id: bytes) -> None:
    if len(client_id) > MAX_CLIENT_ID_BYTES:
        raise InvalidArgument(f"client id of {len(client_id)} bytes is over {MAX_CLIENT_ID_BYTES}")


def check_batch(sizes: Sequence[int]) -> None:
    """`sizes` holds the payload bytes (key + value) of each item."""
    if len(sizes) > MAX_BATCH_ITEMS:
        raise InvalidArgument(
            f"batch of {len(sizes)} items is over the limit of {MAX_BATCH_ITEMS} items"
        )
    total = sum(sizes)
    if total > MAX_BATCH_BYTES:
        raise InvalidArgument(
            f"batch of {total} bytes is over the limit of {MAX_BATCH_BYTES} bytes"
        )
