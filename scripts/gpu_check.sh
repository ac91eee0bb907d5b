#!/usr/bin/env bash
# On a GPU machine: build the CUDA back-end (or use prebuilt binaries in $CPINFER_PREBUILT), run the
# GPU op and model tests, the attention kernel benchmark, the Qwen3-30B-A3B-shape prefill benchmark,
# and the peers (HF transformers, torch SDPA) on the same card. Results go to $OUT (default ./out).
#   scripts/gpu_check.sh [--quick]      --quick: 4K and 16K only
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
SEQS="4096,16384,32768"
[ "${1:-}" = "--quick" ] && SEQS="4096,16384"

if [ -n "${CPINFER_PREBUILT:-}" ]; then
  BIN="$CPINFER_PREBUILT/bin"
  export LD_LIBRARY_PATH="$CPINFER_PREBUILT/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  # The test binaries find the fixtures through the source path they were built in.
  SRC="$(strings "$BIN/gpu_model_test" | grep -m1 -o '/[^ ]*/tests/fixtures' | sed 's#/tests/fixtures##')"
  if [ -n "$SRC" ] && [ ! -e "$SRC/tests/fixtures" ]; then mkdir -p "$(dirname "$SRC")"; ln -sfn "$ROOT" "$SRC"; fi
else
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCPINFER_CUDA=ON > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
  ninja -C build-gpu cpinfer gpu_ops_test gpu_model_test attention_bench > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  BIN="$ROOT/build-gpu"
  for t in gpu_ops_test gpu_model_test; do ln -sf "$(find build-gpu -name $t -type f | head -1)" "$BIN/$t"; done
  ln -sf "$(find build-gpu -name attention_bench -type f | head -1)" "$BIN/attention_bench"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
ldd "$BIN/cpinfer" | grep "not found" && echo "missing libraries"

echo "== gpu op tests"
timeout 180 "$BIN/gpu_ops_test" 2>&1 | tee "$OUT/gpu_ops.log" | grep -E "^\[|nmse|PASSED|FAILED|SKIPPED" | tail -60
echo "== gpu model tests"
timeout 180 "$BIN/gpu_model_test" 2>&1 | tee "$OUT/gpu_model.log" | grep -E "\[gpu|OK|FAILED|Failure|SKIPPED|PASSED" | tail -30
echo "== attention kernel"
timeout 120 "$BIN/attention_bench" 2>&1 | tee "$OUT/attention_bench.log" | tail -8
echo "== cpinfer prefill, Qwen3-30B-A3B shape, random weights"
timeout 300 "$BIN/cpinfer" -q bench prefill --device cuda --random-weights qwen3-30b-a3b --seq "$SEQS" --attn-cp-size 1 \
  2>&1 | tee "$OUT/cpinfer_prefill.log" | tail -8
echo "== peers"
timeout 150 python3 bench/hf_prefill.py --seq "$SEQS" --layers 4 --json "$OUT/hf_prefill.json" 2>&1 | tail -8
timeout 90 python3 bench/torch_attention.py --seq "$SEQS" --json "$OUT/torch_attention.json" 2>&1 | tail -8
