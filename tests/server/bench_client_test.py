#!/usr/bin/env python3
"""bench/serving: run.sh starts `cpinfer serve` on a tiny demo model and runs the python3 client
(bench_serving.py) and, when node is here, the node client (bench_serving.mjs) with the same flags.
Both must complete every request and count the same input and output tokens, which must equal the
lengths the seeded generator draws (so the two scripts send the same prompts); sampled requests
(--extra-request-body) complete; `serve --random-weights` serves; a server that is not there, or an
--extra-request-body that is not a JSON object, is a clear error; run.sh --concurrency runs the
client once per level against one server.

usage: bench_client_test.py CPINFER_BINARY WORK_DIR
"""
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(ROOT, "bench", "serving"))
from cli_check import check, finish, run  # noqa: E402
from bench_serving import Mulberry32, make_requests  # noqa: E402


def main():
    binary, work = sys.argv[1], sys.argv[2]
    model = os.path.join(work, "bench-client-demo")
    shutil.rmtree(model, ignore_errors=True)
    run([binary, "-q", "demo-model", "--out", model, "--layers", "1", "--hidden", "64", "--experts", "4"])
    flags = ["--num-prompts", "8", "--input-len", "40", "--output-len", "6", "--range-ratio", "0.5", "--seed", "3",
             "--request-rate", "50", "--max-concurrency", "3"]
    want = make_requests(8, 40, 6, 0.5, 50000, Mulberry32(3))
    want_in = sum(len(r["prompt"]) for r in want)
    want_out = sum(r["max_tokens"] for r in want)
    check(len({len(r["prompt"]) for r in want}) > 1, "--range-ratio 0.5 draws prompts of several lengths")
    clients = ["py"] + (["node"] if shutil.which("node") else [])
    for client in clients:
        p = run([os.path.join(ROOT, "bench", "serving", "run.sh"), "--bin", binary, "--serve",
                 f"--model-path {model}", "--client", client, "--"] + flags)
        j = json.loads(p.stdout.strip().splitlines()[-1])
        check(j["completed"] == 8 and j["failed"] == 0, f"{client}: 8 of 8 requests completed")
        check(j["total_input_tokens"] == want_in, f"{client}: {j['total_input_tokens']} input tokens == {want_in} drawn")
        check(j["total_output_tokens"] == want_out,
              f"{client}: {j['total_output_tokens']} output tokens == {want_out} asked (ignore_eos)")
        check(0 < j["ttft_ms"]["median"] <= j["e2e_ms"]["median"] and j["tpot_ms"]["mean"] > 0,
              f"{client}: TTFT, TPOT and E2E measured")
    # Sampled requests: --extra-request-body's fields go into every request (both clients).
    extra = ["--extra-request-body", '{"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 5}']
    for client in clients:
        p = run([os.path.join(ROOT, "bench", "serving", "run.sh"), "--bin", binary, "--serve",
                 f"--model-path {model}", "--client", client, "--"] + flags + extra)
        j = json.loads(p.stdout.strip().splitlines()[-1])
        check(j["completed"] == 8 and j["failed"] == 0 and j["total_output_tokens"] == want_out,
              f"{client}: sampled requests (--extra-request-body) complete with every token")
    # --concurrency: one server, the client once per level (--max-concurrency C, --num-prompts
    # max(8, K·C)), each run's JSON line after its "== concurrency C" line.
    level_flags = ["--input-len", "40", "--output-len", "6", "--seed", "3"]
    p = run([os.path.join(ROOT, "bench", "serving", "run.sh"), "--bin", binary, "--serve", f"--model-path {model}",
             "--client", "py", "--concurrency", "1 3 5", "--prompts-per-level", "2", "--"] + level_flags)
    out = p.stdout.strip().splitlines()
    levels = [line for line in out if line.startswith("== concurrency")]
    runs = [json.loads(line) for line in out if line.startswith("{")]
    check(levels == ["== concurrency 1 (8 prompts)", "== concurrency 3 (8 prompts)", "== concurrency 5 (10 prompts)"],
          f"--concurrency: one run per level, max(8, 2·C) prompts each ({levels})")
    check([(j["max_concurrency"], j["num_prompts"], j["completed"]) for j in runs] == [(1, 8, 8), (3, 8, 8), (5, 10, 10)],
          "--concurrency: every level's requests completed at its concurrency")
    check(p.stderr.count("ready: serving") == 1, "--concurrency: the server started once for all levels")
    for bad, why in ((["--concurrency", "4 x"], "--concurrency takes positive integers, got 'x'"),
                     (["--concurrency", "4", "--prompts-per-level", "0"], "--prompts-per-level takes positive")):
        p = subprocess.run([os.path.join(ROOT, "bench", "serving", "run.sh"), "--bin", binary] + bad + ["--"],
                           capture_output=True, text=True, timeout=60)
        check(p.returncode == 2 and why in p.stderr, f"run.sh {' '.join(bad)} is refused before any server starts")
    for body, why in (("[1]", "must be a JSON object"), ("{temperature", "is not JSON")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serving", "bench_serving.py"),
                            "--extra-request-body", body], capture_output=True, text=True, timeout=60)
        check(p.returncode == 2 and why in p.stderr and "Traceback" not in p.stderr,
              f"--extra-request-body {body!r} is refused: {why}")
    # A server on random weights at the demo's shape (no checkpoint read) with the Qwen3 tokenizer.
    p = run([os.path.join(ROOT, "bench", "serving", "run.sh"), "--bin", binary, "--serve",
             f"--random-weights {os.path.join(model, 'config.json')}", "--client", "py", "--"] + flags)
    j = json.loads(p.stdout.strip().splitlines()[-1])
    check(j["completed"] == 8 and j["total_output_tokens"] == want_out and j["model"].startswith("random:"),
          "serve --random-weights CONFIG: every request completed, served as random:...")
    if "node" not in clients:
        print("note: node not found, the node client is not compared")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serving", "bench_serving.py"), "--base-url",
                        "http://127.0.0.1:9", "--num-prompts", "1"], capture_output=True, text=True, timeout=60)
    check(p.returncode != 0 and "/v1/models at 127.0.0.1:9" in p.stderr and "Traceback" not in p.stderr,
          "no server: a one-line error, no traceback")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serving", "bench_serving.py"),
                        "--request-rate", "0"], capture_output=True, text=True, timeout=60)
    check(p.returncode == 2 and "--request-rate must be > 0 or inf" in p.stderr, "--request-rate 0 is refused")
    finish()


if __name__ == "__main__":
    main()
