#!/usr/bin/env bash
# On one GPU (an H200: the BF16 model's 128K prefill does not fit an 80 GB card): issue 11's
# measurement in one call, most wanted first so that a call cut short by the device's 600 s still
# answers the headline: single-GPU prefill of the Qwen3-30B-A3B shape against HF transformers at
# 4K-32K and 128K, then the ws attention kernel (two passes and one) against cuDNN at 4K-128K, the
# engine with --attention-backend ws-1pass (the attention in one pass), torch SDPA on cuDNN, and
# what the card sustains at its power limit (bench/power_ceiling.py: cuBLAS GEMM, cuDNN's attention
# at 128K, the ws kernel at 128K). Each part prints the UTC time it starts.
# Results go to $OUT (default ./out).   scripts/gpu_prefill_target.sh [SEQS]   (default 4096,16384,32768)
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
SEQS="${1:-4096,16384,32768}"
gpu_binaries cpinfer attention_bench
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/card_power.txt"
part() { echo "== $* ($(date -u +%H:%M:%S))"; }
prefill() {  # prefill LOG SEQ [args...]: the engine's prefill at one GPU
  local log=$1 seq=$2
  shift 2
  timeout 240 "$BIN/cpinfer" -q bench prefill --device cuda --random-weights qwen3-30b-a3b --seq "$seq" \
    --attn-cp-size 1 "$@" 2>&1 | tee "$OUT/$log" | tail -6
}
part "prefill, Qwen3-30B-A3B shape, random BF16 weights, one GPU"
prefill cpinfer_prefill.log "$SEQS"
prefill cpinfer_prefill_128k.log 131072 --repeats 1
part "HF transformers (4 layers, extrapolated to 48)"
timeout 150 python3 bench/hf_prefill.py --seq "$SEQS" --layers 4 --json "$OUT/hf_prefill.json" 2>&1 | tail -6
timeout 150 python3 bench/hf_prefill.py --seq 131072 --layers 4 --reps 3 --json "$OUT/hf_prefill_128k.json" 2>&1 | tail -4
part "attention: ws in two passes and one and cuDNN's graph, pages of 16 in a prompt's order"
timeout 120 "$BIN/attention_bench" --kernel ws,ws-1pass,cudnn --ascending-pages --block-size 16 --seq "$SEQS,131072" \
  --reps 10 2>&1 | tee "$OUT/attention_bench.log" | tail -14
part "the engine's prefill with the ws attention in one pass (--attention-backend ws-1pass)"
prefill cpinfer_prefill_1pass.log "$SEQS" --attention-backend ws-1pass
prefill cpinfer_prefill_128k_1pass.log 131072 --repeats 1 --attention-backend ws-1pass
part "torch SDPA on cuDNN"
timeout 120 python3 bench/torch_attention.py --seq "$SEQS,131072" --backends CUDNN_ATTENTION \
  --json "$OUT/torch_attention.json" 2>&1 | tail -6
gpu_power_ceilings
