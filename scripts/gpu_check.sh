#!/usr/bin/env bash
# On a GPU machine: build the CUDA back-end (or use prebuilt binaries in $CPINFER_PREBUILT), run the
# GPU op, MoE, sampling and model tests, the attention and MoE kernel benchmarks, the
# Qwen3-30B-A3B-shape prefill benchmark, and the peers (HF transformers, torch SDPA) on the same
# card. Results go to $OUT (default ./out).
#   scripts/gpu_check.sh [--quick]      --quick: 4K and 16K only
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
SEQS="4096,16384,32768"
[ "${1:-}" = "--quick" ] && SEQS="4096,16384"
gpu_binaries cpinfer gpu_ops_test gpu_moe_test gpu_sample_test gpu_model_test attention_bench moe_bench

echo "== gpu op tests"
timeout 180 "$BIN/gpu_ops_test" 2>&1 | tee "$OUT/gpu_ops.log" | grep -E "^\[|nmse|PASSED|FAILED|SKIPPED" | tail -60
for t in gpu_moe_test gpu_sample_test; do
  echo "== $t"
  timeout 180 "$BIN/$t" 2>&1 | tee "$OUT/$t.log" | grep -E "^\[gpu|PASSED|FAILED|Failure|SKIPPED" | tail -30
done
echo "== gpu model tests"
timeout 180 "$BIN/gpu_model_test" 2>&1 | tee "$OUT/gpu_model.log" | grep -E "\[gpu|OK|FAILED|Failure|SKIPPED|PASSED" | tail -30
echo "== attention kernel"
timeout 120 "$BIN/attention_bench" 2>&1 | tee "$OUT/attention_bench.log" | tail -8
echo "== attention, a fresh prompt's page order (cuDNN's dense graph, what Auto runs for >= 8192 tokens)"
timeout 120 "$BIN/attention_bench" --seq "$SEQS" --kernel ws,cudnn --ascending-pages 2>&1 |
  tee "$OUT/attention_bench_dense.log" | tail -8
echo "== MoE grouped GEMMs"
timeout 120 "$BIN/moe_bench" --tokens 4096,16384,32768 2>&1 | tee "$OUT/moe_bench.log" | tail -10
echo "== cpinfer prefill, Qwen3-30B-A3B shape, random weights"
timeout 300 "$BIN/cpinfer" -q bench prefill --device cuda --random-weights qwen3-30b-a3b --seq "$SEQS" --attn-cp-size 1 \
  2>&1 | tee "$OUT/cpinfer_prefill.log" | tail -8
echo "== the same with KV pages of 64 tokens (the attention runs on the warp-specialized kernel there)"
timeout 300 "$BIN/cpinfer" -q bench prefill --device cuda --random-weights qwen3-30b-a3b --seq "$SEQS" --attn-cp-size 1 \
  --page-size 64 2>&1 | tee "$OUT/cpinfer_prefill_page64.log" | tail -8
echo "== peers"
timeout 150 python3 bench/hf_prefill.py --seq "$SEQS" --layers 4 --json "$OUT/hf_prefill.json" 2>&1 | tail -8
timeout 90 python3 bench/torch_attention.py --seq "$SEQS" --json "$OUT/torch_attention.json" 2>&1 | tail -8
