"""How long a partition stays unwritable after its leader is SIGKILLed or SIGSTOPped (opt-in:
pytest -m slow). Prints median, p90 and max over the kills and writes them, with every
sample, to failover.json under the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import random
import statistics
from pathlib import Path

import pytest

from storage.chaos import measure_failover
from storage.local import LocalCluster

KILLS = int(os.environ.get("RINGSTORE_FAILOVER_KILLS", "20"))


@pytest.mark.slow
@pytest.mark.timeout(60 * KILLS + 120)
@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_failover_time(fault: str, zk: str, tmp_path: Path) -> None:
    env = os.environ.get("RINGSTORE_CHAOS_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"RINGSTORE_CHAOS_SEED={seed}")
    cluster = LocalCluster(tmp_path / "cluster", zk=zk, partitions=16, controllers=2)
    try:
        cluster.start(timeout=90)
        samples = measure_failover(cluster, KILLS, seed, fault=fault)
    finally:
        cluster.stop()
    ordered = sorted(samples)
    stats = {
        "fault": fault,
        "command": f"RINGSTORE_FAILOVER_KILLS={KILLS} flock /tmp/ringstore-bench.lock "
                   f".venv/bin/pytest -m slow tests/chaos/test_failover.py -k {fault} -s",
        "seed": seed,
        "kills": len(samples),
        "session_timeout_s": cluster.session_timeout,
        "median_s": statistics.median(ordered),
        "p90_s": ordered[max(0, round(0.9 * len(ordered)) - 1)],
        "max_s": ordered[-1],
        "samples_s": samples,
    }
    (tmp_path / "failover.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"failover ({fault}) over {len(samples)} faults: median {stats['median_s']:.2f}s "
          f"p90 {stats['p90_s']:.2f}s max {stats['max_s']:.2f}s "
          f"(session timeout {cluster.session_timeout}s); {tmp_path / 'failover.json'}")
    assert len(samples) == KILLS
