"""Summarise a py-spy raw (collapsed-stack) profile: where the sampled time goes.

Usage: python bench/profile_summary.py PROFILE.txt [--top N]

Prints the top frames by self time (the frame on top of the stack), by inclusive time
(the frame anywhere on the stack) and self time by file, each as a share of all samples.
py-spy samples only threads running Python (idle threads and native-only threads such as
gRPC's completion-queue poller and RocksDB's workers are not in the file), so compare the
sample count with the process's CPU seconds from /proc to see how much is native.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

LINE_NUMBER = re.compile(r":\d+\)$")
# The trunk every sample shares (entry points, the event loop's dispatch, thread start):
# left out of the inclusive list, which would otherwise be these frames at ~100%.
TRUNK_FILES = ("<frozen runpy>", "click/core.py", "asyncio/runners.py", "asyncio/base_events.py",
               "asyncio/events.py", "threading.py", "storage/daemons.py")
TRUNK_NAMES = ("<module>", "bench_command", "run_bench", "main")


TRUNK_FILES_SUFFIX = tuple(f"({name})" for name in TRUNK_FILES)


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)` (lines merged, path shortened)."""
    frame = LINE_NUMBER.sub(")", frame.strip())
    name, _, where = frame.partition(" (")
    if where:
        parts = where.rstrip(")").split("/")
        short = "/".join(parts[-2:]) if "site-packages" in where or len(parts) > 2 else where
        return f"{name} ({short.rstrip(')')})"
    return frame


def thread_kind(frames: list[str]) -> str:
    """Which thread a stack ran on: the event loop, gRPC's poller (a Cython thread target,
    so `Thread.run` is its last Python frame), kazoo's threads, or another."""
    if not frames[0].startswith("Thread._bootstrap"):
        return "main thread (event loop)"
    if frames[-1].startswith("Thread.run ("):
        return "native thread target (gRPC completion-queue poller)"
    if any("kazoo/" in f for f in frames):
        return "kazoo threads (ZooKeeper session)"
    return "other Python threads"


def callback(frames: list[str]) -> str:
    """What the event loop was running: the first frame below `Handle._run` (a task's
    coroutine or a plain callback), `(native: gRPC Cython, asyncio C)` when `Handle._run`
    itself is on top, `(polling)` inside the selector; other threads by kind."""
    if frames[0].startswith("Thread._bootstrap"):
        return f"[{thread_kind(frames)}]"
    for i, f in enumerate(frames):
        if f.startswith("Handle._run ("):
            return frames[i + 1] if i + 1 < len(frames) else "(native: gRPC Cython, asyncio C)"
        if f.startswith(("EpollSelector.select", "_PollLikeSelector")):
            return "(polling: epoll syscalls)"
    return frames[-1]


def summarise(path: Path, top: int) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    by_callback: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f]
        total += n
        self_time[frames[-1]] += n
        for f in set(frames):
            if not f.endswith(TRUNK_FILES_SUFFIX) and f.partition(" (")[0] not in TRUNK_NAMES:
                inclusive[f] += n
        by_file[frames[-1].rpartition(" (")[2].rstrip(")")] += n
        by_thread[thread_kind(frames)] += n
        by_callback[callback(frames)] += n
    out = [f"{path.name}: {total} samples"]
    for title, counter in (("threads", by_thread), ("event-loop callbacks", by_callback),
                           ("self", self_time),
                           ("inclusive (below the event loop)", inclusive),
                           ("self by file", by_file)):
        out.append(f"  top {title}:")
        for name, n in counter.most_common(top):
            out.append(f"    {100 * n / max(total, 1):5.1f}%  {name}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    print(summarise(args.profile, args.top))


if __name__ == "__main__":
    main()
