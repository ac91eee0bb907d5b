#!/usr/bin/env python3
"""Hugging Face transformers prefill peer at the real Qwen3-30B-A3B shape, random bf16 weights on the GPU.

What it measures: one forward of a single prompt of S random ids through Qwen3MoeForCausalLM with
--layers decoder layers (attn_implementation="sdpa", experts_implementation="grouped_mm",
torch.inference_mode, use_cache=True as in a real prefill, logits_to_keep=1). The decoder layers are
timed with CUDA events recorded by hooks on the first and last layer; the whole forward is timed too.
The 48-layer prefill time is extrapolated as  layers_ms * 48 / layers + (total_ms - layers_ms),  i.e.
the embedding, final norm and LM head (one token) are counted once.

FLOPs (written into the output as well):
  per-token linear FLOPs per layer = 2*H*(Hq*D + 2*Hkv*D)   q/k/v projections
                                   + 2*Hq*D*H               o projection
                                   + 2*H*E                  router
                                   + k * 3 * 2*H*I          k experts, gate/up/down
  FLOPs(S) = 48 * linear * S + 48 * 4*Hq*D * S^2/2          causal attention (QK^T and PV)
with H=2048, Hq=32, Hkv=4, D=128, E=128, k=8, I=768 (the LM head of the last token is left out).
MFU = FLOPs(S) / extrapolated 48-layer time / measured bf16 GEMM peak (torch.matmul 8192^3, same run).

Usage:  python3 bench/hf_prefill.py --seq 4096,16384,32768 [--layers 4] [--reps 3] [--json OUT]
"""

import argparse
import json
import statistics
import sys
import time

QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
FULL_LAYERS = 48
INIT_STD = 0.02
# The embedding gets std 1 so that each token's own embedding dominates the residual stream: with all
# weights at 0.02 the attention output (an average over the prefix, nearly the same vector for every
# token) dominates instead, every token picks the same experts and one expert gets ~5x its share,
# which a trained, load-balanced model does not do. The balance is measured and reported.
EMBED_STD = 1.0


def log(msg):
    print(msg, flush=True)


def linear_flops_per_token_layer(c):
    h, hq, hkv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    e, k, i = c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]
    qkv = 2 * h * (hq * d + 2 * hkv * d)
    o = 2 * hq * d * h
    router = 2 * h * e
    experts = k * 3 * 2 * h * i
    return qkv + o + router + experts


def attention_flops_layer(c, s):
    # QK^T and PV, 2 FLOPs per multiply-add each, causal half of the S x S square.
    return 4 * c["num_attention_heads"] * c["head_dim"] * s * s / 2


def prefill_flops(c, s, layers=FULL_LAYERS):
    return layers * linear_flops_per_token_layer(c) * s + layers * attention_flops_layer(c, s)


def measure_gemm_peak(torch, n=8192, warmup=3, reps=10):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.matmul(a, b)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    ms = statistics.median(times)
    del a, b
    return 2 * n ** 3 / (ms * 1e-3) / 1e12, ms


def build_model(torch, transformers, layers, max_seq):
    cfg = dict(QWEN3_30B_A3B)
    cfg["num_hidden_layers"] = layers
    cfg["max_position_embeddings"] = max(40960, max_seq)
    config = transformers.Qwen3MoeConfig(**cfg)
    t0 = time.time()
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa", experts_implementation="grouped_mm")
    model.eval()
    # Explicit random init (not zeros, not the meta device): routing must be data-dependent.
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type != "cuda" or p.dtype != torch.bfloat16:
                sys.exit(f"hf_prefill: parameter {name} is {p.dtype} on {p.device}, expected bf16 on cuda")
            if p.ndim == 1:
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, EMBED_STD, generator=gen)
            else:
                p.normal_(0.0, INIT_STD, generator=gen)
    for buf_name, buf in model.named_buffers():
        if buf.device.type != "cuda":
            sys.exit(f"hf_prefill: buffer {buf_name} is on {buf.device}, expected cuda")
    if model.config._attn_implementation != "sdpa":
        sys.exit(f"hf_prefill: attention implementation is {model.config._attn_implementation}, expected sdpa")
    if model.config._experts_implementation != "grouped_mm":
        sys.exit(f"hf_prefill: experts implementation is {model.config._experts_implementation}, expected grouped_mm")
    torch.cuda.synchronize()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {layers} layers, {n_params / 1e9:.2f} B params, {torch.cuda.memory_allocated() / 2**30:.1f} GiB, "
        f"attn={model.config._attn_implementation}, experts={model.config._experts_implementation}, "
        f"built in {time.time() - t0:.1f} s")
    return model, cfg


def run_once(torch, model, ids):
    """One prefill forward; returns (total_ms, layers_ms)."""
    ev = {k: torch.cuda.Event(enable_timing=True) for k in ("start", "layers_start", "layers_end", "end")}
    layers = model.model.layers
    h1 = layers[0].register_forward_pre_hook(lambda *_: ev["layers_start"].record())
    h2 = layers[-1].register_forward_hook(lambda *_: ev["layers_end"].record())
    try:
        ev["start"].record()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        ev["end"].record()
        ev["end"].synchronize()
    finally:
        h1.remove()
        h2.remove()
    if out.logits.shape[1] != 1:
        sys.exit(f"hf_prefill: expected logits for 1 position, got {tuple(out.logits.shape)}")
    if not torch.isfinite(out.logits).all():
        sys.exit("hf_prefill: non-finite logits (bad init?)")
    return ev["start"].elapsed_time(ev["end"]), ev["layers_start"].elapsed_time(ev["layers_end"])


def routing_balance(torch, model, ids):
    """Max / mean tokens per expert, worst layer, and idle experts: the random routing must be balanced
    like a trained model's, or the grouped GEMMs run a different (skewed) problem."""
    counts = []
    hooks = []
    for layer in model.model.layers:
        gate = layer.mlp.gate
        hooks.append(gate.register_forward_hook(lambda _m, _i, out, n=gate.num_experts: counts.append(
            torch.bincount(out[2].reshape(-1), minlength=n).float())))
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    worst = max((c.max() / c.mean()).item() for c in counts)
    idle = max(int((c == 0).sum()) for c in counts)
    return worst, idle


def bench_length(torch, model, cfg, s, layers, reps, peak_tflops, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed + s)
    ids = torch.randint(0, cfg["vocab_size"], (1, s), device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        imbalance, idle = routing_balance(torch, model, ids)
        run_once(torch, model, ids)  # warm-up (kernel selection, allocator)
        runs = [run_once(torch, model, ids) for _ in range(reps)]
    total_ms = statistics.median(r[0] for r in runs)
    layers_ms = statistics.median(r[1] for r in runs)
    other_ms = max(total_ms - layers_ms, 0.0)
    extrap_s = (layers_ms * FULL_LAYERS / layers + other_ms) / 1e3
    flops = prefill_flops(cfg, s)
    tflops = flops / extrap_s / 1e12
    return {
        "seq": s,
        "status": "ok",
        "layers_ms": round(layers_ms, 3),
        "total_ms": round(total_ms, 3),
        "non_layer_ms": round(other_ms, 3),
        "runs_layers_ms": [round(r[1], 3) for r in runs],
        "extrapolated_48_layer_s": round(extrap_s, 4),
        "tokens_per_s": round(s / extrap_s, 1),
        "flops_48_layers": flops,
        "tflops": round(tflops, 1),
        "mfu": round(tflops / peak_tflops, 4),
        "routing_max_over_mean_worst_layer": round(imbalance, 2),
        "idle_experts_worst_layer": idle,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="4096,16384,32768", help="comma-separated prompt lengths")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers to instantiate and time")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per length (median, >= 3)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    seqs = [int(x) for x in args.seq.split(",") if x.strip()]
    if not seqs or min(seqs) < 1:
        sys.exit(f"hf_prefill: bad --seq {args.seq!r}")
    if args.reps < 3:
        sys.exit("hf_prefill: --reps must be >= 3")
    if not 1 <= args.layers <= FULL_LAYERS:
        sys.exit(f"hf_prefill: --layers must be in 1..{FULL_LAYERS}")

    import torch
    import transformers
    if not torch.cuda.is_available():
        sys.exit("hf_prefill: needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    log(f"hf_prefill: torch {torch.__version__}, transformers {transformers.__version__}, {card}")
    peak_tflops, gemm_ms = measure_gemm_peak(torch)
    log(f"bf16 GEMM peak (torch.matmul 8192^3, median of 10): {peak_tflops:.0f} TFLOP/s ({gemm_ms:.3f} ms)")

    model, cfg = build_model(torch, transformers, args.layers, max(seqs))
    lin = linear_flops_per_token_layer(cfg)
    formula = (f"FLOPs(S) = {FULL_LAYERS}*{lin}*S + {FULL_LAYERS}*4*{cfg['num_attention_heads']}*{cfg['head_dim']}*S^2/2 "
               f"(linear per token per layer {lin / 1e6:.2f} MFLOP: qkv+o+router+{cfg['num_experts_per_tok']} experts; "
               "causal attention; LM head excluded)")
    log(formula)

    results = []
    for s in seqs:
        try:
            r = bench_length(torch, model, cfg, s, args.layers, args.reps, peak_tflops, args.seed)
        except torch.OutOfMemoryError as e:
            r = {"seq": s, "status": "oom", "error": str(e).splitlines()[0]}
            log(f"S={s}: SKIPPED, out of GPU memory ({r['error']})")
        torch.cuda.empty_cache()
        results.append(r)
        if r["status"] == "ok":
            log(f"S={s}: layers {r['layers_ms']:.1f} ms ({args.layers} layers), total {r['total_ms']:.1f} ms, "
                f"48-layer {r['extrapolated_48_layer_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s, "
                f"{r['tflops']:.0f} TFLOP/s, MFU {100 * r['mfu']:.1f}%; routing max/mean tokens per expert "
                f"{r['routing_max_over_mean_worst_layer']} (worst layer)")

    log("")
    log(f"HF transformers {transformers.__version__} prefill, Qwen3-30B-A3B shape, {card}, "
        f"{args.layers} timed layers extrapolated to {FULL_LAYERS}, GEMM peak {peak_tflops:.0f} TFLOP/s")
    log(f"{'S':>7} {'layers ms':>10} {'total ms':>9} {'48L s':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8}")
    for r in results:
        if r["status"] != "ok":
            log(f"{r['seq']:>7} {r['status'].upper():>10}")
            continue
        log(f"{r['seq']:>7} {r['layers_ms']:>10.1f} {r['total_ms']:>9.1f} {r['extrapolated_48_layer_s']:>8.3f} "
            f"{r['tokens_per_s']:>9.0f} {r['tflops']:>8.0f} {100 * r['mfu']:>5.1f}% {r['peak_mem_gib']:>8.1f}")
    log(formula)

    if args.json:
        doc = {
            "benchmark": "hf_prefill",
            "card": card,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shape": {k: v for k, v in cfg.items() if k != "num_hidden_layers"},
            "timed_layers": args.layers,
            "extrapolated_layers": FULL_LAYERS,
            "attn_implementation": "sdpa",
            "experts_implementation": "grouped_mm",
            "init_std": INIT_STD,
            "embed_std": EMBED_STD,
            "reps": args.reps,
            "gemm_peak_tflops": round(peak_tflops, 1),
            "flops_formula": formula,
            "extrapolation": "layers_ms * 48 / layers + (total_ms - layers_ms)",
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
