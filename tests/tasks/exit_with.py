"""A test task: print its pid, wait until the file named by argv[2] exists (if given), then
exit with the status argv[1]."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> None:
    code = int(sys.argv[1])
    print(f"pid {os.getpid()}", flush=True)
    if len(sys.argv) > 2:
        gate = Path(sys.argv[2])
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    sys.exit(code)


if __name__ == "__main__":
    main()
