#!/usr/bin/env bash
# On a GPU machine: where the time of a decode step goes, kernel by kernel. Nsight Compute times
# every kernel of two eager decode steps (one warm-up, one timed; --disable-cuda-graph so that each
# launch is its own) of the Qwen3-30B-A3B shape (random weights) and prints the per-kernel summary,
# heaviest first. Results go to $OUT (default ./out). ncu locks base clocks and flushes the caches
# before every kernel unless told otherwise: NCU_FLAGS='--clock-control none --cache-control none'
# times the kernels closer to how a step runs them; PRESET=qwen3-30b-a3b-fp8 profiles the FP8 model.
#   scripts/gpu_decode_profile.sh [BATCH] [CONTEXT]      defaults: 1 1024
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
BATCH="${1:-1}"
CONTEXT="${2:-1024}"
gpu_binaries cpinfer
timeout 420 ncu ${NCU_FLAGS:-} --metrics gpu__time_duration.sum --print-summary per-kernel --csv \
  "$BIN/cpinfer" -q bench decode --device cuda --random-weights "${PRESET:-qwen3-30b-a3b}" --batch "$BATCH" --context "$CONTEXT" \
  --warmup 1 --steps 1 --kv-cache-tokens $((BATCH * (CONTEXT + 64) + 4096)) --disable-cuda-graph \
  > "$OUT/decode_profile_b${BATCH}.csv" 2> "$OUT/decode_profile_b${BATCH}.log"
echo "ncu rc=$?"
python3 - "$OUT/decode_profile_b${BATCH}.csv" <<'PY'
import csv, sys
rows = {}
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = r["Kernel Name"].split("(")[0][-80:]
    n = int(r["Invocations"]) if r.get("Invocations") else 1
    avg = float(r["Average"].replace(",", ""))
    unit = r.get("Metric Unit", "ns")
    scale = {"ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "nsecond": 1e-3}.get(unit, 1e-3)
    prev = rows.get(name, (0, 0.0))  # one line per (kernel, launch shape): add them up
    rows[name] = (prev[0] + n, (prev[0] * prev[1] + n * avg * scale) / (prev[0] + n))
total = sum(n * a for n, a in rows.values())
print("kernel time of both steps: %.3f ms (one step: about half)" % (total / 1e3))
for name, (n, a) in sorted(rows.items(), key=lambda kv: -kv[1][0] * kv[1][1])[:25]:
    print("%8.1f us total %6d calls %8.2f us avg  %s" % (n * a, n, a, name))
PY
