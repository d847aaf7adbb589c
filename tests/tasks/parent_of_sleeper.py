"""A test command: start a sleeping child (in this process group), write "<own pid>
<child's pid>" to the file argv[1] (atomically), then exit with the status argv[2] if
given, else sleep for ten minutes."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    tmp = sys.argv[1] + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(tmp, sys.argv[1])
    if len(sys.argv) > 2:
        sys.exit(int(sys.argv[2]))
    time.sleep(600)


if __name__ == "__main__":
    main()
