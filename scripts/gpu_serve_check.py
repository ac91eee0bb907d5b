#!/usr/bin/env python3
"""Smoke check of `cpinfer serve` on GPUs (standard library only; run on the GPU machine).

    python3 scripts/gpu_serve_check.py --bin build-gpu/cpinfer --model DIR [--gpus 2]

Starts the server on one GPU, then (with --gpus 2) on two GPUs with CP=2, and checks over HTTP:
/health, a chat completion, that the same seed gives the same sampled text twice and a different
seed another one (tokens are drawn on the GPU), that streaming gives the same text as the
non-streamed request, a long prompt (split over the CP ranks with CP=2) answered the same twice,
and a clean exit on SIGTERM. Exits non-zero on the first failure, printing what differed.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def request(url, body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_ready(base, proc, seconds=240):
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode} before it was ready")
        try:
            if request(base + "/health", timeout=2)[0] == 200:
                return time.time() - t0
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    sys.exit("server not ready in time")


def check(cond, msg):
    if not cond:
        sys.exit("FAILED: " + msg)
    print("ok:", msg)


MODEL = {"id": None}


def chat(base, content, **kw):
    body = {"model": MODEL["id"], "messages": [{"role": "user", "content": content}], "max_tokens": 24, **kw}
    status, text = request(base + "/v1/chat/completions", body)
    check(status == 200, f"chat completion answers 200 ({kw})")
    return json.loads(text)["choices"][0]["message"]["content"]


def stream_text(base, content, **kw):
    body = {"model": MODEL["id"], "messages": [{"role": "user", "content": content}], "max_tokens": 24, "stream": True,
            **kw}
    status, text = request(base + "/v1/chat/completions", body)
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for c in json.loads(line[6:])["choices"]:
                out.append(c.get("delta", {}).get("content") or "")
    return "".join(out)


def run(binary, model, extra, port):
    base = f"http://127.0.0.1:{port}"
    cmd = [binary, "serve", "--model-path", model, "--device", "cuda", "--port", str(port), "--log-interval", "0"] + extra
    print("$", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        print(f"ready after {wait_ready(base, proc):.1f} s")
        MODEL["id"] = json.loads(request(base + "/v1/models")[1])["data"][0]["id"]
        a = chat(base, "Hello there", temperature=0.8, seed=7)
        b = chat(base, "Hello there", temperature=0.8, seed=7)
        c = chat(base, "Hello there", temperature=0.8, seed=8)
        check(a == b, "the same seed gives the same sampled text")
        check(a != c, "another seed gives other text")
        check(stream_text(base, "Hello there", temperature=0.8, seed=7) == a, "streamed text equals the plain one")
        g1 = chat(base, "Count: " + " ".join(str(i) for i in range(600)), temperature=0)
        g2 = chat(base, "Count: " + " ".join(str(i) for i in range(600)), temperature=0)
        check(g1 == g2 and len(g1) > 0, "a long greedy prompt (split over the CP ranks when CP > 1) is reproducible")
        return a, g1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        print(out[-1500:])
        check(proc.returncode == 0, f"server drained and exited 0 on SIGTERM (got {proc.returncode})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpus", type=int, default=1)
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    one = run(a.bin, a.model, [], 30123)
    if a.gpus >= 2:
        two = run(a.bin, a.model, ["--attn-cp-size", "2", "--enable-prefill-cp"], 30124)
        # Informational: bf16 results of CP=2 and one GPU differ in rounding, and the demo model's
        # random logits are near-ties, so equal text is likely but not guaranteed.
        print("seeded text equal on 1 and 2 GPUs:", two[0] == one[0])
        print("greedy long prompt, 1 GPU:", repr(one[1][:60]), " 2 GPUs:", repr(two[1][:60]))
    print("all passed")


if __name__ == "__main__":
    main()
