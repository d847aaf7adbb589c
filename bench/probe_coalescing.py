"""How many operations each coalesced Batch RPC carries during a `storage bench` run.

Usage: python bench/probe_coalescing.py [storage bench options...]

Wraps the client's `Batcher.batch_rpc` (storage/batcher.py) to count RPCs and their
sizes, then runs the bench command with the given options; prints the mean and the
size histogram on stderr. A diagnostic, not a benchmark: it adds a little client CPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from storage import batcher
from storage.bench import bench_command

sizes: Counter[int] = Counter()
_original = batcher.Batcher.batch_rpc


async def _counting(self: batcher.Batcher, address: str, ops: Sequence[Any],
                    deadline: float) -> Any:
    sizes[len(ops)] += 1
    return await _original(self, address, ops, deadline)


def main() -> None:
    batcher.Batcher.batch_rpc = _counting  # type: ignore[method-assign]
    try:
        bench_command(sys.argv[1:], standalone_mode=False)
    finally:
        rpcs = sum(sizes.values())
        ops = sum(k * v for k, v in sizes.items())
        print(f"Batch RPCs {rpcs}, operations {ops}, mean {ops / max(rpcs, 1):.1f} per RPC, "
              f"{sizes[1] / max(rpcs, 1):.1%} carry one", file=sys.stderr)
        print(f"sizes (ops: RPCs): {dict(sorted(sizes.items()))}", file=sys.stderr)


if __name__ == "__main__":
    main()
