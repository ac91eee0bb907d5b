#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, clang + ASan + UBSan, in build-fuzz/) and runs each for
# SECONDS_PER_TARGET seconds. Exits non-zero when any target finds a crash, leak, sanitizer report,
# timeout or unexpected exception; the input is saved under build-fuzz/crashes/<target>/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET=30] [TARGET...]     targets: safetensors config
#                                                          tokenizer_json tokenizer api
#   scripts/fuzz.sh 0                                      build only, then replay the seeds once
#   FUZZ_RUNS=N scripts/fuzz.sh                            N inputs per target from seed 1 instead of a time
#                                                          budget: the same inputs on every run (CI)
# Replay one input:  build-fuzz/fuzz_<target> <file>   (CPINFER_FUZZ_VERBOSE=1 prints the errors)
# Needs clang and its libFuzzer runtime (Debian: clang, libclang-rt-14-dev).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECS="${1:-30}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(safetensors config tokenizer_json tokenizer api)
BUILD="$ROOT/build-fuzz"
CXX_BIN="${FUZZ_CXX:-clang++}"

# Longest input per target: JSON documents need room; the tokenizer.json fuzzer stays small because
# every accepted input builds a whole tokenizer.
declare -A MAX_LEN=([safetensors]=16384 [config]=8192 [tokenizer_json]=8192 [tokenizer]=4096 [api]=16384)

command -v "$CXX_BIN" >/dev/null || { echo "[fuzz] $CXX_BIN not found (apt-get install clang libclang-rt-14-dev)"; exit 1; }
if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' |
    "$CXX_BIN" -x c++ -fsanitize=fuzzer - -o /dev/null 2>/dev/null; then
  echo "[fuzz] $CXX_BIN cannot link -fsanitize=fuzzer: the libFuzzer runtime is missing (apt-get install libclang-rt-14-dev)"
  exit 1
fi

echo "[fuzz] build ($BUILD)"
if [ ! -f "$BUILD/build.ninja" ]; then
  CC="${FUZZ_CC:-clang}" CXX="$CXX_BIN" cmake -S tests/fuzz -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
ninja -C "$BUILD" -j "$(nproc)" "${TARGETS[@]/#/fuzz_}"

# A 1 MiB stack (not 8): recursion whose depth grows with the input (e.g. nlohmann::json's dump()
# or copy of a deeply nested value) then overflows within -max_len, where an 8 MiB stack would
# need megabyte inputs that libFuzzer never builds. The same code overflows a server thread's
# 8 MiB stack on a 2 MB request.
STACK_KB="${FUZZ_STACK_KB:-1024}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
failed=()
for t in "${TARGETS[@]}"; do
  bin="$BUILD/fuzz_$t"
  [ -x "$bin" ] || { echo "[fuzz] unknown target '$t'"; exit 1; }
  if [ "$t" = tokenizer ]; then
    tok_dir="${CPINFER_TOKENIZER_DIR:-$ROOT/build/qwen3-tokenizer}"
    if [ ! -f "$tok_dir/tokenizer.json" ]; then
      echo "[fuzz] skip tokenizer: no $tok_dir/tokenizer.json (scripts/setup.sh extracts it)"
      continue
    fi
  fi
  seeds="$ROOT/tests/fuzz/corpus/$t"
  corpus="$BUILD/corpus/$t"  # grows between local runs; the checked-in seeds stay small
  crashes="$BUILD/crashes/$t"
  mkdir -p "$corpus" "$crashes"
  log="$BUILD/fuzz_$t.log"
  args=(-timeout=10 -rss_limit_mb=2048 -max_len="${MAX_LEN[$t]}" -dict="$ROOT/tests/fuzz/dict/$t.dict"
        -artifact_prefix="$crashes/" -print_final_stats=1)
  if [ -n "${FUZZ_RUNS:-}" ]; then
    echo "[fuzz] $t: ${FUZZ_RUNS} runs from seed 1"
    args+=(-runs="$FUZZ_RUNS" -seed=1 "$corpus" "$seeds")
  elif [ "$SECS" -gt 0 ]; then
    echo "[fuzz] $t: ${SECS}s"
    args+=(-max_total_time="$SECS" "$corpus" "$seeds")
  else
    echo "[fuzz] $t: replay seeds"
    args+=(-runs=0 "$seeds")
  fi
  # The outer timeout catches a hang that libFuzzer's own -timeout could not interrupt.
  if (ulimit -s "$STACK_KB" && exec timeout $((SECS + 300)) "$bin" "${args[@]}") >"$log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1) exec/s"
    echo "[fuzz] $t: ok (${execs:-?} runs, $rate, $cov, corpus $(ls "$corpus" | wc -l) files)"
  else
    echo "[fuzz] $t: FAILED (log: $log, inputs: $crashes/)"
    grep -E "ERROR:|SUMMARY:|cpinfer fuzz:|Test unit written|runtime error" "$log" | head -20 || tail -30 "$log"
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "[fuzz] FAILED: ${failed[*]}"
  exit 1
fi
echo "[fuzz] all passed"
