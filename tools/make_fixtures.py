#!/usr/bin/env python3
"""Create tiny random Qwen3 / Qwen3-MoE checkpoints and Hugging Face transformers reference outputs.

Runs on the GPU machine (torch 2.11, transformers 5.x). For each fixture it writes DIR/<name>/ with
config.json, generation_config.json (when save_pretrained writes it), model.safetensors (or shards +
model.safetensors.index.json) and reference.json.

The fp32 reference is transformers' own fp32 forward (CPU, eager attention, eager experts) of the
bf16-rounded weights: the model is saved in bf16 and the SAVED directory is loaded back in fp32, so
cpinfer's CPU back-end (which upcasts bf16 weights) must reproduce it to ~1e-5. The bf16 reference is
the same directory loaded in bf16 on the GPU with SDPA, as a transformers user would run it.

Usage:  python3 tools/make_fixtures.py --out tests/fixtures [--only NAME] [--cpu-only]
See tests/fixtures/README.md for what each fixture covers and the reference.json format.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

from fixture_checkpoint import (FixtureError, check_loaded_config, check_same_weights, fail, load_saved,
                                log, moe_config_fields, moe_layers, natural_key, rewrite_config, sha256_file,
                                verify_saved_keys, write_fused_layout)

VOCAB = 384
MAX_POS = 4096
PROMPT_LENGTHS = [1, 2, 7, 33, 130, 517, 1031]
N_NEW_TOKENS = 20
# Re-initialisation gains (std = gain / sqrt(fan_in)); chosen so the final logits have std >= 1 and
# the router is clearly non-uniform, which the script checks (see check_spread).
GAIN_LINEAR = 1.0
GAIN_ROUTER = 2.0
GAIN_LM_HEAD = 2.0
EMBED_STD = 1.0
# With tied embeddings the residual stream carries the input token's own embedding, which would win the
# argmax everywhere (logit of token t = x . e_t). A small embedding keeps the layers' contribution
# dominant; the final norm weight is scaled up so the logits still have std ~ GAIN_LM_HEAD.
EMBED_STD_TIED = 0.02
NORM_JITTER = 0.1
MIN_LOGIT_STD = 1.0
MAX_ECHO_FRACTION = 0.2  # positions whose argmax is the input token itself
MIN_MEAN_DISTINCT_GREEDY = 5.0  # distinct tokens among the 20 greedy ones, mean over prompts

COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POS,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
)

ROPE_DEFAULT = {"rope_type": "default", "rope_theta": 1000000.0}
FIXTURES = {
    # transformers-4 / hub config dialect, GQA, head_dim != hidden/heads, top-k renormalised, untied.
    "moe_v4_gqa": dict(
        arch="Qwen3MoeForCausalLM", seed=1001, dialect="v4", expert_layout="per_expert",
        config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                    rope_parameters=ROPE_DEFAULT)),
    # transformers-5 dialect as save_pretrained writes it, YaRN, MHA, no renormalisation, tied embeddings.
    "moe_v5_yarn_mha": dict(
        arch="Qwen3MoeForCausalLM", seed=1002, dialect="v5", expert_layout="per_expert",
        config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                    intermediate_size=96, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
                    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=True,
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                     "rope_theta": 10000.0})),
    # Dense layers 0 and 2 (mlp_only_layers + decoder_sparse_step), MQA, fused experts over 2 shards.
    "moe_dense_mix_fused": dict(
        arch="Qwen3MoeForCausalLM", seed=1003, dialect="v5", expert_layout="fused",
        config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                    intermediate_size=96, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[0], tie_word_embeddings=False,
                    rope_parameters=ROPE_DEFAULT)),
    # Trained, so that its predictions are as confident as a real checkpoint's: on random weights the
    # top-2 logit gap is a fraction of the logit spread and bf16 rounding flips 1-4% of the argmaxes;
    # here the fixture's prompts come from the language it learned (see synthetic_language), so the
    # literal bf16 bar (argmax agreement >= 99% with transformers' bf16 forward) can be tested.
    "moe_trained": dict(
        arch="Qwen3MoeForCausalLM", seed=1005, dialect="v5", expert_layout="per_expert",
        train=dict(steps=1500, batch=64, seq_len=128, lr=3e-3, min_accuracy=0.995),
        config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                    rope_parameters=ROPE_DEFAULT)),
    # Llama 3: no q/k norm, llama3 RoPE scaling (original length 256 so that the prompts reach the
    # scaled band), GQA, no biases. Not yet generated (needs the GPU machine's transformers): after
    # `tools/make_fixtures.py --only llama3_gqa`, add "llama3_gqa" to tests/model/fixtures.h.
    "llama3_gqa": dict(
        arch="LlamaForCausalLM", seed=1006, dialect="v5", expert_layout="none",
        config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, tie_word_embeddings=False, mlp_bias=False,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 256})),
    # Dense Qwen3 (no experts).
    "dense_qwen3": dict(
        arch="Qwen3ForCausalLM", seed=1004, dialect="v5", expert_layout="none",
        config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, tie_word_embeddings=False, rope_parameters=ROPE_DEFAULT)),
}
















# ---------------------------------------------------------------------------------------------
# Model creation
# ---------------------------------------------------------------------------------------------


def build_model(spec, torch, transformers):
    cfg_kwargs = dict(COMMON)
    cfg_kwargs.update(spec["config"])
    if spec["arch"] == "Qwen3MoeForCausalLM":
        config = transformers.Qwen3MoeConfig(**cfg_kwargs)
        model_cls = transformers.Qwen3MoeForCausalLM
    elif spec["arch"] == "Qwen3ForCausalLM":
        config = transformers.Qwen3Config(**cfg_kwargs)
        model_cls = transformers.Qwen3ForCausalLM
    elif spec["arch"] == "LlamaForCausalLM":
        config = transformers.LlamaConfig(**cfg_kwargs)
        model_cls = transformers.LlamaForCausalLM
    else:
        fail(f"unknown architecture {spec['arch']}")
    if getattr(config, "head_dim", None) != spec["config"]["head_dim"]:
        fail(f"config did not keep head_dim={spec['config']['head_dim']} (got {getattr(config, 'head_dim', None)})")
    torch.manual_seed(spec["seed"])
    model = model_cls(config).to(torch.float32).eval()
    init_info = reinit_weights(model, spec["seed"], torch)
    if "train" in spec:
        init_info["training"] = train(model, spec, torch)
    return model, model_cls, init_info


class SyntheticLanguage:
    """A deterministic language a tiny model learns to near certainty, and that needs attention.

    Two random cyclic permutations f0, f1 of the vocabulary (one cycle each, so no fixed points):
    x[1] = f0(x[0]) and x[i+1] = f_{x[i-1] mod 2}(x[i]); only x[0] is free. Predicting the next token
    needs the current token and the parity of the one before it (attention to the previous position)."""

    def __init__(self, seed, torch):
        gen = torch.Generator().manual_seed(seed)
        self.f = []
        for _ in range(2):
            order = torch.randperm(VOCAB, generator=gen)
            f = torch.empty(VOCAB, dtype=torch.long)
            f[order] = order.roll(-1)
            self.f.append(f)
        self.torch = torch

    def sample(self, n_seqs, length, gen):
        x = self.torch.empty(n_seqs, length, dtype=self.torch.long)
        x[:, 0] = self.torch.randint(0, VOCAB, (n_seqs,), generator=gen)
        if length > 1:
            x[:, 1] = self.f[0][x[:, 0]]
        for i in range(1, length - 1):
            parity = x[:, i - 1] % 2
            x[:, i + 1] = self.torch.where(parity == 0, self.f[0][x[:, i]], self.f[1][x[:, i]])
        return x


def train(model, spec, torch):
    """Trains the model in fp32 on the synthetic language; fails unless it learned it."""
    t = spec["train"]
    lang = SyntheticLanguage(spec["seed"], torch)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t["lr"], total_steps=t["steps"], pct_start=0.1)
    t0 = time.time()
    for step in range(t["steps"]):
        x = lang.sample(t["batch"], t["seq_len"], gen).to(device)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == t["steps"] - 1:
            log(f"[train] step {step:5d} loss {out.loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        x = lang.sample(64, 1100, gen).to(device)
        pred = model(input_ids=x).logits[:, :-1].argmax(-1)
        accuracy = (pred == x[:, 1:]).float().mean().item()
    model.to("cpu")
    log(f"[train] {t['steps']} steps in {time.time() - t0:.1f} s on {device}: next-token accuracy {accuracy:.4f} "
        f"on 1100-token sequences")
    if accuracy < t["min_accuracy"]:
        fail(f"training reached next-token accuracy {accuracy:.4f} < {t['min_accuracy']}: raise steps or lr")
    return {**t, "device": device, "final_loss": round(out.loss.item(), 5), "accuracy": round(accuracy, 5),
            "language": "x[i+1] = f_(x[i-1] mod 2)(x[i]), two random single-cycle permutations; x[1] = f0(x[0])"}


def reinit_weights(model, seed, torch):
    """Replace the default (tiny-std) init by one with real spread: logits std >= 1, peaked routing."""
    gen = torch.Generator().manual_seed(seed)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embed_std = EMBED_STD_TIED if tied else EMBED_STD
    final_norm_scale = GAIN_LM_HEAD / (EMBED_STD_TIED * math.sqrt(model.config.hidden_size)) if tied else 1.0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: natural_key(kv[0])):
            shape = tuple(p.shape)
            noise = torch.randn(shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:
                # Every 1-D parameter in these models is an RMSNorm weight (no biases).
                if not name.endswith("norm.weight"):
                    fail(f"unexpected 1-D parameter {name}; the init rule assumes only norm weights are 1-D")
                value = 1.0 + NORM_JITTER * noise
                if name == "model.norm.weight":
                    value = value * final_norm_scale
            elif name == "model.embed_tokens.weight":
                value = embed_std * noise
            elif name == "lm_head.weight":
                if tied:
                    fail("lm_head.weight listed separately although tie_word_embeddings is true")
                value = noise * (GAIN_LM_HEAD / math.sqrt(shape[-1]))
            elif name.endswith("mlp.gate.weight"):
                value = noise * (GAIN_ROUTER / math.sqrt(shape[-1]))
            else:
                # nn.Linear weights [out, in] and fused experts [E, out, in]: fan_in is the last dim.
                value = noise * (GAIN_LINEAR / math.sqrt(shape[-1]))
            p.copy_(value)
    return {"embed_std": embed_std, "final_norm_scale": round(final_norm_scale, 4)}


# ---------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------










# ---------------------------------------------------------------------------------------------
# Reference computation
# ---------------------------------------------------------------------------------------------








def make_prompts(spec, torch):
    """Random ids, or for a trained fixture sentences of the language it learned."""
    seed = spec["seed"]
    lang = SyntheticLanguage(seed, torch) if "train" in spec else None
    prompts = []
    for n in PROMPT_LENGTHS:
        gen = torch.Generator().manual_seed(seed * 10007 + n)
        if lang:
            prompts.append(lang.sample(1, n, gen)[0].tolist())
        else:
            prompts.append(torch.randint(0, VOCAB, (n,), generator=gen).tolist())
    return prompts


def greedy(model, ids, n_new, device, torch):
    """Greedy continuation with the KV cache; eos is ignored (always n_new tokens).

    Returns (tokens, gaps): gaps[i] is the top-1 minus top-2 logit at step i, so a consumer can tell a
    real mismatch from a near-tie."""
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    tokens, gaps = [], []
    while True:
        last = out.logits[0, -1].float()  # [V]
        top2 = last.topk(2).values
        tokens.append(int(last.argmax()))
        gaps.append(float(f"{(top2[0] - top2[1]).item():.4g}"))
        if len(tokens) == n_new:
            return tokens, gaps
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), past_key_values=out.past_key_values,
                    use_cache=True)


def check_spread(name, spec, model, prompts, torch):
    """Fail if the random init gives flat logits or near-uniform routing (fixtures would test little)."""
    top1 = []
    hooks = []
    if spec["arch"] == "Qwen3MoeForCausalLM":
        for i in moe_layers(spec):
            def hook(_mod, _inp, out):
                router_logits = out[0]  # [T, E]
                top1.append(torch.softmax(router_logits.float(), dim=-1).max(dim=-1).values.mean().item())
            hooks.append(model.model.layers[i].mlp.gate.register_forward_hook(hook))
    ids = prompts[PROMPT_LENGTHS.index(130)]
    logits = model(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    for h in hooks:
        h.remove()
    std = logits.std(dim=-1).mean().item()
    stats = {"logit_std_mean": round(std, 4)}
    log(f"[{name}] spread: mean per-position logit std {std:.3f} (need >= {MIN_LOGIT_STD})")
    if std < MIN_LOGIT_STD:
        fail(f"[{name}] logits too flat (std {std:.3f}); raise GAIN_LM_HEAD")
    echo = (logits.argmax(dim=-1) == torch.tensor(ids)).float().mean().item()
    stats["echo_fraction"] = round(echo, 4)
    log(f"[{name}] spread: argmax equals the input token at {100 * echo:.1f}% of positions "
        f"(max {100 * MAX_ECHO_FRACTION:.0f}%)")
    if echo > MAX_ECHO_FRACTION:
        fail(f"[{name}] the model mostly echoes its input ({100 * echo:.0f}% of positions): the embedding "
             "dominates the residual stream; lower EMBED_STD / EMBED_STD_TIED")
    if top1:
        n_exp = spec["config"]["num_experts"]
        stats["router_top1_prob_mean"] = [round(x, 4) for x in top1]
        log(f"[{name}] spread: mean top-1 router probability per MoE layer {[round(x, 3) for x in top1]} "
            f"(uniform would be {1.0 / n_exp:.3f})")
        if min(top1) < 1.5 / n_exp:
            fail(f"[{name}] routing nearly uniform (top-1 prob {min(top1):.3f}); raise GAIN_ROUTER")
    return stats


def fp32_reference(name, spec, model, prompts, torch):
    records = []
    for ids in prompts:
        t0 = time.time()
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]
        top2 = logits.topk(2, dim=-1).values  # [T, 2]
        argmax = logits.argmax(dim=-1).tolist()
        gen, gen_gaps = greedy(model, ids, N_NEW_TOKENS, "cpu", torch)
        if gen[0] != argmax[-1]:
            fail(f"[{name}] len {len(ids)}: first greedy token {gen[0]} != argmax of the full forward {argmax[-1]}")
        records.append({
            "n_tokens": len(ids),
            "ids": ids,
            "argmax_fp32": argmax,
            "top2_gap_fp32": [float(f"{g:.4g}") for g in (top2[:, 0] - top2[:, 1]).tolist()],
            "last_logits_fp32": [float(f"{x:.8g}") for x in logits[-1].tolist()],
            "greedy_fp32": gen,
            "greedy_gap_fp32": gen_gaps,
        })
        log(f"[{name}] fp32 len {len(ids):5d}: {time.time() - t0:6.2f} s, min top-2 gap "
            f"{(top2[:, 0] - top2[:, 1]).min().item():.2e}, greedy {gen[:8]}...")
    distinct = sum(len(set(r["greedy_fp32"])) for r in records) / len(records)
    log(f"[{name}] greedy continuations hold {distinct:.1f} distinct tokens on average (min {MIN_MEAN_DISTINCT_GREEDY})")
    if distinct < MIN_MEAN_DISTINCT_GREEDY:
        fail(f"[{name}] greedy continuations are degenerate ({distinct:.1f} distinct tokens of {N_NEW_TOKENS})")
    return records


def bf16_reference(name, spec, model, records, torch):
    for rec in records:
        ids = rec["ids"]
        logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0]  # [T, V] bf16
        rec["argmax_bf16"] = logits.argmax(dim=-1).tolist()
        rec["greedy_bf16"] = greedy(model, ids, N_NEW_TOKENS, "cuda", torch)[0]
        agree = sum(a == b for a, b in zip(rec["argmax_bf16"], rec["argmax_fp32"])) / len(ids)
        rec["argmax_agreement_bf16_vs_fp32"] = round(agree, 4)
        log(f"[{name}] bf16 len {len(ids):5d}: argmax agreement with fp32 {agree:.3f}, "
            f"greedy equal: {rec['greedy_bf16'] == rec['greedy_fp32']}")


def config_summary(spec, model):
    c = model.config
    s = {
        "architecture": spec["arch"],
        "model_type": c.model_type,
        "config_dialect": spec["dialect"],
        "expert_layout": spec["expert_layout"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_parameters": dict(c.rope_parameters),
        "rope_attention_scaling": float(model.model.rotary_emb.attention_scaling),
        "rope_inv_freq": [float(f"{x:.8g}") for x in model.model.rotary_emb.inv_freq.float().tolist()],
    }
    if spec["arch"] == "Qwen3MoeForCausalLM":
        s.update(moe_config_fields(c), moe_layers=moe_layers(spec))
    return s


def build_fixture(name, spec, out_root, use_gpu, torch, transformers):
    t_start = time.time()
    fixture_dir = os.path.join(out_root, name)
    if os.path.exists(fixture_dir):
        log(f"[{name}] removing existing {fixture_dir}")
        shutil.rmtree(fixture_dir)
    os.makedirs(fixture_dir)
    log(f"[{name}] building {spec['arch']} (seed {spec['seed']}, dialect {spec['dialect']}, "
        f"experts {spec['expert_layout']}): {spec['config']}")

    model, model_cls, init_info = build_model(spec, torch, transformers)
    model_bf16 = model.to(torch.bfloat16)
    model_bf16.save_pretrained(fixture_dir)
    del model
    log(f"[{name}] save_pretrained wrote: {sorted(os.listdir(fixture_dir))}")
    verify_saved_keys(name, spec, fixture_dir)
    rewrite_config(name, spec, fixture_dir)

    # fp32 reference of the saved (bf16-rounded) weights, loaded as a user would load them.
    ref = load_saved(name, spec, fixture_dir, model_cls, torch, torch.float32, "eager", "cpu")
    check_loaded_config(name, spec, ref)
    check_same_weights(name, model_bf16, ref, torch)
    prompts = make_prompts(spec, torch)
    with torch.inference_mode():
        spread = check_spread(name, spec, ref, prompts, torch)
        records = fp32_reference(name, spec, ref, prompts, torch)
    summary = config_summary(spec, ref)

    bf16_info = None
    if use_gpu:
        gpu = load_saved(name, spec, fixture_dir, model_cls, torch, torch.bfloat16, "sdpa", "cuda")
        with torch.inference_mode():
            bf16_reference(name, spec, gpu, records, torch)
        bf16_info = {
            "device": torch.cuda.get_device_name(),
            "dtype": "bfloat16",
            "attn_implementation": gpu.config._attn_implementation,
            "experts_implementation": getattr(gpu.config, "_experts_implementation", None)
            if spec["arch"] == "Qwen3MoeForCausalLM" else None,
        }
        del gpu
        torch.cuda.empty_cache()

    if spec["expert_layout"] == "fused":
        write_fused_layout(name, spec, fixture_dir, torch)
        fused = load_saved(name, spec, fixture_dir, model_cls, torch, torch.float32, "eager", "cpu")
        check_same_weights(name, model_bf16, fused, torch)
        with torch.inference_mode():
            for rec in records[:5]:
                a = ref(input_ids=torch.tensor([rec["ids"]])).logits
                b = fused(input_ids=torch.tensor([rec["ids"]])).logits
                if not torch.equal(a, b):
                    fail(f"[{name}] fused checkpoint gives different fp32 logits (max abs diff "
                         f"{(a - b).abs().max().item():.3e}) at len {len(rec['ids'])}")
        log(f"[{name}] transformers loads the fused shards to identical weights and identical fp32 logits")
        del fused

    files = {}
    for fn in sorted(os.listdir(fixture_dir)):
        if fn.endswith(".safetensors"):
            files[fn] = {"bytes": os.path.getsize(os.path.join(fixture_dir, fn)),
                         "sha256": sha256_file(os.path.join(fixture_dir, fn))}
    reference = {
        "fixture": name,
        "format_version": 1,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created_by": "tools/make_fixtures.py",
        "config": summary,
        "init": {"seed": spec["seed"], **init_info, "gain_linear": GAIN_LINEAR,
                 "gain_router": GAIN_ROUTER, "gain_lm_head": GAIN_LM_HEAD, "norm_jitter": NORM_JITTER, **spread},
        "weight_files": files,
        "reference_fp32": {"device": "cpu", "dtype": "float32", "attn_implementation": "eager",
                           "experts_implementation": "eager" if spec["arch"] == "Qwen3MoeForCausalLM" else None,
                           "weights": "bf16 values from the saved files, upcast to fp32",
                           "loaded_from": "per-expert save" if spec["expert_layout"] == "fused" else "this directory"},
        "reference_bf16": bf16_info,
        "greedy": {"new_tokens": N_NEW_TOKENS, "eos": "ignored", "method": "argmax loop with the KV cache"},
        "prompts": records,
    }
    with open(os.path.join(fixture_dir, "reference.json"), "w") as f:
        json.dump(reference, f, separators=(",", ":"))
        f.write("\n")
    for fn in os.listdir(fixture_dir):
        os.chmod(os.path.join(fixture_dir, fn), 0o644)  # save_file creates 0600 files
    size = sum(os.path.getsize(os.path.join(fixture_dir, fn)) for fn in os.listdir(fixture_dir))
    log(f"[{name}] done in {time.time() - t_start:.1f} s: {sorted(os.listdir(fixture_dir))}, {size / 1024:.0f} KiB")
    return size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (one sub-directory per fixture)")
    parser.add_argument("--only", action="append", choices=sorted(FIXTURES),
                        help="build only this fixture (repeatable)")
    parser.add_argument("--cpu-only", action="store_true",
                        help="skip the bf16 GPU reference (reference_bf16 is null); without it a GPU is required")
    parser.add_argument("--threads", type=int, default=16, help="CPU threads for the fp32 reference")
    args = parser.parse_args()

    try:
        import torch
        import transformers
        import safetensors  # noqa: F401
    except ImportError as e:
        sys.exit(f"make_fixtures.py needs torch, transformers 5.x and safetensors: {e}")
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        sys.exit(f"make_fixtures.py needs transformers >= 5 (found {transformers.__version__})")
    use_gpu = not args.cpu_only
    if use_gpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: the bf16 reference needs a GPU (pass --cpu-only to skip it explicitly)")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    log(f"make_fixtures: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, gpu {torch.cuda.get_device_name() if use_gpu else 'none (--cpu-only)'}")

    names = args.only or list(FIXTURES)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    total = 0
    try:
        for name in names:
            total += build_fixture(name, FIXTURES[name], args.out, use_gpu, torch, transformers)
    except FixtureError as e:
        sys.exit(f"make_fixtures.py FAILED: {e}")
    log(f"make_fixtures: {len(names)} fixture(s) in {args.out}: {', '.join(names)}; "
        f"{total / 1024:.0f} KiB in all; {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
