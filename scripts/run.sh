#!/usr/bin/env bash
# The main job: set up, build, and generate text. Without --model-path it writes and uses the
# built-in demo model (random weights: its output is random text).
#   scripts/run.sh                                    # demo model, chat prompt
#   scripts/run.sh --model-path /models/Qwen3-30B-A3B --prompt "Hello" --chat --max-new-tokens 64
# Any other cpinfer generate flag may follow (see build/cpinfer generate --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh" "$ROOT/build"
args=("$@")
have_model=0
have_prompt=0
for a in "${args[@]}"; do
  [ "$a" = "--model-path" ] && have_model=1
  { [ "$a" = "--prompt" ] || [ "$a" = "--input-ids" ]; } && have_prompt=1
done
if [ $have_model = 0 ]; then
  DEMO="$ROOT/build/demo-model"
  [ -f "$DEMO/model.safetensors" ] || "$ROOT/build/cpinfer" demo-model --out "$DEMO"
  echo "[run] no --model-path: using the demo model in $DEMO (random weights, so the text is random)"
  args=(--model-path "$DEMO" "${args[@]}")
fi
if [ $have_prompt = 0 ]; then
  args+=(--prompt "Explain context parallelism in one sentence." --chat --max-new-tokens 32)
fi
exec "$ROOT/build/cpinfer" generate "${args[@]}"
