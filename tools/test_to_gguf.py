#!/usr/bin/env python3
"""Tests of tools/to_gguf.py, standard library only: python3 tools/test_to_gguf.py

Tiny checkpoints (random BF16 weights, a 10-token byte-level BPE tokenizer) are written here, converted,
and the GGUF read back with a reader written from the format description (not the converter's code):
header, metadata, tensor table, alignment, the bytes of every tensor, the expert stacking (per-expert
and transformers 5's fused gate_up layouts must give the same file), BF16/F32 conversion and refusals.
"""
import json
import os
import random
import struct
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import to_gguf  # noqa: E402

# ---------------------------------------------------------------- writing test checkpoints

def rand_bf16(rng, n):
    """n random bf16 values of moderate size (|x| in [2^-8, 2^-6)), as little-endian bytes."""
    out = bytearray()
    for _ in range(n):
        out += struct.pack("<H", (rng.getrandbits(1) << 15) | ((0x77 + rng.getrandbits(1)) << 7) | rng.getrandbits(7))
    return bytes(out)


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, shape, bytes)."""
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


TOKENS = ["a", "b", "c", "ab", "Ġ", "Ġa", "abc"]
ADDED = [("<|endoftext|>", True), ("<|im_end|>", True), ("<think>", False)]


def write_tokenizer(d, vocab_size):
    vocab = {t: i for i, t in enumerate(TOKENS)}
    added = [{"id": len(TOKENS) + k, "content": c, "special": s} for k, (c, s) in enumerate(ADDED)]
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"], "ab c", ["Ġ", "a"]]},
           "added_tokens": added}
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "chat_template": "{{ messages }}"}, f)
    return vocab_size


def make_model(d, dense=False, fused=False, layers=2, H=32, E=4, I=16, Hq=2, Hkv=1, D=16, V=12, tied=True,
               seed=0, extra_cfg=None):
    """A Qwen3-MoE (or dense Qwen3) checkpoint; returns {hf name: bytes} of what was written."""
    rng = random.Random(seed)
    os.makedirs(d, exist_ok=True)
    cfg = {"architectures": ["Qwen3ForCausalLM" if dense else "Qwen3MoeForCausalLM"],
           "model_type": "qwen3" if dense else "qwen3_moe", "hidden_size": H, "num_hidden_layers": layers,
           "num_attention_heads": Hq, "num_key_value_heads": Hkv, "head_dim": D, "vocab_size": V,
           "intermediate_size": 2 * H, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "max_position_embeddings": 4096, "tie_word_embeddings": tied, "bos_token_id": 7, "eos_token_id": 8}
    if not dense:
        cfg.update({"num_experts": E, "num_experts_per_tok": 2, "moe_intermediate_size": I,
                    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []})
    cfg.update(extra_cfg or {})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_tokenizer(d, V)
    t = {}

    def add(name, shape):
        n = 1
        for s in shape:
            n *= s
        t[name] = ("BF16", shape, rand_bf16(rng, n))

    add("model.embed_tokens.weight", [V, H])
    add("model.norm.weight", [H])
    if not tied:
        add("lm_head.weight", [V, H])
    for l in range(layers):
        p = f"model.layers.{l}."
        add(p + "input_layernorm.weight", [H])
        add(p + "post_attention_layernorm.weight", [H])
        add(p + "self_attn.q_proj.weight", [Hq * D, H])
        add(p + "self_attn.k_proj.weight", [Hkv * D, H])
        add(p + "self_attn.v_proj.weight", [Hkv * D, H])
        add(p + "self_attn.o_proj.weight", [H, Hq * D])
        add(p + "self_attn.q_norm.weight", [D])
        add(p + "self_attn.k_norm.weight", [D])
        if dense:
            for proj, shape in (("gate", [2 * H, H]), ("up", [2 * H, H]), ("down", [H, 2 * H])):
                add(f"{p}mlp.{proj}_proj.weight", shape)
            continue
        add(p + "mlp.gate.weight", [E, H])
        for e in range(E):
            for proj, shape in (("gate", [I, H]), ("up", [I, H]), ("down", [H, I])):
                add(f"{p}mlp.experts.{e}.{proj}_proj.weight", shape)
    written = {k: v[2] for k, v in t.items()}
    if fused:  # transformers 5: [E, 2I, H] gate then up per expert, [E, H, I] down
        for l in range(layers):
            p = f"model.layers.{l}.mlp.experts."
            gu = b"".join(t.pop(f"{p}{e}.gate_proj.weight")[2] + t.pop(f"{p}{e}.up_proj.weight")[2]
                          for e in range(E))
            dn = b"".join(t.pop(f"{p}{e}.down_proj.weight")[2] for e in range(E))
            t[p + "gate_up_proj"] = ("BF16", [E, 2 * I, H], gu)
            t[p + "down_proj"] = ("BF16", [E, H, I], dn)
    write_safetensors(os.path.join(d, "model.safetensors"), t)
    return written, cfg

# ---------------------------------------------------------------- reading GGUF (independent reader)

class Reader:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.buf = f.read()
        self.pos = 0
        assert self.buf[:4] == b"GGUF", "magic"
        self.pos = 4
        self.version, n_tensors, n_kv = self.u("<I"), self.u("<Q"), self.u("<Q")
        self.kv = {}
        for _ in range(n_kv):
            key = self.s()
            self.kv[key] = self.value(self.u("<I"))
        self.tensors = {}
        for _ in range(n_tensors):
            name = self.s()
            nd = self.u("<I")
            ne = [self.u("<Q") for _ in range(nd)]
            self.tensors[name] = (ne, self.u("<I"), self.u("<Q"))
        align = self.kv.get("general.alignment", 32)
        self.data = self.pos + (-self.pos % align)

    def u(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def s(self):
        n = self.u("<Q")
        v = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return v

    def value(self, t):
        fmts = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
        if t == 8:
            return self.s()
        if t == 9:
            et, n = self.u("<I"), self.u("<Q")
            return [self.value(et) for _ in range(n)]
        return self.u(fmts[t])

    def tensor_bytes(self, name):
        ne, t, off = self.tensors[name]
        n = 1
        for d in ne:
            n *= d
        size = n * {0: 4, 1: 2, 30: 2}[t]
        return self.buf[self.data + off:self.data + off + size]


def bf16_to_f32_bytes(b):
    return b"".join(b"\x00\x00" + b[i:i + 2] for i in range(0, len(b), 2))

# ---------------------------------------------------------------- tests

class ToGGUF(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def convert(self, d, *args):
        out = os.path.join(d, "out.gguf")
        self.assertEqual(to_gguf.main([d, "--out", out, "--quiet", *args]), 0)
        return Reader(out), out

    def test_moe_bf16_layout_metadata_and_bytes(self):
        d = os.path.join(self.dir, "m")
        w, cfg = make_model(d)
        r, _ = self.convert(d)
        self.assertEqual(r.version, 3)
        kv = r.kv
        self.assertEqual(kv["general.architecture"], "qwen3moe")
        self.assertEqual(kv["general.file_type"], 32)
        for key, want in (("block_count", 2), ("embedding_length", 32), ("attention.head_count", 2),
                          ("attention.head_count_kv", 1), ("attention.key_length", 16), ("expert_count", 4),
                          ("expert_used_count", 2), ("expert_feed_forward_length", 16), ("context_length", 4096)):
            self.assertEqual(kv[f"qwen3moe.{key}"], want, key)
        self.assertAlmostEqual(kv["qwen3moe.rope.freq_base"], 1e6)
        self.assertAlmostEqual(kv["qwen3moe.attention.layer_norm_rms_epsilon"], 1e-6, places=12)
        # Tokenizer: every id up to vocab_size, added tokens typed, merges as "left right".
        toks = kv["tokenizer.ggml.tokens"]
        self.assertEqual(len(toks), 12)
        self.assertEqual(toks[:7], TOKENS)
        self.assertEqual(toks[7:10], [c for c, _ in ADDED])
        self.assertEqual(toks[10:], ["[PAD10]", "[PAD11]"])
        self.assertEqual(kv["tokenizer.ggml.token_type"], [1] * 7 + [3, 3, 4, 4, 4])
        self.assertEqual(kv["tokenizer.ggml.merges"], ["a b", "ab c", "Ġ a"])
        self.assertEqual((kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]), ("gpt2", "qwen2"))
        self.assertEqual(kv["tokenizer.ggml.eos_token_id"], 8)  # from tokenizer_config's eos_token
        self.assertEqual(kv["tokenizer.ggml.bos_token_id"], 7)  # from config.json (bos_token is null)
        self.assertEqual(kv["tokenizer.ggml.padding_token_id"], 7)
        self.assertIs(kv["tokenizer.ggml.add_bos_token"], False)
        self.assertEqual(kv["tokenizer.chat_template"], "{{ messages }}")
        # Tensors: names, reversed shapes, types, aligned offsets, bytes.
        self.assertNotIn("output.weight", r.tensors)  # tied
        self.assertEqual(r.tensors["token_embd.weight"][:2], ([32, 12], 30))
        self.assertEqual(r.tensors["blk.1.ffn_gate_exps.weight"][:2], ([32, 16, 4], 30))
        self.assertEqual(r.tensors["blk.1.ffn_down_exps.weight"][:2], ([16, 32, 4], 30))
        self.assertEqual(r.tensors["blk.0.ffn_gate_inp.weight"][:2], ([32, 4], 0))  # router F32
        self.assertEqual(r.tensors["blk.0.attn_q_norm.weight"][:2], ([16], 0))     # norms F32
        for name, (_, _, off) in r.tensors.items():
            self.assertEqual(off % 32, 0, name)
        self.assertEqual(r.tensor_bytes("token_embd.weight"), w["model.embed_tokens.weight"])
        self.assertEqual(r.tensor_bytes("blk.1.attn_output.weight"), w["model.layers.1.self_attn.o_proj.weight"])
        self.assertEqual(r.tensor_bytes("blk.0.ffn_norm.weight"),
                         bf16_to_f32_bytes(w["model.layers.0.post_attention_layernorm.weight"]))
        self.assertEqual(r.tensor_bytes("blk.1.ffn_gate_inp.weight"),
                         bf16_to_f32_bytes(w["model.layers.1.mlp.gate.weight"]))
        for proj in ("gate", "up", "down"):
            want = b"".join(w[f"model.layers.1.mlp.experts.{e}.{proj}_proj.weight"] for e in range(4))
            self.assertEqual(r.tensor_bytes(f"blk.1.ffn_{proj}_exps.weight"), want, proj)
        self.assertEqual(len(r.tensors), 2 + 2 * 12)

    def test_fused_experts_give_the_same_file(self):
        a, b = os.path.join(self.dir, "a"), os.path.join(self.dir, "b")
        make_model(a, seed=3)
        make_model(b, seed=3, fused=True)
        _, pa = self.convert(a, "--name", "x")
        _, pb = self.convert(b, "--name", "x")
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            self.assertEqual(fa.read(), fb.read())

    def test_f32_output_and_untied_head(self):
        d = os.path.join(self.dir, "f")
        w, _ = make_model(d, tied=False)
        r, _ = self.convert(d, "--outtype", "f32")
        self.assertEqual(r.kv["general.file_type"], 0)
        self.assertEqual(r.tensors["output.weight"][:2], ([32, 12], 0))
        self.assertEqual(r.tensor_bytes("output.weight"), bf16_to_f32_bytes(w["lm_head.weight"]))
        want = b"".join(w[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] for e in range(4))
        self.assertEqual(r.tensor_bytes("blk.0.ffn_up_exps.weight"), bf16_to_f32_bytes(want))

    def test_dense_qwen3(self):
        d = os.path.join(self.dir, "dense")
        w, _ = make_model(d, dense=True)
        r, _ = self.convert(d)
        self.assertEqual(r.kv["general.architecture"], "qwen3")
        self.assertNotIn("qwen3.expert_count", r.kv)
        self.assertEqual(r.tensors["blk.0.ffn_gate.weight"][:2], ([32, 64], 30))
        self.assertEqual(r.tensors["blk.0.ffn_down.weight"][:2], ([64, 32], 30))
        self.assertEqual(r.tensor_bytes("blk.1.ffn_up.weight"), w["model.layers.1.mlp.up_proj.weight"])
        self.assertFalse(any("exps" in n or "gate_inp" in n for n in r.tensors))

    def test_f32_to_bf16_rounds_to_nearest_even(self):
        cases = {0x3F800000: 0x3F80, 0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3F808001: 0x3F81,
                 0x3F807FFF: 0x3F80, 0xBF80C000: 0xBF81, 0x7F800000: 0x7F80, 0x7FC00001: 0x7FC0}
        src = struct.pack(f"<{len(cases)}I", *cases)
        got = struct.unpack(f"<{len(cases)}H", to_gguf.convert(to_gguf.GGML_F32, src, to_gguf.GGML_BF16))
        self.assertEqual(list(got), list(cases.values()))
        f16 = struct.pack("<3e", 1.5, -2.0, 0.0)
        self.assertEqual(struct.unpack("<3f", to_gguf.convert(to_gguf.GGML_F16, f16, to_gguf.GGML_F32)),
                         (1.5, -2.0, 0.0))

    def test_refusals(self):
        for extra, why in (({"norm_topk_prob": False}, "norm_topk_prob"), ({"mlp_only_layers": [0]}, "mlp_only"),
                           ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures")):
            d = os.path.join(self.dir, why)
            make_model(d, extra_cfg=extra)
            self.assertEqual(to_gguf.main([d, "--out", os.path.join(d, "x.gguf"), "--quiet"]), 1, why)
            self.assertFalse(os.path.exists(os.path.join(d, "x.gguf")))
        d = os.path.join(self.dir, "shape")
        make_model(d, extra_cfg={"moe_intermediate_size": 8})  # the tensors say 16
        self.assertEqual(to_gguf.main([d, "--out", os.path.join(d, "x.gguf"), "--quiet"]), 1)


if __name__ == "__main__":
    unittest.main()
