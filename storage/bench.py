"""`storage bench`: YCSB-style workloads against a running cluster, beside baselines
measured in the same run on the same machine, so every headline figure is also a ratio.

Role: pre-generate keys, values and the operation sequence; drive `AsyncClient` from one
process with `--clients` operations in flight (closed loop), or at a fixed `--rate`
(open loop); measure two baselines first (a raw grpc.aio unary echo between two processes,
and the raw `Engine` in a temporary directory); print, and optionally record, the result.

Invariants:
- The pure parts (`Zipfian`, `Histogram`, `op_mix`, `key_sequence`, `ratio`) do no I/O.
- The measuring loop only indexes pre-generated sequences, calls the client, reads
  `time.perf_counter_ns` twice and records one histogram bucket per operation.
- Open loop: an operation's latency runs from its scheduled start, not from when a free
  slot let it start, so a stalled cluster shows up in the percentiles (no coordinated
  omission); at most `--clients` operations are outstanding.
- Throughput counts what completed inside the measuring window; latencies are of
  successful operations; failures are counted by error type.
- The echo server is the only process this module starts (through `scheduler.process`);
  it is stopped before the command returns. Every RPC carries a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import shlex
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scheduler.deadline import free_port
from scheduler.process import Process, run, spawn
from storage import limits
from storage.client import CHANNEL_OPTIONS, AsyncClient
from storage.errors import StorageError
from storage.v1 import kv_pb2

__all__ = [
    "WORKLOADS",
    "Histogram",
    "Zipfian",
    "bench_command",
    "echo_baseline",
    "echo_server_command",
    "engine_baseline",
    "key_sequence",
    "op_mix",
    "ratio",
]

log = logging.getLogger(__name__)

# Workload -> fraction of operations that are reads (the rest are updates).
WORKLOADS: dict[str, float] = {"a": 0.50, "b": 0.95, "c": 1.00, "w": 0.00}
ZIPF_THETA = 0.99
SEQUENCE_LENGTH = 1 << 18  # pre-generated draws, cycled; a power of two for masking
PERCENTILES = (0.50, 0.99, 0.999)
LOAD_BATCH = 100
LOAD_CONCURRENCY = 8
ENGINE_BATCH = 100
ENGINE_PARTITIONS = 64
ECHO_SERVICE = "ringstore.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
ECHO_WARMUP = 0.5
# The node's server flavour (storage/node.py), so the echo measures the same stack.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
PROGRESS_INTERVAL = 0.25
OTHER_CORES_WARNING = 0.3  # busy cores outside client and nodes that make a run suspect


# ---------------------------------------------------------------------------------------
# Pure parts: key distributions, operation mixes, the latency histogram.


def zeta(n: int, theta: float) -> float:
    """The generalised harmonic number: sum of 1/i**theta for i in 1..n."""
    return math.fsum(i**-theta for i in range(1, n + 1))


class Zipfian:
    """YCSB's ZipfianGenerator (Gray et al., "Quickly generating billion-record synthetic
    databases"): ranks 0..n-1, rank 0 hottest, P(rank i) ~ 1/(i+1)**theta. Ranks 0 and 1
    are drawn with their exact probabilities; the tail by Gray's closed-form approximation."""

    __slots__ = ("_random", "alpha", "eta", "items", "theta", "two_cut", "zetan")

    def __init__(
        self, items: int, theta: float = ZIPF_THETA, rand: Callable[[], float] = random.random
    ) -> None:
        if items < 1 or not 0 < theta < 1:
            raise ValueError("need items >= 1 and 0 < theta < 1")
        self.items = items
        self.theta = theta
        self._random = rand
        self.zetan = zeta(items, theta)
        self.alpha = 1.0 / (1.0 - theta)
        self.two_cut = 1.0 + 0.5**theta
        self.eta = 0.0
        if items > 2:  # with 1 or 2 items the first two cases cover every draw
            self.eta = (1 - (2.0 / items) ** (1 - theta)) / (1 - zeta(2, theta) / self.zetan)

    def probability(self, rank: int) -> float:
        """The exact zipfian probability of `rank` (what the generator approximates)."""
        return float((rank + 1) ** -self.theta / self.zetan)

    def next(self) -> int:
        u = self._random()
        uz = u * self.zetan
        if uz < 1.0:
            return 0
        if uz < self.two_cut:
            return 1
        rank = int(self.items * (self.eta * u - self.eta + 1) ** self.alpha)
        return min(rank, self.items - 1)


def key_sequence(distribution: str, items: int, length: int, rng: random.Random) -> list[int]:
    """`length` key indexes in 0..items-1 drawn from `distribution` (uniform|zipfian)."""
    if distribution == "uniform":
        return [rng.randrange(items) for _ in range(length)]
    if distribution == "zipfian":
        z = Zipfian(items, rand=rng.random)
        return [z.next() for _ in range(length)]
    raise ValueError(f"unknown distribution {distribution!r}: use uniform or zipfian")


def op_mix(read_fraction: float, length: int, rng: random.Random) -> bytes:
    """A shuffled sequence of operation kinds, 0 = read, 1 = update, with exactly
    round(length * read_fraction) reads: every cycle through it has the workload's mix."""
    if not 0.0 <= read_fraction <= 1.0:
        raise ValueError(f"read fraction {read_fraction} is not within 0..1")
    reads = round(length * read_fraction)
    kinds = bytearray(reads) + bytearray(b"\x01" * (length - reads))
    rng.shuffle(kinds)
    return bytes(kinds)


class Histogram:
    """Log-bucketed counts of non-negative integers (HdrHistogram's layout): exact below
    2**SUB_BITS, above that 2**(SUB_BITS-1) buckets per power of two, so a reported value
    is never below the true one and at most 1/2**(SUB_BITS-1) (0.8%) above it."""

    SUB_BITS = 8
    HALF = 1 << (SUB_BITS - 1)
    MAX_VALUE = (1 << 40) - 1  # ns: about 18 minutes; larger values are clamped

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        top = self.MAX_VALUE.bit_length() - self.SUB_BITS
        self.counts = [0] * ((top + 2) * self.HALF)
        self.count = 0
        self.total = 0
        self.min = self.MAX_VALUE
        self.max = 0

    def record(self, value: int) -> None:
        if value > self.MAX_VALUE:
            value = self.MAX_VALUE
        elif value < 0:
            value = 0
        shift = value.bit_length() - self.SUB_BITS
        self.counts[value if shift <= 0 else (shift << 7) + (value >> shift)] += 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value

    @classmethod
    def bucket_range(cls, index: int) -> tuple[int, int]:
        """The smallest and largest value that land in bucket `index`."""
        if index < 2 * cls.HALF:
            return index, index
        shift = index // cls.HALF - 1
        sub = index - shift * cls.HALF
        return sub << shift, ((sub + 1) << shift) - 1

    def percentile(self, q: float) -> int:
        """The nearest-rank q-quantile (0 < q <= 1), as its bucket's highest value
        (capped at the largest value recorded); 0 if nothing was recorded."""
        if not self.count:
            return 0
        rank = min(self.count, max(1, math.ceil(q * self.count)))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self.bucket_range(index)[1], self.max)
        return self.max

    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            if n:
                self.counts[i] += n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    def summary_ms(self) -> dict[str, float]:
        """p50/p99/p999/max/mean in milliseconds (values recorded in nanoseconds)."""
        out = {f"p{q * 100:g}".replace(".", ""): self.percentile(q) / 1e6 for q in PERCENTILES}
        out["max"] = self.max / 1e6
        out["mean"] = self.mean() / 1e6
        return {k: round(v, 3) for k, v in out.items()}


assert Histogram.HALF == 1 << 7, "record() inlines SUB_BITS - 1 as the shift 7"


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline rounded to 3 places; None when either is missing or zero."""
    if not value or not baseline:
        return None
    return round(value / baseline, 3)


# ---------------------------------------------------------------------------------------
# Machine and process probes (Linux /proc).


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    versions = {}
    for package in ("grpcio", "protobuf", "rocksdict"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(ram / 2**30, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        **versions,
    }


def code_version() -> dict[str, Any]:
    """Which code ran: the commit, the files of `storage`/`scheduler` that differ from it,
    and a hash over those differences (edits, untracked files) to tell two trees apart."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = run(["git", "rev-parse", "HEAD"], 10, cwd=repo)
        status = run(["git", "status", "--porcelain", "--", "storage", "scheduler"], 10,
                     cwd=repo)
        diff = run(["git", "diff", "HEAD", "--", "storage", "scheduler"], 10, cwd=repo)
    except (OSError, TimeoutError) as exc:
        return {"commit": "unknown", "error": str(exc)}
    if not head.ok:
        return {"commit": "unknown", "error": head.stderr.strip()}
    digest = hashlib.sha256(diff.stdout.encode())
    changed = []
    for line in status.stdout.splitlines():
        path = line[3:].strip()
        changed.append(path)
        if line.startswith("??"):
            target = repo / path
            for f in sorted(target.rglob("*.py") if target.is_dir() else [target]):
                with contextlib.suppress(OSError):
                    digest.update(f.read_bytes())
    return {"commit": head.stdout.strip(), "changed": changed,
            "changes_sha256": digest.hexdigest()[:16] if changed else None}


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of every thread of `pid` so far, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float | None:
    """CPU seconds every core of the machine spent busy so far (all processes, ours or not)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident) of `pid` in MiB."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out["rss_mib" if name == "VmRSS" else "hwm_mib"] = round(
                    int(rest.split()[0]) / 1024, 1)
    return out


def local_node_pids(work_dir: Path) -> dict[str, int]:
    """Node id -> pid from a `storage local up` work directory's cluster.json."""
    state = json.loads((work_dir / "cluster.json").read_text())
    return {name: int(n["pid"]) for name, n in state.get("nodes", {}).items() if n.get("pid")}


class CpuMeter:
    """CPU seconds used between `start` and `stop` by this process ("client"), by the
    named others, and by the whole machine ("machine": anything else busy shows here)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._first: dict[str, float | None] = {}
        self._self = 0.0
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._self = time.process_time()
        self._first = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._first["machine"] = machine_cpu_seconds()

    def stop(self) -> None:
        self.used = {"client": time.process_time() - self._self}
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        now["machine"] = machine_cpu_seconds()
        for name, after in now.items():
            before = self._first.get(name)
            if before is not None and after is not None:
                self.used[name] = after - before
        if "machine" in self.used and len(self.used) == len(self.pids) + 2:
            # Busy CPU that is none of ours: other tenants, ZooKeeper, the controller.
            ours = sum(v for k, v in self.used.items() if k != "machine")
            self.used["other"] = max(0.0, self.used["machine"] - ours)


def per_op_us(seconds: float, ops: int) -> float | None:
    return round(seconds * 1e6 / ops, 1) if ops else None


# ---------------------------------------------------------------------------------------
# Progress (stderr), updated a few times a second, never from the measuring loop.


class Phases:
    """A rich progress bar naming the current phase and its completed operations."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<16}"), BarColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True), auto_refresh=False, transient=False,
            disable=not enabled,
        )

    def __enter__(self) -> Phases:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @contextlib.asynccontextmanager
    async def phase(
        self, name: str, seconds: float, done: Callable[[], int]
    ) -> AsyncIterator[None]:
        """Show `name` for the `seconds` it should last, with done()/s beside it."""
        task = self.progress.add_task(name, total=seconds, info="")
        started = time.perf_counter()

        async def tick() -> None:
            while True:
                elapsed = time.perf_counter() - started
                n = done()
                self.progress.update(task, completed=min(elapsed, seconds),
                                     info=f"{n:>9,} ops  {n / max(elapsed, 1e-9):>10,.0f}/s")
                self.progress.refresh()
                await asyncio.sleep(PROGRESS_INTERVAL)

        ticker = asyncio.get_running_loop().create_task(tick())
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            elapsed = time.perf_counter() - started
            n = done()
            self.progress.update(task, completed=seconds,
                                 info=f"{n:>9,} ops  {n / max(elapsed, 1e-9):>10,.0f}/s")
            self.progress.refresh()

    def sync_step(self, name: str, seconds: float) -> Callable[[int], None]:
        """For synchronous loops: returns a callback taking the ops done so far."""
        task = self.progress.add_task(name, total=seconds, info="")
        started = time.perf_counter()

        def update(n: int) -> None:
            elapsed = time.perf_counter() - started
            self.progress.update(task, completed=min(elapsed, seconds),
                                 info=f"{n:>9,} ops  {n / max(elapsed, 1e-9):>10,.0f}/s")
            self.progress.refresh()

        return update


# ---------------------------------------------------------------------------------------
# Baseline 1: the raw engine, in-process.


def engine_baseline(
    keys: Sequence[bytes], value: bytes, seconds: float, phases: Phases | None = None
) -> dict[str, float]:
    """Single puts/s and ENGINE_BATCH-item batched items/s into a fresh `Engine`."""
    from storage.engine import Engine  # only here: the echo server need not load RocksDB

    clock = time.perf_counter
    n_keys = len(keys)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ringstore-bench-engine-") as tmp:
        engine = Engine.open(Path(tmp) / "db")
        try:
            show = phases.sync_step("engine put", seconds) if phases else None
            done, started = 0, clock()
            end = started + seconds
            while True:
                for _ in range(256):
                    batch = engine.batch()
                    batch.put(done % ENGINE_PARTITIONS, keys[done % n_keys], value)
                    engine.write(batch)
                    done += 1
                if show is not None and done % 8192 == 0:
                    show(done)
                if clock() >= end:
                    break
            out["puts_per_s"] = round(done / (clock() - started), 1)
            if show is not None:
                show(done)
            show = phases.sync_step(f"engine batch {ENGINE_BATCH}", seconds) if phases else None
            done, started = 0, clock()
            end = started + seconds
            while clock() < end:
                batch = engine.batch()
                for i in range(done, done + ENGINE_BATCH):
                    batch.put(i % ENGINE_PARTITIONS, keys[i % n_keys], value)
                engine.write(batch)
                done += ENGINE_BATCH
                if show is not None and done % (ENGINE_BATCH * 64) == 0:
                    show(done)
            out["batched_items_per_s"] = round(done / (clock() - started), 1)
            if show is not None:
                show(done)
        finally:
            engine.close()
    return out


# ---------------------------------------------------------------------------------------
# Baseline 2: a raw grpc.aio unary echo between two processes.


_ECHO_VERSION = kv_pb2.Version(epoch=1, index=1)
_ECHO_HEADER = kv_pb2.ResponseHeader(map_version=1, node_id="echo")


async def _echo(request: kv_pb2.PutRequest, context: Any) -> kv_pb2.GetResponse:
    # A Put-sized request in, a Get-sized reply out: the node's two message shapes.
    return kv_pb2.GetResponse(found=True, value=request.value, version=_ECHO_VERSION,
                              header=_ECHO_HEADER)


async def serve_echo(host: str, port: int) -> None:
    """Serve the echo until SIGTERM/SIGINT, with the node's server flavour."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(
        _echo, request_deserializer=kv_pb2.PutRequest.FromString,
        response_serializer=kv_pb2.GetResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise click.ClickException(f"cannot listen on {host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(json.dumps({"echo": f"{host}:{bound}", "pid": os.getpid()}), flush=True)
    await stop.wait()
    await server.stop(0.5)


@click.command("echo-server")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True)
def echo_server_command(host: str, port: int) -> None:
    """Serve the raw gRPC echo the bench's baseline calls (until SIGTERM)."""
    asyncio.run(serve_echo(host, port))


@contextlib.contextmanager
def echo_server_process(log_dir: Path, startup: float = 20.0) -> Iterator[tuple[Process, str]]:
    """Start `python -m storage.bench echo-server` on a free loopback port; stop it after."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    process = spawn([sys.executable, "-m", "storage.bench", "echo-server", "--port", str(port)],
                    name="bench-echo", log_dir=log_dir)
    try:
        channel = grpc.insecure_channel(address)
        try:
            deadline = time.monotonic() + startup
            while True:
                if not process.alive():
                    tail = process.stderr_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the echo server exited at start:\n{tail}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.2)
                    break
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"the echo server did not listen on {address} within {startup}s"
                        ) from None
        finally:
            channel.close()
        yield process, address
    finally:
        process.terminate(grace=5.0)


async def echo_baseline(
    address: str, clients: int, seconds: float, value: bytes, key: bytes,
    timeout: float = 5.0, server_pid: int | None = None, phases: Phases | None = None,
    warmup: float = ECHO_WARMUP,
) -> dict[str, Any]:
    """Drive the echo at `address` with `clients` calls in flight for `seconds`."""
    request = kv_pb2.PutRequest(key=key, value=value, request_id=kv_pb2.RequestId(
        client_id=os.urandom(16), seq=time.time_ns() // 1000))
    hist = Histogram()
    errors: Counter[str] = Counter()
    running = True
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(
            ECHO_METHOD, request_serializer=kv_pb2.PutRequest.SerializeToString,
            response_deserializer=kv_pb2.GetResponse.FromString)

        async def worker() -> None:
            clock = time.perf_counter_ns
            while running:
                t0 = clock()
                try:
                    await call(request, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                hist.record(clock() - t0)

        workers = [asyncio.create_task(worker()) for _ in range(clients)]
        try:
            await asyncio.sleep(warmup)
            hist, errors = Histogram(), Counter()  # the workers read these names at record
            meter = CpuMeter({"server": server_pid} if server_pid else {})
            meter.start()
            started = time.perf_counter()
            if phases is not None:
                async with phases.phase("echo baseline", seconds, lambda: hist.count):
                    await asyncio.sleep(seconds)
            else:
                await asyncio.sleep(seconds)
            elapsed = time.perf_counter() - started
            final, final_errors = hist, errors
            hist, errors = Histogram(), Counter()  # completions after the window
            meter.stop()
            running = False
            await asyncio.wait(workers, timeout=timeout + 1.0)
        finally:
            running = False
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    return {
        "calls_per_s": round(final.count / elapsed, 1),
        "calls": final.count,
        "clients": clients,
        "seconds": round(elapsed, 3),
        "latency_ms": final.summary_ms(),
        "errors": dict(final_errors),
        "cpu_us_per_call": {k: per_op_us(v, final.count) for k, v in meter.used.items()},
        "cores": {k: round(v / elapsed, 2) for k, v in meter.used.items()},
    }


# ---------------------------------------------------------------------------------------
# The workload against the cluster.


@dataclass(frozen=True)
class BenchConfig:
    endpoints: str | None
    zk: str | None
    cluster: str
    workload: str
    clients: int
    duration: float
    warmup: float
    keys: int
    value_size: int
    distribution: str
    batch: int
    consistency: str
    coalesce: bool
    max_in_flight: int
    rate: float | None
    load: bool
    baselines: bool
    baseline_duration: float
    timeout: float
    seed: int
    local_work_dir: Path | None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["local_work_dir"] = str(self.local_work_dir) if self.local_work_dir else None
        return out


@dataclass
class Window:
    """What one phase (warmup, measure, drain) saw. Workers record into the current one."""

    hist: Histogram = field(default_factory=Histogram)
    errors: Counter[str] = field(default_factory=Counter)
    items: int = 0  # batch mode: items answered OK
    misses: int = 0  # reads that found no value

    def fail(self, exc: BaseException, n: int = 1) -> None:
        self.errors[type(exc).__name__] += n


class Workload:
    """Pre-generated keys, values and operation kinds, and the workers that use them."""

    def __init__(self, config: BenchConfig, client: AsyncClient) -> None:
        self.config = config
        self.client = client
        rng = random.Random(config.seed)
        self.keys = [b"user%012d" % i for i in range(config.keys)]
        self.values = [rng.randbytes(config.value_size) for _ in range(16)]
        self.index = key_sequence(config.distribution, config.keys, SEQUENCE_LENGTH, rng)
        self.kinds = op_mix(WORKLOADS[config.workload], SEQUENCE_LENGTH, rng)
        self.window = Window()
        self.running = True
        self.next_slot = 0  # open loop: the next scheduled operation
        self.origin_ns = 0  # open loop: when slot 0 was due

    async def load(self, phases: Phases) -> dict[str, Any]:
        """Write every key once (batch puts, a few in flight); return what it took."""
        config = self.config
        chunks = [self.keys[i:i + LOAD_BATCH] for i in range(0, len(self.keys), LOAD_BATCH)]
        todo = iter(enumerate(chunks))
        window = Window()
        done = [0]

        async def loader() -> None:
            for n, chunk in todo:
                value = self.values[n % len(self.values)]
                try:
                    results = await self.client.batch_put([(k, value) for k in chunk],
                                                          timeout=config.timeout)
                except StorageError as exc:
                    window.fail(exc, len(chunk))
                    continue
                for r in results:
                    if isinstance(r, StorageError):
                        window.fail(r)
                    else:
                        done[0] += 1

        started = time.perf_counter()
        guess = len(self.keys) / 20_000
        async with phases.phase("load", guess, lambda: done[0]):
            await asyncio.gather(*(loader() for _ in range(LOAD_CONCURRENCY)))
        elapsed = time.perf_counter() - started
        return {"items": done[0], "seconds": round(elapsed, 3),
                "items_per_s": round(done[0] / elapsed, 1), "errors": dict(window.errors)}

    def _start_positions(self) -> list[int]:
        stride = SEQUENCE_LENGTH // self.config.clients
        return [i * stride for i in range(self.config.clients)]

    async def closed_worker(self, pos: int) -> None:
        keys, index, kinds, values = self.keys, self.index, self.kinds, self.values
        mask = SEQUENCE_LENGTH - 1
        put, get = self.client.put, self.client.get
        consistency, timeout = self.config.consistency, self.config.timeout
        clock = time.perf_counter_ns
        while self.running:
            slot = pos & mask
            key = keys[index[slot]]
            pos += 1
            t0 = clock()
            try:
                if kinds[slot]:
                    await put(key, values[slot & 15], timeout=timeout)
                elif await get(key, consistency=consistency, timeout=timeout) is None:
                    self.window.misses += 1
            except Exception as exc:  # counted by type; the run goes on
                self.window.fail(exc)
                continue
            self.window.hist.record(clock() - t0)

    async def open_worker(self, interval_ns: float) -> None:
        """Take the next scheduled slot, wait for its time, run it; latency from schedule."""
        keys, index, kinds, values = self.keys, self.index, self.kinds, self.values
        mask = SEQUENCE_LENGTH - 1
        put, get = self.client.put, self.client.get
        consistency, timeout = self.config.consistency, self.config.timeout
        clock = time.perf_counter_ns
        while self.running:
            n = self.next_slot
            self.next_slot = n + 1
            due = self.origin_ns + int(n * interval_ns)
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait / 1e9)
                if not self.running:
                    return
            slot = n & mask
            key = keys[index[slot]]
            try:
                if kinds[slot]:
                    await put(key, values[slot & 15], timeout=timeout)
                elif await get(key, consistency=consistency, timeout=timeout) is None:
                    self.window.misses += 1
            except Exception as exc:
                self.window.fail(exc)
                continue
            self.window.hist.record(clock() - due)

    async def batch_worker(self, pos: int) -> None:
        keys, index, kinds, values = self.keys, self.index, self.kinds, self.values
        mask = SEQUENCE_LENGTH - 1
        n = self.config.batch
        consistency, timeout = self.config.consistency, self.config.timeout
        clock = time.perf_counter_ns
        while self.running:
            slot = pos & mask
            batch = [keys[index[(pos + j) & mask]] for j in range(n)]
            pos += n
            t0 = clock()
            try:
                results: Sequence[object]
                if kinds[slot]:
                    value = values[slot & 15]
                    results = await self.client.batch_put([(k, value) for k in batch],
                                                          timeout=timeout)
                else:
                    results = await self.client.batch_get(batch, consistency=consistency,
                                                          timeout=timeout)
            except Exception as exc:
                self.window.fail(exc, n)
                continue
            window = self.window
            window.hist.record(clock() - t0)
            ok = n
            for r in results:
                if isinstance(r, StorageError):
                    window.fail(r)
                    ok -= 1
                elif r is None:
                    window.misses += 1
            window.items += ok

    def workers(self) -> list[asyncio.Task[None]]:
        config = self.config
        create = asyncio.get_running_loop().create_task
        if config.rate:
            self.origin_ns = time.perf_counter_ns()
            interval = 1e9 / config.rate
            return [create(self.open_worker(interval)) for _ in range(config.clients)]
        if config.batch > 1:
            return [create(self.batch_worker(p)) for p in self._start_positions()]
        return [create(self.closed_worker(p)) for p in self._start_positions()]

    def completed(self) -> int:
        return self.window.items if self.config.batch > 1 else self.window.hist.count

    async def run(self, phases: Phases, meter: CpuMeter) -> dict[str, Any]:
        """Warm up, measure for `duration`, stop; the measured window's figures."""
        config = self.config
        tasks = self.workers()
        try:
            if config.warmup > 0:
                async with phases.phase("warmup", config.warmup, self.completed):
                    await asyncio.sleep(config.warmup)
            measured = self.window = Window()
            meter.start()
            slot_at_start = self.next_slot
            started = time.perf_counter()
            async with phases.phase("measure", config.duration, self.completed):
                await asyncio.sleep(config.duration)
            elapsed = time.perf_counter() - started
            self.window = Window()  # completions after the window are not counted
            meter.stop()
            backlog = 0
            if config.rate:
                due = int((time.perf_counter_ns() - self.origin_ns) * config.rate / 1e9)
                backlog = max(0, due - self.next_slot)
            self.running = False
            await asyncio.wait(tasks, timeout=config.timeout + 1.0)
        finally:
            self.running = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ops = measured.hist.count
        out: dict[str, Any] = {
            "seconds": round(elapsed, 3),
            "ops": ops,
            "ops_per_s": round(ops / elapsed, 1),
            "latency_ms": measured.hist.summary_ms(),
            "errors": dict(measured.errors),
            "misses": measured.misses,
        }
        if config.batch > 1:
            out["calls"] = ops
            out["calls_per_s"] = out.pop("ops_per_s")
            out["ops"] = measured.items
            out["items_per_s"] = round(measured.items / elapsed, 1)
        if config.rate:
            out["open_loop"] = {
                "target_per_s": config.rate,
                "started_in_window": self.next_slot - slot_at_start,
                "backlog_at_end": backlog,
            }
        return out


# ---------------------------------------------------------------------------------------
# The whole run: baselines, load, workload; output.


def leadership(pmap: kv_pb2.PartitionMap) -> dict[str, Any]:
    """The map's version and how many partitions each node leads."""
    counts = Counter(entry.leader or "(none)" for entry in pmap.entries)
    return {"map_version": pmap.version, "partitions_led": dict(sorted(counts.items()))}


async def _run_async(
    config: BenchConfig, phases: Phases, keys: list[bytes], value: bytes
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if config.baselines:
        with tempfile.TemporaryDirectory(prefix="ringstore-bench-echo-") as tmp, \
                echo_server_process(Path(tmp)) as (process, address):
            result["echo"] = await echo_baseline(
                address, config.clients, config.baseline_duration, value, keys[0],
                timeout=config.timeout, server_pid=process.pid, phases=phases)
    pids = local_node_pids(config.local_work_dir) if config.local_work_dir else {}
    client = AsyncClient(config.endpoints, zk=config.zk, cluster=config.cluster,
                         coalesce=config.coalesce, timeout=config.timeout,
                         max_in_flight=config.max_in_flight)
    async with client:
        workload = Workload(config, client)
        if config.load:
            result["load"] = await workload.load(phases)
        meter = CpuMeter(pids)
        before = leadership(client.partition_map)
        result["run"] = await workload.run(phases, meter)
        # Leaders moving during the run (or piled on one node) explain many odd figures.
        after = leadership(await client.get_map())
        result["leaders"] = {"before": before, "after": after}
    ops = result["run"]["ops"]
    result["processes"] = {
        name: {"cpu_s": round(used, 2), "cpu_us_per_op": per_op_us(used, ops),
               "cores": round(used / result["run"]["seconds"], 2),
               **(memory_mib(pids[name]) if name in pids else {})}
        for name, used in meter.used.items()
    }
    return result


def run_bench(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Everything `storage bench` measures, as one JSON-able dict."""
    keys_for_baseline = [b"user%012d" % i for i in range(min(config.keys, 100_000))]
    value = random.Random(config.seed).randbytes(config.value_size)
    with Phases(progress) as phases:
        baselines: dict[str, Any] = {}
        if config.baselines:
            baselines["engine"] = engine_baseline(
                keys_for_baseline, value, config.baseline_duration / 2, phases)
        measured = asyncio.run(_run_async(config, phases, keys_for_baseline, value))
    if "echo" in measured:
        baselines["echo"] = measured.pop("echo")
    run = measured["run"]
    echo = baselines.get("echo", {})
    engine = baselines.get("engine", {})
    ratios: dict[str, float | None] = {}
    if baselines:
        if config.batch > 1:
            ratios["items_per_s/engine_batched_items_per_s"] = ratio(
                run["items_per_s"], engine.get("batched_items_per_s"))
            ratios["calls_per_s/echo_calls_per_s"] = ratio(
                run["calls_per_s"], echo.get("calls_per_s"))
        else:
            ratios["ops_per_s/echo_calls_per_s"] = ratio(run["ops_per_s"],
                                                        echo.get("calls_per_s"))
            ratios["ops_per_s/engine_puts_per_s"] = ratio(run["ops_per_s"],
                                                         engine.get("puts_per_s"))
        ratios["p50/echo_p50"] = ratio(run["latency_ms"]["p50"],
                                       echo.get("latency_ms", {}).get("p50"))
        # Throughput per CPU, which other tenants of the machine disturb far less than
        # throughput: echo client+server CPU per call over client+nodes CPU per operation.
        echo_cpu = echo.get("cpu_us_per_call", {})
        ours = [p["cpu_us_per_op"] for name, p in measured["processes"].items()
                if name not in ("machine", "other")]
        if echo_cpu.get("client") and echo_cpu.get("server") and len(ours) > 1 \
                and None not in ours:
            ratios["echo_cpu_per_call/cpu_per_op"] = ratio(
                echo_cpu["client"] + echo_cpu["server"], sum(ours))
    warnings = []
    other = measured["processes"].get("other", {}).get("cores", 0.0)
    if other > OTHER_CORES_WARNING:
        warnings.append(f"processes other than the client and nodes kept {other:.2f} cores "
                        "busy during the measurement: the figures are disturbed, run again")
    other = echo.get("cores", {}).get("other", 0.0)
    if other > OTHER_CORES_WARNING:
        warnings.append(f"processes other than the echo client and server kept {other:.2f} "
                        "cores busy during the echo baseline: the ratios are disturbed")
    return {"config": config.as_json(), **measured, "baselines": baselines, "ratios": ratios,
            "warnings": warnings}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:,.3f}" if x < 100 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def render_table(result: dict[str, Any]) -> Table:
    config, run = result["config"], result["run"]
    mode = f"open loop {config['rate']:g}/s" if config["rate"] else "closed loop"
    title = (f"workload {config['workload'].upper()} · {config['distribution']} · "
             f"{config['clients']} in flight · {mode} · {config['consistency']} · "
             f"coalesce {'on' if config['coalesce'] else 'off'}"
             + (f" · batch {config['batch']}" if config["batch"] > 1 else ""))
    table = Table(title=title)
    for column in ("measure", "value", "baseline", "ratio"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    echo = result["baselines"].get("echo", {})
    engine = result["baselines"].get("engine", {})
    ratios = result["ratios"]
    if config["batch"] > 1:
        table.add_row("items/s", _fmt(run["items_per_s"]),
                      f"engine batched {_fmt(engine.get('batched_items_per_s', '-'))}",
                      _fmt(ratios.get("items_per_s/engine_batched_items_per_s", "-")))
        table.add_row("calls/s", _fmt(run["calls_per_s"]),
                      f"echo {_fmt(echo.get('calls_per_s', '-'))}",
                      _fmt(ratios.get("calls_per_s/echo_calls_per_s", "-")))
    else:
        table.add_row("ops/s", _fmt(run["ops_per_s"]),
                      f"echo {_fmt(echo.get('calls_per_s', '-'))}",
                      _fmt(ratios.get("ops_per_s/echo_calls_per_s", "-")))
        table.add_row("", "", f"engine put {_fmt(engine.get('puts_per_s', '-'))}",
                      _fmt(ratios.get("ops_per_s/engine_puts_per_s", "-")))
    if "echo_cpu_per_call/cpu_per_op" in ratios:
        table.add_row("ops per CPU", "client+nodes", "echo client+server",
                      _fmt(ratios["echo_cpu_per_call/cpu_per_op"]))
    echo_latency = echo.get("latency_ms", {})
    for name, value in run["latency_ms"].items():
        table.add_row(f"{name} ms", _fmt(value), f"echo {_fmt(echo_latency.get(name, '-'))}",
                      _fmt(ratios.get("p50/echo_p50", "-")) if name == "p50" else "")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(run["errors"].items())) or "none"
    table.add_row("errors", errors, "", "")
    table.add_row("reads not found", _fmt(run["misses"]), "", "")
    if "open_loop" in run:
        table.add_row("open-loop backlog", _fmt(run["open_loop"]["backlog_at_end"]), "", "")
    if "leaders" in result:
        before, after = result["leaders"]["before"], result["leaders"]["after"]
        led = " ".join(f"{k} {v}" for k, v in after["partitions_led"].items())
        moved = "" if before == after else f"changed from map v{before['map_version']}"
        table.add_row("partitions led", led, f"map v{after['map_version']}", moved)
    if "load" in result:
        table.add_row("load items/s", _fmt(result["load"]["items_per_s"]), "", "")
    for name, p in result.get("processes", {}).items():
        table.add_row(f"{name} cpu/op", f"{_fmt(p['cpu_us_per_op'])} µs",
                      f"{p['cores']} cores busy", "")
        if "rss_mib" in p:
            table.add_row(f"{name} RSS", f"{p['rss_mib']} MiB", f"peak {p['hwm_mib']} MiB", "")
    for name, us in echo.get("cpu_us_per_call", {}).items():
        table.add_row(f"echo {name} cpu/call", f"{_fmt(us)} µs", "", "")
    return table


@click.command("bench")
@click.option("--endpoints", envvar="RINGSTORE_ENDPOINTS", metavar="HOST:PORT[,...]",
              help="Storage node addresses [env RINGSTORE_ENDPOINTS].")
@click.option("--zk", envvar="RINGSTORE_ZK", metavar="HOST:PORT[,...][/CHROOT]",
              help="ZooKeeper to find the nodes in [env RINGSTORE_ZK].")
@click.option("--cluster", envvar="RINGSTORE_CLUSTER", default="default", show_default=True,
              help="Cluster name [env RINGSTORE_CLUSTER].")
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="a",
              show_default=True,
              help="YCSB A 50/50 read/update, B 95/5, C read-only, W 100% writes.")
@click.option("--clients", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Operations in flight from this process (open loop: the cap).")
@click.option("--duration", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="Seconds measured.")
@click.option("--warmup", type=click.FloatRange(0, 600), default=2.0, show_default=True,
              help="Seconds run before measuring.")
@click.option("--keys", type=click.IntRange(1, 10_000_000), default=100_000,
              show_default=True, help="Key space size.")
@click.option("--value-size", type=click.IntRange(0, limits.MAX_VALUE_BYTES), default=100,
              show_default=True, help="Bytes per value.")
@click.option("--distribution", type=click.Choice(["uniform", "zipfian"]), default="uniform",
              show_default=True, help=f"Key popularity (zipfian: theta {ZIPF_THETA}).")
@click.option("--batch", type=click.IntRange(1, limits.MAX_BATCH_ITEMS), default=1,
              show_default=True, help="Items per batch_put/batch_get call (1: single ops).")
@click.option("--consistency", type=click.Choice(["linearizable", "lease", "follower"]),
              default="linearizable", show_default=True, help="Consistency of reads.")
@click.option("--coalesce/--no-coalesce", default=True, show_default=True,
              help="Let the client coalesce concurrent calls into batch RPCs.")
@click.option("--max-in-flight", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Coalesced batch RPCs in flight per leader.")
@click.option("--rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Open loop: start this many calls/s whatever the completions; latency "
                   "counts from the scheduled start.")
@click.option("--load/--no-load", default=None,
              help="Write every key before measuring [default: on for workloads with reads].")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Measure the raw engine and a raw gRPC echo in the same run.")
@click.option("--baseline-duration", type=click.FloatRange(0.2, 60), default=3.0,
              show_default=True, help="Seconds for the echo (the engine gets half each way).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=5.0,
              show_default=True, help="Deadline of each operation, seconds.")
@click.option("--seed", type=int, default=None, help="Seed for keys and mix [default: random].")
@click.option("--local-work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None,
              help="A `storage local up` work directory: report its nodes' CPU per op and RSS.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON result, command line, machine and time here.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar on stderr.")
def bench_command(
    endpoints: str | None, zk: str | None, cluster: str, workload: str, clients: int,
    duration: float, warmup: float, keys: int, value_size: int, distribution: str, batch: int,
    consistency: str, coalesce: bool, max_in_flight: int, rate: float | None,
    load: bool | None, baselines: bool, baseline_duration: float, timeout: float,
    seed: int | None, local_work_dir: Path | None, output: str, record: Path | None,
    progress: bool,
) -> None:
    """Drive a YCSB-style workload; print ops/s and p50/p99/p999 beside a raw gRPC echo
    and the raw engine measured in the same run on this machine."""
    if not (endpoints or "").replace(",", " ").strip() and not zk:
        raise click.UsageError("give --endpoints HOST:PORT[,...] or --zk HOST:PORT "
                               "(or set RINGSTORE_ENDPOINTS / RINGSTORE_ZK)")
    if local_work_dir is not None and not (local_work_dir / "cluster.json").is_file():
        raise click.UsageError(f"{local_work_dir} has no cluster.json: give the work directory "
                               "of `storage local up`")
    config = BenchConfig(
        endpoints=endpoints, zk=zk, cluster=cluster, workload=workload, clients=clients,
        duration=duration, warmup=warmup, keys=keys, value_size=value_size,
        distribution=distribution, batch=batch, consistency=consistency, coalesce=coalesce,
        max_in_flight=max_in_flight, rate=rate,
        load=WORKLOADS[workload] > 0 if load is None else load, baselines=baselines,
        baseline_duration=baseline_duration, timeout=timeout,
        seed=random.randrange(2**32) if seed is None else seed, local_work_dir=local_work_dir,
    )
    click.echo(f"seed {config.seed}", err=True)
    try:
        result = run_bench(config, progress)
    except StorageError as exc:
        click.echo(f"error: {exc.message}; check that the cluster is up (`storage map`) and "
                   "the --endpoints / --zk address", err=True)
        raise click.exceptions.Exit(1) from None
    except (RuntimeError, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise click.exceptions.Exit(1) from None
    if record is not None:
        recorded = {
            "command": shlex.join(sys.orig_argv),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "code": code_version(),
            **result,
        }
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(recorded, indent=2) + "\n")
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if output == "json":
        click.echo(json.dumps(result, indent=2))
    else:
        Console().print(render_table(result))
    if not result["run"]["ops"]:
        click.echo("error: no operation succeeded; see the error counts above", err=True)
        raise click.exceptions.Exit(1)


@click.group()
def _main() -> None:
    """`python -m storage.bench bench ...` until the `storage` CLI carries `bench`."""


_main.add_command(bench_command)
_main.add_command(echo_server_command)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _main()
