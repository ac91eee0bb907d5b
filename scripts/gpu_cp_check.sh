#!/usr/bin/env bash
# On a machine with several GPUs: the context-parallel GPU tests (gpu_cp_test: CP=2/4 vs CP=1,
# overlapped and sequential exchange, replicated experts, fault tests), then the CP scaling
# benchmark at the Qwen3-30B-A3B shape (random weights, 48 layers) with experts sharded over the
# GPUs and replicated on each, HF transformers on one GPU as the peer, and the scaling plot.
# Results go to $OUT (default ./out).
#   scripts/gpu_cp_check.sh [--seq 32768,131072] [--cp 1,2,4] [--skip-tests] [--skip-hf]
# Binaries: $CPINFER_PREBUILT/bin (built elsewhere, see scripts/gpu_check.sh) or build-gpu/.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
SEQS="32768,131072"
CPS="1,2,4"
TESTS=1
HF=1
while [ $# -gt 0 ]; do
  case "$1" in
    --seq) SEQS="$2"; shift 2 ;;
    --cp) CPS="$2"; shift 2 ;;
    --skip-tests) TESTS=0; shift ;;
    --skip-hf) HF=0; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
gpu_binaries cpinfer gpu_cp_test gpu_model_test
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
NGPU=$(nvidia-smi -L | wc -l)

if [ "$TESTS" = 1 ]; then
  echo "== gpu_cp_test on $NGPU GPUs"
  timeout 400 "$BIN/gpu_cp_test" 2>&1 | tee "$OUT/gpu_cp.log" | grep -E "^\[gpu|OK \]|FAILED|Failure|SKIPPED|PASSED" | tail -60
fi

echo "== CP scaling, Qwen3-30B-A3B shape, random weights, experts sharded over the GPUs"
BENCH=("$BIN/cpinfer" -q bench prefill --device cuda --random-weights qwen3-30b-a3b --seq "$SEQS" --warmup 1 --repeats 1 --no-profile --json)
timeout 420 "${BENCH[@]}" --attn-cp-size "$CPS" > "$OUT/experts-sharded.json" 2> "$OUT/bench_sharded.err"
tail -3 "$OUT/bench_sharded.err"
python3 - "$OUT/experts-sharded.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(d["device"], "GEMM peak", round(d.get("gemm_peak_tflops", 0)), "TFLOP/s")
for r in d["results"]:
    print("seq %6d cp %d ttft %.3f s speedup %.2f eff %.2f exposed comm %s s (profiled comm %.3f) MFU %.3f" % (
        r["seq"], r["cp"], r["ttft_s"], r["speedup"], r["efficiency"],
        "%.3f" % r["exposed_comm_s"] if r["exposed_comm_s"] >= 0 else "-", r["comm_s"], r.get("mfu", 0)))
EOF

echo "== CP scaling, experts replicated on every GPU (--ep-size 1: no MoE communication)"
CPS_REP="$(echo "$CPS" | tr ',' '\n' | grep -vx 1 | paste -sd, -)"
if [ -n "$CPS_REP" ]; then
  timeout 300 "${BENCH[@]}" --ep-size 1 --attn-cp-size "$CPS_REP" > "$OUT/experts-replicated.json" 2> "$OUT/bench_replicated.err"
  tail -3 "$OUT/bench_replicated.err"
  python3 - "$OUT/experts-sharded.json" "$OUT/experts-replicated.json" <<'PY'
import json, sys
sharded, rep = (json.load(open(p)) for p in sys.argv[1:3])
base = {r["seq"]: r["ttft_s"] for r in sharded["results"] if r["cp"] == 1}
for r in rep["results"]:  # speedup against the same CP=1 run (one GPU holds every expert either way)
    b = base.get(r["seq"])
    if b:
        r["speedup"] = b / r["ttft_s"]
        r["efficiency"] = r["speedup"] / r["cp"]
    print("seq %6d cp %d ttft %.3f s speedup %.2f eff %.2f exposed comm %s s" % (
        r["seq"], r["cp"], r["ttft_s"], r["speedup"], r["efficiency"],
        "%.3f" % r["exposed_comm_s"] if r["exposed_comm_s"] >= 0 else "-"))
rep["results"] = [r for r in sharded["results"] if r["cp"] == 1] + rep["results"]
json.dump(rep, open(sys.argv[2], "w"), indent=2)
PY
fi

if [ "$HF" = 1 ]; then
  echo "== peer: HF transformers on one GPU (4 timed layers, extrapolated to 48)"
  timeout 240 python3 bench/hf_prefill.py --seq "$SEQS" --layers 4 --json "$OUT/hf_prefill.json" 2>&1 | tail -6
fi

python3 bench/plot_cp.py "$OUT/experts-sharded.json" $( [ -s "$OUT/experts-replicated.json" ] && echo "$OUT/experts-replicated.json") \
  --out "$OUT/cp_scaling.svg"
