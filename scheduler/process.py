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

`run_group` runs a short command (a COMMAND health check) from asyncio without a thread:
it leads its own process group, and on timeout, on cancellation and after it exits the
whole group is SIGKILLed before the leader is reaped, so nothing it started outlives it.

`pid_alive` and `terminate_pid` deal with processes recorded by an earlier invocation
(not our children): they poll with ``kill(pid, 0)`` and count zombies as dead.

Tasks (the agent's work) start through scheduler.task_process, which builds on `spawn`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as _signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from scheduler.deadline import poll_for

__all__ = [
    "Completed",
    "Process",
    "pid_alive",
    "run",
    "run_group",
    "spawn",
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
        popen = _popen_group(args, out, err, cwd=cwd, env=env)
    log.info("spawned name=%s pid=%s argv=%s", name, popen.pid,
             list(log_argv) if log_argv is not None else args)
    return Process(popen, name=name, argv=args, stdout=stdout, stderr=stderr)


def _popen_group(
    args: list[str],
    stdout: int | IO[bytes],
    stderr: int | IO[bytes],
    *,
    cwd: Path | None,
    env: Mapping[str, str] | None,
) -> subprocess.Popen[bytes]:
    """Start `args` leading a new session and process group, stdin from /dev/null.

    Forks and execs, never waits for the child: fine to call from the event loop."""
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )


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


async def run_group(
    argv: Sequence[str | os.PathLike[str]],
    timeout: float,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run `argv` in its own session and process group, output discarded; return its exit
    status (negative: killed by that signal). Waits on a pidfd, not in a thread; only
    after a cancellation is the SIGKILLed leader reaped synchronously (milliseconds).

    Raises TimeoutError if it runs longer than `timeout`, FileNotFoundError if the program
    does not exist. Whether it exits, times out or the caller is cancelled, every process
    left in its group is SIGKILLed and the leader reaped before this returns or raises.
    """
    args = [os.fspath(a) for a in argv]
    popen = _popen_group(args, subprocess.DEVNULL, subprocess.DEVNULL, cwd=cwd, env=env)
    process = Process(popen, name=args[0], argv=args, stdout=Path(os.devnull),
                      stderr=Path(os.devnull))
    try:
        try:
            await _leader_exit(process, timeout)
        except TimeoutError:
            process.signal(_signal.SIGKILL)
            await _leader_exit(process, _KILL_TIMEOUT)
            raise TimeoutError(f"{args[0]} ran longer than {timeout}s; its process group "
                               "was killed") from None
    finally:
        # However it ended (exited, timed out, or the caller was cancelled): SIGKILL what
        # is left of the group while the unreaped leader still pins its id, then reap it.
        status = process.kill()
    return status


async def _leader_exit(process: Process, timeout: float) -> None:
    """Return once `process`'s leader has exited (it is not reaped), or raise TimeoutError.

    Waits on a pidfd, which becomes readable when the process exits."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    fd = os.pidfd_open(process.pid)

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(exited, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)
