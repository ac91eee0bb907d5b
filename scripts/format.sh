#!/usr/bin/env bash
# clang-format (.clang-format) over every C++ and CUDA source in the tree: scripts/format.sh rewrites
# them, scripts/format.sh --check (run by scripts/test.sh) fails listing the ones that differ.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Every C++ and CUDA source git tracks.
mapfile -t FILES < <(git ls-files '*.h' '*.hpp' '*.cpp' '*.cc' '*.cu' '*.cuh')
[ ${#FILES[@]} -gt 0 ] || { echo "[format] no sources found (not a git checkout?)" >&2; exit 1; }
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
