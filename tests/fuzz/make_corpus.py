#!/usr/bin/env python3
"""Writes the seed corpora under tests/fuzz/corpus/<target>/ (checked in; rerun after editing).

Seeds are small valid inputs (plus a few near-misses) so that libFuzzer starts from the
interesting parts of each format instead of discovering JSON from scratch."""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def safetensors(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape, raw bytes), laid out in order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def seeds_safetensors():
    write("safetensors", "two_tensors", safetensors(
        [("a", "F32", [2], struct.pack("<2f", 1.0, -2.0)), ("b.weight", "BF16", [1, 2], b"\x80\x3f\x00\x40")],
        metadata={"format": "pt"}))
    write("safetensors", "all_dtypes", safetensors(
        [("f16", "F16", [1], b"\x00\x3c"), ("i32", "I32", [1], b"\x01\x00\x00\x00"),
         ("i64", "I64", [1], b"\x02" + b"\x00" * 7), ("u8", "U8", [3], b"xyz"), ("empty", "F32", [0, 4], b"")],
        pad=False))
    write("safetensors", "scalar", safetensors([("s", "F32", [], b"\x00\x00\x80\x3f")]))
    write("safetensors", "empty_header", struct.pack("<Q", 2) + b"{}")
    # The head of the dense fixture's header, truncated: a realistic header shape.
    with open(os.path.join(ROOT, "tests/fixtures/dense_qwen3/model.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    first = {k: header[k] for k in list(header)[:3]}
    write("safetensors", "fixture_head", struct.pack("<Q", len(json.dumps(first))) + json.dumps(first).encode())


def seeds_config():
    fixtures = os.path.join(ROOT, "tests/fixtures")
    for d in sorted(os.listdir(fixtures)):
        p = os.path.join(fixtures, d, "config.json")
        if os.path.isfile(p):
            with open(p) as f:
                write("config", d + ".json", json.dumps(json.load(f), separators=(",", ":")))
    hub_moe = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [0], "norm_topk_prob": True,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 1000000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": [2, 3], "tie_word_embeddings": False}
    write("config", "hub_moe_yarn.json", json.dumps(hub_moe, separators=(",", ":")))
    linear = dict(hub_moe, rope_scaling={"type": "linear", "factor": 2.0})
    write("config", "hub_moe_linear.json", json.dumps(linear, separators=(",", ":")))


def byte_symbols():
    """GPT-2's byte -> printable unicode mapping (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def seeds_tokenizer_json():
    sym = byte_symbols()
    vocab = {sym[b]: b for b in range(256)}
    vocab["he"] = 256
    vocab["Ġw"] = 257
    regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = {
        "version": "1.0",
        "added_tokens": [{"id": 258, "content": "<|im_start|>", "special": True},
                         {"id": 259, "content": "<think>", "special": False, "normalized": False}],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": ["h e", "Ġ w"]},
    }
    write("tokenizer_json", "qwen_like.json", json.dumps(tok, ensure_ascii=False, separators=(",", ":")))
    tok2 = dict(tok, normalizer=None, pre_tokenizer={"type": "ByteLevel", "use_regex": True},
                added_tokens=[], model=dict(tok["model"], merges=[["h", "e"], ["Ġ", "w"]]))
    write("tokenizer_json", "gpt2_like.json", json.dumps(tok2, ensure_ascii=False, separators=(",", ":")))


def seeds_tokenizer():
    # First byte: mode (even: encode text, bit 1 = parse specials, bit 2 = skip specials when
    # decoding; odd: decode 3-byte ids).
    write("tokenizer", "ascii", b"\x00Hello, world! It's 2026: 3.14 + x_y == z\n\n  done.")
    write("tokenizer", "chat", b"\x02<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok")
    write("tokenizer", "unicode", "\x00你好，世界 café naïve e\u0301 🙂👍🏽 Ω≈ç √ ١٢٣ \t\r\n".encode())
    write("tokenizer", "invalid_utf8", b"\x04ab\xff\xfe c\xc3 d\xe4\xbd e\xed\xa0\x80 f\xf4\x90\x80\x80")
    write("tokenizer", "ids", b"\x01" + b"".join(struct.pack("<I", i)[:3] for i in [9707, 11, 1879, 151644, 151645, 0, 220]))
    write("tokenizer", "split_char_ids", b"\x03" + b"".join(struct.pack("<I", i)[:3] for i in [56568, 52801, 247, 98, 5]))


def seeds_api():
    # First byte: endpoint (even: chat, odd: completion).
    chat = {"model": "qwen3", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                            {"role": "assistant", "content": None, "reasoning_content": "r"},
                                            {"role": "developer", "content": "x"}],
            "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.0, "seed": 42,
            "stop": ["\n\n", "END"], "stop_token_ids": [151645], "stream": True,
            "stream_options": {"include_usage": True}, "chat_template_kwargs": {"enable_thinking": False},
            "separate_reasoning": False, "user": "u1", "n": 1, "frequency_penalty": 0,
            "response_format": {"type": "text"}, "logit_bias": {}, "tools": []}
    write("api", "chat_full", b"\x00" + json.dumps(chat).encode())
    write("api", "chat_min", b"\x00" + b'{"messages":[{"role":"user","content":"hello"}]}')
    write("api", "completion_text", b"\x01" + b'{"prompt":"Once upon","max_completion_tokens":8,"ignore_eos":true,"echo":false,"suffix":""}')
    write("api", "completion_ids", b"\x01" + b'{"prompt":[1,2,3],"stop":"x","temperature":0,"max_tokens":3.0}')
    write("api", "completion_nested", b"\x01" + b'{"prompt":[[5,6]],"repetition_penalty":1,"logprobs":false}')
    tools = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"c\": 1}"}},
                              {"id": "c2", "type": "function", "function": {"name": "w", "arguments": {"c": [1.5, None]}}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
             "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object", "b": 1, "a": 2}}}],
             "tool_choice": {"type": "function", "function": {"name": "w"}}, "n": 2, "logprobs": True, "top_logprobs": 3}
    write("api", "chat_tools", b"\x00" + json.dumps(tools).encode())
    write("api", "completion_logprobs", b"\x01" + b'{"prompt":"a","logprobs":5,"n":3}')


if __name__ == "__main__":
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    seeds_safetensors()
    seeds_config()
    seeds_tokenizer_json()
    seeds_tokenizer()
    seeds_api()
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        print(t, len(files), "files,", sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files), "bytes")
