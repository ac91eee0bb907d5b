#!/usr/bin/env bash
# On a GPU machine: decode at the Qwen3-30B-A3B shape (random weights) — cpinfer bench decode over
# batch and context, the transformers peer (static cache, eager and with its torch.compile) on the
# same card, then the serving benchmark (python3 client, no node there) against `cpinfer serve
# --random-weights qwen3-30b-a3b` at concurrency 1, 16, 64 and 256, and the multi-turn prefix-cache run
# (bench/serving/multi_turn.py). Results go to $OUT (default ./out).
#   scripts/gpu_decode_check.sh [--quick]      --quick: no context 32768, no compiled peer
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
gpu_binaries cpinfer
decode_summary() {
  python3 -c 'import json,sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(r["batch"], r["context"], "%.3f ms" % (r["step_s"] * 1e3), "%.0f tok/s" % r["tokens_per_s"],
          "%.0f%% of copy bandwidth" % (100 * r["share_of_copy_bandwidth"])) if "step_s" in r else print(r)' "$1"
}

# KV for 600K positions (bf16, 96 KiB each: 55 GiB) beside 57 GiB of weights; batch x context pairs
# beyond it are skipped by the benchmark, saying so.
echo "== cpinfer bench decode, Qwen3-30B-A3B shape, context 1024"
timeout 240 "$BIN/cpinfer" -q bench decode --device cuda --random-weights qwen3-30b-a3b \
  --batch 1,8,32,64,128,256 --context 1024 --kv-cache-tokens 600000 --json > "$OUT/cpinfer_decode_1k.json" \
  2> "$OUT/cpinfer_decode_1k.log"; echo "rc=$?"; decode_summary "$OUT/cpinfer_decode_1k.json"
echo "== the same without CUDA graphs (--disable-cuda-graph)"
timeout 120 "$BIN/cpinfer" -q bench decode --device cuda --random-weights qwen3-30b-a3b \
  --batch 1,8,64,256 --context 1024 --kv-cache-tokens 600000 --disable-cuda-graph --json \
  > "$OUT/cpinfer_decode_1k_nograph.json" 2> "$OUT/cpinfer_decode_1k_nograph.log"; echo "rc=$?"
python3 - "$OUT/cpinfer_decode_1k.json" "$OUT/cpinfer_decode_1k_nograph.json" <<'PY'
import json, sys
on, off = (json.load(open(p)) for p in sys.argv[1:3])
print("graphs recorded %s, steps replayed %s" % (on.get("graphs_recorded"), on.get("steps_replayed")))
t = {r["batch"]: r for r in off["results"] if "step_s" in r}
for r in on["results"]:
    if "step_s" in r and r["batch"] in t:
        print("batch %4d: graphs %.3f ms, no graphs %.3f ms, %.2fx" % (r["batch"], r["step_s"] * 1e3,
              t[r["batch"]]["step_s"] * 1e3, t[r["batch"]]["step_s"] / r["step_s"]))
PY
if [ $QUICK = 0 ]; then
  echo "== cpinfer bench decode, context 32768"
  timeout 240 "$BIN/cpinfer" -q bench decode --device cuda --random-weights qwen3-30b-a3b \
    --batch 1,8,16 --context 32768 --kv-cache-tokens 600000 --json > "$OUT/cpinfer_decode_32k.json" \
    2> "$OUT/cpinfer_decode_32k.log"; echo "rc=$?"; decode_summary "$OUT/cpinfer_decode_32k.json"
fi

echo "== transformers decode peer (2 and 4 layers, extrapolated to 48)"
PEER_FLAGS=(--batch 1,64 --context 1024 --steps 32 --layers 2,4 --json "$OUT/hf_decode.json")
[ $QUICK = 0 ] && PEER_FLAGS+=(--compile)
timeout 300 python3 bench/hf_decode.py "${PEER_FLAGS[@]}" 2>&1 | tee "$OUT/hf_decode.log" | tail -8

echo "== serving, random weights at the real shape (one server; Qwen3's sampling: T 0.7, top-p 0.8, top-k 20)"
# max(8, 2 x concurrency) prompts a level. Like the decode runs above, sized for a 141 GB H200: the
# BF16 weights and a KV cache for 256 such requests need more than 80 GB.
BENCH_READY_S=150 timeout 480 bench/serving/run.sh --bin "$BIN/cpinfer" --client py --concurrency "1 16 64 256" \
  --prompts-per-level 2 \
  --serve "--device cuda --random-weights qwen3-30b-a3b --kv-cache-tokens 400000 --max-running-requests 256" \
  -- --input-len 1024 --output-len 128 --extra-request-body '{"temperature": 0.7, "top_p": 0.8, "top_k": 20}' \
  > "$OUT/serving.log" 2>&1
echo "rc=$?"
grep -E "^== concurrency|Output token|Median TTFT|P99 TTFT|Median TPOT" "$OUT/serving.log"

echo "== multi-turn chat with and without the prefix cache (8K system prompt, 20 turns)"
timeout 240 python3 bench/serving/multi_turn.py --bin "$BIN/cpinfer" --model "" --ready-s 120 \
  --server-args "--device cuda --random-weights qwen3-30b-a3b --kv-cache-tokens 65536 --context-length 32768" \
  --output-file "$OUT/multi_turn.json" 2>&1 | tail -4
