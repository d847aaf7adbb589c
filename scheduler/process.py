"""Child processes: spawn, signal, stop and reap. The only module that imports subprocess.

Every daemon, task and server the project starts goes through `spawn`. Invariants:

- a spawned child leads its own session and process group (``start_new_session``), so a
  signal sent through `Process` reaches the whole tree it started, and a Ctrl-C in the
  parent's terminal does not;
- its stdout and stderr go to files (append mode), never to the parent's streams or a
  pipe that could fill up; stdin is /dev/null;
- the leader is reaped only by `Process.wait`, `Process.terminate` and `Process.kill`.
  Until then an exited leader stays a zombie, which keeps its pid (and so the process
  group id) from being reused: signals to the group are therefore never sent once the
  leader has been reaped;
- `terminate` is idempotent and safe on a process that already died; after it returns the
  leader is reaped and the rest of its group has been sent SIGKILL.

`pid_alive` and `terminate_pid` deal with processes recorded by an earlier invocation
(not our children): they poll with ``kill(pid, 0)`` and count zombies as dead.

Tasks (the agent's work) start through `spawn_task`: a tiny Python wrapper leads the
task's session and process group, runs the task's argv as its child, and records the
child's exit status in ``<sandbox>/.exit_status`` (JSON, written atomically) before it
exits. So an agent that restarts and finds a task gone learns how it ended, although it
never was its parent. The wrapper ignores SIGTERM/SIGINT/SIGHUP (by a handler, which exec
resets, so the task still receives them) and so outlives its child; `signal_group` with
``spare_leader`` signals the task's processes but not the wrapper. `process_start_time`
tells a live process from a new one that reused its pid; `group_rss_bytes` measures a
process group's memory from /proc.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal as _signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from scheduler.deadline import poll_for

__all__ = [
    "EXIT_STATUS_FILE",
    "Completed",
    "ExitStatus",
    "Process",
    "group_pids",
    "group_rss_bytes",
    "pid_alive",
    "pids_with_argument",
    "process_start_time",
    "read_exit_status",
    "run",
    "signal_group",
    "spawn",
    "spawn_task",
    "terminate_pid",
]

log = logging.getLogger(__name__)

# How long a SIGKILLed process may take to disappear before we call it stuck (a process
# in uninterruptible sleep can take a while; longer than this means something is wrong).
_KILL_TIMEOUT = 10.0


class Process:
    """A spawned child and its process group; see the module docstring for invariants."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        name: str,
        argv: Sequence[str],
        stdout: Path,
        stderr: Path,
    ) -> None:
        self._popen = popen
        self.name = name
        self.argv: tuple[str, ...] = tuple(argv)
        self.pid: int = popen.pid
        self.stdout_path = stdout
        self.stderr_path = stderr

    def __repr__(self) -> str:
        return f"Process(name={self.name!r}, pid={self.pid}, returncode={self.returncode})"

    @property
    def returncode(self) -> int | None:
        """Exit status of the leader (negative: killed by that signal), None while running.

        Does not reap the leader.
        """
        if self._popen.returncode is not None:
            return self._popen.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped behind our back (nobody else should)
            return self._popen.poll()
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status

    def alive(self) -> bool:
        """True while the leader has not exited (a stopped process is alive)."""
        return self.returncode is None

    def _reaped(self) -> bool:
        return self._popen.returncode is not None

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group; a no-op once the leader is reaped."""
        if self._reaped():
            log.debug("not signalling reaped process name=%s pid=%s", self.name, self.pid)
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """SIGSTOP the group (freeze it, as a hung host would look)."""
        self.signal(_signal.SIGSTOP)

    def cont(self) -> None:
        """SIGCONT the group."""
        self.signal(_signal.SIGCONT)

    def kill(self) -> int:
        """SIGKILL the group and reap the leader; return its exit status."""
        self.signal(_signal.SIGKILL)
        return self._reap()

    def wait(self, timeout: float) -> int | None:
        """Wait up to `timeout` seconds for the leader to exit; reap it and return its
        status, or return None if it is still running. Does not touch the rest of the group."""
        try:
            poll_for(lambda: not self.alive(), timeout, interval=0.02, what=f"{self.name} to exit")
        except TimeoutError:
            return None
        return self._popen.wait()

    def terminate(self, grace: float = 10.0) -> int:
        """SIGTERM the group, give the leader `grace` seconds to exit, then SIGKILL the group;
        reap the leader and return its exit status. Idempotent."""
        if self._reaped():
            return self._popen.wait()
        if self.alive():
            log.debug("terminating name=%s pid=%s grace=%s", self.name, self.pid, grace)
            self.signal(_signal.SIGTERM)
            self.signal(_signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            try:
                poll_for(lambda: not self.alive(), grace, interval=0.02, what="exit")
            except TimeoutError:
                log.warning(
                    "killing name=%s pid=%s: still running %ss after SIGTERM",
                    self.name,
                    self.pid,
                    grace,
                )
        return self.kill()  # also sweeps whatever is left of the group

    def _reap(self) -> int:
        poll_for(lambda: not self.alive(), _KILL_TIMEOUT, interval=0.02, what=f"{self.name} to die")
        return self._popen.wait()

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    name: str,
    log_dir: Path | None = None,
    stdout: Path | None = None,
    stderr: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    log_argv: Sequence[str] | None = None,
) -> Process:
    """Start `argv` in its own session and process group.

    Output goes to `stdout` / `stderr` when given, else to ``<log_dir>/<name>.stdout`` and
    ``<log_dir>/<name>.stderr`` (created if missing, appended to). `env` None inherits
    this process's environment; a mapping replaces it entirely, as in subprocess.
    `log_argv` is what the log line shows instead of `argv` (e.g. without a long script).
    """
    if stdout is None or stderr is None:
        if log_dir is None:
            raise ValueError("spawn needs log_dir, or both stdout and stderr paths")
        log_dir.mkdir(parents=True, exist_ok=True)
        stdout = stdout or log_dir / f"{name}.stdout"
        stderr = stderr or log_dir / f"{name}.stderr"
    args = [os.fspath(a) for a in argv]
    with open(stdout, "ab") as out, open(stderr, "ab") as err:
        popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    log.info("spawned name=%s pid=%s argv=%s", name, popen.pid,
             list(log_argv) if log_argv is not None else args)
    return Process(popen, name=name, argv=args, stdout=stdout, stderr=stderr)


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat, None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain ') '.
    return stat[stat.rindex(")") + 2]


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return _proc_state(pid) not in (None, "Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def terminate_pid(pid: int, grace: float = 10.0, *, cmdline_contains: str | None = None) -> bool:
    """Stop a process that is not our child (e.g. recorded in a state file by an earlier run).

    SIGTERM (to its process group if it leads one, else to it), up to `grace` seconds for it
    to go, then SIGKILL. With `cmdline_contains`, a process whose command line does not
    contain that text is left alone: its pid was reused. Returns True if a process was
    signalled, False if there was nothing (of ours) to stop.
    """
    if not pid_alive(pid):
        return False
    if cmdline_contains is not None and cmdline_contains not in _cmdline(pid):
        log.info("not stopping pid=%s: command line does not match %r", pid, cmdline_contains)
        return False

    def send(sig: int) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    send(_signal.SIGTERM)
    send(_signal.SIGCONT)
    try:
        poll_for(lambda: not pid_alive(pid), grace, interval=0.02, what=f"pid {pid} to exit")
    except TimeoutError:
        log.warning("killing pid=%s: still running %ss after SIGTERM", pid, grace)
        send(_signal.SIGKILL)
        poll_for(lambda: not pid_alive(pid), _KILL_TIMEOUT, interval=0.02, what=f"pid {pid} to die")
    return True


@dataclass(frozen=True)
class Completed:
    """The outcome of a short command run with `run`."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(
    argv: Sequence[str | os.PathLike[str]],
    timeout: float,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run a short command (a probe such as ``java -version``) and capture its output.

    Raises TimeoutError if it runs longer than `timeout` (it is killed), FileNotFoundError
    if the program does not exist. A non-zero exit is reported, not raised.
    """
    args = [os.fspath(a) for a in argv]
    started = time.monotonic()
    try:
        done = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"timed out after {timeout}s waiting for {args[0]}") from None
    log.debug(
        "ran argv=%s returncode=%s seconds=%.2f", args, done.returncode, time.monotonic() - started
    )
    return Completed(tuple(args), done.returncode, done.stdout, done.stderr)


# ------------------------------------------------------------------------------ tasks

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
