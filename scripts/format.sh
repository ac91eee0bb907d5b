#!/usr/bin/env bash
# clang-format (.clang-format) over the files that follow it: scripts/format.sh rewrites them,
# scripts/format.sh --check (run by scripts/test.sh) fails listing the ones that differ. The list
# grows as files are restructured; the rest of the tree predates the style file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FILES=(
  src/layers/*.h src/layers/*.cpp
  src/model/*.h src/model/*.cpp
  src/parallel/context.h src/parallel/exchange.h src/parallel/exchange.cpp src/parallel/merge.h src/parallel/merge.cpp
  src/engine/stop.h src/engine/stop.cpp
  src/ops/contract.h src/ops/contract.cpp
  src/kv/radix_cache.h src/kv/radix_cache.cpp tests/unit/radix_cache_test.cpp tests/server/prefix_cache_test.cpp tests/server/engine_harness.h tests/server/runner_test.cpp
  tests/model/llama_test.cpp
  src/backends/cuda/kernels/attention_decode.cu src/backends/cuda/kernels/skinny_gemm.cu src/backends/cuda/kernels/gemv.cuh
  src/backends/cuda/cuda_attention.cpp src/backends/cuda/cuda_args.h
  src/backends/cuda/kernels/fp8.cuh src/backends/cuda/kernels/fp8.cu src/backends/cuda/kernels/moe_fp8.cu
  src/backends/cuda/kernels/moe_gemm_fp8_wgmma.cu src/backends/cuda/kernels/moe_gemm_tiles.cuh
  src/backends/cuda/cuda_fp8.cpp src/backends/cuda/cuda_moe_fp8.cpp
)
FORMAT="${CLANG_FORMAT:-clang-format}"
command -v "$FORMAT" >/dev/null || { echo "[format] $FORMAT not found (scripts/setup.sh installs it)" >&2; exit 1; }
if [ "${1:-}" = "--check" ]; then
  bad=()
  for f in "${FILES[@]}"; do
    "$FORMAT" --style=file "$f" | cmp -s - "$f" || bad+=("$f")
  done
  if [ ${#bad[@]} -gt 0 ]; then
    echo "[format] not clang-formatted (run scripts/format.sh): ${bad[*]}" >&2
    exit 1
  fi
  echo "[format] ${#FILES[@]} files clang-formatted"
else
  "$FORMAT" --style=file -i "${FILES[@]}"
fi
