#!/usr/bin/env python3
"""Add fidelity.json to the FP8 fixture (tests/fixtures/moe_fp8): the W8A8 reference's error against
the fp32 truth at every position of many more prompts than reference.json holds, small enough to keep.

Why: on the fixture's five prompts (431 positions) a few positions decide the nmse of an FP8 forward
(a near-tied router or top-2 gap flips and that position's error is 10-100x the median), so which of
two W8A8 forwards is the more faithful is not settled there. fidelity.json holds seeded random
prompts (36 by default, 33 to 300 tokens: ~5,900 positions) and, per position, only what a test needs
to compare another forward's error with the reference's without the logits themselves:

  truth_sq    sum over the vocabulary of truth^2         (nmse denominators; checks a test's truth)
  truth_max   the largest truth logit                    (checks a test's truth)
  truth_gap   top-1 minus top-2 truth logit
  truth_arg   argmax of the truth
  ref_err     sum over the vocabulary of (ref - truth)^2
  ref_arg     argmax of the reference

The truth is transformers' fp32 forward with FineGrainedFP8Config(dequantize=True) on the CPU
(make_fp8_fixture.load_truth: its weights are checked bit for bit against w.float() * scale_inv);
the reference is make_fp8_fixture's W8A8 forward (`--fp8-forward emulate`: transformers' bf16 model
with every quantized product taking its activations e4m3 per (row, 128 columns)). A test takes its
truth from cpinfer's CPU forward of the fixture (fp32 activations, FP8 weights dequantized exactly as
here) after checking it against truth_sq / truth_max / truth_arg.

Runs on the GPU machine after make_fp8_fixture.py, on the fixture as it is (its sha256 must match
reference.json):  python3 tools/make_fp8_fidelity.py --fixture tests/fixtures/moe_fp8
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fp8_rule  # noqa: E402
import make_fp8_fixture as mff  # noqa: E402
from fixture_checkpoint import FixtureError, fail, log  # noqa: E402

LENGTHS = [33, 65, 130, 200, 260, 300]


def dequantized_copy(fixture_dir, deq_dir, torch):
    """The fixture in fp32 with every FP8 weight replaced by codes * scale_inv (tools/fp8_rule.py)."""
    from safetensors.torch import load_file, save_file

    t = load_file(os.path.join(fixture_dir, "model.safetensors"))
    deq = {}
    for k, v in t.items():
        if k.endswith("_scale_inv"):
            continue
        deq[k] = fp8_rule.dequantize(v, t[k + "_scale_inv"], torch) if v.dtype == torch.float8_e4m3fn else \
            v.to(torch.float32)
    os.makedirs(deq_dir)
    save_file(deq, os.path.join(deq_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(fixture_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config")
    cfg["dtype"] = "float32"
    with open(os.path.join(deq_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg


def g(x):
    return float(f"{x:.7g}")


def build(fixture_dir, n_prompts, seed, torch, transformers):
    t0 = time.time()
    with open(os.path.join(fixture_dir, "reference.json")) as f:
        ref = json.load(f)
    weights = os.path.join(fixture_dir, "model.safetensors")
    with open(weights, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != ref["weight_files"]["model.safetensors"]["sha256"]:
        fail(f"{weights} is not the file reference.json describes (sha256 {digest}): run make_fp8_fixture.py first")
    cls = transformers.Qwen3MoeForCausalLM
    tmp = tempfile.mkdtemp(prefix="cpinfer_fp8_fidelity_")
    try:
        deq_dir = os.path.join(tmp, "dequantized_fp32")
        cfg = dequantized_copy(fixture_dir, deq_dir, torch)
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, cfg["vocab_size"], (LENGTHS[i % len(LENGTHS)],), generator=gen).tolist()
                   for i in range(n_prompts)]
        truth_model, truth_info = mff.load_truth(fixture_dir, deq_dir, cls, torch, transformers)
        from safetensors.torch import load_file

        stored = load_file(os.path.join(fixture_dir, "reference_logits.safetensors"))
        with torch.inference_mode():
            for p in ref["prompts"]:  # the truth as make_fp8_fixture.py stored it: same model, same forward
                got = truth_model(input_ids=torch.tensor([p["ids"]])).logits[0].float()
                diff = (got - stored[f"fp32.{p['n_tokens']}"].float()).abs().max().item()
                if diff > 1e-4:
                    fail(f"the truth of the fixture's {p['n_tokens']}-token prompt is {diff:.3g} off the stored one")
                log(f"[{mff.NAME}] truth of the fixture's {p['n_tokens']}-token prompt: {diff:.3g} off the stored one")
            truth = [truth_model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]
        del truth_model
        m, context, desc = mff.fp8_model("emulate", fixture_dir, deq_dir, cls, torch)
        with torch.inference_mode(), context():
            fp8 = [m(input_ids=torch.tensor([p], device="cuda")).logits[0].float().cpu() for p in prompts]
        missing = desc.pop("_names") - desc.pop("_mode").seen
        if missing:
            fail(f"the emulated FP8 forward never intercepted the products of {sorted(missing)[:4]}")
        del m
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    records, d_all, s_all, agree = [], 0.0, 0.0, 0
    for ids, t, r in zip(prompts, truth, fp8):
        top2 = t.topk(2, dim=-1).values
        err = (r.double() - t.double()).pow(2).sum(-1)
        sq = t.double().pow(2).sum(-1)
        d_all += err.sum().item()
        s_all += sq.sum().item()
        agree += int((r.argmax(-1) == t.argmax(-1)).sum().item())
        records.append({"ids": ids, "truth_sq": [g(x) for x in sq.tolist()],
                        "truth_max": [g(x) for x in top2[:, 0].tolist()],
                        "truth_gap": [g(x) for x in (top2[:, 0] - top2[:, 1]).tolist()],
                        "truth_arg": t.argmax(-1).tolist(), "ref_err": [g(x) for x in err.tolist()],
                        "ref_arg": r.argmax(-1).tolist()})
    n_pos = sum(map(len, prompts))
    summary = {"prompts": len(prompts), "positions": n_pos, "nmse": g(d_all / s_all),
               "argmax_agreement": round(agree / n_pos, 4)}
    out = {"fixture": mff.NAME, "format_version": 1, "created_by": "tools/make_fp8_fidelity.py",
           "transformers_version": transformers.__version__, "torch_version": torch.__version__,
           "device": torch.cuda.get_device_name(), "seed": seed, "lengths": LENGTHS,
           "reference_fp32": truth_info, "reference_fp8": desc, "reference_fp8_vs_fp32": summary,
           "prompts": records}
    path = os.path.join(fixture_dir, "fidelity.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    os.chmod(path, 0o644)
    log(f"[{mff.NAME}] fidelity.json: {summary}, {os.path.getsize(path) / 1024:.0f} KiB, {time.time() - t0:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="tests/fixtures/moe_fp8", help="the FP8 fixture directory")
    parser.add_argument("--prompts", type=int, default=36, help="random prompts, lengths cycling through "
                        + ", ".join(map(str, LENGTHS)))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=16, help="CPU threads for the fp32 truth")
    args = parser.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"make_fp8_fidelity.py needs torch, transformers 5.x and safetensors: {e}")
    if not torch.cuda.is_available():
        sys.exit("make_fp8_fidelity.py needs a CUDA GPU (the W8A8 reference runs there, as make_fp8_fixture.py's)")
    mff.exact_torch(torch, transformers, args.threads)
    try:
        build(args.fixture, args.prompts, args.seed, torch, transformers)
    except FixtureError as e:
        sys.exit(f"make_fp8_fidelity.py FAILED: {e}")


if __name__ == "__main__":
    main()
