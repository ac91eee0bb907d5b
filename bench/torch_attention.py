#!/usr/bin/env python3
"""torch SDPA causal attention peer at the Qwen3-30B-A3B attention shape (bf16, B=1, 32 q heads, D=128).

For each S and each backend (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION, forced with
torch.nn.attention.sdpa_kernel) it times torch.nn.functional.scaled_dot_product_attention(is_causal=True)
in two forms:
  expanded  K/V materialised to 32 heads (repeat_interleave of the 4 KV heads), as HF's eager path does;
  gqa       the 4 KV heads passed as they are with enable_gqa=True (where the backend supports it).
Median of --reps timed calls (CUDA events) after --warmup calls. TFLOP/s uses the causal count
4 * S^2 * D * H / 2 (QK^T and PV, 2 FLOPs per multiply-add, half the square). Each backend's output is
compared with the first backend that ran (max abs difference) so a broken kernel is visible.

Usage:  python3 bench/torch_attention.py --seq 4096,16384,32768 [--reps 10] [--backends CUDNN_ATTENTION,...] [--json OUT]
"""

import argparse
import json
import statistics
import sys
import time
import warnings

HEADS = 32
KV_HEADS = 4
HEAD_DIM = 128
BACKEND_NAMES = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]


def log(msg):
    print(msg, flush=True)


def causal_flops(s):
    return 4 * s * s * HEAD_DIM * HEADS / 2


def time_call(torch, fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def bench_length(torch, s, backends, warmup, reps, seed, names=BACKEND_NAMES):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(seed + s)
    q = torch.randn(1, HEADS, s, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)  # [B, H, S, D]
    k = torch.randn(1, KV_HEADS, s, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)  # [B, Hkv, S, D]
    v = torch.randn(1, KV_HEADS, s, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    group = HEADS // KV_HEADS
    k_exp = k.repeat_interleave(group, dim=1).contiguous()  # [B, H, S, D]
    v_exp = v.repeat_interleave(group, dim=1).contiguous()
    forms = {
        "expanded": lambda: F.scaled_dot_product_attention(q, k_exp, v_exp, is_causal=True),
        "gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    flops = causal_flops(s)
    rows = []
    reference = None
    for name in names:
        backend = backends[name]
        for form, fn in forms.items():
            row = {"seq": s, "backend": name, "form": form}
            caught = []
            try:
                with sdpa_kernel([backend]), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = fn()
                    torch.cuda.synchronize()
                    if not torch.isfinite(out).all():
                        raise RuntimeError("non-finite output")
                    if reference is None:
                        reference = out.float()
                        row["max_abs_diff_vs_first"] = 0.0
                    else:
                        row["max_abs_diff_vs_first"] = float(f"{(out.float() - reference).abs().max().item():.3g}")
                    del out
                    ms = time_call(torch, fn, warmup, reps)
                row.update(status="ok", ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 1))
            except torch.OutOfMemoryError as e:
                row.update(status="oom", error=str(e).splitlines()[0])
            except RuntimeError as e:
                # sdpa_kernel raises "No available kernel" when the backend rejects these inputs; the reason
                # comes as a UserWarning just before.
                reasons = [str(w.message).split(". ")[0] for w in caught or []]
                row.update(status="unsupported", error="; ".join(reasons + [str(e).strip().splitlines()[0]])[:300])
            torch.cuda.empty_cache()
            rows.append(row)
            if row["status"] == "ok":
                log(f"S={s:>6} {name:<20} {form:<9} {row['ms']:>9.3f} ms {row['tflops']:>7.1f} TFLOP/s "
                    f"(max |diff| vs first {row['max_abs_diff_vs_first']})")
            else:
                log(f"S={s:>6} {name:<20} {form:<9} {row['status'].upper()}: {row['error']}")
    del q, k, v, k_exp, v_exp, reference
    torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="4096,16384,32768", help="comma-separated sequence lengths")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per case (median, >= 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--backends", default=",".join(BACKEND_NAMES),
                        help="comma-separated subset of " + ", ".join(BACKEND_NAMES))
    args = parser.parse_args()
    names = [x for x in args.backends.split(",") if x]
    if not names or any(n not in BACKEND_NAMES for n in names):
        sys.exit(f"torch_attention: bad --backends {args.backends!r}")
    seqs = [int(x) for x in args.seq.split(",") if x.strip()]
    if not seqs or min(seqs) < 1:
        sys.exit(f"torch_attention: bad --seq {args.seq!r}")
    if args.reps < 10:
        sys.exit("torch_attention: --reps must be >= 10")

    import torch
    from torch.nn.attention import SDPBackend
    if not torch.cuda.is_available():
        sys.exit("torch_attention: needs a CUDA GPU")
    backends = {}
    for name in BACKEND_NAMES:
        if not hasattr(SDPBackend, name):
            sys.exit(f"torch_attention: this torch has no SDPBackend.{name}")
        backends[name] = getattr(SDPBackend, name)
    card = torch.cuda.get_device_name()
    log(f"torch_attention: torch {torch.__version__}, {card}, cuDNN {torch.backends.cudnn.version()}; "
        f"B=1, H={HEADS} (KV {KV_HEADS}), D={HEAD_DIM}, bf16, causal")

    rows = []
    for s in seqs:
        rows.extend(bench_length(torch, s, backends, args.warmup, args.reps, args.seed, names))

    log("")
    log(f"torch SDPA causal attention, {card}, torch {torch.__version__}; TFLOP/s = 4*S^2*D*H/2 / time")
    log(f"{'S':>7} {'backend':<20} {'form':<9} {'ms':>10} {'TFLOP/s':>8}")
    for r in rows:
        if r["status"] == "ok":
            log(f"{r['seq']:>7} {r['backend']:<20} {r['form']:<9} {r['ms']:>10.3f} {r['tflops']:>8.1f}")
        else:
            log(f"{r['seq']:>7} {r['backend']:<20} {r['form']:<9} {r['status'].upper():>10}")

    if args.json:
        doc = {
            "benchmark": "torch_attention",
            "card": card,
            "torch_version": torch.__version__,
            "cudnn_version": torch.backends.cudnn.version(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shape": {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
                      "causal": True},
            "flops_formula": "4 * S^2 * D * H / 2",
            "reps": args.reps,
            "warmup": args.warmup,
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
