#!/usr/bin/env python3
"""Multi-turn chat benchmark of the prefix cache in python3's standard library only (for the GPU
machine, which has no node): the same benchmark as multi_turn.mjs, with the same flags, text and
table. One conversation with a long shared system prompt (--system-tokens, about that many tokens
of text) and --turns user turns; each turn sends the whole history and streams a greedy answer of
--max-tokens. TTFT per turn is measured on a server started with the prefix cache and on one
started with --disable-radix-cache (same binary and flags), printed side by side with the ratio.

  python3 bench/serving/multi_turn.py --bin build/cpinfer --model build/demo-model \\
      [--system-tokens 8192] [--turns 20] [--max-tokens 16] [--server-args "--kv-cache-tokens 32768"]
  # without a checkpoint: --model "" --server-args "--device cuda --random-weights qwen3-30b-a3b ..."
"""
import argparse
import http.client
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import sse_data  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no what up out who them "
         "some could more into only other time new about then two may first any like now my such make over").split(" ")


def text(n, seed):
    """multi_turn.mjs's text, word for word: common one-token words in a seeded order."""
    out, x = [], seed & 0xFFFFFFFF
    for _ in range(n):
        x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
        out.append(WORDS[x % len(WORDS)])
    return " ".join(out)


class Server:
    """`cpinfer serve` on a free port; its stderr is drained (and kept) by a thread."""

    def __init__(self, args, extra, ready_s):
        cmd = [args.bin, "serve", "--port", "0", "--log-interval", "0", "--served-model-name", "m"]
        if args.model:
            cmd += ["--model-path", args.model]
        cmd += shlex.split(args.server_args) + extra
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log, self.url = [], None
        ready = threading.Event()

        def drain():
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace")
                self.log.append(line)
                m = re.search(r"ready: .* at http://([\d.]+):(\d+)", line)
                if m and not ready.is_set():
                    self.url = (m.group(1), int(m.group(2)))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(ready_s)
        if self.url is None:
            self.stop()
            raise SystemExit("server not ready:\n" + "".join(self.log[-30:]))

    def request(self, method, path, body=None):
        c = http.client.HTTPConnection(*self.url, timeout=600)
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"Content-Type": "application/json"})
        return c, c.getresponse()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def turn(server, messages, max_tokens):
    """One streamed chat completion: TTFT (first content chunk) in ms, the answer, the prompt size."""
    t0 = time.perf_counter()
    c, r = server.request("POST", "/v1/chat/completions",
                          {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}})
    try:
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {r.read()[:300].decode(errors='replace')}")
        ttft, answer, prompt_tokens = None, "", 0
        for j in sse_data(r):
            if j.get("usage"):
                prompt_tokens = j["usage"]["prompt_tokens"]
            for ch in j.get("choices") or []:
                d = ch.get("delta") or {}
                piece = (d.get("reasoning_content") or "") + (d.get("content") or "")
                if ttft is None and piece:
                    ttft = (time.perf_counter() - t0) * 1e3
                answer += piece
    finally:
        c.close()
    return {"ttft_ms": ttft if ttft is not None else (time.perf_counter() - t0) * 1e3, "answer": answer,
            "prompt_tokens": prompt_tokens}


def metric(text_, name):
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text_, re.M)
    return float(m.group(1)) if m else float("nan")


def conversation(args, extra):
    server = Server(args, extra, args.ready_s)
    try:
        turn(server, [{"role": "user", "content": "warm up"}], args.max_tokens)  # first-request costs out of turn 1
        messages = [{"role": "system", "content": text(args.system_tokens, 1)}]
        out = []
        for t in range(args.turns):
            messages.append({"role": "user", "content": f"Question {t + 1}: {text(24, t + 2)}?"})
            r = turn(server, messages, args.max_tokens)
            messages.append({"role": "assistant", "content": r["answer"]})
            out.append({"ttft_ms": r["ttft_ms"], "prompt_tokens": r["prompt_tokens"]})
        c, r = server.request("GET", "/metrics")
        m = r.read().decode()
        c.close()
        return {"turns": out, "hit_rate": metric(m, "cpinfer_prefix_cache_hit_rate"),
                "prefilled": metric(m, "cpinfer_prompt_tokens_total")}
    finally:
        server.stop()


def main():
    p = argparse.ArgumentParser(description="Multi-turn chat TTFT with and without the prefix cache")
    p.add_argument("--bin", default="build/cpinfer")
    p.add_argument("--model", default="build/demo-model", help='model directory ("" with --random-weights)')
    p.add_argument("--system-tokens", type=int, default=8192)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--server-args", default="--kv-cache-tokens 32768 --context-length 32768")
    p.add_argument("--ready-s", type=float, default=300, help="seconds to wait for each server to be ready")
    p.add_argument("--output-file")
    args = p.parse_args()
    if args.turns < 1 or args.system_tokens < 1 or args.max_tokens < 1:
        raise SystemExit("--turns, --system-tokens and --max-tokens must be positive")

    on = conversation(args, [])
    off = conversation(args, ["--disable-radix-cache"])
    print("turn  prompt_tokens  ttft_ms(cache)  ttft_ms(--disable-radix-cache)  ratio")
    for t in range(args.turns):
        a, b = on["turns"][t], off["turns"][t]
        print(f"{t + 1:4d}  {a['prompt_tokens']:13d}  {a['ttft_ms']:14.1f}  {b['ttft_ms']:29.1f}  "
              f"{b['ttft_ms'] / a['ttft_ms']:5.1f}")

    def later(r):
        xs = sorted(x["ttft_ms"] for x in r["turns"][1:]) or [r["turns"][0]["ttft_ms"]]
        return xs[len(xs) // 2]

    print(f"median TTFT of turns 2..{args.turns}: {later(on):.1f} ms with the prefix cache, {later(off):.1f} ms "
          f"without: {later(off) / later(on):.1f}x")
    print(f"prefix cache hit rate {on['hit_rate']:.3f}; prompt tokens prefilled {on['prefilled']:.0f} vs "
          f"{off['prefilled']:.0f}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": platform.processor(),
                       "cores": os.cpu_count(), "options": vars(args), "cache": on, "no_cache": off}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
