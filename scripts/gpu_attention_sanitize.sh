#!/usr/bin/env bash
# On a GPU machine: compute-sanitizer on the warp-specialized prefill attention kernel alone
# (--kernel-name; other kernels run uninstrumented — cuDNN's SDPA, which the tests also run, shows
# racecheck hazards of its own): racecheck over the attention tests' prefill cases (GQA 1-16, block
# sizes 1-256, ragged batches, late jumps of the row max, key ranges, LSE, the CP merge; the kernel
# in one pass and in two), memcheck on the late jumps (the second pass's path) and memcheck and
# synccheck on a small attention_bench run of both. Exits 1 on any hazard, error or failed test.
# Logs in $OUT (default ./out).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
gpu_binaries gpu_ops_test attention_bench
CS="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
KERNEL=(--kernel-name kns=attention_ws_kernel)
CASES='AttnRunner.FlashSingleSequence:AttnRunner.FlashOffsetsAndVarlen:AttnRunner.FlashGqaBlockSizesAndLengths'
JUMPS='AttnRunner.FlashScoresJumpOnALateTile:AttnRunner.WsFirstPassAloneOnLateJumps'
CASES+=":$JUMPS"
CASES+=':AttnRunner.FlashKeyRanges:AttnRunner.DiagonalMergedWithPrefixEqualsFull'
bad=0
# ok LOG: the run exited 0 and its summaries count no hazard and no error.
ok() {
  local rc=$1 log=$2
  grep -E "SUMMARY" "$log" | sort | uniq -c
  [ "$rc" -eq 0 ] && grep -qE "SUMMARY" "$log" && ! grep -E "SUMMARY" "$log" | grep -qvE ": 0 (hazards|errors)"
}
echo "== racecheck, the attention tests' prefill cases"
timeout 300 "$CS" --tool racecheck --racecheck-report all "${KERNEL[@]}" "$BIN/gpu_ops_test" --gtest_filter="$CASES" \
  > "$OUT/racecheck_attention.log" 2>&1
ok $? "$OUT/racecheck_attention.log" || { echo "racecheck: hazards or failures (racecheck_attention.log)"; bad=1; }
echo "== memcheck, the late jumps"
timeout 120 "$CS" --tool memcheck "${KERNEL[@]}" "$BIN/gpu_ops_test" --gtest_filter="$JUMPS" \
  > "$OUT/memcheck_jumps.log" 2>&1
ok $? "$OUT/memcheck_jumps.log" || { echo "memcheck: errors or failures (memcheck_jumps.log)"; bad=1; }
for tool in memcheck synccheck; do
  echo "== $tool, attention_bench --kernel ws,ws-1pass --seq 1000"
  timeout 120 "$CS" --tool "$tool" "${KERNEL[@]}" "$BIN/attention_bench" --kernel ws,ws-1pass --seq 1000 \
    --block-size 16 --ascending-pages --reps 10 > "$OUT/${tool}_attention.log" 2>&1
  ok $? "$OUT/${tool}_attention.log" || { echo "$tool: errors (${tool}_attention.log)"; bad=1; }
done
[ "$bad" -eq 0 ] && echo "sanitizers: clean"
exit "$bad"
