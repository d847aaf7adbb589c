"""Explicit time: bounded waits on a condition, and free loopback ports.

The only sanctioned way to wait for something to become true. Invariants:

- every wait has a timeout; a wait that runs out raises ``TimeoutError`` saying how long
  it waited and for what, never returns quietly;
- the predicate is evaluated at least once, and once more at the deadline, so a condition
  that becomes true during the last interval is not reported as a timeout;
- sleeping here is the poll interval of a loop with a deadline, never synchronisation.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable

__all__ = ["async_poll_for", "free_port", "poll_for"]


def _timed_out(timeout: float, what: str) -> TimeoutError:
    return TimeoutError(f"timed out after {timeout}s waiting for {what}")


def poll_for(
    predicate: Callable[[], bool],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Return once `predicate()` is true; raise TimeoutError after `timeout` seconds.

    Exceptions raised by the predicate propagate: a predicate can abort the wait early
    (for example when the process it waits on has died).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(timeout, what)
        time.sleep(min(interval, remaining))


async def async_poll_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """The asyncio twin of `poll_for`; `predicate` may be sync or return an awaitable.

    A single evaluation of an async predicate is not interrupted at the deadline: give its
    own awaits their own timeouts.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(timeout, what)
        await asyncio.sleep(min(interval, remaining))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (the OS picks it).

    Racy by nature: bind it soon, and be ready to retry if another process took it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
