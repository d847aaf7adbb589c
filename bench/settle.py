"""Wait until a fresh cluster's leadership has settled: the partition map unchanged for
5 s with every node leading within 2 partitions of the others (at most 60 s).

Usage: python bench/settle.py   (uses RINGSTORE_ENDPOINTS)

A just-started cluster moves leaders for a while (the controller rebalances them); a
measurement taken meanwhile sees NOT_LEADER redirects and one node doing most of the work.
"""

from __future__ import annotations

import collections
import os
import time

from storage.client import Client

STABLE_FOR = 5.0
TIMEOUT = 60.0


def main() -> None:
    with Client(os.environ["RINGSTORE_ENDPOINTS"], timeout=5.0) as client:
        deadline = time.monotonic() + TIMEOUT
        seen: tuple[object, ...] | None = None
        since = time.monotonic()
        while True:
            pmap = client.get_map()
            led = collections.Counter(e.leader for e in pmap.entries)
            state = (pmap.version, tuple(sorted(led.items())))
            now = time.monotonic()
            if state != seen:
                seen, since = state, now
            elif now - since >= STABLE_FOR and max(led.values()) - min(led.values()) <= 2:
                break
            if now > deadline:
                print("not settled within 60 s; measuring anyway")
                break
            time.sleep(0.5)
    print(f"settled: map version {pmap.version}, partitions led {dict(sorted(led.items()))}")


if __name__ == "__main__":
    main()
