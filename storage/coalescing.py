"""Coalescing decisions: which waiting calls leave together in one Batch RPC, and when.

Role: a `Lane` per leader address admits up to `max_in_flight` Batch RPCs; calls that
arrive while they are all in flight queue, and leave together when one finishes.
`take_batch` and `chunk_by_limits` cut batches within the server's batch limits.
`storage.batcher` owns the futures, the timers and the RPCs, and sends what is decided here.

Invariants:
- Pure: no I/O, no asyncio, grpc or protobuf import. A queued call is anything with a
  `size` and a `future` that says whether it is `done()` (the client's `Pending`, which
  holds an asyncio future, lives in the shell, `storage.batcher`).
- A batch holds at most MAX_BATCH_ITEMS operations and BATCH_BYTES_BUDGET bytes, except
  that one operation always fits; calls whose caller gave up are never sent.
- A lane's queue is non-empty only while `in_flight == max_in_flight`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from storage import limits

__all__ = [
    "BATCH_BYTES_BUDGET",
    "OP_OVERHEAD_BYTES",
    "Answer",
    "Call",
    "Lane",
    "chunk_by_limits",
    "take_batch",
]

OP_OVERHEAD_BYTES = 64  # request id, tags and framing of one Op, estimated generously
# What a coalesced batch may carry: the server's 2 MiB batch limit minus headroom for
# protobuf framing, so the message stays under the 2 MiB gRPC cap too.
BATCH_BYTES_BUDGET = limits.MAX_BATCH_BYTES - 64 * 1024


class Answer(Protocol):
    """Where a call's result goes; done once answered, failed or given up by its caller."""

    def done(self) -> bool: ...


class Call(Protocol):
    """One call waiting to leave in a batch: its estimated size on the wire and its answer."""

    @property
    def size(self) -> int: ...
    @property
    def future(self) -> Answer: ...


C = TypeVar("C", bound=Call)


def take_batch(
    queue: deque[C],
    max_items: int = limits.MAX_BATCH_ITEMS,
    max_bytes: int = BATCH_BYTES_BUDGET,
) -> list[C]:
    """Pop the next batch from the front of `queue`: at most `max_items` and `max_bytes`
    (one item always fits), skipping calls whose caller gave up."""
    batch: list[C] = []
    total = 0
    while queue and len(batch) < max_items:
        head = queue[0]
        if head.future.done():
            queue.popleft()
            continue
        if batch and total + head.size > max_bytes:
            break
        queue.popleft()
        batch.append(head)
        total += head.size
    return batch


def chunk_by_limits(
    indices: Sequence[int],
    sizes: Sequence[int],
    max_items: int = limits.MAX_BATCH_ITEMS,
    max_bytes: int = BATCH_BYTES_BUDGET,
) -> list[list[int]]:
    """Split item positions into consecutive chunks within the batch limits."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in indices:
        if current and (len(current) >= max_items or total + sizes[i] > max_bytes):
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += sizes[i]
    if current:
        chunks.append(current)
    return chunks


class Lane(Generic[C]):
    """Per-address coalescing state: decides when a batch leaves. No I/O.

    Invariant: the queue is non-empty only while `in_flight == max_in_flight`.
    """

    __slots__ = ("in_flight", "max_in_flight", "queue")

    def __init__(self, max_in_flight: int = 1) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.queue: deque[C] = deque()

    def offer(self, pending: C) -> list[C] | None:
        """A new call: the batch to send at once (the caller owns the slot), or None (queued)."""
        if self.in_flight < self.max_in_flight:
            self.in_flight += 1
            return [pending]
        self.queue.append(pending)
        return None

    def complete(self) -> list[C]:
        """An RPC finished: the next batch to send in the freed slot (empty: slot released)."""
        self.in_flight -= 1
        batch = take_batch(self.queue)
        if batch:
            self.in_flight += 1
        return batch
