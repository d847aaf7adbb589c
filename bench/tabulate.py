"""Markdown tables of recorded `storage bench` runs, against the targets of the suite.

Usage: python bench/tabulate.py bench/results/*.json

A run is named by its file (`w-coalesce.json` -> `w-coalesce`); the targets below are the
ones the recorded suite (bench/run_suite.sh) is measured against. `other` is how many
cores processes other than the client and the nodes kept busy during the run / during
the echo baseline: above 0.3 the figures are disturbed by other tenants of the machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# name -> (what is compared, target)
TARGETS: dict[str, tuple[str, float]] = {
    "w-coalesce": ("ops/echo", 1.5),
    "w-coalesce-again": ("ops/echo", 1.5),
    "w-nocoalesce": ("ops/echo", 0.4),
    "c-coalesce": ("ops/echo", 1.5),
    "c-nocoalesce": ("ops/echo", 0.5),
    "c-lease": ("ops/echo", 0.7),
    "c-follower": ("ops/echo", 0.7),
    "w-batch100": ("items/engine", 0.12),
    "w-open-half": ("p99 ms", 20.0),
}


def row(name: str, d: dict[str, Any]) -> list[str]:
    run, ratios, processes = d["run"], d["ratios"], d["processes"]
    echo = d["baselines"].get("echo", {})
    engine = d["baselines"].get("engine", {})
    batch = d["config"]["batch"] > 1
    throughput = run["items_per_s"] if batch else run["ops_per_s"]
    headline = (ratios.get("items_per_s/engine_batched_items_per_s") if batch
                else ratios.get("ops_per_s/echo_calls_per_s"))
    what, target = TARGETS.get(name, ("", 0.0))
    if what == "p99 ms":
        value = run["latency_ms"]["p99"]
        verdict = f"p99 {value:g} ms vs ≤ {target:g}: {'met' if value <= target else 'NOT met'}"
    elif what:
        verdict = f"{headline} vs ≥ {target:g}: {'met' if (headline or 0) >= target else 'NOT met'}"
    else:
        verdict = f"{headline} (no target)" if headline else "—"
    nodes = {k: v for k, v in processes.items() if k.startswith("n")}
    node_cpu = sum(v["cpu_us_per_op"] or 0 for v in nodes.values())
    rss = max((v.get("rss_mib", 0) for v in nodes.values()), default=0)
    other = processes.get("other", {}).get("cores", 0)
    echo_other = echo.get("cores", {}).get("other", 0)
    lat = run["latency_ms"]
    errors = sum(run["errors"].values())
    return [
        name,
        f"{throughput:,.0f}{' items/s' if batch else ''}",
        f"{echo['calls_per_s']:,.0f}" if echo else "—",
        (f"{engine['batched_items_per_s']:,.0f}" if batch else f"{engine['puts_per_s']:,.0f}")
        if engine else "—",
        verdict,
        f"{ratios.get('echo_cpu_per_call/cpu_per_op', '—')}",
        f"{lat['p50']:g} / {lat['p99']:g} / {lat['p999']:g}",
        f"{errors}" + (f" ({', '.join(run['errors'])})" if errors else ""),
        f"{processes['client']['cpu_us_per_op']:g} / {node_cpu:,.0f}",
        f"{rss:g}",
        f"{other:.2f} / {echo_other:.2f}",
    ]


HEADER = ["run", "ops/s", "echo calls/s", "engine puts/s (batched)", "headline ratio vs target",
          "ops per CPU vs echo", "p50 / p99 / p999 ms", "errors",
          "CPU µs/op client / 3 nodes", "node RSS MiB (max)", "other cores run / echo"]


def main() -> None:
    rows = []
    for arg in sys.argv[1:]:
        path = Path(arg)
        rows.append(row(path.stem, json.loads(path.read_text())))
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
