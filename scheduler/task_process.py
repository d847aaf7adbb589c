"""A task's processes: the exit-status wrapper that leads them, and what /proc says of them.

Tasks (the agent's work) start through `spawn_task` (on scheduler.process.spawn): a tiny
Python wrapper leads the task's session and process group, runs the task's argv as its
child, and records the child's exit status in ``<sandbox>/.exit_status`` (JSON, written
atomically) before it exits. So an agent that restarts and finds a task gone learns how
it ended, although it never was its parent. The wrapper ignores SIGTERM/SIGINT/SIGHUP (by
a handler, which exec resets, so the task still receives them) and so outlives its child;
`signal_group` with ``spare_leader`` signals the task's processes but not the wrapper.
`process_start_time` tells a live process from a new one that reused its pid;
`group_rss_bytes` measures a process group's memory from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scheduler.process import Process, pid_alive, spawn

__all__ = [
    "EXIT_STATUS_FILE",
    "ExitStatus",
    "group_pids",
    "group_rss_bytes",
    "pids_with_argument",
    "process_start_time",
    "read_exit_status",
    "signal_group",
    "spawn_task",
]

EXIT_STATUS_FILE = ".exit_status"

# The wrapper that leads a task's process group. Self-contained (run with -I -S, before
# any project code could be imported): argv is [status_file, task argv...].
_TASK_WRAPPER = r"""
import json, os, signal, sys
status_path, argv = sys.argv[1], sys.argv[2:]
def record(status):
    tmp = status_path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(status, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, status_path)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda *_: None)
try:
    pid = os.posix_spawnp(argv[0], argv, dict(os.environ), setsigdef=(signal.SIGPIPE,))
except OSError as exc:
    print(f'cannot launch {argv[0]}: {exc}', file=sys.stderr, flush=True)
    record({'exit_code': 127, 'error': f'cannot launch {argv[0]}: {exc.strerror}'})
    sys.exit(127)
while True:
    try:
        _, status = os.waitpid(pid, 0)
        break
    except InterruptedError:
        continue
code = os.waitstatus_to_exitcode(status)
record({'exit_code': code})
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class ExitStatus:
    """How a task's command ended, as its wrapper recorded it.

    `exit_code` is negative (-N) when the command was killed by signal N; `error` is set
    when the command could not be started at all (then `exit_code` is 127).
    """

    exit_code: int
    error: str = ""


def spawn_task(
    argv: Sequence[str],
    *,
    name: str,
    sandbox: Path,
    env: Mapping[str, str],
) -> Process:
    """Start a task's `argv` under the exit-status wrapper, in `sandbox`, with exactly `env`.

    stdout and stderr go to ``<sandbox>/stdout`` and ``<sandbox>/stderr``, truncated first
    (they hold the newest run); a stale exit-status file is removed. The returned Process
    is the wrapper: it leads the task's session and process group.
    """
    if not argv:
        raise ValueError("a task needs a non-empty argv")
    sandbox.mkdir(parents=True, exist_ok=True)
    status = sandbox / EXIT_STATUS_FILE
    status.unlink(missing_ok=True)
    for stream in ("stdout", "stderr"):
        (sandbox / stream).write_bytes(b"")
    return spawn(
        [sys.executable, "-I", "-S", "-c", _TASK_WRAPPER, str(status), *argv],
        name=name,
        stdout=sandbox / "stdout",
        stderr=sandbox / "stderr",
        cwd=sandbox,
        env=env,
        log_argv=["<task wrapper>", *argv],
    )


def read_exit_status(sandbox: Path) -> ExitStatus | None:
    """The exit status the wrapper recorded in `sandbox`, None if it recorded none."""
    try:
        data = json.loads((sandbox / EXIT_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return ExitStatus(int(data["exit_code"]), str(data.get("error", "")))


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: fields 3.. (state, ppid, pgrp, ...)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat[stat.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), None if there is no such process.

    A pid plus its start time names one process for good: a new process that reuses the
    pid has a later start time.
    """
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None  # field 22 of stat(5)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    found = []
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(pid)
    return found


def group_rss_bytes(pgid: int, *, spare_leader: bool = False) -> int:
    """Resident memory of the processes of group `pgid` (without the leader if asked)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in group_pids(pgid):
        if spare_leader and pid == pgid:
            continue
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total


def signal_group(pgid: int, sig: int, *, spare_leader: bool = False) -> int:
    """Send `sig` to the processes of group `pgid` (all but its leader with
    `spare_leader`); return how many were signalled.

    Safe after the leader is gone: a pid that still names a process group cannot be
    handed to a new process, so `pgid` cannot have been reused while members remain.
    """
    if not spare_leader:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return 0
        return 1
    sent = 0
    for pid in group_pids(pgid):
        if pid == pgid:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            sent += 1
    return sent


def pids_with_argument(argument: str) -> list[int]:
    """Live processes one of whose command-line arguments is exactly `argument`."""
    wanted = argument.encode()
    found = []
    for pid in _all_pids():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in args and pid_alive(pid):
            found.append(pid)
    return found
