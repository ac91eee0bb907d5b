#!/usr/bin/env python3
"""Online serving benchmark for an OpenAI-compatible server (cpinfer serve, SGLang, vLLM) in
python3's standard library only, for machines without node (the GPU machine). The same benchmark
as bench_serving.mjs: the same flags, the same seeded prompts (random token ids, lengths, Poisson
arrivals), the same metrics (TTFT, TPOT, ITL and end-to-end latency: mean, median, p99;
throughput), the same table and JSON line.

  python3 bench/serving/bench_serving.py --base-url http://127.0.0.1:30000 --num-prompts 64 \\
      --request-rate 4 --input-len 512 --output-len 64 [--max-concurrency 16] [--output-file out.json] \\
      [--extra-request-body '{"temperature": 0.7, "top_p": 0.8}']

Requests are greedy (temperature 0) unless --extra-request-body (sglang.bench_serving's flag) gives a
JSON object whose fields are merged into every request's body (sampling parameters, e.g.).
"""
import argparse
import http.client
import json
import math
import os
import sys
import threading
import time
import urllib.parse


class Mulberry32:
    """bench_serving.mjs's seeded generator, bit for bit: both scripts draw the same prompts."""

    def __init__(self, seed):
        self.state = seed & 0xFFFFFFFF

    def __call__(self):
        m = 0xFFFFFFFF
        self.state = (self.state + 0x6D2B79F5) & m
        t = self.state
        t = ((t ^ (t >> 15)) * (t | 1)) & m
        t = (t ^ ((t + (((t ^ (t >> 7)) * (t | 61)) & m)) & m)) & m
        return ((t ^ (t >> 14)) & m) / 4294967296.0


def make_requests(n, in_len, out_len, ratio, id_max, rand):
    def length(x):
        return max(1, math.floor(x * ratio + rand() * (x - x * ratio + 1)))

    reqs = []
    for _ in range(n):
        k = min(length(in_len), in_len)
        prompt = [1000 + math.floor(rand() * (id_max - 1000)) for _ in range(k)]
        reqs.append({"prompt": prompt, "max_tokens": min(length(out_len), out_len)})
    return reqs


def stats(xs):
    if not xs:
        return {"mean": 0, "median": 0, "p99": 0}
    s = sorted(xs)

    def q(p):
        i = (len(s) - 1) * p
        lo, hi = math.floor(i), math.ceil(i)
        return s[lo] + (s[hi] - s[lo]) * (i - lo)

    return {"mean": sum(s) / len(s), "median": q(0.5), "p99": q(0.99)}


def sse_data(response):
    """The JSON objects of the `data:` events of a streamed http.client response, up to [DONE]; an
    event carrying an error raises RuntimeError."""
    while True:
        line = response.readline()
        if not line:
            return
        line = line.strip()
        if line == b"data: [DONE]":
            return
        if not line.startswith(b"data: "):
            continue
        j = json.loads(line[6:])
        if j.get("error"):
            raise RuntimeError(j["error"].get("message", str(j["error"])))
        yield j


class Client:
    def __init__(self, base_url, api_key, timeout):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SystemExit(f"--base-url must be http(s)://host[:port], got {base_url!r}")
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.timeout = timeout

    def connect(self):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def model_name(self):
        c = self.connect()
        try:
            c.request("GET", self.prefix + "/v1/models", headers=self.headers)
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise SystemExit(f"GET /v1/models: HTTP {r.status}")
            return json.loads(body)["data"][0]["id"]
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
            raise SystemExit(f"GET {self.prefix}/v1/models at {self.host}:{self.port}: {e or type(e).__name__}")
        finally:
            c.close()

    def send(self, model, req, extra=None):
        """One streaming completion; times every SSE chunk that carries text (in ms)."""
        out = {"ok": False, "input_len": len(req["prompt"]), "output_len": 0, "ttft": 0.0, "itl": [], "e2e": 0.0,
               "error": ""}
        body = json.dumps({"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"],
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}, **(extra or {})})
        t0 = time.perf_counter()
        c = self.connect()
        try:
            c.request("POST", self.prefix + "/v1/completions", body=body,
                      headers={**self.headers, "Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {r.read()[:200].decode(errors='replace')}")
            first, last = True, t0
            for j in sse_data(r):
                if j.get("usage"):
                    out["output_len"] = j["usage"]["completion_tokens"]
                ch = j.get("choices") or []
                if not ch or not ch[0].get("text"):
                    continue
                now = time.perf_counter()
                if first:
                    out["ttft"] = (now - t0) * 1e3
                    first = False
                else:
                    out["itl"].append((now - last) * 1e3)
                last = now
            out["e2e"] = (time.perf_counter() - t0) * 1e3
            out["ok"] = True
        except Exception as e:  # a failed request is counted and reported, not fatal
            out["error"] = str(e) or type(e).__name__
        finally:
            c.close()
        return out


def positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"--{name} must be a positive integer, got {s!r}")
        return v
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description="Online serving benchmark (python3 stdlib); see the module docstring.")
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--num-prompts", type=positive_int("num-prompts"), default=64)
    p.add_argument("--request-rate", default="inf", help="requests/s of the Poisson arrivals, or inf (all at once)")
    p.add_argument("--max-concurrency", type=int, default=0, help="at most this many requests in flight (0: no limit)")
    p.add_argument("--input-len", type=positive_int("input-len"), default=512)
    p.add_argument("--output-len", type=positive_int("output-len"), default=64)
    p.add_argument("--range-ratio", type=float, default=1.0, help="lengths drawn from [len * ratio, len]")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--output-file")
    p.add_argument("--token-id-max", type=int, default=50000)
    p.add_argument("--timeout", type=float, default=3600, help="seconds a request may wait for bytes")
    p.add_argument("--extra-request-body", default="{}",
                   help="a JSON object merged into every request's body (e.g. sampling parameters)")
    a = p.parse_args(argv)
    try:
        extra = json.loads(a.extra_request_body)
    except ValueError as e:
        p.error(f"--extra-request-body is not JSON: {e}")
    if not isinstance(extra, dict):
        p.error("--extra-request-body must be a JSON object")
    try:
        rate = math.inf if a.request_rate == "inf" else float(a.request_rate)
    except ValueError:
        rate = -1
    if not rate > 0:
        p.error("--request-rate must be > 0 or inf")
    if not 0 < a.range_ratio <= 1:
        p.error("--range-ratio must be in (0, 1]")
    if a.max_concurrency < 0:
        p.error("--max-concurrency must be >= 0")
    if a.token_id_max <= 1000:
        p.error("--token-id-max must be > 1000")

    rand = Mulberry32(a.seed)
    requests = make_requests(a.num_prompts, a.input_len, a.output_len, a.range_ratio, a.token_id_max, rand)
    client = Client(a.base_url, a.api_key, a.timeout)
    model = a.model or client.model_name()
    print(f"[bench] {a.num_prompts} requests, input {a.input_len}, output {a.output_len}, rate {a.request_rate}, "
          f"model {model}, {a.base_url}", file=sys.stderr)

    results = [None] * len(requests)
    slots = threading.Semaphore(a.max_concurrency) if a.max_concurrency > 0 else None
    threads = []

    def job(i):
        try:
            results[i] = client.send(model, requests[i], extra)
        finally:
            if slots:
                slots.release()

    t0 = time.perf_counter()
    for i in range(len(requests)):
        if slots:
            slots.acquire()
        th = threading.Thread(target=job, args=(i,), daemon=True)
        th.start()
        threads.append(th)
        if rate != math.inf:
            time.sleep(-math.log(1 - rand()) / rate)
    for th in threads:
        th.join()
    duration = time.perf_counter() - t0

    ok = [r for r in results if r["ok"]]
    in_tok = sum(r["input_len"] for r in ok)
    out_tok = sum(r["output_len"] for r in ok)
    tpot = [(r["e2e"] - r["ttft"]) / (r["output_len"] - 1) for r in ok if r["output_len"] > 1]
    errors = []
    for r in results:
        if not r["ok"] and r["error"] not in errors:
            errors.append(r["error"])
    summary = {
        "backend": "openai-completions", "base_url": a.base_url, "model": model, "num_prompts": a.num_prompts,
        "request_rate": "inf" if rate == math.inf else rate, "max_concurrency": a.max_concurrency or None,
        "input_len": a.input_len, "output_len": a.output_len, "range_ratio": a.range_ratio,
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tok, "total_output_tokens": out_tok,
        "request_throughput": len(ok) / duration, "input_throughput": in_tok / duration,
        "output_throughput": out_tok / duration,
        "ttft_ms": stats([r["ttft"] for r in ok]), "tpot_ms": stats(tpot),
        "itl_ms": stats([x for r in ok for x in r["itl"]]), "e2e_ms": stats([r["e2e"] for r in ok]),
        "errors": errors[:5],
    }
    rows = [("Successful requests", len(ok)), ("Failed requests", summary["failed"]),
            ("Benchmark duration (s)", f"{duration:.2f}"), ("Total input tokens", in_tok),
            ("Total generated tokens", out_tok),
            ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
            ("Input token throughput (tok/s)", f"{summary['input_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}")]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2e_ms")):
        for s in ("mean", "median", "p99"):
            rows.append((f"{s.capitalize()} {name} (ms)", f"{summary[key][s]:.2f}"))
    print("============ Serving Benchmark Result ============")
    for k, v in rows:
        print(k.ljust(40) + str(v).rjust(10))
    print("==================================================")
    print(json.dumps(summary))
    if a.output_file:
        with open(a.output_file, "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    if summary["failed"]:
        print(f"[bench] {summary['failed']} requests failed: {' | '.join(errors[:5])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
