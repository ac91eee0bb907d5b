"""What tools/make_fixtures.py needs around a fixture's checkpoint files: the shared helpers (errors,
logging, hashing, which layers are MoE) and writing, rewriting, listing, reloading and checking the
saved checkpoint (its tensor names, its config.json, the fused expert layout, that the reloaded
weights are the saved ones). torch and the model classes are passed in, so this module imports
without them."""

import hashlib
import json
import os


class FixtureError(RuntimeError):
    pass


def fail(msg):
    raise FixtureError(msg)


def log(msg):
    print(msg, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def natural_key(name):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def is_moe_layer(cfg, layer_idx):
    # The rule of Qwen3MoeDecoderLayer.__init__ (transformers 5.x).
    return (
        layer_idx not in cfg["mlp_only_layers"]
        and cfg["num_experts"] > 0
        and (layer_idx + 1) % cfg["decoder_sparse_step"] == 0
    )


def moe_layers(spec):
    cfg = spec["config"]
    if spec["arch"] != "Qwen3MoeForCausalLM":
        return []
    return [i for i in range(cfg["num_hidden_layers"]) if is_moe_layer(cfg, i)]


def list_checkpoint(fixture_dir):
    """Return {tensor name: file name} for the safetensors in fixture_dir."""
    from safetensors import safe_open

    index_path = os.path.join(fixture_dir, "model.safetensors.index.json")
    single_path = os.path.join(fixture_dir, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single_path):
        files = ["model.safetensors"]
        weight_map = None
    else:
        fail(f"{fixture_dir}: save_pretrained wrote neither model.safetensors nor model.safetensors.index.json "
             f"(files: {sorted(os.listdir(fixture_dir))})")
    names = {}
    for fn in files:
        with safe_open(os.path.join(fixture_dir, fn), framework="pt") as f:
            for k in f.keys():
                names[k] = fn
    if weight_map is not None and set(weight_map) != set(names):
        fail(f"{fixture_dir}: index weight_map and shard contents differ")
    return names


def verify_saved_keys(name, spec, fixture_dir):
    keys = list_checkpoint(fixture_dir)
    cfg = spec["config"]
    log(f"[{name}] save_pretrained wrote {len(keys)} tensors in {sorted(set(keys.values()))}")
    fused = [k for k in keys if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj")]
    if fused:
        fail(f"[{name}] save_pretrained wrote fused expert tensors {fused[:3]}...; this script expects transformers "
             "to revert to the per-expert hub layout on save (save_original_format=True)")
    for layer in moe_layers(spec):
        prefix = f"model.layers.{layer}.mlp."
        layer_keys = sorted((k for k in keys if k.startswith(prefix)), key=natural_key)
        expected = {prefix + "gate.weight"}
        for e in range(cfg["num_experts"]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                expected.add(f"{prefix}experts.{e}.{proj}.weight")
        if set(layer_keys) != expected:
            fail(f"[{name}] layer {layer}: saved MoE keys differ from the per-expert layout; "
                 f"missing {sorted(expected - set(layer_keys))[:4]}, extra {sorted(set(layer_keys) - expected)[:4]}")
        shown = [k for k in layer_keys if ".experts." not in k or ".experts.0." in k or ".experts.1." in k]
        log(f"[{name}] layer {layer} MoE keys ({len(layer_keys)}), e.g.: " + ", ".join(shown))
    for layer in range(cfg["num_hidden_layers"]):
        if layer in moe_layers(spec):
            continue
        dense = [f"model.layers.{layer}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        missing = [k for k in dense if k not in keys]
        if missing:
            fail(f"[{name}] dense layer {layer} lacks {missing}")
        log(f"[{name}] layer {layer} dense MLP keys: " + ", ".join(dense))
    has_head = "lm_head.weight" in keys
    if cfg["tie_word_embeddings"] and has_head:
        fail(f"[{name}] tied embeddings but lm_head.weight was saved")
    if not cfg["tie_word_embeddings"] and not has_head:
        fail(f"[{name}] untied embeddings but lm_head.weight is missing")
    log(f"[{name}] lm_head.weight saved: {has_head} (tie_word_embeddings={cfg['tie_word_embeddings']})")


def rewrite_config(name, spec, fixture_dir):
    """Check the v5 dialect that save_pretrained wrote; rewrite into the hub / transformers-4 dialect if asked."""
    path = os.path.join(fixture_dir, "config.json")
    with open(path) as f:
        d = json.load(f)
    is_moe = spec["arch"] == "Qwen3MoeForCausalLM"
    if "rope_parameters" not in d:
        fail(f"[{name}] transformers {d.get('transformers_version')} wrote no rope_parameters in config.json: {sorted(d)}")
    if is_moe and ("num_local_experts" not in d or "num_experts" in d):
        fail(f"[{name}] expected config.json with num_local_experts (v5 dialect), got keys {sorted(d)}")
    if d.get("head_dim") != spec["config"]["head_dim"]:
        fail(f"[{name}] config.json head_dim={d.get('head_dim')}, expected {spec['config']['head_dim']}")
    if spec["dialect"] == "v4":
        if not is_moe:
            fail("v4 dialect rewrite is only defined for Qwen3-MoE")
        rope = d.pop("rope_parameters")
        if rope.get("rope_type") != "default" or set(rope) - {"rope_type", "rope_theta"}:
            fail(f"[{name}] v4 rewrite supports only default RoPE, got {rope}")
        d["num_experts"] = d.pop("num_local_experts")
        d["rope_theta"] = rope["rope_theta"]
        d["rope_scaling"] = None
        if "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")
        d["torch_dtype"] = "bfloat16"
        # Mimic the hub file of Qwen3-30B-A3B, which was written by transformers 4.51.
        d["transformers_version"] = "4.51.0"
        with open(path, "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")
        log(f"[{name}] rewrote config.json into the transformers-4 dialect "
            "(num_experts, rope_theta, rope_scaling=null, torch_dtype)")
    with open(path) as f:
        log(f"[{name}] config.json: {json.dumps(json.load(f), sort_keys=True)}")


def write_fused_layout(name, spec, fixture_dir, torch):
    """Rewrite the per-expert checkpoint into the fused 3-D expert layout, split over two shards."""
    from safetensors.torch import load_file, save_file

    src = os.path.join(fixture_dir, "model.safetensors")
    if not os.path.exists(src):
        fail(f"[{name}] expected a single model.safetensors to fuse, found {sorted(os.listdir(fixture_dir))}")
    tensors = load_file(src)
    cfg = spec["config"]
    n_exp = cfg["num_experts"]
    for layer in moe_layers(spec):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = [], []
        for e in range(n_exp):
            gate = tensors.pop(f"{prefix}{e}.gate_proj.weight")  # [I, H]
            up = tensors.pop(f"{prefix}{e}.up_proj.weight")  # [I, H]
            gate_up.append(torch.cat([gate, up], dim=0))  # [2I, H], gate rows first
            down.append(tensors.pop(f"{prefix}{e}.down_proj.weight"))  # [H, I]
        tensors[prefix + "gate_up_proj"] = torch.stack(gate_up).contiguous()  # [E, 2I, H]
        tensors[prefix + "down_proj"] = torch.stack(down).contiguous()  # [E, H, I]
    leftover = [k for k in tensors if ".experts." in k and not k.endswith(("gate_up_proj", "down_proj"))]
    if leftover:
        fail(f"[{name}] per-expert tensors left after fusing: {leftover[:4]}")

    names = sorted(tensors, key=natural_key)
    nbytes = {k: tensors[k].numel() * tensors[k].element_size() for k in names}
    total = sum(nbytes.values())
    shard_files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map, shards, acc = {}, [{}, {}], 0
    for k in names:
        # First half of the bytes (in natural key order) to shard 1, so a layer straddles the cut.
        s = 0 if acc < total / 2 else 1
        acc += nbytes[k]
        shards[s][k] = tensors[k].contiguous()
        weight_map[k] = shard_files[s]
    if not shards[0] or not shards[1]:
        fail(f"[{name}] shard split left a shard empty")
    os.remove(src)
    for fn, shard in zip(shard_files, shards):
        save_file(shard, os.path.join(fixture_dir, fn), metadata={"format": "pt"})
    with open(os.path.join(fixture_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    for layer in moe_layers(spec):
        prefix = f"model.layers.{layer}.mlp.experts."
        log(f"[{name}] layer {layer} fused: {prefix}gate_up_proj {list(tensors[prefix + 'gate_up_proj'].shape)} "
            f"in {weight_map[prefix + 'gate_up_proj']}, {prefix}down_proj {list(tensors[prefix + 'down_proj'].shape)} "
            f"in {weight_map[prefix + 'down_proj']}")
    log(f"[{name}] wrote fused layout: {len(shards[0])} + {len(shards[1])} tensors over 2 shards, {total} bytes")


def load_saved(name, spec, fixture_dir, model_cls, torch, dtype, attn, device):
    kwargs = dict(dtype=dtype, attn_implementation=attn, output_loading_info=True)
    if spec["arch"] == "Qwen3MoeForCausalLM" and attn == "eager":
        # The readable per-expert loop; the fp32 reference should not depend on a grouped GEMM kernel.
        kwargs["experts_implementation"] = "eager"
    model, info = model_cls.from_pretrained(fixture_dir, **kwargs)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        fail(f"[{name}] from_pretrained({fixture_dir}) reported loading problems: {problems}")
    model = model.to(device).eval()
    for pname, p in model.named_parameters():
        if p.dtype != dtype or p.device.type != torch.device(device).type:
            fail(f"[{name}] parameter {pname} is {p.dtype} on {p.device}, expected {dtype} on {device}")
    return model


def moe_config_fields(c):
    """The MoE fields of a loaded Qwen3-MoE config, by their config.json names."""
    return dict(
        num_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size,
        norm_topk_prob=c.norm_topk_prob,
        decoder_sparse_step=c.decoder_sparse_step,
        mlp_only_layers=list(c.mlp_only_layers),
    )


def check_loaded_config(name, spec, model):
    cfg = spec["config"]
    c = model.config
    checks = {
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None),
        "tie_word_embeddings": c.tie_word_embeddings,
    }
    if spec["arch"] == "Qwen3MoeForCausalLM":
        checks.update(moe_config_fields(c))
    for key, got in checks.items():
        if got != cfg[key]:
            fail(f"[{name}] reloaded config has {key}={got}, expected {cfg[key]}")
    rope = dict(c.rope_parameters)
    for key, want in cfg["rope_parameters"].items():
        if rope.get(key) != want:
            fail(f"[{name}] reloaded rope_parameters {rope} disagree with {cfg['rope_parameters']} on {key}")
    if spec["arch"] == "Qwen3MoeForCausalLM":
        for i, layer in enumerate(model.model.layers):
            kind = type(layer.mlp).__name__
            want = "Qwen3MoeSparseMoeBlock" if i in moe_layers(spec) else "Qwen3MoeMLP"
            if kind != want:
                fail(f"[{name}] layer {i} is {kind}, expected {want}")
    elif getattr(model.model.layers[0].self_attn, "sliding_window", None) is not None:
        fail(f"[{name}] dense Qwen3 fixture unexpectedly uses sliding-window attention")


def check_same_weights(name, ref_model, loaded, torch):
    """The loaded fp32 weights must be exactly the bf16 weights we saved."""
    ref = ref_model.state_dict()
    got = loaded.state_dict()
    if set(ref) != set(got):
        fail(f"[{name}] state_dict keys differ after reload: {sorted(set(ref) ^ set(got))[:6]}")
    for k in ref:
        if not torch.equal(ref[k].to(torch.float32), got[k].to(torch.float32).cpu()):
            diff = (ref[k].float() - got[k].float().cpu()).abs().max().item()
            fail(f"[{name}] reloaded tensor {k} differs from the saved bf16 weights (max abs diff {diff})")
