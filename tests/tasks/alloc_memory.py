"""A test task: allocate (and touch) N MiB, step by step, then sleep. argv: N."""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    mib = int(sys.argv[1])
    print(f"pid {os.getpid()}", flush=True)
    blocks = []
    for _ in range(mib):
        blocks.append(bytearray(b"x" * (1024 * 1024)))
        time.sleep(0.002)
    print(f"allocated {mib} MiB", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
