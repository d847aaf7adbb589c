"""Time request-id look-ups (`Engine.get_request`) in a node's store, as a write's apply
does once per write on every replica, next to a fresh store, and with a larger cache.

Usage: python bench/probe_requests.py COPY_OF_A_NODE_DB   (the node must be stopped, or
copy its directory first: a running node holds the RocksDB lock)

Found with it (bench/results/README.md): after a few hundred thousand writes the
`requests` column family holds millions of entries (it is never pruned), and a look-up
of a new request id costs ~250 µs with the engine's 64 MiB cache (half of it charged to
memtables) against ~1 µs on a fresh store or with a 512 MiB cache.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

import storage.engine as engine_module
from storage.engine import Engine

PROBES = 3000


def probe(path: Path, label: str) -> None:
    engine = Engine.open(path)
    try:
        entries = sum(1 for p in range(64) for _ in engine.requests(p))
        rng = random.Random(1)
        keys = [(rng.randrange(64), os.urandom(24)) for _ in range(PROBES)]
        started = time.perf_counter()
        for p, k in keys:
            engine.get_request(p, k)
        miss_us = (time.perf_counter() - started) / PROBES * 1e6
        print(f"{label}: {entries:,} request entries; a new request id costs {miss_us:.1f} µs")
    finally:
        engine.close()


def main() -> None:
    probe(Path(sys.argv[1]), "given store, 64 MiB cache")
    engine_module._CACHE_BYTES = 512 * 1024 * 1024  # what the cache size does to it
    probe(Path(sys.argv[1]), "given store, 512 MiB cache")
    engine_module._CACHE_BYTES = 64 * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Engine.open(Path(tmp) / "db")
        batch = fresh.batch()
        for i in range(20_000):
            batch.put_request(i % 64, os.urandom(24), b"x" * 20)
        fresh.write(batch)
        fresh.close()
        probe(Path(tmp) / "db", "fresh store, 20k request entries")


if __name__ == "__main__":
    main()
