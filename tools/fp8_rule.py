"""The fine-grained FP8 format of Qwen/Qwen3-30B-A3B-FP8 (DeepSeek-V3's), for tools/make_fp8_fixture.py:
quantizing a weight per 128x128 block, dequantizing it back, checking a checkpoint against the format,
comparing it with what transformers writes, and the W8A8 forward by the same rule in plain torch
(`--fp8-forward emulate`). torch is passed in, so this module imports without it."""

import json
import os

from fixture_checkpoint import fail, log

BLOCK = 128
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def is_quantized(name, tensor):
    """The linear weights the real checkpoints store in FP8: attention projections, the dense MLP and
    every expert. Embeddings, norms, the router (`mlp.gate.weight`) and the LM head stay BF16."""
    return tensor.ndim == 2 and name.endswith("_proj.weight")


def n_blocks(n):
    return -(-n // BLOCK)


def quantize(w, torch):
    """transformers' fine-grained FP8 rule (Fp8Quantize in transformers 5.x), per 128x128 block of
    w [N, K], the last row / column blocks partial where N or K is not a multiple of 128:
    scale = 448 / amax (1 for an all-zero block), code = e4m3(clamp(w * scale, +-448)) (round to
    nearest even), weight_scale_inv = fp32(1 / scale). The same ops in the same order as
    transformers, so full blocks come out bit for bit as transformers' own quantizer writes them.
    Returns (codes [N, K] float8_e4m3fn, scale_inv [ceil(N/128), ceil(K/128)] float32)."""
    n, k = w.shape
    sn, sk = n_blocks(n), n_blocks(k)
    padded = torch.zeros(sn * BLOCK, sk * BLOCK, dtype=torch.float32)  # zeros never raise an amax
    padded[:n, :k] = w.to(torch.float32)
    blocks = padded.reshape(sn, BLOCK, sk, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # [sn, sk]
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(amax))
    scale_inv = (1.0 / scale).to(torch.float32)
    codes = torch.clamp(blocks * scale[:, None, :, None], min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn)
    codes = codes.reshape(sn * BLOCK, sk * BLOCK)[:n, :k].contiguous()
    bits = codes.view(torch.uint8)
    if bool(((bits & 0x7F) == 0x7F).any()):
        fail("quantize produced a NaN e4m3 code (the clamp should make that impossible)")
    top = (bits & 0x7F).to(torch.int32)
    padded_top = torch.zeros(sn * BLOCK, sk * BLOCK, dtype=torch.int32)
    padded_top[:n, :k] = top
    block_top = padded_top.reshape(sn, BLOCK, sk, BLOCK).amax(dim=(1, 3))
    if not bool(((block_top == 0x7E) | (amax == 0)).all()):
        fail("a block's largest weight did not quantize to +-448 (code 0x7e): the scale rule is off")
    return codes, scale_inv


def dequantize(codes, scale_inv, torch):
    """w = fp32(e4m3 code) * scale_inv of its 128x128 block, rounded once to fp32: what transformers'
    dequantize path and cpinfer's CPU back-end compute. Written independently of quantize()."""
    n, k = codes.shape
    s = scale_inv.repeat_interleave(BLOCK, dim=0)[:n].repeat_interleave(BLOCK, dim=1)[:, :k]
    return codes.to(torch.float32) * s


def check_format(tensors, torch):
    """Fail unless `tensors` is the real checkpoints' layout: each quantized linear weight F8_E4M3 with
    an F32 `<name>_scale_inv` [ceil(N/128), ceil(K/128)]; everything else BF16; nothing else."""
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            w = tensors.get(name[: -len("_scale_inv")])
            if w is None:
                fail(f"{name} has no weight beside it")
            want = [n_blocks(w.shape[0]), n_blocks(w.shape[1])]
            if t.dtype != torch.float32 or list(t.shape) != want:
                fail(f"{name}: {t.dtype} {list(t.shape)}, want float32 {want}")
        elif t.dtype == torch.float8_e4m3fn:
            if not is_quantized(name, t) or name + "_scale_inv" not in tensors:
                fail(f"{name} is FP8 but not a quantized linear weight with a scale")
        elif t.dtype != torch.bfloat16:
            fail(f"{name} is {t.dtype}; unquantized tensors must stay bfloat16")
        elif is_quantized(name, t):
            fail(f"{name} is a linear weight left in bfloat16")


def compare_with_transformers_save(ours, hf_dir, torch):
    """What transformers' own save_pretrained wrote after quantizing on load, against our file.
    Returns a summary: the tensors both hold bit-equal, those in another form, and those whose
    values differ (with what differs: the scales, the size of the code differences)."""
    from safetensors.torch import load_file

    theirs = {}
    for fn in sorted(os.listdir(hf_dir)):
        if fn.endswith(".safetensors"):
            theirs.update(load_file(os.path.join(hf_dir, fn)))
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_qc = json.load(f).get("quantization_config")
    equal, other_form, differs = [], [], []
    for name, t in sorted(ours.items()):
        h = theirs.get(name)
        if h is None:
            continue
        if h.dtype != t.dtype or list(h.shape) != list(t.shape):
            other_form.append(f"{name}: transformers {h.dtype} {list(h.shape)}, ours {t.dtype} {list(t.shape)}")
            continue
        a = h.view(torch.uint8) if h.dtype == torch.float8_e4m3fn else h
        b = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
        if not torch.equal(a, b):
            # Recorded, not fatal: the fixture is a checkpoint in the real format either way (its fp32
            # truth is transformers' dequantization of this very file); what differs is said here.
            rec = {"name": name, "values_different": int((a != b).sum()), "values": int(a.numel())}
            if h.dtype == torch.float8_e4m3fn:
                sname = name + "_scale_inv"
                hs, ts = theirs.get(sname), ours.get(sname)
                rec["scale_inv_equal"] = bool(hs is not None and ts is not None and hs.shape == ts.shape and
                                              torch.equal(hs.float(), ts.float()))
                hf, tf = h.to(torch.float32), t.to(torch.float32)
                rec["max_code_value_diff"] = float((hf - tf).abs().max())
                rec["codes_equal_negated"] = bool(torch.equal(hf, -tf))
            differs.append(rec)
            log(f"[transformers save] DIFFERS from ours: {rec}")
            continue
        equal.append(name)
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    n_fp8 = sum(1 for n in equal if ours[n].dtype == torch.float8_e4m3fn)
    log(f"[transformers save] {len(equal)} tensors bit-equal to ours ({n_fp8} FP8 code tensors); "
        f"{len(other_form)} in another dtype/shape; {len(only_ours)} only in ours; {len(only_theirs)} only in "
        f"transformers'; its quantization_config: {hf_qc}")
    for line in other_form[:8]:
        log(f"[transformers save]   other form: {line}")
    for label, names in (("only ours", only_ours), ("only transformers'", only_theirs)):
        if names:
            log(f"[transformers save]   {label}: {names[:8]}{' ...' if len(names) > 8 else ''}")
    return {"bit_equal_tensors": len(equal), "bit_equal_fp8_code_tensors": n_fp8, "differs": differs,
            "other_form": other_form,
            "only_ours": only_ours, "only_transformers": only_theirs, "quantization_config": hf_qc}


def act_qdq(x, torch):
    """Dynamic activation quantization per (row, 128 columns), DeepSeek-V3's act_quant rule:
    s = amax / 448 (1 for an all-zero block), e4m3(x / s); returned dequantized, in fp32."""
    k = x.shape[-1]
    if k % BLOCK:
        fail(f"activation width {k} is not a multiple of {BLOCK}")
    b = x.to(torch.float32).reshape(-1, k // BLOCK, BLOCK)
    amax = b.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = torch.clamp(b / s, min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn)
    return (q.to(torch.float32) * s).reshape(x.shape)


def make_w8a8_mode(model, torch):
    """A TorchFunctionMode under which the model computes as transformers' FP8 path does, in plain
    torch: every product with a quantized weight (held dequantized, in fp32) takes its activations
    quantized per (row, 128 columns), multiplies in fp32 and returns bf16; the other parameters are
    cast to bf16 here. `mode.seen` collects which quantized weights were used."""
    F = torch.nn.functional
    quantized = {}
    for pname, p in model.named_parameters():
        if pname.endswith("_proj.weight") or pname.endswith(("experts.gate_up_proj", "experts.down_proj")):
            quantized[p.untyped_storage().data_ptr()] = pname
        else:
            p.data = p.data.to(torch.bfloat16)  # bf16 values in the checkpoint: exact

    class W8A8(torch.overrides.TorchFunctionMode):
        seen = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) >= 2:
                x, w = args[0], args[1]
                name = quantized.get(w.untyped_storage().data_ptr()) if isinstance(w, torch.Tensor) else None
                if name is not None:
                    self.seen.add(name)
                    xq = act_qdq(x, torch)
                    if func is F.linear:
                        bias = args[2] if len(args) > 2 else kwargs.get("bias")
                        y = F.linear(xq, w, None if bias is None else bias.to(torch.float32))
                    else:
                        y = torch.matmul(xq, w)
                    return y.to(x.dtype)
            return func(*args, **kwargs)

    return W8A8(), set(quantized.values())
