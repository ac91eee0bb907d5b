#!/usr/bin/env python3
"""`cpinfer bench decode` and `bench prefill` through the built binary on a tiny demo model (both
run the serving step loop, engine/bench_loop.h). Decode: the rows it reports (one per batch x
context, skipped when the KV does not fit, with the loop's never_fits reason when one sequence
cannot), the bytes a step reads as the formula in apps/bench_decode.cpp gives them for this shape,
tokens/s and GB/s consistent with the step time, sampled decode (--temperature / --top-k / --top-p /
--min-p, reported in the JSON; greedy by default), and clear errors for bad flags. Prefill: one row
per length x CP size (CP 2 through the step protocol on two thread ranks) with the per-op profile,
and a clear error for a prompt the KV cache cannot hold.

usage: cli_bench_test.py CPINFER_BINARY WORK_DIR
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cli_check import check, finish, run  # noqa: E402


def main():
    binary, work = sys.argv[1], sys.argv[2]
    model = os.path.join(work, "bench-demo")
    shutil.rmtree(model, ignore_errors=True)
    run([binary, "-q", "demo-model", "--out", model, "--layers", "2", "--hidden", "64", "--experts", "4"])
    cfg = json.load(open(os.path.join(model, "config.json")))

    bench = [binary, "-q", "bench", "decode", "--model-path", model, "--steps", "2", "--warmup", "1", "--json"]
    j = json.loads(run(bench + ["--batch", "1,3", "--context", "16,100"]).stdout)
    rows = j["results"]
    check([(r["batch"], r["context"]) for r in rows] == [(1, 16), (3, 16), (1, 100), (3, 100)],
          "one row per context x batch, in that order")
    check(j["copy_gbps"] > 0, "the copy bandwidth is measured")
    H, L, Hq, Hkv, D = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"], cfg["head_dim"]
    E, k, I, V = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["vocab_size"]
    for r in rows:
        B, C = r["batch"], r["context"]
        ok = all(x in r for x in ("step_s", "tokens_per_s", "achieved_gbps")) and r["step_s"] > 0
        check(ok, f"batch {B} context {C}: timed")
        if not ok:
            continue
        check(abs(r["tokens_per_s"] - B / r["step_s"]) <= 1e-9 * r["tokens_per_s"], f"batch {B}: tokens/s = batch / step")
        # The CPU back-end keeps the KV cache in F32: 4 bytes per value.
        kv = B * (C + 1) * L * 2 * Hkv * D * 4
        check(r["kv_bytes"] == kv, f"batch {B} context {C}: KV bytes {r['kv_bytes']} == {kv}")
        w = L * (H * (Hq * D + 2 * Hkv * D) + Hq * D * H + H * E) * 2 + V * H * 2
        check(abs(r["weight_bytes"] - w) <= 1e-6 * w, f"batch {B}: weight bytes {r['weight_bytes']} == {w}")
        touched = E * (1 - (1 - k / E) ** B)
        ex = L * touched * 3 * H * I * 2
        check(abs(r["expert_bytes"] - ex) <= 1e-6 * ex, f"batch {B}: expert bytes under uniform routing")
        total = r["kv_bytes"] + r["weight_bytes"] + r["expert_bytes"]
        check(abs(r["achieved_gbps"] - total / r["step_s"] / 1e9) <= 1e-6 * r["achieved_gbps"],
              f"batch {B} context {C}: GB/s = bytes / step")

    # A cache too small for batch 3 at context 100 skips that pair and runs the others.
    small = json.loads(run(bench + ["--batch", "1,3", "--context", "100", "--kv-cache-tokens", "256"]).stdout)
    r1, r3 = small["results"]
    check("step_s" in r1 and "skipped" not in r1, "batch 1 x 100 fits 256 positions and runs")
    check("skipped" in r3 and "step_s" not in r3, "batch 3 x 100 does not fit 256 positions: skipped")
    # One sequence longer than the whole cache: the loop's never_fits reason, and the other rows run.
    huge = json.loads(run(bench + ["--batch", "1", "--context", "300,16", "--kv-cache-tokens", "256"]).stdout)
    rh, rs = huge["results"]
    check("exceed the KV cache capacity of 256" in rh.get("skipped", ""), f"context 300 > 256 positions: {rh}")
    check("step_s" in rs, "context 16 still runs after a skipped row")

    prefill = [binary, "-q", "bench", "prefill", "--model-path", model, "--warmup", "0", "--repeats", "1", "--json"]
    p = json.loads(run(prefill + ["--seq", "9,40", "--attn-cp-size", "1,2"]).stdout)
    prow = p["results"]
    check([(r["seq"], r["cp"]) for r in prow] == [(9, 1), (40, 1), (9, 2), (40, 2)], "one prefill row per cp x seq")
    for r in prow:
        S, cp = r["seq"], r["cp"]
        check(r["ttft_s"] > 0 and abs(r["tokens_per_s"] - S / r["ttft_s"]) <= 1e-6 * r["tokens_per_s"],
              f"prefill {S} cp {cp}: timed, tokens/s = seq / ttft")
        ops = r["attention_s"] + r["moe_s"] + r["dense_gemm_s"] + r["other_s"]
        check(ops > 0, f"prefill {S} cp {cp}: the per-op profile of the timed run ({ops})")
        check((r["exposed_comm_s"] >= 0) == (cp > 1), f"prefill {S} cp {cp}: exposed communication only with CP")
    # Attention TP: two ranks, one CP group of one, the heads split over the two.
    tp = json.loads(run(prefill + ["--seq", "40", "--world-size", "2", "--attn-cp-size", "1"]).stdout)["results"]
    check([(r["cp"], r["attn_tp"], r["ranks"]) for r in tp] == [(1, 2, 2)],
          f"bench prefill --world-size 2 --attn-cp-size 1 runs attention TP 2 on 2 ranks: {tp}")
    check(tp[0]["ttft_s"] > 0 and tp[0]["exposed_comm_s"] >= 0, "attention TP: timed, exposed communication measured")
    p = run(prefill + ["--seq", "300", "--kv-cache-tokens", "256"], expect_ok=False)
    check(p.returncode != 0 and "exceed the KV cache capacity of 256" in p.stderr,
          f"a prompt longer than the cache fails clearly: {p.stderr.strip()}")

    table = run([binary, "-q", "bench", "decode", "--model-path", model, "--steps", "1", "--batch", "2",
                 "--context", "8"]).stdout
    check("tok/s" in table and "%copy" in table, "the table has its header")
    check("sampling: greedy" in table, "greedy unless asked")

    # Sampled decode (what a serving request with a temperature costs): the parameters reported.
    sampled = json.loads(run(bench + ["--batch", "2", "--context", "16", "--temperature", "0.7", "--top-k", "20",
                                      "--top-p", "0.8", "--min-p", "0.05"]).stdout)
    want = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.05}
    check(all(abs(sampled["sampling"][k] - v) < 1e-6 for k, v in want.items()),
          f"the sampling parameters in the JSON: {sampled['sampling']}")
    check(sampled["results"][0].get("step_s", 0) > 0, "a sampled decode row is timed")
    check(j["sampling"]["temperature"] == 0, "the default is greedy (temperature 0)")

    bad = [
        (["--batch", "0"], "--batch: '0' is not a positive integer"),
        (["--context", "8x"], "--context: '8x' is not a positive integer"),
        (["--random-weights", "qwen3-30b-a3b"], "exactly one of --model-path and --random-weights"),
        (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (["--temperature", "-1"], "temperature must be >= 0, got -1"),
    ]
    for extra, want in bad:
        p = run(bench + extra, expect_ok=False)
        check(p.returncode != 0 and want in p.stderr, f"{' '.join(extra)}: fails saying {want!r}")
    finish()


if __name__ == "__main__":
    main()
