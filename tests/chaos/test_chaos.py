"""Long seeded chaos runs (opt-in: pytest -m chaos): five minutes of workload and faults
on 3 and on 5 nodes, each history checked for linearizability, lost writes and
fail-but-applied operations.

Seeds are printed; replay with RINGSTORE_CHAOS_SEED=<seed>. RINGSTORE_CHAOS_SECONDS
shortens or lengthens the runs (then the write floor scales with it). Evidence stays under
the test's tmp dir: chaos/{history,nemesis}.jsonl, chaos/summary.txt, cluster/logs/.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from storage.chaos import run_chaos
from storage.local import LocalCluster

SECONDS = float(os.environ.get("RINGSTORE_CHAOS_SECONDS", "300"))
MIN_WRITES_PER_RUN = 10_000  # acknowledged writes in a 300 s run


def chaos_seed() -> int:
    env = os.environ.get("RINGSTORE_CHAOS_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"RINGSTORE_CHAOS_SEED={seed}")
    return seed


@pytest.mark.timeout(SECONDS + 300)
@pytest.mark.parametrize(("nodes", "partitions", "clients", "coalesce"), [
    (3, 16, 8, True),
    (5, 32, 12, False),
], ids=["3-nodes", "5-nodes-unary-client"])
def test_chaos_run(nodes: int, partitions: int, clients: int, coalesce: bool, zk: str,
                   tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", zk=zk, nodes=nodes, partitions=partitions,
                           controllers=2)
    try:
        cluster.start(timeout=90)
        result = run_chaos(cluster, seed=chaos_seed(), duration_s=SECONDS, clients=clients,
                           out_dir=tmp_path / "chaos", coalesce=coalesce, check_budget_s=120)
    finally:
        cluster.stop()
    print(result.summary())
    why = f"{result.summary()}\nnemesis log: {result.nemesis_path}\nlogs: {cluster.log_dir}"
    assert result.report.lost_writes == [], why
    assert result.report.fail_but_applied == [], why
    assert result.report.valid is True, why
    assert result.recovered, why
    assert result.crashed == [], why
    assert result.faults_applied >= SECONDS / 30, why
    assert result.acknowledged_writes >= MIN_WRITES_PER_RUN * SECONDS / 300, why
