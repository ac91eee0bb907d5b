#!/usr/bin/env bash
# Starts `cpinfer serve` (default: the demo model), waits for its ready line, runs the benchmark
# client against it with the remaining arguments, then stops the server (SIGTERM). The client is
# bench_serving.mjs (node) or bench_serving.py (python3 stdlib: the same prompts and metrics);
# default: node when it is installed, else python3.
#   bench/serving/run.sh [--bin build/cpinfer] [--serve "serve flags"] [--client node|py]
#                        [--concurrency "C1 C2 ..." [--prompts-per-level K]] -- [bench flags]
# --concurrency: one server, the client run once per level C with --max-concurrency C and
# --num-prompts max(8, K·C) (K default 4), each run's table and JSON line after a "== concurrency C"
# line (a real-shape model loads once instead of once per level).
#   bench/serving/run.sh --serve "--chunked-prefill-size 512" -- --num-prompts 64 --request-rate 8 \
#       --input-len 256 --output-len 32
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="$ROOT/build/cpinfer"
SERVE_FLAGS=""
CLIENT=""
LEVELS=""
PER_LEVEL=4
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --serve) SERVE_FLAGS="$2"; shift 2 ;;
    --client) CLIENT="$2"; shift 2 ;;
    --concurrency) LEVELS="$2"; shift 2 ;;
    --prompts-per-level) PER_LEVEL="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
positive() { case "$2" in '' | *[!0-9]* | 0 | 0*) echo "[bench] $1 takes positive integers, got '$2'" >&2; exit 2 ;; esac; }
for c in $LEVELS; do positive --concurrency "$c"; done
positive --prompts-per-level "$PER_LEVEL"
[ -n "$CLIENT" ] || { command -v node >/dev/null && CLIENT=node || CLIENT=py; }
case "$CLIENT" in node|py) ;; *) echo "[bench] --client must be node or py, got '$CLIENT'" >&2; exit 2 ;; esac
LOG="$(mktemp)"
# shellcheck disable=SC2086
"$BIN" serve --port 0 --log-interval 0 $SERVE_FLAGS 2>"$LOG" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
URL=""
READY_S="${BENCH_READY_S:-60}"  # seconds the server may take to load
for _ in $(seq 1 $((READY_S * 10))); do
  URL="$(grep -o 'ready: .* at http://[0-9.]*:[0-9]*' "$LOG" | grep -o 'http://.*' || true)"
  [ -n "$URL" ] && break
  kill -0 $PID 2>/dev/null || { cat "$LOG" >&2; echo "[bench] server exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { cat "$LOG" >&2; echo "[bench] server not ready after $READY_S s (BENCH_READY_S)" >&2; exit 1; }
grep -E "loaded|KV cache|ready" "$LOG" >&2 || true
client() {
  if [ "$CLIENT" = node ]; then
    node "$ROOT/bench/serving/bench_serving.mjs" --base-url "$URL" "$@"
  else
    python3 "$ROOT/bench/serving/bench_serving.py" --base-url "$URL" "$@"
  fi
}
if [ -z "$LEVELS" ]; then
  client "$@"
  exit
fi
for c in $LEVELS; do
  n=$((c * PER_LEVEL))
  [ $n -lt 8 ] && n=8
  echo "== concurrency $c ($n prompts)"
  client "$@" --max-concurrency "$c" --num-prompts "$n"
done
