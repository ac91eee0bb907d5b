#!/usr/bin/env bash
# The test command: set up, build (Release, CUDA compiled when nvcc is present), run every test,
# then build the unit tests again under AddressSanitizer + UBSan and run them, then fuzz the parsers
# of untrusted input (safetensors, config.json, tokenizer.json and text, HTTP request bodies).
# GPU tests skip, saying so, on a machine without a GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
JOBS="$(nproc)"

echo "[test] clang-format"
"$ROOT/scripts/format.sh" --check

echo "[test] build (Release)"
"$ROOT/scripts/build.sh" "$ROOT/build"
echo "[test] ctest (Release)"
(cd "$ROOT/build" && ctest --output-on-failure -j "$JOBS" --timeout 1200)

if [ "${CPINFER_SKIP_SANITIZERS:-0}" != 1 ]; then
  echo "[test] build (ASan + UBSan, CPU only)"
  "$ROOT/scripts/build.sh" "$ROOT/build-asan" -DCPINFER_SANITIZE=ON -DCPINFER_CUDA=OFF -DCPINFER_MPI=OFF \
    -DCPINFER_BUILD_SERVER=OFF
  echo "[test] ctest -L unit (ASan + UBSan)"
  (cd "$ROOT/build-asan" && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j "$JOBS" -L unit --timeout 1200)
fi
if [ "${CPINFER_SKIP_FUZZ:-0}" != 1 ]; then
  # A fixed number of inputs from a fixed seed: CI sees the same inputs every time (scripts/fuzz.sh
  # with a time budget explores further, for development).
  echo "[test] fuzz (libFuzzer + ASan + UBSan, 100000 inputs per target)"
  rm -rf "$ROOT/build-fuzz/corpus"
  FUZZ_RUNS=100000 "$ROOT/scripts/fuzz.sh" 300
fi
echo "[test] all passed"
