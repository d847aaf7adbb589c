"""`storage bench`: the pure generators and histogram, the CLI surface, and one short
echo baseline between two real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.bench import (
    WORKLOADS,
    Histogram,
    Zipfian,
    bench_command,
    echo_baseline,
    echo_server_process,
    key_sequence,
    op_mix,
    ratio,
)

pytestmark = pytest.mark.timeout(60)

CLEAN_ENV = {"RINGSTORE_ENDPOINTS": None, "RINGSTORE_ZK": None, "RINGSTORE_CLUSTER": None}


# -- zipfian -----------------------------------------------------------------------------


def test_zipfian_hottest_keys_get_their_share() -> None:
    rng = random.Random(7)
    z = Zipfian(1000, rand=rng.random)
    draws = 200_000
    counts = Counter(z.next() for _ in range(draws))
    assert min(counts) >= 0 and max(counts) < 1000
    # Ranks 0 and 1 are drawn with their exact probabilities: 1/zeta(n) and 2**-theta/zeta(n).
    for rank in (0, 1):
        expected = z.probability(rank)
        assert counts[rank] / draws == pytest.approx(expected, rel=0.05), rank
    assert z.probability(0) == pytest.approx(1 / z.zetan)
    # Skewed: the hottest 1% of keys take far more than 1% of the draws, and far more
    # than the coldest half together.
    top = sum(counts[r] for r in range(10)) / draws
    cold = sum(counts[r] for r in range(500, 1000)) / draws
    assert top > 0.35
    assert top > 3 * cold
    assert counts[0] > counts[1] > counts[10] > counts[500]


@pytest.mark.parametrize("items", [1, 2, 3, 17])
def test_zipfian_values_stay_in_range(items: int) -> None:
    z = Zipfian(items, rand=random.Random(items).random)
    seen = {z.next() for _ in range(5000)}
    assert seen <= set(range(items))
    assert 0 in seen


def test_zipfian_edge_of_the_unit_interval_stays_in_range() -> None:
    z = Zipfian(100, rand=lambda: 1.0 - 2**-53)
    assert z.next() == 99


def test_zipfian_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Zipfian(0)
    with pytest.raises(ValueError):
        Zipfian(10, theta=1.0)


def test_key_sequences_are_seeded_and_in_range() -> None:
    for distribution in ("uniform", "zipfian"):
        first = key_sequence(distribution, 500, 4000, random.Random(3))
        again = key_sequence(distribution, 500, 4000, random.Random(3))
        assert first == again
        assert len(first) == 4000 and 0 <= min(first) and max(first) < 500
    uniform = Counter(key_sequence("uniform", 10, 20_000, random.Random(1)))
    assert max(uniform.values()) / min(uniform.values()) < 1.2
    with pytest.raises(ValueError):
        key_sequence("latest", 10, 10, random.Random(1))


# -- workload mixes ----------------------------------------------------------------------


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_op_mix_has_the_workload_proportions(workload: str) -> None:
    reads = WORKLOADS[workload]
    kinds = op_mix(reads, 1 << 16, random.Random(5))
    assert len(kinds) == 1 << 16
    assert set(kinds) <= {0, 1}
    assert kinds.count(0) == round(reads * (1 << 16))
    # Shuffled, not sorted: any stretch of the sequence has about the same mix.
    for start in range(0, 1 << 16, 8192):
        window = kinds[start:start + 8192]
        assert window.count(0) / len(window) == pytest.approx(reads, abs=0.03)


def test_expected_workloads() -> None:
    assert WORKLOADS == {"a": 0.5, "b": 0.95, "c": 1.0, "w": 0.0}
    with pytest.raises(ValueError):
        op_mix(1.5, 10, random.Random(1))


# -- histogram ---------------------------------------------------------------------------


def nearest_rank(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


latencies = st.lists(
    st.one_of(st.integers(0, 300), st.integers(0, 10**6), st.integers(0, Histogram.MAX_VALUE)),
    min_size=1, max_size=400,
)


@settings(max_examples=150, deadline=None)
@given(values=latencies, q=st.floats(min_value=1e-6, max_value=1.0))
def test_histogram_percentiles_match_a_sorted_list(values: list[int], q: float) -> None:
    h = Histogram()
    for v in values:
        h.record(v)
    for quantile in (q, 0.5, 0.99, 0.999, 1.0):
        exact = nearest_rank(values, quantile)
        got = h.percentile(quantile)
        # Never below the true value, at most one bucket width (<= 1/128 of it) above.
        assert exact <= got <= exact + exact / Histogram.HALF, (quantile, exact, got)
    assert h.count == len(values)
    assert h.max == max(values) and h.min == min(values)
    assert h.mean() == pytest.approx(sum(values) / len(values))


@given(st.integers(0, Histogram.MAX_VALUE))
def test_histogram_bucket_holds_its_value(value: int) -> None:
    h = Histogram()
    h.record(value)
    index = next(i for i, n in enumerate(h.counts) if n)
    low, high = Histogram.bucket_range(index)
    assert low <= value <= high
    assert high - low <= max(low // Histogram.HALF, 0)


@given(latencies, latencies)
def test_histogram_merge_is_recording_both(a: list[int], b: list[int]) -> None:
    left, right, both = Histogram(), Histogram(), Histogram()
    for v in a:
        left.record(v)
        both.record(v)
    for v in b:
        right.record(v)
        both.record(v)
    left.merge(right)
    assert left.counts == both.counts
    assert (left.count, left.total, left.max, left.min) == (
        both.count, both.total, both.max, both.min)


def test_histogram_clamps_and_summarises() -> None:
    h = Histogram()
    assert h.percentile(0.5) == 0
    h.record(-5)
    h.record(Histogram.MAX_VALUE * 4)
    assert h.min == 0 and h.max == Histogram.MAX_VALUE
    h = Histogram()
    for ms in range(1, 1001):
        h.record(ms * 1_000_000)
    summary = h.summary_ms()
    assert set(summary) == {"p50", "p99", "p999", "max", "mean"}
    assert summary["p50"] == pytest.approx(500, rel=0.01)
    assert summary["p99"] == pytest.approx(990, rel=0.01)
    assert summary["p999"] == pytest.approx(999, rel=0.01)


def test_ratio() -> None:
    assert ratio(3000, 2000) == 1.5
    assert ratio(None, 2000) is None
    assert ratio(10, 0) is None


# -- CLI ---------------------------------------------------------------------------------


def test_help_lists_the_options() -> None:
    result = CliRunner().invoke(bench_command, ["--help"], env=CLEAN_ENV)
    assert result.exit_code == 0, result.output
    for option in ("--endpoints", "--zk", "--cluster", "--workload", "--clients", "--duration",
                   "--warmup", "--keys", "--value-size", "--distribution", "--batch",
                   "--consistency", "--coalesce / --no-coalesce", "--rate",
                   "--load / --no-load", "--baselines / --no-baselines", "--output",
                   "--record"):
        assert option in result.output, option
    assert bench_command.name == "bench"


def test_without_an_address_it_says_what_to_give() -> None:
    result = CliRunner().invoke(bench_command, ["--duration", "1"], env=CLEAN_ENV)
    assert result.exit_code == 2
    assert "--endpoints" in result.output


# -- the echo baseline, for real -----------------------------------------------------------


def test_echo_baseline_measures_calls_between_two_processes(tmp_path: Path) -> None:
    with echo_server_process(tmp_path) as (process, address):
        assert process.alive()
        result = asyncio.run(echo_baseline(
            address, clients=4, seconds=1.0, value=b"v" * 100, key=b"user000000000001",
            server_pid=process.pid, warmup=0.1))
    assert not process.alive()
    assert result["calls"] > 0
    assert result["calls_per_s"] > 0
    assert result["errors"] == {}
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert result["cpu_us_per_call"]["server"] is not None
