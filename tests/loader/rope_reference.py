#!/usr/bin/env python3
"""Reference RoPE values for tests/loader/config_test.cpp.

Computes inv_freq and attention_factor for the small cases used by the tests straight from the
formulas of transformers 5 (modeling_rope_utils: _compute_default_rope_parameters,
_compute_linear_scaling_rope_parameters, _compute_yarn_parameters), emulating torch's float32
tensor arithmetic one op at a time in pure Python (no numpy/torch needed). When transformers and
torch are importable it also runs transformers itself on the same configs and prints the largest
relative difference, which is how the hand values were cross-checked.

Usage: python3 tests/loader/rope_reference.py
"""
import math
import struct


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def pos_freqs(theta, dim):
    # base ** (arange(0, dim, 2).float() / dim), in float32
    return [f32(f32(theta) ** f32(f32(float(i)) / dim)) for i in range(0, dim, 2)]


def default(theta, dim):
    return [f32(1.0 / p) for p in pos_freqs(theta, dim)], 1.0


def linear(theta, dim, factor):
    inv, att = default(theta, dim)
    return [f32(x / f32(factor)) for x in inv], att


def yarn(theta, dim, factor, orig, beta_fast=None, beta_slow=None, truncate=True, attention_factor=None,
         mscale=None, mscale_all_dim=None):
    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = beta_fast or 32
    beta_slow = beta_slow or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pf = pos_freqs(theta, dim)
    out = []
    for i, p in enumerate(pf):
        ramp = f32(f32(float(i) - f32(low)) / f32(high - low))
        ramp = min(max(ramp, 0.0), 1.0)
        ef = f32(1.0 - ramp)
        extra = f32(1.0 / p)
        inter = f32(1.0 / f32(f32(factor) * p))
        out.append(f32(f32(inter * f32(1.0 - ef)) + f32(extra * ef)))
    return out, attention_factor


# The cases of config_test.cpp (head_dim 16, theta 10000 unless noted).
CASES = {
    "default": (lambda: default(10000.0, 16), {"rope_theta": 10000.0}),
    "linear": (lambda: linear(10000.0, 16, 2.0), {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}),
    "yarn": (lambda: yarn(10000.0, 16, 4.0, 2048),
             {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}),
    "yarn_mscale_notrunc": (
        lambda: yarn(1000000.0, 16, 8.0, 4096, beta_fast=16, truncate=False, mscale=1.0, mscale_all_dim=0.5),
        {"rope_theta": 1000000.0, "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
         "beta_fast": 16, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5}),
}


def main():
    for name, (fn, _) in CASES.items():
        inv, att = fn()
        print(f"{name}: attention_factor={att!r}")
        print("  inv_freq = {" + ", ".join(f"{x:.9e}f" for x in inv) + "}")
    try:
        import torch  # noqa: F401
        from transformers import Qwen3MoeConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except Exception as e:  # transformers is only on the GPU machine
        print(f"transformers not available ({e}); hand values only")
        return
    for name, (fn, params) in CASES.items():
        inv, att = fn()
        cfg = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=8192,
                             rope_parameters=dict(params))
        rope_type = cfg.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding
            hf_inv, hf_att = Qwen3MoeRotaryEmbedding.compute_default_rope_parameters(cfg, "cpu")
        else:
            hf_inv, hf_att = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
        hf = hf_inv.tolist()
        rel = max(abs(a - b) / abs(b) for a, b in zip(inv, hf))
        print(f"{name}: transformers attention_factor={hf_att!r} max rel diff inv_freq={rel:.3e}"
              f" bitwise_equal={inv == hf}")


if __name__ == "__main__":
    main()
