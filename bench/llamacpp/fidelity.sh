#!/usr/bin/env bash
# Fidelity check against an independent implementation: llama.cpp and cpinfer generate greedily from
# the same prompt ids on the same random-weight Qwen3-MoE, converted to an F32 GGUF and run by
# llama.cpp with an F32 KV cache and flash attention off (both engines then compute in fp32 on the
# same bf16-rounded weights). Passes when at least --min-agree of the --new tokens are equal, position
# by position (default: all of them). Optional: not part of scripts/test.sh; needs build/cpinfer, node
# and npm (node-llama-cpp is installed into bench/llamacpp on first use).
#
#   bench/llamacpp/fidelity.sh [--layers 4] [--hidden 256] [--experts 16] [--heads 4] [--kv-heads 2]
#                              [--head-dim 64] [--prompt 32] [--new 100] [--threads 2] [--seed 1]
#                              [--min-agree N] [--work DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/bench/llamacpp"
LAYERS=4 HIDDEN=256 EXPERTS=16 HEADS=4 KV_HEADS=2 HEAD_DIM=64 PROMPT=32 NEW=100 THREADS=2 SEED=1 MIN_AGREE="" WORK=""
CPINFER="${CPINFER:-$ROOT/build/cpinfer}"
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) LAYERS="$2"; shift 2 ;;
    --hidden) HIDDEN="$2"; shift 2 ;;
    --experts) EXPERTS="$2"; shift 2 ;;
    --heads) HEADS="$2"; shift 2 ;;
    --kv-heads) KV_HEADS="$2"; shift 2 ;;
    --head-dim) HEAD_DIM="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    --new) NEW="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --min-agree) MIN_AGREE="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fidelity.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
MIN_AGREE="${MIN_AGREE:-$NEW}"
WORK="${WORK:-$ROOT/build/llamacpp-bench}"
MODEL="$WORK/qwen3moe-l${LAYERS}-h${HIDDEN}-e${EXPERTS}"
[ "$HEADS/$KV_HEADS/$HEAD_DIM" = "4/2/64" ] || MODEL="$MODEL-q${HEADS}-kv${KV_HEADS}-d${HEAD_DIM}"  # as run.sh names it
mkdir -p "$WORK"

[ -x "$CPINFER" ] || { echo "fidelity.sh: $CPINFER not built" >&2; exit 1; }
if [ ! -d "$HERE/node_modules/node-llama-cpp" ]; then
  npm install --prefix "$HERE" --omit=optional --no-audit --no-fund --loglevel=error >&2
fi
if [ ! -f "$MODEL/model.safetensors" ]; then
  rm -rf "$MODEL"
  "$CPINFER" demo-model --out "$MODEL" --layers "$LAYERS" --hidden "$HIDDEN" --experts "$EXPERTS" \
    --heads "$HEADS" --kv-heads "$KV_HEADS" --head-dim "$HEAD_DIM" >&2
fi
GGUF="$MODEL/model-f32.gguf"
if [ ! -f "$GGUF" ] || [ "$MODEL/model.safetensors" -nt "$GGUF" ]; then
  python3 "$ROOT/tools/to_gguf.py" "$MODEL" --outtype f32 --out "$GGUF" --quiet
fi

node "$HERE/bench.mjs" --model "$GGUF" --threads "$THREADS" --prompt-tokens "$PROMPT" --seed "$SEED" \
  --max-new-tokens "$NEW" --repeats 1 --f32-kv --flash-attention off > "$WORK/fidelity_llamacpp.json"
IDS="$(python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["prompt_ids"])))' \
  "$WORK/fidelity_llamacpp.json")"
OMP_NUM_THREADS="$THREADS" "$CPINFER" generate --model-path "$MODEL" --input-ids "$IDS" \
  --max-new-tokens "$NEW" --ignore-eos --json 2>/dev/null > "$WORK/fidelity_cpinfer.json"

python3 - "$WORK" "$NEW" "$MIN_AGREE" "$LAYERS" "$HIDDEN" "$EXPERTS" "$HEADS/$KV_HEADS x $HEAD_DIM" <<'EOF'
import json, sys
work, new, min_agree = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ll = json.load(open(f"{work}/fidelity_llamacpp.json"))["output_ids"]
cp = json.load(open(f"{work}/fidelity_cpinfer.json"))["output_ids"]
if len(ll) != new or len(cp) != new:
    print(f"fidelity: expected {new} tokens from each, got llama.cpp {len(ll)}, cpinfer {len(cp)}")
    sys.exit(1)
same = sum(a == b for a, b in zip(ll, cp))
first = next((i for i, (a, b) in enumerate(zip(ll, cp)) if a != b), None)
where = "" if first is None else f"; first difference at token {first}: llama.cpp {ll[first]}, cpinfer {cp[first]}"
ok = same >= min_agree
print(f"fidelity ({sys.argv[4]} layers, hidden {sys.argv[5]}, {sys.argv[6]} experts, q/kv heads {sys.argv[7]}, "
      f"F32 GGUF, F32 KV, "
      f"no flash attention): {same}/{new} greedy tokens equal{where}")
print(f"{1 if ok else 0} passed, {0 if ok else 1} failed")
sys.exit(0 if ok else 1)
EOF
