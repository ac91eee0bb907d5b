#!/usr/bin/env python3
"""Create the tiny fine-grained FP8 Qwen3-MoE fixture `moe_fp8` and its transformers references.

Runs on the GPU machine (torch 2.11, transformers 5.x, one Hopper GPU; no hub access needed).
It writes DIR/moe_fp8/ with config.json (with Qwen3-30B-A3B-FP8's quantization_config),
generation_config.json, model.safetensors (F8_E4M3 linear weights, one tensor per expert, F32
`*.weight_scale_inv` per 128x128 block; embeddings, norms, router and LM head BF16),
reference.json and reference_logits.safetensors (all-position logits of the two references).

1. A random Qwen3-MoE (make_fixtures.py's init) is saved in bf16 by transformers (per-expert layout).
2. Every linear weight is quantized by transformers' fine-grained FP8 rule (tools/fp8_rule.py),
   including the partial blocks transformers' own quantizer leaves alone (k_proj / v_proj are
   64 x 256 here). As a cross-check, transformers quantizes the same bf16 checkpoint on load
   (FineGrainedFP8Config(weight_block_size=(128, 128))) and saves it; what the two files hold
   alike and what differs (scales, codes) is recorded in reference.json (transformers 5.17 differs:
   tests/fixtures/README.md).
3. fp32 truth: a fresh from_pretrained of the FP8 directory with FineGrainedFP8Config(dequantize=True)
   in fp32 on the CPU (eager attention and experts): transformers' fp32 forward of w.float() *
   scale_inv. Its weights must equal our own dequantization bit for bit. If this transformers
   cannot dequantize, the truth is the same forward of our dequantized weights (recorded).
4. FP8 reference: a fresh from_pretrained of the FP8 directory in bf16 on the GPU, transformers'
   own FP8 forward (W8A8 block kernels). Those kernels come from the Hub (`kernels` package); when
   they cannot be loaded the script stops and says so; `--fp8-forward emulate` then computes the
   same W8A8 rule in plain torch instead, recorded as such in reference.json.

Usage:  python3 tools/make_fp8_fixture.py --out tests/fixtures [--fp8-forward transformers|emulate]
See tests/fixtures/README.md and docs/fp8.md.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on the GPU machine: fail fast instead of timing out

import fp8_rule  # noqa: E402
import make_fixtures as mf  # noqa: E402
from fixture_checkpoint import (FixtureError, check_loaded_config, fail, load_saved, log, moe_layers,  # noqa: E402
                                rewrite_config, sha256_file, verify_saved_keys)

NAME = "moe_fp8"
PROMPT_LENGTHS = [1, 7, 33, 130, 260]
mf.PROMPT_LENGTHS = PROMPT_LENGTHS  # make_fixtures' make_prompts and check_spread read its module global
# Hidden 256 and every K a multiple of 128 (transformers' activation quantization needs that), 2 or 3
# blocks per dimension; head_dim 64 with one KV head makes k_proj / v_proj 64 x 256: a partial row
# block (scale_inv [1, 2]), as Qwen3-30B-A3B's are not, that the loaders must read as ceil(N / 128).
# Layer 0 is dense (intermediate 384: down_proj K / 128 = 3), layer 1 has 8 experts top-2 of width 256.
SPEC = dict(
    arch="Qwen3MoeForCausalLM", seed=1008, dialect="v5", expert_layout="per_expert",
    config=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                intermediate_size=384, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0], tie_word_embeddings=False,
                rope_parameters=mf.ROPE_DEFAULT))
NOT_CONVERT = ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in moe_layers(SPEC)]
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [fp8_rule.BLOCK, fp8_rule.BLOCK], "modules_to_not_convert": NOT_CONVERT}
# The FP8 forward against the truth, to catch a broken quantization or forward only: activation
# quantization (e4m3, ~2.6% RMS per element) flips argmaxes wherever the random model's top-2 gap is
# small (bf16 alone flips up to 9% on the other fixtures).
MIN_FP8_ARGMAX_AGREEMENT = 0.6
MAX_FP8_NMSE = 3e-2


def write_checkpoints(src_dir, fixture_dir, deq_dir, torch):
    """The FP8 fixture from the bf16 save, and beside it (deq_dir) the same model in fp32 with every
    quantized weight replaced by our dequantization. Returns (fp8 tensors, fp32 tensors, summary)."""
    from safetensors.torch import load_file, save_file

    src = load_file(os.path.join(src_dir, "model.safetensors"))
    fp8, deq, quantized = {}, {}, []
    for name in sorted(src):
        t = src[name]
        if t.dtype != torch.bfloat16:
            fail(f"{name} in the bf16 save is {t.dtype}")
        if fp8_rule.is_quantized(name, t):
            codes, scale_inv = fp8_rule.quantize(t, torch)
            fp8[name], fp8[name + "_scale_inv"] = codes, scale_inv
            deq[name] = fp8_rule.dequantize(codes, scale_inv, torch)
            n, k = t.shape
            quantized.append([name, n, k, *scale_inv.shape])
        else:
            fp8[name] = t.contiguous()
            deq[name] = t.to(torch.float32)
    fp8_rule.check_format(fp8, torch)
    partial = [q[0] for q in quantized if q[1] % fp8_rule.BLOCK or q[2] % fp8_rule.BLOCK]
    if not partial:
        fail("no quantized weight has a partial 128 block; the fixture should exercise ceil(N / 128)")
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    outputs = ((fixture_dir, fp8, {"quantization_config": QUANT_CONFIG}), (deq_dir, deq, {"dtype": "float32"}))
    for d, tensors, extra in outputs:
        os.makedirs(d, exist_ok=True)
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({**cfg, **extra}, f, indent=2, sort_keys=True)
            f.write("\n")
    gen = os.path.join(src_dir, "generation_config.json")
    if os.path.exists(gen):
        shutil.copy(gen, os.path.join(fixture_dir, "generation_config.json"))
    n_codes = sum(q[1] * q[2] for q in quantized)
    log(f"[{NAME}] wrote {len(quantized)} FP8 weights ({n_codes} codes, F32 scales), partial 128 blocks in "
        f"{len(partial)} of them (e.g. {partial[0]}); {len(fp8) - 2 * len(quantized)} tensors stay bf16")
    return fp8, deq, {"quantized": quantized, "partial_block_weights": partial}


def check_state(name, model, tensors, torch):
    """The model's parameters equal `tensors` (checkpoint names, fp32) bit for bit, the in-memory
    fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) against the per-expert tensors."""
    checked = 0
    for key, p in model.state_dict().items():
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            prefix, proj = key.rsplit(".", 1)
            per = []
            for e in range(p.shape[0]):
                parts = ["gate_proj", "up_proj"] if proj == "gate_up_proj" else ["down_proj"]
                per.append(torch.cat([tensors[f"{prefix}.{e}.{q}.weight"] for q in parts], dim=0))
            want = torch.stack(per)
        elif key in tensors:
            want = tensors[key]
        else:
            continue
        got = p.detach().to("cpu")
        if got.dim() == 3 and got.shape != want.shape and got.shape == want.transpose(1, 2).shape:
            want = want.transpose(1, 2)  # experts held [E, in, out]
        if got.dtype != torch.float32 or got.shape != want.shape or not torch.equal(got, want):
            bad = "dtype/shape" if got.shape != want.shape or got.dtype != torch.float32 else \
                f"max abs diff {(got - want).abs().max().item():.3e}"
            fail(f"[{NAME}] {name}: parameter {key} ({got.dtype} {list(got.shape)}) differs from "
                 f"w.float() * scale_inv per 128 block: {bad}")
        checked += 1
    if checked < len([k for k in tensors if fp8_rule.is_quantized(k, tensors[k])]) // 3:
        fail(f"[{NAME}] {name}: only {checked} parameters matched checkpoint names; the check saw too little")
    return checked


def load_truth(fixture_dir, deq_dir, model_cls, torch, transformers):
    """transformers' dequantize path on the fixture (checked against our dequantization), or, where this
    transformers cannot dequantize, its fp32 forward of our dequantized weights."""
    own = load_saved(NAME, SPEC, deq_dir, model_cls, torch, torch.float32, "eager", "cpu")
    check_loaded_config(NAME, SPEC, own)
    from safetensors.torch import load_file

    deq = load_file(os.path.join(deq_dir, "model.safetensors"))
    check_state("our dequantized fp32 checkpoint", own, deq, torch)
    try:
        qc = transformers.FineGrainedFP8Config(dequantize=True, modules_to_not_convert=list(NOT_CONVERT))
        hf, info = model_cls.from_pretrained(fixture_dir, dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager", quantization_config=qc,
                                             output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        left = sorted({str(p.dtype) for p in hf.parameters() if p.dtype != torch.float32})
        if problems or left:
            raise RuntimeError(f"loading problems {problems}, parameters left in {left}")
    except Exception as e:  # this transformers has no (working) dequantize path: say so, keep going
        log(f"[{NAME}] WARNING: transformers could not load the fixture with FineGrainedFP8Config(dequantize=True): "
            f"{type(e).__name__}: {e}. The fp32 truth is transformers' fp32 forward of our dequantized weights.")
        return own, {"weights": "tools/fp8_rule.py dequantize (w.float() * scale_inv per 128x128 block), saved in "
                                "fp32 and loaded back", "transformers_dequantize": f"failed: {type(e).__name__}: {e}"}
    hf = hf.to("cpu").eval()
    n = check_state("transformers' dequantize=True", hf, deq, torch)
    with torch.inference_mode():
        ids = torch.tensor([mf.make_prompts(SPEC, torch)[PROMPT_LENGTHS.index(130)]])
        a, b = hf(input_ids=ids).logits, own(input_ids=ids).logits
    if not torch.equal(a, b):
        fail(f"[{NAME}] same weights, different fp32 logits: transformers' dequantized model vs ours "
             f"(max abs diff {(a - b).abs().max().item():.3e})")
    log(f"[{NAME}] transformers' dequantize=True gives our dequantized weights bit for bit ({n} parameters) "
        "and identical fp32 logits: it is the fp32 truth")
    del own
    return hf, {"weights": "transformers' FineGrainedFP8Config(dequantize=True): w.float() * scale_inv per block",
                "transformers_dequantize": f"ok: {n} parameters bit-equal to tools/fp8_rule.py dequantize"}


def transformers_quantize_check(src_dir, fp8, tmp, model_cls, torch, transformers):
    """transformers quantizes the bf16 checkpoint on load (GPU) and saves it; compared with our file."""
    out = os.path.join(tmp, "transformers_fp8")
    try:
        qc = transformers.FineGrainedFP8Config(weight_block_size=(fp8_rule.BLOCK, fp8_rule.BLOCK),
                                               modules_to_not_convert=list(NOT_CONVERT))
        m = model_cls.from_pretrained(src_dir, dtype=torch.bfloat16, device_map="cuda", quantization_config=qc)
        n_fp8 = sum(1 for p in m.parameters() if p.dtype == torch.float8_e4m3fn)
        m.save_pretrained(out)
        del m
        torch.cuda.empty_cache()
    except Exception as e:
        log(f"[{NAME}] WARNING: transformers could not quantize the bf16 checkpoint on load and save it: "
            f"{type(e).__name__}: {e}")
        return {"ran": False, "error": f"{type(e).__name__}: {e}"}
    log(f"[{NAME}] transformers quantized on load: {n_fp8} FP8 parameters in memory; saved {sorted(os.listdir(out))}")
    return {"ran": True, "fp8_parameters_in_memory": n_fp8,
            **fp8_rule.compare_with_transformers_save(fp8, out, torch)}


def fp8_model(mode, fixture_dir, deq_dir, model_cls, torch):
    """(model, context manager for its forwards, description) of the FP8 reference on the GPU."""
    if mode == "transformers":
        try:
            m, info = model_cls.from_pretrained(fixture_dir, dtype=torch.bfloat16, device_map="cuda",
                                                attn_implementation="sdpa", output_loading_info=True)
        except Exception as e:
            fail(f"transformers could not load the FP8 fixture on the GPU: {type(e).__name__}: {e}")
        problems = {k: v for k, v in info.items() if v}
        if problems:
            fail(f"from_pretrained of the FP8 fixture reported loading problems: {problems}")
        fp8_params = [n for n, p in m.named_parameters() if p.dtype == torch.float8_e4m3fn]
        for part in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.experts"):
            if not any(part in n for n in fp8_params):
                fail(f"transformers loaded no FP8 parameter for {part} (FP8 parameters: {fp8_params[:6]})")
        m.eval()
        desc = {"implementation": "transformers' own FP8 forward (FineGrainedFP8 modules, W8A8 block kernels)",
                "attn_implementation": m.config._attn_implementation,
                "experts_implementation": getattr(m.config, "_experts_implementation", None),
                "fp8_parameters": len(fp8_params)}
        return m, _null_context, desc
    m, info = model_cls.from_pretrained(deq_dir, dtype=torch.float32, attn_implementation="sdpa",
                                        experts_implementation="eager", output_loading_info=True)
    if any(info.values()):
        fail(f"loading the dequantized checkpoint reported {info}")
    m = m.to("cuda").eval()
    mode_obj, names = fp8_rule.make_w8a8_mode(m, torch)
    desc = {"implementation": "EMULATED (--fp8-forward emulate), not transformers' kernels: transformers' bf16 "
                              "model with every quantized product computed as act e4m3 per (row, 128) "
                              "(s = amax/448) x dequantized weight in fp32, output bf16",
            "attn_implementation": "sdpa", "experts_implementation": "eager", "quantized_weights": len(names)}
    desc["_mode"], desc["_names"] = mode_obj, names
    return m, (lambda: mode_obj), desc


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _null_context():
    return _NullContext()


def logit_errors(got, truth):
    d = (got - truth).double()
    return {"max_abs": float(f"{d.abs().max().item():.4g}"),
            "nmse": float(f"{(d.pow(2).sum() / truth.double().pow(2).sum()).item():.4g}"),
            "argmax_agreement": round((got.argmax(-1) == truth.argmax(-1)).double().mean().item(), 4)}


def fp8_reference(m, context, records, truth_logits, torch):
    out = []
    with torch.inference_mode():
        for rec, t32 in zip(records, truth_logits):
            ids = rec["ids"]
            try:
                with context():
                    logits = m(input_ids=torch.tensor([ids], device="cuda")).logits[0].float().cpu()  # [T, V]
                    gen, _ = mf.greedy(m, ids, mf.N_NEW_TOKENS, "cuda", torch)
            except FixtureError:
                raise
            except Exception as e:
                fail(f"the FP8 forward failed: {type(e).__name__}: {e}\nWith --fp8-forward transformers: its W8A8 "
                     "kernels come from the Hub (the `kernels` package: kernels-community/finegrained-fp8, "
                     "deep-gemm); offline they must already be in the Hugging Face cache. Rerun with "
                     "--fp8-forward emulate to compute the same W8A8 rule in plain torch (recorded as emulated "
                     "in reference.json).")
            err = logit_errors(logits, t32)
            rec["argmax_fp8"] = logits.argmax(-1).tolist()
            rec["last_logits_fp8"] = [float(f"{x:.8g}") for x in logits[-1].tolist()]
            rec["greedy_fp8"] = gen
            rec["fp8_vs_fp32"] = err
            log(f"[{NAME}] fp8 len {len(ids):4d}: vs fp32 truth {err}, greedy equal: {gen == rec['greedy_fp32']}")
            out.append(logits)
    return out


def build(out_root, fp8_mode, keep_tmp, torch, transformers):
    t0 = time.time()
    fixture_dir = os.path.join(out_root, NAME)
    if os.path.exists(fixture_dir):
        log(f"[{NAME}] removing existing {fixture_dir}")
        shutil.rmtree(fixture_dir)
    tmp = tempfile.mkdtemp(prefix="cpinfer_fp8_fixture_")
    src_dir, deq_dir = os.path.join(tmp, "bf16"), os.path.join(tmp, "dequantized_fp32")
    try:
        model, model_cls, init_info = mf.build_model(SPEC, torch, transformers)
        model.to(torch.bfloat16).save_pretrained(src_dir)
        del model
        verify_saved_keys(NAME, SPEC, src_dir)
        rewrite_config(NAME, SPEC, src_dir)
        fp8, _, qsummary = write_checkpoints(src_dir, fixture_dir, deq_dir, torch)
        hf_quant = transformers_quantize_check(src_dir, fp8, tmp, model_cls, torch, transformers)

        truth, truth_info = load_truth(fixture_dir, deq_dir, model_cls, torch, transformers)
        prompts = mf.make_prompts(SPEC, torch)
        with torch.inference_mode():
            spread = mf.check_spread(NAME, SPEC, truth, prompts, torch)
            records = mf.fp32_reference(NAME, SPEC, truth, prompts, torch)
            truth_logits = [truth(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]
        for rec, t32 in zip(records, truth_logits):
            if t32.argmax(-1).tolist() != rec["argmax_fp32"]:
                fail(f"[{NAME}] fp32 forward not reproducible at len {len(rec['ids'])}")
        source = load_saved(NAME, SPEC, src_dir, model_cls, torch, torch.float32, "eager", "cpu")
        with torch.inference_mode():
            src_logits = [source(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]
        quant_effect = logit_errors(torch.cat(truth_logits), torch.cat(src_logits))
        log(f"[{NAME}] FP8 quantization moved the fp32 logits from the bf16 source's by {quant_effect}")
        del source, truth

        m, context, fp8_info = fp8_model(fp8_mode, fixture_dir, deq_dir, model_cls, torch)
        fp8_logits = fp8_reference(m, context, records, truth_logits, torch)
        if "_mode" in fp8_info:
            missing = fp8_info.pop("_names") - fp8_info.pop("_mode").seen
            if missing:
                fail(f"the emulated FP8 forward never intercepted the products of {sorted(missing)[:4]}")
        del m
        total = logit_errors(torch.cat(fp8_logits), torch.cat(truth_logits))
        fp8_info.update(device=torch.cuda.get_device_name(), dtype="bfloat16", error_vs_fp32_all_positions=total)
        log(f"[{NAME}] FP8 forward against the fp32 truth over all positions: {total}")
        if total["argmax_agreement"] < MIN_FP8_ARGMAX_AGREEMENT or total["nmse"] > MAX_FP8_NMSE:
            fail(f"[{NAME}] the FP8 forward is far from the fp32 truth ({total}); a broken quantization or forward")

        from safetensors.torch import save_file

        logits_file = {}
        for rec, t32, t8 in zip(records, truth_logits, fp8_logits):
            logits_file[f"fp32.{rec['n_tokens']}"] = t32.contiguous()
            b = t8.to(torch.bfloat16)
            logits_file[f"fp8.{rec['n_tokens']}"] = b if torch.equal(b.float(), t8) else t8.contiguous()
        save_file(logits_file, os.path.join(fixture_dir, "reference_logits.safetensors"), metadata={"format": "pt"})

        weights = os.path.join(fixture_dir, "model.safetensors")
        loaded = load_saved(NAME, SPEC, deq_dir, model_cls, torch, torch.float32, "eager", "cpu")
        summary = mf.config_summary(SPEC, loaded)
        summary["quantization_config"] = QUANT_CONFIG
        reference = {
            "fixture": NAME, "format_version": 1, "created_by": "tools/make_fp8_fixture.py",
            "transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "config": summary,
            "init": {"seed": SPEC["seed"], **init_info, "gain_linear": mf.GAIN_LINEAR, "gain_router": mf.GAIN_ROUTER,
                     "gain_lm_head": mf.GAIN_LM_HEAD, "norm_jitter": mf.NORM_JITTER, **spread},
            "weight_files": {"model.safetensors": {"bytes": os.path.getsize(weights), "sha256": sha256_file(weights)}},
            "quantization": {
                "rule": "per 128x128 block: scale = 448 / amax, code = e4m3(clamp(w * scale, +-448)) nearest-even, "
                        "weight_scale_inv = fp32(1 / scale) (transformers' Fp8Quantize; partial blocks likewise)",
                "source": "the bf16 weights transformers saved (per-expert layout)",
                **qsummary, "fp32_logits_moved_from_bf16_source": quant_effect,
                "transformers_quantize_on_load": hf_quant},
            "reference_fp32": {"device": "cpu", "dtype": "float32", "attn_implementation": "eager",
                               "experts_implementation": "eager", **truth_info},
            "reference_fp8": fp8_info,
            "logits_file": {"file": "reference_logits.safetensors",
                            "tensors": "fp32.<n_tokens> [T, V] F32 (the truth), fp8.<n_tokens> [T, V] (the FP8 "
                                       "forward, BF16 where its values are bf16)"},
            "greedy": {"new_tokens": mf.N_NEW_TOKENS, "eos": "ignored", "method": "argmax loop with the KV cache"},
            "prompts": records,
        }
        with open(os.path.join(fixture_dir, "reference.json"), "w") as f:
            json.dump(reference, f, separators=(",", ":"))
            f.write("\n")
        for fn in os.listdir(fixture_dir):
            os.chmod(os.path.join(fixture_dir, fn), 0o644)
        size = sum(os.path.getsize(os.path.join(fixture_dir, fn)) for fn in os.listdir(fixture_dir))
        log(f"[{NAME}] done in {time.time() - t0:.1f} s: {sorted(os.listdir(fixture_dir))}, {size / 1024:.0f} KiB")
    finally:
        if keep_tmp:
            log(f"[{NAME}] kept the intermediate checkpoints in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def exact_torch(torch, transformers, threads):
    """fp32 products in fp32 (no TF32), `threads` CPU threads, no progress bars."""
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    transformers.utils.logging.disable_progress_bar()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (the fixture goes to OUT/moe_fp8)")
    parser.add_argument("--only", action="append", choices=[NAME], help="accepted for symmetry with make_fixtures.py")
    parser.add_argument("--fp8-forward", choices=["transformers", "emulate"], default="transformers",
                        help="the FP8 reference: transformers' own forward (default; needs its Hub kernels in the "
                             "cache) or the same W8A8 rule in plain torch")
    parser.add_argument("--threads", type=int, default=16, help="CPU threads for the fp32 reference")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the bf16 / dequantized / transformers saves")
    args = parser.parse_args()
    try:
        import torch
        import transformers
        import safetensors  # noqa: F401
    except ImportError as e:
        sys.exit(f"make_fp8_fixture.py needs torch, transformers 5.x and safetensors: {e}")
    if int(transformers.__version__.split(".")[0]) < 5:
        sys.exit(f"make_fp8_fixture.py needs transformers >= 5 (found {transformers.__version__})")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        sys.exit("make_fp8_fixture.py needs a CUDA GPU with FP8 (compute capability >= 8.9) for transformers' "
                 "FP8 quantization and forward")
    exact_torch(torch, transformers, args.threads)
    log(f"make_fp8_fixture: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"gpu {torch.cuda.get_device_name()}, FP8 forward: {args.fp8_forward}")
    os.makedirs(args.out, exist_ok=True)
    try:
        build(args.out, args.fp8_forward, args.keep_tmp, torch, transformers)
    except FixtureError as e:
        sys.exit(f"make_fp8_fixture.py FAILED: {e}")


if __name__ == "__main__":
    main()
