#!/usr/bin/env python3
"""Fidelity of the dense Qwen3 conversion (tools/to_gguf.py's `qwen3` path), through cpinfer.

cpinfer runs only Qwen3-MoE, so the dense model is checked through an identity: a MoE layer whose
experts are all the same MLP, with renormalized top-k weights (they sum to 1), computes that MLP. From
a Qwen3-MoE checkpoint (e.g. `cpinfer demo-model`) this writes
  - TWIN_MOE: the same checkpoint with every expert replaced by expert 0, and
  - TWIN_DENSE: a Qwen3ForCausalLM with expert 0 as its MLP (intermediate_size = moe_intermediate_size),
converts TWIN_DENSE to an F32 GGUF and checks that llama.cpp's greedy tokens on it (F32 KV, no flash
attention) equal cpinfer's on TWIN_MOE. Standard library only; needs build/cpinfer and bench/llamacpp's npm
install (run.sh or fidelity.sh does it).

    python3 bench/llamacpp/dense_fidelity.py MOE_DIR WORK_DIR [--prompt 32] [--new 100] [--threads 2]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import to_gguf  # noqa: E402


def write_safetensors(path, tensors):
    header, off = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for _, _, data in tensors.values():
            f.write(data)


def make_twins(src, moe_dir, dense_dir):
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    ckpt = to_gguf.Checkpoint(src)
    names = {to_gguf.GGML_BF16: "BF16", to_gguf.GGML_F32: "F32", to_gguf.GGML_F16: "F16"}
    moe, dense = {}, {}
    for name in ckpt.tensors:
        dtype, data = ckpt.raw(name)
        entry = (names[dtype], ckpt.shape(name), bytes(data))
        if ".mlp.experts." in name:
            layer, rest = name.split(".mlp.experts.")
            proj = rest.split(".", 1)[1]  # gate_proj.weight, ...
            e0 = ckpt.raw(f"{layer}.mlp.experts.0.{proj}")
            moe[name] = (entry[0], entry[1], bytes(e0[1]))
            if rest.startswith("0."):
                dense[f"{layer}.mlp.{proj}"] = (entry[0], entry[1], bytes(e0[1]))
            continue
        moe[name] = entry
        if not name.endswith(".mlp.gate.weight"):
            dense[name] = entry
    dense_cfg = {k: v for k, v in cfg.items() if k not in (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
        "mlp_only_layers", "output_router_logits", "router_aux_loss_coef")}
    dense_cfg.update({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                      "intermediate_size": cfg["moe_intermediate_size"]})
    for d, c, t in ((moe_dir, cfg, moe), (dense_dir, dense_cfg, dense)):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f, indent=1)
        for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if os.path.exists(os.path.join(src, extra)):
                shutil.copy(os.path.join(src, extra), d)
        write_safetensors(os.path.join(d, "model.safetensors"), t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("moe_dir")
    ap.add_argument("work_dir")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    moe_dir, dense_dir = os.path.join(a.work_dir, "twin-moe"), os.path.join(a.work_dir, "twin-dense")
    make_twins(a.moe_dir, moe_dir, dense_dir)
    gguf = os.path.join(dense_dir, "model-f32.gguf")
    if to_gguf.main([dense_dir, "--outtype", "f32", "--out", gguf, "--quiet"]) != 0:
        return 1
    ll = json.loads(subprocess.run(
        ["node", os.path.join(ROOT, "bench/llamacpp/bench.mjs"), "--model", gguf, "--threads", str(a.threads),
         "--prompt-tokens", str(a.prompt), "--max-new-tokens", str(a.new), "--repeats", "1", "--f32-kv",
         "--flash-attention", "off"], check=True, capture_output=True, text=True).stdout)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    cp = json.loads(subprocess.run(
        [os.environ.get("CPINFER", os.path.join(ROOT, "build/cpinfer")), "generate", "--model-path", moe_dir,
         "--input-ids", ",".join(map(str, ll["prompt_ids"])), "--max-new-tokens", str(a.new), "--ignore-eos",
         "--json"], check=True, capture_output=True, text=True, env=env).stdout)
    x, y = ll["output_ids"], cp["output_ids"]
    same = sum(p == q for p, q in zip(x, y))
    ok = len(x) == len(y) == a.new and same == a.new
    print(f"dense fidelity (llama.cpp qwen3 F32 vs cpinfer MoE with identical experts): {same}/{a.new} greedy "
          f"tokens equal")
    print(f"{1 if ok else 0} passed, {0 if ok else 1} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
