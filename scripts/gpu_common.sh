# Sourced by the scripts/gpu_*.sh checks: environment, output folder, and the binaries — prebuilt in
# $CPINFER_PREBUILT/bin (built on another machine by scripts/carry.sh, with the tokenizer in
# $CPINFER_PREBUILT/qwen3-tokenizer) or built here into build-gpu. Usage: gpu_binaries TARGET...   (sets BIN)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

gpu_binaries() {
  if [ -n "${CPINFER_PREBUILT:-}" ]; then
    BIN="$CPINFER_PREBUILT/bin"
    [ -d "$CPINFER_PREBUILT/qwen3-tokenizer" ] && export CPINFER_TOKENIZER_DIR="$CPINFER_PREBUILT/qwen3-tokenizer"
    export LD_LIBRARY_PATH="$CPINFER_PREBUILT/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
    # The test binaries find the fixtures through the source path they were built in.
    local src
    src="$(strings "$BIN/gpu_model_test" | grep -m1 -o '/[^ ]*/tests/fixtures' | sed 's#/tests/fixtures##')"
    # (CPINFER_SOURCE_DIR on its own; its build paths, e.g. /x/build/../src/..., name it too)
    [ -n "$src" ] || src="$(strings "$BIN/gpu_model_test" | grep -m1 -oE '^/[^ ]+/build[^/]*/\.\./src' |
      sed -E 's#/build[^/]*/\.\./src$##')"
    if [ -n "$src" ] && [ ! -e "$src/tests/fixtures" ]; then mkdir -p "$(dirname "$src")"; ln -sfn "$ROOT" "$src"; fi
  else
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCPINFER_CUDA=ON > "$OUT/cmake.log" 2>&1 ||
      { tail -30 "$OUT/cmake.log"; exit 1; }
    ninja -C build-gpu "$@" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    BIN="$ROOT/build-gpu/bin"
    mkdir -p "$BIN"
    local t
    for t in "$@"; do ln -sf "$(find "$ROOT/build-gpu" -name "$t" -type f -perm -u+x | head -1)" "$BIN/$t"; done
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
  ldd "$BIN/cpinfer" | grep "not found" && echo "missing libraries"
}

# What the card sustains at its power limit, 12 s each: cuBLAS's bf16 GEMM of 8192^3 and cuDNN's
# causal attention at 128K (bench/power_ceiling.py), then the ws kernel at 128K (attention_bench
# --reps 40, ~9 s). Needs BIN with attention_bench.
gpu_power_ceilings() {
  echo "== sustained at the power limit: cuBLAS bf16 GEMM 8192^3, cuDNN SDPA at 128K, ws at 128K"
  timeout 60 python3 bench/power_ceiling.py --op gemm --seconds 12 --json "$OUT/ceiling_gemm.json" 2>&1 | tail -1
  timeout 60 python3 bench/power_ceiling.py --op sdpa --seq 131072 --seconds 12 --json "$OUT/ceiling_sdpa.json" 2>&1 |
    tail -1
  timeout 60 "$BIN/attention_bench" --kernel ws --ascending-pages --block-size 16 --seq 131072 --reps 40 2>&1 | tail -1
}
