#!/usr/bin/env bash
# On a GPU machine (one H200, about 4 minutes): the CUDA FP8 paths (issue 15). Builds the CUDA
# back-end (or uses prebuilt binaries in $CPINFER_PREBUILT, see scripts/carry.sh), then:
#   1. the FP8 op tests: linear on every path (gpu_ops_test Fp8Ops.*, plus the BF16 linear cases),
#      FP8 moe_experts on the row-wise, grouped wgmma and cuBLASLt paths (gpu_moe_test MoeFp8Test.*);
#   2. the FP8 model test: a random FP8 model on the GPU against the CPU (gpu_model_test GpuFp8Model.*);
#   3. prefill at the Qwen3-30B-A3B shape, FP8 (qwen3-30b-a3b-fp8) against BF16 (qwen3-30b-a3b),
#      4K and 32K tokens: the per-op profile's moe_s and gemm_s (issue 15's target: FP8 MoE time
#      <= 0.65x BF16's at 4K and 32K), and the FP8 experts on the per-expert cuBLASLt path at 4K;
#   4. decode batch 1 at 1K context, FP8 against BF16: step latency and the bytes a step reads
#      (target: half of BF16's weight bytes).
# Results go to $OUT (default ./out): *.log, prefill_{fp8,bf16}.json, decode_{fp8,bf16}.json and
# fp8_summary.txt (the ratios).
#   CPINFER_PREBUILT=.carry scripts/gpu_fp8_check.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
gpu_binaries cpinfer gpu_ops_test gpu_moe_test gpu_model_test

echo "== FP8 op tests (linear)"
timeout 150 "$BIN/gpu_ops_test" --gtest_filter='Fp8Ops.*:Fp8ScaleLayouts.*:Ops.Linear*' 2>&1 | tee "$OUT/gpu_fp8_ops.log" |
  grep -E "^\[gpu_ops\]|OK \]|FAILED|Failure|SKIPPED|PASSED|Expected|Which is|actual|nmse|cuBLASLt" | tail -80
echo "== FP8 op tests (moe_experts)"
timeout 240 "$BIN/gpu_moe_test" --gtest_filter='MoeFp8Test.*' 2>&1 | tee "$OUT/gpu_fp8_moe.log" |
  grep -E "^\[gpu_ops\]|OK \]|FAILED|Failure|SKIPPED|PASSED|Expected|Which is|actual|warn|cuBLASLt" | tail -80
echo "== FP8 model test"
timeout 150 "$BIN/gpu_model_test" --gtest_filter='GpuFp8Model.*' 2>&1 | tee "$OUT/gpu_fp8_model.log" |
  grep -E "\[gpu fp8|OK \]|FAILED|Failure|SKIPPED|PASSED|Expected|Which is" | tail -30

echo "== prefill, Qwen3-30B-A3B shape: FP8 then BF16 (4K, 32K)"
for m in fp8 bf16; do
  preset=qwen3-30b-a3b
  [ "$m" = fp8 ] && preset=qwen3-30b-a3b-fp8
  timeout 240 "$BIN/cpinfer" -q bench prefill --device cuda --random-weights "$preset" --seq 4096,32768 \
    --attn-cp-size 1 --json > "$OUT/prefill_$m.json" 2> "$OUT/prefill_$m.log"
  echo "$m: exit $?"; tail -3 "$OUT/prefill_$m.log"
done
echo "== prefill, FP8 experts on the per-expert cuBLASLt path (--moe-runner-backend cublas), 4K"
timeout 120 "$BIN/cpinfer" -q bench prefill --device cuda --random-weights qwen3-30b-a3b-fp8 --seq 4096 \
  --attn-cp-size 1 --moe-runner-backend cublas --json > "$OUT/prefill_fp8_cublaslt.json" \
  2> "$OUT/prefill_fp8_cublaslt.log"
echo "exit $?"; tail -3 "$OUT/prefill_fp8_cublaslt.log"

echo "== decode batch 1, context 1024: FP8 then BF16"
for m in fp8 bf16; do
  preset=qwen3-30b-a3b
  [ "$m" = fp8 ] && preset=qwen3-30b-a3b-fp8
  timeout 150 "$BIN/cpinfer" -q bench decode --device cuda --random-weights "$preset" --batch 1 --context 1024 \
    --json > "$OUT/decode_$m.json" 2> "$OUT/decode_$m.log"
  echo "$m: exit $?"; tail -3 "$OUT/decode_$m.log"
done

echo "== summary"
python3 - "$OUT" <<'EOF' | tee "$OUT/fp8_summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:
        print(f"{name}: not readable ({e})")
        return None
pf, pb, pl = load("prefill_fp8.json"), load("prefill_bf16.json"), load("prefill_fp8_cublaslt.json")
if pf and pb:
    print(f"prefill on {pf.get('device')}: FP8 / BF16 (issue 15 target: moe_s ratio <= 0.65)")
    bf = {r["seq"]: r for r in pb["results"]}
    for r in pf["results"]:
        b = bf.get(r["seq"])
        if not b:
            continue
        ratio = lambda k: r[k] / b[k] if b[k] > 0 else float("nan")
        print(f"  seq {r['seq']:6d}: ttft {r['ttft_s']:.3f} / {b['ttft_s']:.3f} s ({ratio('ttft_s'):.2f}x), "
              f"moe {r['moe_s']:.3f} / {b['moe_s']:.3f} s ({ratio('moe_s'):.2f}x), "
              f"dense gemm {r['dense_gemm_s']:.3f} / {b['dense_gemm_s']:.3f} s ({ratio('dense_gemm_s'):.2f}x), "
              f"attention {r['attention_s']:.3f} / {b['attention_s']:.3f} s")
    if pl:
        for r in pl["results"]:
            b = bf.get(r["seq"])
            if b and b["moe_s"] > 0:
                print(f"  seq {r['seq']:6d}, FP8 experts on cuBLASLt per expert: moe {r['moe_s']:.3f} s "
                      f"({r['moe_s'] / b['moe_s']:.2f}x BF16's grouped wgmma)")
df, db = load("decode_fp8.json"), load("decode_bf16.json")
if df and db and df["results"] and db["results"]:
    f, b = df["results"][0], db["results"][0]
    if "step_s" in f and "step_s" in b:
        wf, wb = f["weight_bytes"] + f["expert_bytes"], b["weight_bytes"] + b["expert_bytes"]
        print(f"decode batch {f['batch']} context {f['context']} ({df.get('linear_weights')} vs "
              f"{db.get('linear_weights')}): step {f['step_s'] * 1e3:.3f} / {b['step_s'] * 1e3:.3f} ms "
              f"({f['step_s'] / b['step_s']:.2f}x); weight + expert bytes {wf / 1e6:.0f} / {wb / 1e6:.0f} MB "
              f"({wf / wb:.2f}x, target ~0.5 for the linear layers); achieved {f['achieved_gbps']:.0f} / "
              f"{b['achieved_gbps']:.0f} GB/s")
EOF
