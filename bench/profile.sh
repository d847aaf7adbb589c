#!/usr/bin/env bash
# Profile a W run with py-spy: one storage node (n1, which leads a third of the
# partitions and follows the rest) and the bench client, for 10 s in the middle of a
# 20 s measured run. Usage: bench/profile.sh coalesce|no-coalesce
# Writes bench/results/profile-w-<mode>-{node,client}.txt (py-spy raw collapsed stacks)
# and bench/results/profile-w-<mode>.json (the run itself, with CPU µs per op per process).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: bench/profile.sh coalesce|no-coalesce}
LOCK=/tmp/ringstore-bench.lock
# A fresh cluster unless RINGSTORE_BENCH_WORK names an existing work directory to reuse.
WORK=${RINGSTORE_BENCH_WORK:-}
FRESH=""
if [ -z "$WORK" ]; then WORK=$(mktemp -d /tmp/ringstore-bench-profile.XXXXXX); FRESH=1; fi
OUT=${RINGSTORE_BENCH_OUT:-bench/results}
PY=.venv/bin/python
SPY=.venv/bin/py-spy
[ -x "$SPY" ] || .venv/bin/pip install py-spy

trap '.venv/bin/storage local down --work-dir "$WORK" >&2 || true; [ -z "$FRESH" ] || rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
flock "$LOCK" .venv/bin/storage local up --work-dir "$WORK" --nodes 3 --partitions 64 >&2
export RINGSTORE_ENDPOINTS=$("$PY" -c 'import json,sys; s=json.load(open(sys.argv[1]));
print(",".join(n["address"] for n in s["nodes"].values()))' "$WORK/cluster.json")
"$PY" bench/settle.py >&2
NODE_PID=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"]["n1"]["pid"])' \
  "$WORK/cluster.json")

# One lock for the whole profiled run (about 35 s): the run, and py-spy beside it.
flock "$LOCK" bash -c '
  set -euo pipefail
  .venv/bin/storage bench --workload w --'"$MODE"' --clients 64 --duration 20 --warmup 2 \
    --keys 20000 --value-size 100 --seed 42 --no-baselines --no-progress \
    --local-work-dir "$1" --record "$2/profile-w-'"$MODE"'.json" >&2 &
  CLIENT=$!
  sleep 7  # past the client start and the warmup, into the measured window
  "$3" record -p "$4" -d 10 -r 100 --nonblocking -f raw -o "$2/profile-w-'"$MODE"'-node.txt" &
  "$3" record -p "$CLIENT" -d 10 -r 100 --nonblocking -f raw \
    -o "$2/profile-w-'"$MODE"'-client.txt" &
  wait
' "$PY" "$WORK" "$OUT" "$SPY" "$NODE_PID"
for who in node client; do
  "$PY" bench/profile_summary.py "$OUT/profile-w-$MODE-$who.txt"
done
