#!/usr/bin/env bash
# On a GPU machine: the prefill-attention kernels alone — a quick run of the warp-specialized
# kernel first (so a hang costs seconds), the CUDA-vs-CPU attention tests, compute-sanitizer on the
# warp-specialized kernel (scripts/gpu_attention_sanitize.sh), attention_bench (every kernel, the ws
# kernel in one pass against two, and the context-parallel pieces), torch SDPA (cuDNN, flash) on the
# same card, and what a cuBLAS GEMM and cuDNN's attention sustain at the board's power limit
# (bench/power_ceiling.py).
# Results go to $OUT (default ./out).   scripts/gpu_attention_check.sh [SEQS]
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
SEQS="${1:-4096,16384,32768,131072}"
gpu_binaries gpu_ops_test attention_bench

echo "== ws smoke (4K)"
if ! timeout 30 "$BIN/attention_bench" --kernel mma,ws,ws-1pass --seq 4096 --reps 10 2>&1 | tee "$OUT/ws_smoke.log"; then
  echo "ws smoke failed or hung"
  exit 1
fi
echo "== attention tests"
timeout 300 "$BIN/gpu_ops_test" --gtest_filter='AttnRunner.*' 2>&1 | tee "$OUT/gpu_attention.log" |
  grep -E "^\[ +(OK|FAILED|PASSED) |Failure|nmse|rel|error" | tail -40
bash scripts/gpu_attention_sanitize.sh
echo "== attention_bench (SM clock and power sampled every 100 ms meanwhile)"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 100 \
  > "$OUT/clocks.csv" 2>/dev/null &
SMI=$!
timeout 240 "$BIN/attention_bench" --seq "$SEQS" --reps 10 2>&1 | tee "$OUT/attention_bench.log" | tail -16
kill $SMI 2>/dev/null
# The clock under sustained tensor-core load: long runs (128K) settle lower than short ones.
awk -F', ' '{gsub(/ MHz/,"",$2); gsub(/ W/,"",$3); if ($2+0 > 0) {n++; c+=$2; p+=$3; if ($2 < lo || lo == 0) lo = $2}}
  END {if (n) printf "SM clock mean %.0f MHz (min %d), power mean %.0f W over %d samples\n", c/n, lo, p/n, n}' "$OUT/clocks.csv"
echo "== attention_bench at block size 16 (the engine's default page)"
timeout 240 "$BIN/attention_bench" --seq "$SEQS" --reps 10 --block-size 16 --kernel wgmma,ws 2>&1 |
  tee "$OUT/attention_bench_bs16.log" | tail -10
echo "== the ws kernel in two passes and in one (AttentionWsConfig::two_pass), twice in turn"
for round in 1 2; do
  timeout 120 "$BIN/attention_bench" --kernel ws,ws-1pass --ascending-pages --block-size 16 --seq "$SEQS" --reps 10 \
    2>&1 | tee "$OUT/attention_two_pass_$round.log" | grep -E "^ +[0-9]+ +ws"
done
timeout 120 "$BIN/attention_bench" --kernel ws --seq 32768,131072 --cp 4 --reps 10 2>&1 | tee "$OUT/attention_cp4.log" | tail -12
echo "== torch SDPA"
timeout 200 python3 bench/torch_attention.py --seq "$SEQS" --backends CUDNN_ATTENTION,FLASH_ATTENTION \
  --json "$OUT/torch_attention.json" 2>&1 | tail -12
gpu_power_ceilings
