#!/usr/bin/env python3
"""Writes tiny Qwen3-MoE checkpoints with transformers itself, for the HfInterop test.

Usage (on a machine with torch + transformers 5):
  python3 tests/loader/make_hf_tiny.py OUT_DIR
  CPINFER_HF_TINY_DIR=OUT_DIR build/tests/loader/loader_tests --gtest_filter='HfInterop.*'

OUT_DIR/single (one model.safetensors), OUT_DIR/sharded (index + shards) and OUT_DIR/expected.json:
RoPE inv_freq / attention_scaling as the model computes them, and per-tensor shapes and float64
sums of the saved bf16 values, which the C++ loader must reproduce.
"""
import json
import os
import sys

import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from safetensors import safe_open


def main(out):
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                  mlp_only_layers=[1], norm_topk_prob=True, max_position_embeddings=8192, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 2048})
    cfg = Qwen3MoeConfig(**kwargs)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)  # fp32: the rotary buffers are read before the bf16 cast
    rot = model.model.rotary_emb
    inv_freq = rot.inv_freq.float().tolist()
    scaling = float(rot.attention_scaling)
    model = model.to(torch.bfloat16)
    model.save_pretrained(os.path.join(out, "single"))
    model.save_pretrained(os.path.join(out, "sharded"), max_shard_size="20KB")

    tensors = {}
    path = os.path.join(out, "single", "model.safetensors")
    with safe_open(path, "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            tensors[name] = {"shape": list(t.shape), "sum": float(t.double().sum())}
    with open(os.path.join(out, "expected.json"), "w") as fh:
        json.dump({"transformers": transformers.__version__, "inv_freq": inv_freq, "attention_scaling": scaling,
                   "tensors": tensors}, fh, indent=1)
    print("transformers", transformers.__version__, "tensors", len(tensors), "attention_scaling", scaling)
    print("shards:", sorted(os.listdir(os.path.join(out, "sharded"))))
    print(open(os.path.join(out, "single", "config.json")).read())


if __name__ == "__main__":
    main(sys.argv[1])
