"""Task health checks: COMMAND (argv exits 0), TCP (a connection is accepted) and GRPC
(grpc.health.v1 says SERVING), with delay, interval, timeout, grace and consecutive failures.

The decision is pure (`HealthTally`: probe results in, verdicts out); `HealthChecker` is
the thin asyncio loop that runs a probe and feeds the tally. Invariants:
- no probe runs before `delay`; probes run one at a time, each bounded by `timeout` (a
  probe that times out or raises counts as a failure);
- failures inside the grace period (from the checker's start) do not count, unless a
  check already succeeded: the first success ends the grace period;
- the task is reported healthy on its first success and again on every change, and
  unhealthy when `consecutive_failures` checks in a row failed; with `kill_on_failure`
  the checker then asks for the kill once and stops.

COMMAND runs through scheduler.process.run_group: its own process group, killed whole
when it times out or the checker is cancelled (no thread, nothing left behind). GRPC
calls grpc.health.v1 Check (`grpc_health_probe`; a caller may give its own probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler.process import run_group

__all__ = [
    "GrpcProbe",
    "HealthChecker",
    "HealthSpec",
    "HealthTally",
    "Verdict",
    "grpc_health_probe",
    "make_probe",
]

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]
# (port, service, timeout) -> SERVING?
GrpcProbe = Callable[[int, str, float], Awaitable[bool]]


@dataclass(frozen=True)
class HealthSpec:
    """A task's health check; `port` is already resolved (0 became the first port)."""

    kind: str  # "COMMAND", "TCP" or "GRPC"
    argv: tuple[str, ...] = ()
    port: int = 0
    grpc_service: str = ""
    delay: float = 0.0
    interval: float = 10.0
    timeout: float = 20.0
    consecutive_failures: int = 3
    grace: float = 0.0
    kill_on_failure: bool = False


class Verdict(Enum):
    NONE = "none"  # nothing to report
    HEALTHY = "healthy"  # report healthy (first success, or recovered)
    UNHEALTHY = "unhealthy"  # report unhealthy (threshold reached)


class HealthTally:
    """Pure: consecutive-failure counting with a grace period. Times are monotonic seconds."""

    def __init__(self, spec: HealthSpec, started: float) -> None:
        self.spec = spec
        self.started = started
        self.failures = 0
        self.healthy: bool | None = None  # last reported
        self.succeeded_once = False

    def record(self, ok: bool, now: float) -> Verdict:
        if ok:
            self.failures = 0
            self.succeeded_once = True
            if self.healthy is not True:
                self.healthy = True
                return Verdict.HEALTHY
            return Verdict.NONE
        if not self.succeeded_once and now - self.started < self.spec.grace:
            return Verdict.NONE
        self.failures += 1
        if self.failures >= max(1, self.spec.consecutive_failures) and self.healthy is not False:
            self.healthy = False
            return Verdict.UNHEALTHY
        return Verdict.NONE


async def grpc_health_probe(port: int, service: str, timeout: float) -> bool:
    """grpc.health.v1 Check on 127.0.0.1:port: True if SERVING."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def make_probe(
    spec: HealthSpec,
    *,
    env: Mapping[str, str],
    cwd: Path,
    grpc_probe: GrpcProbe | None = None,
) -> Probe:
    """The probe for `spec`; it returns False (never raises) on a failed check."""
    if spec.kind == "COMMAND":
        if not spec.argv:
            raise ValueError("a COMMAND health check needs argv")

        async def command() -> bool:
            try:
                return await run_group(spec.argv, spec.timeout, cwd=cwd, env=env) == 0
            except (TimeoutError, OSError):
                return False

        return command
    if spec.kind == "TCP":

        async def tcp() -> bool:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", spec.port), spec.timeout
                )
            except (TimeoutError, OSError):
                return False
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True

        return tcp
    if spec.kind == "GRPC":
        probe = grpc_probe or grpc_health_probe

        async def grpc() -> bool:
            try:
                return await asyncio.wait_for(
                    probe(spec.port, spec.grpc_service, spec.timeout), spec.timeout + 1
                )
            except Exception:
                return False

        return grpc
    raise ValueError(f"unknown health check kind {spec.kind!r}")


class HealthChecker:
    """Runs `probe` per `spec` until cancelled (or until the kill it asked for).

    `on_change(healthy)` is called on each verdict; `on_failed()` is awaited once when the
    task turned unhealthy and the spec says kill_on_failure.
    """

    def __init__(
        self,
        spec: HealthSpec,
        probe: Probe,
        *,
        on_change: Callable[[bool], None],
        on_failed: Callable[[], Awaitable[None]],
        name: str = "",
    ) -> None:
        self.spec = spec
        self.probe = probe
        self.on_change = on_change
        self.on_failed = on_failed
        self.name = name

    async def _check(self) -> bool:
        try:
            return await asyncio.wait_for(self.probe(), self.spec.timeout + 1)
        except Exception:  # a broken probe is a failed check, not a dead checker
            return False

    async def run(self) -> None:
        tally = HealthTally(self.spec, time.monotonic())
        await asyncio.sleep(self.spec.delay)
        while True:
            ok = await self._check()
            verdict = tally.record(ok, time.monotonic())
            log.debug("health check task=%s ok=%s failures=%s", self.name, ok, tally.failures)
            if verdict is Verdict.HEALTHY:
                self.on_change(True)
            elif verdict is Verdict.UNHEALTHY:
                log.info("task unhealthy task=%s failures=%s", self.name, tally.failures)
                self.on_change(False)
                if self.spec.kill_on_failure:
                    await self.on_failed()
                    return
            await asyncio.sleep(max(self.spec.interval, 0.05))
