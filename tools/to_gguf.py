#!/usr/bin/env python3
"""Convert a Hugging Face / cpinfer Qwen3-MoE (or dense Qwen3) checkpoint directory to GGUF v3.

    python3 tools/to_gguf.py MODEL_DIR [--out FILE.gguf] [--outtype bf16|f32]

MODEL_DIR holds config.json, model.safetensors (or shards named by model.safetensors.index.json),
tokenizer.json and tokenizer_config.json: what `cpinfer demo-model` writes and what the Hub ships.
The output is what llama.cpp loads as architecture `qwen3moe` (`qwen3` for Qwen3ForCausalLM):

- tensors get llama.cpp's names (token_embd, blk.N.attn_q, blk.N.ffn_gate_inp, ...); the experts of
  a layer are stacked into one 3-D tensor each, blk.N.ffn_{gate,up,down}_exps, in expert order
  (per-expert `mlp.experts.E.*_proj.weight` and transformers 5's fused `gate_up_proj` both work);
- GGUF lists dimensions innermost first, so a row-major [out, in] matrix is ne = [in, out] and its
  bytes are copied unchanged;
- 1-D tensors (norms) and the MoE router stay F32 whatever --outtype says, as in a stock llama.cpp
  conversion; the other matrices are BF16 (default) or F32 (--outtype f32);
- the tokenizer is llama.cpp's "gpt2" byte-level BPE with the "qwen2" pre-tokenizer: every id up to
  config.json's vocab_size gets a token (ids without one become [PADn]), added tokens that are special
  or look like <|...|> are CONTROL, merges are written as "left right".

Standard library only (no numpy, no torch, no gguf-py). Sources may be BF16, F16 or F32.
"""
import argparse
import json
import mmap
import os
import struct
import sys
from array import array

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# GGUF metadata value types.
T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = 4, 5, 6, 7, 8, 9
# ggml tensor types and the matching general.file_type (llama_ftype) values.
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
FTYPE = {GGML_F32: 0, GGML_BF16: 32}
OUTTYPES = {"f32": GGML_F32, "bf16": GGML_BF16}
ELEM_SIZE = {GGML_F32: 4, GGML_F16: 2, GGML_BF16: 2}
SRC_DTYPES = {"F32": GGML_F32, "F16": GGML_F16, "BF16": GGML_BF16}

# Token types (llama_token_type).
TOK_NORMAL, TOK_CONTROL, TOK_USER_DEFINED = 1, 3, 4

CHUNK = 1 << 24  # elements per conversion chunk


class ConvertError(Exception):
    pass


# ---------------------------------------------------------------- safetensors input

class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read lazily."""

    def __init__(self, model_dir):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise ConvertError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
        self.tensors = {}  # name -> (mmap, dtype, shape, begin, end)
        self._maps = []
        for fname in files:
            path = os.path.join(model_dir, fname)
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mm)
            (hlen,) = struct.unpack_from("<Q", mm, 0)
            header = json.loads(bytes(mm[8:8 + hlen]).decode("utf-8"))
            base = 8 + hlen
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SRC_DTYPES:
                    raise ConvertError(f"{path}: tensor {name} has dtype {info['dtype']}; "
                                       f"only {', '.join(SRC_DTYPES)} sources are converted")
                b, e = info["data_offsets"]
                self.tensors[name] = (mm, SRC_DTYPES[info["dtype"]], list(info["shape"]), base + b, base + e)

    def has(self, name):
        return name in self.tensors

    def shape(self, name):
        if name not in self.tensors:
            raise ConvertError(f"missing tensor {name}")
        return self.tensors[name][2]

    def raw(self, name, first_row=0, rows=None):
        """(ggml type, bytes) of the tensor or of `rows` rows of its outermost dimension."""
        mm, dtype, shape, b, e = self.tensors[name]
        if rows is not None:
            row_bytes = (e - b) // shape[0]
            b, e = b + first_row * row_bytes, b + (first_row + rows) * row_bytes
        return dtype, mm[b:e]


# ---------------------------------------------------------------- element conversion

def _to_f32(src_type, data):
    if src_type == GGML_F32:
        return bytes(data)
    n = len(data) // 2
    if src_type == GGML_BF16:
        out = bytearray(4 * n)  # little-endian: bf16 bits are the high half of the f32
        out[2::4] = data[0::2]
        out[3::4] = data[1::2]
        return bytes(out)
    parts = []  # F16: through Python floats, in chunks
    for i in range(0, n, CHUNK):
        k = min(CHUNK, n - i)
        parts.append(struct.pack(f"<{k}f", *struct.unpack_from(f"<{k}e", data, 2 * i)))
    return b"".join(parts)


def _f32_to_bf16(data):
    """Round to nearest even, as llama.cpp's converter does; NaNs stay (quiet) NaNs."""
    words = array("I")
    words.frombytes(data)
    if sys.byteorder != "little":
        words.byteswap()
    out = array("H", bytes(2 * len(words)))
    for i, x in enumerate(words):
        if (x & 0x7FFFFFFF) > 0x7F800000:
            out[i] = (x >> 16) | 64
        else:
            out[i] = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def convert(src_type, data, dst_type):
    if src_type == dst_type:
        return bytes(data)
    if dst_type == GGML_F32:
        return _to_f32(src_type, data)
    if dst_type == GGML_BF16:
        return _f32_to_bf16(_to_f32(src_type, data))
    raise ConvertError(f"no conversion to ggml type {dst_type}")


# ---------------------------------------------------------------- GGUF writer

def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


class GGUFWriter:
    """Collects metadata and tensor descriptions, then writes the file in one pass."""

    def __init__(self):
        self.kv = []       # encoded key/value records
        self.tensors = []  # (name, ne, ggml type, nbytes, produce() -> bytes)

    def add(self, key, vtype, value):
        rec = _str(key) + struct.pack("<I", vtype)
        if vtype == T_ARRAY:
            etype, items = value
            rec += struct.pack("<IQ", etype, len(items))
            if etype == T_STRING:
                rec += b"".join(_str(s) for s in items)
            elif etype == T_INT32:
                rec += array("i", items).tobytes() if sys.byteorder == "little" else \
                    struct.pack(f"<{len(items)}i", *items)
            else:
                raise ConvertError(f"array of type {etype} not supported")
        elif vtype == T_STRING:
            rec += _str(value)
        elif vtype == T_UINT32:
            rec += struct.pack("<I", value)
        elif vtype == T_INT32:
            rec += struct.pack("<i", value)
        elif vtype == T_FLOAT32:
            rec += struct.pack("<f", value)
        elif vtype == T_BOOL:
            rec += struct.pack("<?", bool(value))
        else:
            raise ConvertError(f"metadata type {vtype} not supported")
        self.kv.append(rec)

    def add_tensor(self, name, shape, ggml_type, produce):
        """shape is row-major (outermost first), as in safetensors; GGUF stores it reversed."""
        n = 1
        for d in shape:
            n *= d
        self.tensors.append((name, list(reversed(shape)), ggml_type, n * ELEM_SIZE[ggml_type], produce))

    def write(self, path, progress=None):
        head = bytearray(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(self.tensors), len(self.kv)))
        for rec in self.kv:
            head += rec
        offset = 0
        for name, ne, ttype, nbytes, _ in self.tensors:
            head += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
            head += struct.pack("<IQ", ttype, offset)
            offset += nbytes + (-nbytes % ALIGNMENT)
        head += bytes(-len(head) % ALIGNMENT)
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            f.write(head)
            for i, (name, ne, ttype, nbytes, produce) in enumerate(self.tensors):
                data = produce()
                if len(data) != nbytes:
                    raise ConvertError(f"{name}: produced {len(data)} bytes, expected {nbytes}")
                f.write(data)
                f.write(bytes(-nbytes % ALIGNMENT))
                if progress:
                    progress(i + 1, len(self.tensors), name)
        os.replace(tmp, path)


# ---------------------------------------------------------------- model mapping

def _experts_stacked(ckpt, layer, proj, n_experts, inter, dst_type):
    """ffn_{gate,up,down}_exps of one layer: [E, rows, cols] bytes in expert order."""
    p = f"model.layers.{layer}.mlp.experts."
    fused = next((n for n in (p + "gate_up_proj", p + "gate_up_proj.weight") if ckpt.has(n)), None)
    if fused is not None and proj in ("gate", "up"):
        # transformers 5 layout [E, 2I, H]: each expert's gate rows, then its up rows.
        def produce():
            parts = []
            for e in range(n_experts):
                src_type, data = _rows_3d(ckpt, fused, e, 0 if proj == "gate" else inter, inter)
                parts.append(convert(src_type, data, dst_type))
            return b"".join(parts)
        return produce
    if fused is not None:  # fused down_proj [E, H, I]
        name = next(n for n in (p + "down_proj", p + "down_proj.weight") if ckpt.has(n))
        return lambda: convert(*ckpt.raw(name), dst_type)
    names = [f"{p}{e}.{proj}_proj.weight" for e in range(n_experts)]
    return lambda: b"".join(convert(*ckpt.raw(n), dst_type) for n in names)


def _rows_3d(ckpt, name, outer, first_row, rows):
    """Rows [first_row, first_row+rows) of slice `outer` of a 3-D tensor."""
    mm, dtype, shape, b, e = ckpt.tensors[name]
    row_bytes = (e - b) // (shape[0] * shape[1])
    start = b + (outer * shape[1] + first_row) * row_bytes
    return dtype, mm[start:start + rows * row_bytes]


def _check_shape(ckpt, name, want):
    got = ckpt.shape(name)
    if got != want:
        raise ConvertError(f"{name} has shape {got}, config.json implies {want}")


def build_tensors(w, ckpt, cfg, moe, outtype):
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // Hq
    L = cfg["num_hidden_layers"]

    def plain(src, dst, want, force_f32=False):
        _check_shape(ckpt, src, want)
        ttype = GGML_F32 if (force_f32 or len(want) == 1) else outtype
        w.add_tensor(dst, want, ttype, lambda: convert(*ckpt.raw(src), ttype))

    plain("model.embed_tokens.weight", "token_embd.weight", [V, H])
    plain("model.norm.weight", "output_norm.weight", [H])
    if not cfg.get("tie_word_embeddings", False):
        plain("lm_head.weight", "output.weight", [V, H])
    for l in range(L):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        plain(p + "input_layernorm.weight", b + "attn_norm.weight", [H])
        plain(p + "self_attn.q_proj.weight", b + "attn_q.weight", [Hq * D, H])
        plain(p + "self_attn.k_proj.weight", b + "attn_k.weight", [Hkv * D, H])
        plain(p + "self_attn.v_proj.weight", b + "attn_v.weight", [Hkv * D, H])
        plain(p + "self_attn.o_proj.weight", b + "attn_output.weight", [H, Hq * D])
        plain(p + "self_attn.q_norm.weight", b + "attn_q_norm.weight", [D])
        plain(p + "self_attn.k_norm.weight", b + "attn_k_norm.weight", [D])
        plain(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", [H])
        if not moe:
            I = cfg["intermediate_size"]
            plain(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", [I, H])
            plain(p + "mlp.up_proj.weight", b + "ffn_up.weight", [I, H])
            plain(p + "mlp.down_proj.weight", b + "ffn_down.weight", [H, I])
            continue
        E, I = cfg["num_experts"], cfg["moe_intermediate_size"]
        plain(p + "mlp.gate.weight", b + "ffn_gate_inp.weight", [E, H], force_f32=True)
        ex = p + "mlp.experts."
        fused = next((n for n in (ex + "gate_up_proj", ex + "gate_up_proj.weight") if ckpt.has(n)), None)
        if fused is not None:
            _check_shape(ckpt, fused, [E, 2 * I, H])
            down = next((n for n in (ex + "down_proj", ex + "down_proj.weight") if ckpt.has(n)), None)
            if down is None:
                raise ConvertError(f"{fused} is fused but there is no fused {ex}down_proj")
            _check_shape(ckpt, down, [E, H, I])
        else:
            for e in range(E):
                _check_shape(ckpt, f"{ex}{e}.gate_proj.weight", [I, H])
                _check_shape(ckpt, f"{ex}{e}.up_proj.weight", [I, H])
                _check_shape(ckpt, f"{ex}{e}.down_proj.weight", [H, I])
        w.add_tensor(b + "ffn_gate_exps.weight", [E, I, H], outtype, _experts_stacked(ckpt, l, "gate", E, I, outtype))
        w.add_tensor(b + "ffn_up_exps.weight", [E, I, H], outtype, _experts_stacked(ckpt, l, "up", E, I, outtype))
        w.add_tensor(b + "ffn_down_exps.weight", [E, H, I], outtype, _experts_stacked(ckpt, l, "down", E, I, outtype))


def add_hparams(w, cfg, arch, moe, outtype, name):
    H, Hq = cfg["hidden_size"], cfg["num_attention_heads"]
    D = cfg.get("head_dim") or H // Hq
    w.add("general.architecture", T_STRING, arch)
    w.add("general.type", T_STRING, "model")
    w.add("general.name", T_STRING, name)
    w.add("general.file_type", T_UINT32, FTYPE[outtype])
    w.add("general.quantization_version", T_UINT32, 2)
    w.add(f"{arch}.block_count", T_UINT32, cfg["num_hidden_layers"])
    w.add(f"{arch}.context_length", T_UINT32, cfg.get("max_position_embeddings", 32768))
    w.add(f"{arch}.embedding_length", T_UINT32, H)
    w.add(f"{arch}.feed_forward_length", T_UINT32, cfg.get("intermediate_size", 0))
    w.add(f"{arch}.attention.head_count", T_UINT32, Hq)
    w.add(f"{arch}.attention.head_count_kv", T_UINT32, cfg["num_key_value_heads"])
    w.add(f"{arch}.attention.key_length", T_UINT32, D)
    w.add(f"{arch}.attention.value_length", T_UINT32, D)
    w.add(f"{arch}.rope.dimension_count", T_UINT32, D)
    w.add(f"{arch}.rope.freq_base", T_FLOAT32, float(cfg.get("rope_theta", 1000000.0)))
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", T_FLOAT32, float(cfg.get("rms_norm_eps", 1e-6)))
    if moe:
        w.add(f"{arch}.expert_count", T_UINT32, cfg["num_experts"])
        w.add(f"{arch}.expert_used_count", T_UINT32, cfg["num_experts_per_tok"])
        w.add(f"{arch}.expert_feed_forward_length", T_UINT32, cfg["moe_intermediate_size"])


def _looks_special(text):
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def _token_id(spec, vocab):
    if isinstance(spec, dict):
        spec = spec.get("content")
    return vocab.get(spec) if isinstance(spec, str) else None


def add_tokenizer(w, model_dir, cfg, pre):
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    tcfg_path = os.path.join(model_dir, "tokenizer_config.json")
    tcfg = {}
    if os.path.isfile(tcfg_path):
        with open(tcfg_path, encoding="utf-8") as f:
            tcfg = json.load(f)
    model = tok["model"]
    if model.get("type") != "BPE":
        raise ConvertError(f"tokenizer.json model type {model.get('type')!r}: only byte-level BPE is converted")
    vocab = dict(model["vocab"])
    added = {}
    for a in tok.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        added[a["id"]] = a
    by_id = {i: t for t, i in vocab.items()}
    n_vocab = max(cfg.get("vocab_size", 0), max(by_id) + 1)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOK_USER_DEFINED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TOK_CONTROL if added[i].get("special") or _looks_special(by_id[i]) else TOK_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TOK_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add("tokenizer.ggml.model", T_STRING, "gpt2")
    w.add("tokenizer.ggml.pre", T_STRING, pre)
    w.add("tokenizer.ggml.tokens", T_ARRAY, (T_STRING, tokens))
    w.add("tokenizer.ggml.token_type", T_ARRAY, (T_INT32, types))
    w.add("tokenizer.ggml.merges", T_ARRAY, (T_STRING, merges))
    # Special ids: tokenizer_config.json's *_token first, config.json's *_token_id for the rest.
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                     ("unk", "unknown_token_id")):
        tid = _token_id(tcfg.get(f"{typ}_token"), vocab)
        if tid is None:
            tid = cfg.get(f"{typ}_token_id")
            if isinstance(tid, list):
                tid = tid[0] if tid else None
        if tid is not None:
            w.add(f"tokenizer.ggml.{key}", T_UINT32, int(tid))
    w.add("tokenizer.ggml.add_bos_token", T_BOOL, bool(tcfg.get("add_bos_token", False)))
    if isinstance(tcfg.get("chat_template"), str):
        w.add("tokenizer.chat_template", T_STRING, tcfg["chat_template"])
    return n_vocab


def model_kind(cfg):
    archs = cfg.get("architectures") or []
    if "Qwen3MoeForCausalLM" in archs or cfg.get("model_type") == "qwen3_moe":
        if cfg.get("mlp_only_layers"):
            raise ConvertError("mlp_only_layers is not empty: llama.cpp's qwen3moe has MoE in every layer")
        if cfg.get("decoder_sparse_step", 1) != 1:
            raise ConvertError("decoder_sparse_step != 1: llama.cpp's qwen3moe has MoE in every layer")
        if cfg.get("norm_topk_prob") is False:
            raise ConvertError("norm_topk_prob is false: llama.cpp's qwen3moe always renormalizes the top-k weights")
        return "qwen3moe", True
    if "Qwen3ForCausalLM" in archs or cfg.get("model_type") == "qwen3":
        return "qwen3", False
    raise ConvertError(f"architectures {archs}: only Qwen3MoeForCausalLM and Qwen3ForCausalLM are converted")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="checkpoint directory (config.json, safetensors, tokenizer files)")
    ap.add_argument("--out", help="output file (default: MODEL_DIR/model-<outtype>.gguf)")
    ap.add_argument("--outtype", choices=sorted(OUTTYPES), default="bf16",
                    help="type of the matrices (norms and the router are always f32); default bf16")
    ap.add_argument("--name", help="general.name (default: the directory's name)")
    ap.add_argument("--pre", default="qwen2", help="tokenizer.ggml.pre (default qwen2, Qwen3's pre-tokenizer)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        with open(os.path.join(args.model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        arch, moe = model_kind(cfg)
        outtype = OUTTYPES[args.outtype]
        out = args.out or os.path.join(args.model_dir, f"model-{args.outtype}.gguf")
        name = args.name or os.path.basename(os.path.abspath(args.model_dir))
        ckpt = Checkpoint(args.model_dir)
        w = GGUFWriter()
        add_hparams(w, cfg, arch, moe, outtype, name)
        n_vocab = add_tokenizer(w, args.model_dir, cfg, args.pre)
        if n_vocab != cfg["vocab_size"]:
            raise ConvertError(f"the tokenizer has {n_vocab} ids, more than vocab_size {cfg['vocab_size']}")
        build_tensors(w, ckpt, cfg, moe, outtype)
        step = max(1, len(w.tensors) // 10)

        def progress(i, n, tname):
            if not args.quiet and (i % step == 0 or i == n):
                print(f"[to_gguf] {i}/{n} tensors ({tname})", file=sys.stderr)
        w.write(out, progress)
    except (ConvertError, KeyError, OSError, ValueError) as e:
        print(f"to_gguf: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"[to_gguf] wrote {out}: {arch}, {len(w.tensors)} tensors, {args.outtype}, "
              f"{os.path.getsize(out) / 2**20:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
