#!/usr/bin/env bash
# Decode before/after of the engine-core refactor (issue 12) in one GPU call. Both builds come
# prebuilt in .ab.tar.xz (made on the build machine: .ab/before/cpinfer at 439d304, the last commit
# before the refactor, .ab/after/cpinfer at f218bc7, the refactor's last commit before any decode
# work; .ab/lib the shared libraries the GPU machine lacks; .ab/qwen3-tokenizer; .ab/COMMITS).
# The script writes one random checkpoint at the Qwen3-30B-A3B shape with 4 layers (BF16
# safetensors with the published tensor names; torch on the GPU, or a stdlib writer where torch is
# absent), runs `cpinfer generate` of the two builds in turn on the same prompt ids (greedy, EOS
# ignored, the same number of new tokens, the default page size and kernels, no CUDA graphs where a
# build has them unless AB_GRAPHS=on) and writes the decode tokens/s table to $OUT/decode_ab.txt.
#   OUT=/some/dir bash scripts/gpu_decode_ab.sh
# Another pair of builds, packed the same way, with decode graphs on in both (the normal path):
#   OUT=/some/dir AB_TAR=.ab2.tar.xz AB_GRAPHS=on bash scripts/gpu_decode_ab.sh
# Knobs (environment): AB_TAR (the tarball, default .ab.tar.xz; AB_TARBALL is read too; a relative
# path is taken from the current folder, else from the repository root),
# AB_GRAPHS (off, the default: pass --disable-cuda-graph to a build that has it; on: pass nothing,
# decode steps replay CUDA graphs where a build records them), AB_SCRATCH (scratch parent, default
# /dev/shm, else $TMPDIR or /tmp; the script uses and empties its cpinfer-decode-ab/),
# AB_DEVICE (cuda), AB_SHAPE (a3b | tiny: hidden 64, 4 experts top-2, for a CPU check),
# AB_LAYERS (4), AB_NEW_TOKENS (1024), AB_PROMPT_TOKENS (64), AB_RUNS (5 per build), AB_WARMUP (1 per
# build, not counted), AB_RUN_TIMEOUT (90 s per run), AB_DEADLINE (480: no run starts later than
# this many seconds after the start, so that the table is written inside one device call).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
TAR="${AB_TAR:-${AB_TARBALL:-$ROOT/.ab.tar.xz}}"
[ -f "$TAR" ] || [ ! -f "$ROOT/$TAR" ] || TAR="$ROOT/$TAR"
GRAPHS="${AB_GRAPHS:-off}"
DEVICE="${AB_DEVICE:-cuda}"
SHAPE="${AB_SHAPE:-a3b}"
LAYERS="${AB_LAYERS:-4}"
NEW="${AB_NEW_TOKENS:-1024}"
PROMPT_N="${AB_PROMPT_TOKENS:-64}"
RUNS="${AB_RUNS:-5}"
WARMUP="${AB_WARMUP:-1}"
RUN_TIMEOUT="${AB_RUN_TIMEOUT:-90}"
DEADLINE="${AB_DEADLINE:-480}"
T0=$(date +%s)
say() { echo "[decode-ab +$(($(date +%s) - T0))s] $*"; }
die() { say "error: $*" | tee -a "$OUT/decode_ab.txt" >&2; exit 1; }

# Scratch space outside $OUT (only the table and small logs come back): tmpfs when it has room for
# the ~6.2 GB checkpoint, else /tmp.
if [ -z "${AB_SCRATCH:-}" ]; then
  AB_SCRATCH="${TMPDIR:-/tmp}"
  shm_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2{print $4}')
  [ -n "$shm_kb" ] && [ "$shm_kb" -gt $((12 * 1024 * 1024)) ] && AB_SCRATCH=/dev/shm
fi
AB_SCRATCH="$AB_SCRATCH/cpinfer-decode-ab"
LOGS="$AB_SCRATCH/decode_ab_logs"  # packed into $OUT/decode_ab_logs.tar.gz at the end (few files come back)
rm -rf "$AB_SCRATCH"
mkdir -p "$LOGS"
: > "$OUT/decode_ab.txt"

# (a) the two builds
case "$GRAPHS" in on | off) ;; *) die "AB_GRAPHS must be on or off, not '$GRAPHS'" ;; esac
[ -f "$TAR" ] || die "no $TAR (carry $(basename "$TAR"))"
tar -xJf "$TAR" -C "$AB_SCRATCH" || die "cannot unpack $TAR"
AB="$AB_SCRATCH/.ab"
export LD_LIBRARY_PATH="$AB/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for b in before after; do
  "$AB/$b/cpinfer" --help > /dev/null 2>&1 || die "$b/cpinfer does not start (ldd: $(ldd "$AB/$b/cpinfer" 2>&1 | grep 'not found' | tr '\n' ' '))"
done
say "builds: $(tr '\n' ' ' < "$AB/COMMITS" 2>/dev/null); scratch $AB_SCRATCH"

# (b) the random checkpoint
MODEL="$AB_SCRATCH/model"
say "writing the random checkpoint ($SHAPE, $LAYERS layers) to $MODEL"
# --- checkpoint writer (python3) ---
timeout 300 python3 - "$MODEL" "$SHAPE" "$LAYERS" "$AB/qwen3-tokenizer" <<'PY' || die "checkpoint writer failed"
"""Random Qwen3-MoE checkpoint with the published file layout: config.json (as Qwen/Qwen3-30B-A3B
publishes it, fewer layers), generation_config.json, the tokenizer files, and one model.safetensors
of BF16 tensors with the published names (per-expert gate/up/down). Linear weights N(0, 0.02^2),
norms 1. torch (on the GPU when there is one) + safetensors where torch is installed; otherwise a
stdlib writer of the same tensors' format (random values tiled from a pool), for machines without
torch."""
import json
import os
import random
import shutil
import struct
import sys
import time

out, shape, n_layers, tok_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
SHAPES = {
    "a3b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144),
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128),
}
cfg = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "decoder_sparse_step": 1, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 40960, "max_window_layers": n_layers,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "norm_topk_prob": True, "num_hidden_layers": n_layers,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
cfg.update(SHAPES[shape])
gen_cfg = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
           "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}


def tensor_list(c):
    """(name, shape, kind) in the published order; kind 'ones' for norms, 'randn' otherwise."""
    H, V = c["hidden_size"], c["vocab_size"]
    D, Hq, Hkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    E, Im = c["num_experts"], c["moe_intermediate_size"]
    t = [("model.embed_tokens.weight", (V, H), "randn")]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        t += [(p + "input_layernorm.weight", (H,), "ones"), (p + "post_attention_layernorm.weight", (H,), "ones"),
              (p + "self_attn.q_proj.weight", (Hq * D, H), "randn"),
              (p + "self_attn.k_proj.weight", (Hkv * D, H), "randn"),
              (p + "self_attn.v_proj.weight", (Hkv * D, H), "randn"),
              (p + "self_attn.o_proj.weight", (H, Hq * D), "randn"),
              (p + "self_attn.q_norm.weight", (D,), "ones"), (p + "self_attn.k_norm.weight", (D,), "ones"),
              (p + "mlp.gate.weight", (E, H), "randn")]
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t += [(q + "gate_proj.weight", (Im, H), "randn"), (q + "up_proj.weight", (Im, H), "randn"),
                  (q + "down_proj.weight", (H, Im), "randn")]
    t += [("model.norm.weight", (H,), "ones"), ("lm_head.weight", (V, H), "randn")]
    return t


def numel(s):
    n = 1
    for d in s:
        n *= d
    return n


def write_torch(path, tensors):
    import torch
    from safetensors.torch import save_file
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev)
    g.manual_seed(1234)
    d = {}
    for name, s, kind in tensors:
        if kind == "ones":
            d[name] = torch.ones(s, dtype=torch.bfloat16)
        else:
            d[name] = (torch.randn(s, generator=g, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
    save_file(d, path, metadata={"format": "pt"})
    return "torch " + torch.__version__ + " on " + dev


def write_stdlib(path, tensors):
    rng = random.Random(1234)
    bf16 = lambda x: struct.pack("<f", x)[2:]  # truncation to bf16 (little-endian high half)
    pool_n = 1 << 18
    pool = b"".join(bf16(rng.gauss(0.0, 0.02)) for _ in range(pool_n))
    one = bf16(1.0)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, s, _ in tensors:
        nb = 2 * numel(s)
        header[name] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + nb]}
        off += nb
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, s, kind in tensors:
            n = numel(s)
            if kind == "ones":
                f.write(one * n)
                continue
            done = 0
            while done < n:
                o = rng.randrange(0, pool_n // 2)
                k = min(n - done, pool_n - o)
                f.write(pool[2 * o:2 * (o + k)])
                done += k
    return "stdlib writer"


t0 = time.time()
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump(gen_cfg, f, indent=2)
for fn in ("tokenizer.json", "tokenizer_config.json"):
    if os.path.isfile(os.path.join(tok_dir, fn)):
        shutil.copy(os.path.join(tok_dir, fn), out)
tensors = tensor_list(cfg)
try:
    how = write_torch(os.path.join(out, "model.safetensors"), tensors)
except Exception as e:  # no torch here, or it failed: the stdlib writer gives the same layout
    print(f"checkpoint: torch writer unavailable ({type(e).__name__}: {e}); stdlib writer instead", flush=True)
    how = write_stdlib(os.path.join(out, "model.safetensors"), tensors)
size = os.path.getsize(os.path.join(out, "model.safetensors"))
print(f"checkpoint: {len(tensors)} tensors, {size / 2**30:.2f} GiB, {how}, {time.time() - t0:.1f} s")
PY
# --- end of checkpoint writer ---

# (c) the runs: same prompt ids (fixed, inside the vocabulary), greedy, EOS ignored.
IDS=$(seq 0 $((PROMPT_N - 1)) | awk '{printf "%s%d", (NR > 1 ? "," : ""), ($1 * 7919 + 101) % 151000 + 100}')
[ -n "$IDS" ] || die "no prompt ids"
declare -A EXTRA
for b in before after; do
  help=$("$AB/$b/cpinfer" generate --help 2>&1)
  for flag in --ignore-eos --input-ids --max-new-tokens --temperature --json --device; do
    grep -q -- "$flag" <<< "$help" || die "$b: generate has no $flag"
  done
  EXTRA[$b]=""
  [ "$GRAPHS" = off ] && grep -q -- "--disable-cuda-graph" <<< "$help" && EXTRA[$b]="--disable-cuda-graph"
done
run_one() {  # build, tag
  local b=$1 tag=$2
  if [ $(($(date +%s) - T0)) -gt "$DEADLINE" ]; then
    say "$tag skipped: past the ${DEADLINE} s deadline"
    return
  fi
  # shellcheck disable=SC2086
  timeout "$RUN_TIMEOUT" "$AB/$b/cpinfer" generate --model-path "$MODEL" --device "$DEVICE" --input-ids "$IDS" \
    --max-new-tokens "$NEW" --ignore-eos --temperature 0 --json ${EXTRA[$b]} \
    > "$LOGS/$tag.json" 2> "$LOGS/$tag.log"
  local rc=$?
  say "$tag rc=$rc $(grep -o '"decode_tokens_per_s":[0-9.e+-]*' "$LOGS/$tag.json" 2>/dev/null)"
}
gpu_state() {
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,temperature.gpu \
    --format=csv,noheader 2> /dev/null | head -1
}
echo "GPU before the runs: $(gpu_state)" > "$LOGS/gpu.txt"
for i in $(seq 1 "$WARMUP"); do
  run_one before "warmup${i}_before"
  run_one after "warmup${i}_after"
done
for i in $(seq 1 "$RUNS"); do
  run_one before "run${i}_before"
  run_one after "run${i}_after"
done
echo "GPU after the runs: $(gpu_state)" >> "$LOGS/gpu.txt"

# (d) the table
python3 - "$LOGS" "$RUNS" "$AB/COMMITS" "$DEVICE" "$SHAPE" "$LAYERS" "$NEW" "$PROMPT_N" \
  "${EXTRA[before]:-none}" "${EXTRA[after]:-none}" "$GRAPHS" <<'PY' | tee "$OUT/decode_ab.txt"
import json, os, statistics, sys
logs, runs, commits, device, shape, layers, new, prompt_n, extra_b, extra_a, graphs = sys.argv[1:]
runs = int(runs)
print("cpinfer decode before/after the engine-core refactor (issue 12)")
if os.path.isfile(commits):
    print(open(commits).read().strip())
print(f"model: random Qwen3-MoE, shape {shape}, {layers} layers, BF16; device {device}; prompt {prompt_n} ids, "
      f"{new} new tokens, greedy, --ignore-eos; AB_GRAPHS={graphs}; extra flags: before {extra_b}, after {extra_a}")
print(open(os.path.join(logs, "gpu.txt")).read().strip())
for b in ("before", "after"):  # the engine's load line: back-end, weight size, load time
    try:
        line = next(l for l in open(os.path.join(logs, f"run1_{b}.log")) if "loaded " in l)
        print(f"{b}: {line.strip()[:400]}")
    except (OSError, StopIteration):
        pass
res, ids = {}, {}
for b in ("before", "after"):
    res[b] = []
    for i in range(1, runs + 1):
        p = os.path.join(logs, f"run{i}_{b}.json")
        try:
            j = json.loads(open(p).read().strip().splitlines()[-1])
        except Exception as e:  # a failed or killed run
            print(f"{b} run {i}: no result ({type(e).__name__}); see run{i}_{b}.log in decode_ab_logs.tar.gz")
            continue
        res[b].append((j["decode_tokens_per_s"], len(j["output_ids"]), j["finish_reason"], j["ttft_s"]))
        ids.setdefault(b, j["output_ids"])
print()
print("per run (decode tok/s, tokens generated, finish, TTFT s):")
for b in ("before", "after"):
    print(f"  {b:6s} " + "  ".join(f"{t:.1f}/{n}/{f}/{ttft:.3f}" for t, n, f, ttft in res[b]))
print()
print(f"{'build':8s} {'runs':>4s} {'median':>10s} {'min':>10s} {'max':>10s}  (decode tok/s)")
med = {}
for b in ("before", "after"):
    v = [r[0] for r in res[b]]
    if v:
        med[b] = statistics.median(v)
        print(f"{b:8s} {len(v):4d} {med[b]:10.1f} {min(v):10.1f} {max(v):10.1f}")
    else:
        print(f"{b:8s} {0:4d} {'-':>10s}")
if len(med) == 2 and med["before"] > 0:
    vb, va = [r[0] for r in res["before"]], [r[0] for r in res["after"]]
    spread = max((max(v) - min(v)) / statistics.median(v) for v in (vb, va))
    print(f"after / before (medians): {med['after'] / med['before']:.3f}  "
          f"(largest within-build spread (max-min)/median: {spread:.3f})")
if len(ids) == 2:
    a, b = ids["before"], ids["after"]
    same = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
    print("greedy tokens of run 1: " + ("identical" if same is None and len(a) == len(b) else
          f"differ from token {same if same is not None else min(len(a), len(b))} on"))
PY
tar -czf "$OUT/decode_ab_logs.tar.gz" -C "$AB_SCRATCH" decode_ab_logs
say "done; table in $OUT/decode_ab.txt, every run's stdout/stderr in $OUT/decode_ab_logs.tar.gz"
