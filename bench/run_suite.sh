#!/usr/bin/env bash
# The recorded benchmark suite (bench/results/README.md): a 3-node RF=3 Q=64 local cluster,
# then one `storage bench` run per configuration, each under the shared bench lock and
# recorded to bench/results/<name>.json. Usage: bench/run_suite.sh [NAME...] (default: all).
#
# Every run holds /tmp/ringstore-bench.lock for its own ≤ 30 s only, so other engineers'
# measurements interleave with ours instead of colliding. The cluster starts on empty
# data directories (a fresh work directory, removed at the end): nodes that carry the
# data of earlier runs measure differently (bench/results/README.md, "state matters").
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=/tmp/ringstore-bench.lock
WORK=$(mktemp -d /tmp/ringstore-bench-suite.XXXXXX)
OUT=${RINGSTORE_BENCH_OUT:-bench/results}
PY=.venv/bin/python
COMMON=(--clients 64 --duration 12 --warmup 2 --keys 20000 --value-size 100
        --baseline-duration 3 --seed 42 --local-work-dir "$WORK" --no-progress)

quiet() {  # wait (up to 1 min) until the machine is nearly idle for 3 s, outside the lock
  "$PY" - <<'PY'
import os, time
def busy():
    t = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return sum(t) - t[3] - t[4]
tick, deadline = os.sysconf("SC_CLK_TCK"), time.monotonic() + 60
while time.monotonic() < deadline:
    before = busy(); time.sleep(3); cores = (busy() - before) / tick / 3
    if cores < 0.4:
        break
    print(f"waiting for a quieter machine: {cores:.2f} cores busy", flush=True)
PY
}

disturbance() {  # busy cores outside our processes during the run or its echo baseline
  "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1]))
print(max(d["processes"].get("other", {}).get("cores", 0),
          d["baselines"].get("echo", {}).get("cores", {}).get("other", 0)))' "$1"
}

bench() {  # bench NAME ARGS...: one recorded run; if disturbed, up to 2 tries, least kept
  local name=$1; shift
  local best="" best_other=99
  for try in 1 2; do
    quiet >&2
    echo "== $name (try $try): storage bench $*" >&2
    flock "$LOCK" timeout 60 .venv/bin/storage bench "${COMMON[@]}" "$@" \
      --record "$OUT/$name.try$try.json" >&2
    local other; other=$(disturbance "$OUT/$name.try$try.json")
    if "$PY" -c "import sys; sys.exit(0 if $other < $best_other else 1)"; then
      [ -n "$best" ] && rm -f "$best"
      best="$OUT/$name.try$try.json" best_other=$other
    else
      rm -f "$OUT/$name.try$try.json"
    fi
    "$PY" -c "import sys; sys.exit(0 if $other <= 0.3 else 1)" && break
  done
  mv "$best" "$OUT/$name.json"
}

up() {
  flock "$LOCK" .venv/bin/storage local up --work-dir "$WORK" --nodes 3 --partitions 64 \
    --replication 3 >&2
  RINGSTORE_ENDPOINTS=$("$PY" -c 'import json,sys; s=json.load(open(sys.argv[1]));
print(",".join(n["address"] for n in s["nodes"].values()))' "$WORK/cluster.json")
  export RINGSTORE_ENDPOINTS
}

down() { .venv/bin/storage local down --work-dir "$WORK" >&2 || true; rm -rf "$WORK"; }

settle() { "$PY" bench/settle.py >&2; }  # leadership stops moving after a start

half_peak_w() {  # half the ops/s of the recorded coalesced W run
  "$PY" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["run"]["ops_per_s"] / 2))' \
    "$OUT/w-coalesce.json"
}

run() {
  case $1 in
    w-coalesce)   bench w-coalesce   --workload w --coalesce ;;
    w-nocoalesce) bench w-nocoalesce --workload w --no-coalesce ;;
    c-coalesce)   bench c-coalesce   --workload c --coalesce ;;
    c-nocoalesce) bench c-nocoalesce --workload c --no-coalesce ;;
    c-lease)      bench c-lease      --workload c --no-coalesce --consistency lease ;;
    c-follower)   bench c-follower   --workload c --no-coalesce --consistency follower ;;
    w-batch100)   bench w-batch100   --workload w --batch 100 ;;
    a-zipfian)    bench a-zipfian    --workload a --distribution zipfian ;;
    b-zipfian)    bench b-zipfian    --workload b --distribution zipfian ;;
    w-open-half)  bench w-open-half  --workload w --coalesce --rate "$(half_peak_w)" ;;
    w-coalesce-again) bench w-coalesce-again --workload w --coalesce ;;  # run-to-run spread
    *) echo "unknown run $1" >&2; return 2 ;;
  esac
}

ALL=(w-coalesce w-nocoalesce c-coalesce c-nocoalesce c-lease c-follower w-batch100
     a-zipfian b-zipfian w-open-half w-coalesce-again)
mkdir -p "$OUT"
trap down EXIT
trap 'exit 130' INT TERM  # so that the EXIT trap stops the cluster
up
settle
for name in "${@:-${ALL[@]}}"; do run "$name"; done
