"""A test task: serve TCP on $PORT0 (answers each connection with one line), print to stdout.

Prints "pid <pid>" and "listening <port>" once ready. With --ignore-term it ignores
SIGTERM (to test kill escalation).
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def main() -> None:
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    port = int(os.environ["PORT0"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(16)
        print(f"pid {os.getpid()}", flush=True)
        print(f"listening {port}", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(f"hello from {os.environ.get('TASK_ID', '?')}\n".encode())


if __name__ == "__main__":
    main()
