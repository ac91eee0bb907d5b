#!/usr/bin/env bash
# cpinfer's CPU back-end against llama.cpp (node-llama-cpp's prebuilt binaries) on the same model, the
# same prompt and the same number of threads. See bench/README.md.
#
#   bench/llamacpp/run.sh [--layers 4] [--hidden 256] [--experts 16] [--heads 4] [--kv-heads 2]
#                         [--head-dim 64] [--threads 2] [--prompt 512] [--new 64] [--repeats 3]
#                         [--outtype bf16|f32] [--kv-cache-dtype auto|bf16] [--work DIR] [--json FILE]
#
# 1. `cpinfer demo-model` writes a random-weight Qwen3-MoE checkpoint (kept in --work, default
#    build/llamacpp-bench, and reused), 2. tools/to_gguf.py converts it, 3. bench.mjs measures
#    llama.cpp (its default settings: F16 KV cache, flash attention auto, batch 512), 4. cpinfer runs
#    with OMP_NUM_THREADS: `bench prefill` for prefill and `generate --ignore-eos` on llama.cpp's
#    prompt ids for decode, 5. a table of tokens/s and cpinfer / llama.cpp.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/bench/llamacpp"
LAYERS=4 HIDDEN=256 EXPERTS=16 HEADS=4 KV_HEADS=2 HEAD_DIM=64 THREADS=2 PROMPT=512 NEW=64 REPEATS=3 OUTTYPE=bf16 KV_DTYPE=auto WORK="" JSON_OUT=""
CPINFER="${CPINFER:-$ROOT/build/cpinfer}"
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) LAYERS="$2"; shift 2 ;;
    --hidden) HIDDEN="$2"; shift 2 ;;
    --experts) EXPERTS="$2"; shift 2 ;;
    --heads) HEADS="$2"; shift 2 ;;
    --kv-heads) KV_HEADS="$2"; shift 2 ;;
    --head-dim) HEAD_DIM="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    --new) NEW="$2"; shift 2 ;;
    --repeats) REPEATS="$2"; shift 2 ;;
    --outtype) OUTTYPE="$2"; shift 2 ;;
    --kv-cache-dtype) KV_DTYPE="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --json) JSON_OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
WORK="${WORK:-$ROOT/build/llamacpp-bench}"
MODEL="$WORK/qwen3moe-l${LAYERS}-h${HIDDEN}-e${EXPERTS}"
# The demo's heads (4 q / 2 kv of 64) keep the old directory name; another head shape names itself.
[ "$HEADS/$KV_HEADS/$HEAD_DIM" = "4/2/64" ] || MODEL="$MODEL-q${HEADS}-kv${KV_HEADS}-d${HEAD_DIM}"
mkdir -p "$WORK"

[ -x "$CPINFER" ] || { echo "run.sh: $CPINFER not built (scripts/build.sh build, or ninja -C build cpinfer)" >&2; exit 1; }
if [ ! -d "$HERE/node_modules/node-llama-cpp" ]; then
  echo "[llamacpp] npm install (node-llama-cpp, CPU binaries only)" >&2
  npm install --prefix "$HERE" --omit=optional --no-audit --no-fund --loglevel=error >&2
fi

if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "[llamacpp] cpinfer demo-model: $LAYERS layers, hidden $HIDDEN, $EXPERTS experts -> $MODEL" >&2
  rm -rf "$MODEL"
  "$CPINFER" demo-model --out "$MODEL" --layers "$LAYERS" --hidden "$HIDDEN" --experts "$EXPERTS" \
    --heads "$HEADS" --kv-heads "$KV_HEADS" --head-dim "$HEAD_DIM" >&2
fi
GGUF="$MODEL/model-$OUTTYPE.gguf"
if [ ! -f "$GGUF" ] || [ "$MODEL/model.safetensors" -nt "$GGUF" ]; then
  echo "[llamacpp] to_gguf --outtype $OUTTYPE" >&2
  python3 "$ROOT/tools/to_gguf.py" "$MODEL" --outtype "$OUTTYPE" --out "$GGUF" --quiet
fi

echo "[llamacpp] llama.cpp: prompt $PROMPT, $NEW new tokens, $THREADS threads" >&2
node "$HERE/bench.mjs" --model "$GGUF" --threads "$THREADS" --prompt-tokens "$PROMPT" \
  --max-new-tokens "$NEW" --repeats "$REPEATS" > "$WORK/llamacpp.json"
python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["prompt_ids"])))' \
  "$WORK/llamacpp.json" > "$WORK/prompt_ids.txt"  # a file: a long prompt's ids outgrow one argument

echo "[llamacpp] cpinfer: the same prompt, OMP_NUM_THREADS=$THREADS" >&2
OMP_NUM_THREADS="$THREADS" "$CPINFER" bench prefill --model-path "$MODEL" --seq "$PROMPT" --attn-cp-size 1 \
  --kv-cache-dtype "$KV_DTYPE" --repeats "$REPEATS" --no-profile --json 2>/dev/null > "$WORK/cpinfer_prefill.json"
OMP_NUM_THREADS="$THREADS" "$CPINFER" generate --model-path "$MODEL" --input-ids "@$WORK/prompt_ids.txt" --kv-cache-dtype "$KV_DTYPE" \
  --max-new-tokens "$NEW" --ignore-eos --json 2>/dev/null > "$WORK/cpinfer_generate.json"

python3 - "$WORK" "$LAYERS" "$HIDDEN" "$EXPERTS" "$THREADS" "$OUTTYPE" "$JSON_OUT" "$HEADS" "$KV_HEADS" "$HEAD_DIM" "$KV_DTYPE" <<'EOF'
import json, sys, platform, datetime
work, layers, hidden, experts, threads, outtype, json_out, heads, kv_heads, head_dim, kv_dtype = sys.argv[1:12]
ll = json.load(open(f"{work}/llamacpp.json"))
pf = json.load(open(f"{work}/cpinfer_prefill.json"))["results"][0]
gen = json.load(open(f"{work}/cpinfer_generate.json"))
rows = [("prefill tokens/s", pf["tokens_per_s"], ll["prefill_tokens_per_s"]),
        ("decode tokens/s", gen["decode_tokens_per_s"], ll["decode_tokens_per_s"])]
cpu = ll["cpu"]
print(f"\nQwen3-MoE demo model: {layers} layers, hidden {hidden}, {heads} q / {kv_heads} kv heads of {head_dim}, "
      f"{experts} experts; {threads} threads; {cpu}")
print(f"llama.cpp: {ll['binding']} (llama.cpp {ll['llama_cpp_release']}), GGUF {outtype}, KV {ll['kv_cache']}, "
      f"flash attention {ll['flash_attention']}, batch {ll['batch_size']}")
print(f"cpinfer: KV cache {'fp32' if kv_dtype == 'auto' else kv_dtype} (--kv-cache-dtype {kv_dtype})")
print(f"prompt {ll['prompt_tokens']} tokens, decode {ll['new_tokens']} tokens after it (greedy, EOS ignored)\n")
print(f"| {'metric':<17} | {'cpinfer':>10} | {'llama.cpp':>10} | {'cpinfer / llama.cpp':>19} |")
print(f"| {'-'*17} | {'-'*10}:| {'-'*10}:| {'-'*19}:|")
for name, c, l in rows:
    print(f"| {name:<17} | {c:>10.1f} | {l:>10.1f} | {c / l if l else float('nan'):>18.2f}x |")
same = sum(a == b for a, b in zip(gen["output_ids"], ll["output_ids"]))
print(f"\ngreedy tokens equal at {same} of {min(len(gen['output_ids']), len(ll['output_ids']))} positions "
      f"(expect agreement only with --outtype f32 and F32 KV: see fidelity.sh)")
if json_out:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": platform.node(), "cpu": cpu, "threads": int(threads),
               "cpinfer_kv_cache_dtype": kv_dtype,
               "model": {"layers": int(layers), "hidden": int(hidden), "experts": int(experts), "heads": int(heads),
                         "kv_heads": int(kv_heads), "head_dim": int(head_dim), "gguf": outtype},
               "llamacpp": ll, "cpinfer_prefill": pf, "cpinfer_generate": gen,
               "ratio": {r[0]: r[1] / r[2] for r in rows if r[2]}}, open(json_out, "w"), indent=1)
EOF
