"""A test task: append a line to <$VOLUME_DATA>/runs.txt, print the file, then sleep."""

from __future__ import annotations

import os
import time
from pathlib import Path


def main() -> None:
    runs = Path(os.environ["VOLUME_DATA"]) / "runs.txt"
    with runs.open("a") as f:
        f.write(f"run by pid {os.getpid()}\n")
    print(f"pid {os.getpid()}", flush=True)
    print(runs.read_text(), end="", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
