#!/usr/bin/env python3
"""`cpinfer demo-model` + `cpinfer generate` through the built binary: text prompts through the
real Qwen3 tokenizer and chat template, greedy determinism, seeded sampling, stop strings and clear errors.

usage: cli_generate_test.py CPINFER_BINARY WORK_DIR
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cli_check import check, finish, run  # noqa: E402


def main():
    binary, work = sys.argv[1], sys.argv[2]
    model = os.path.join(work, "tiny-demo")
    shutil.rmtree(model, ignore_errors=True)
    run([binary, "-q", "demo-model", "--out", model, "--layers", "2", "--hidden", "64", "--experts", "4"])
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        check(os.path.exists(os.path.join(model, f)), f"demo-model wrote {f}")

    gen = [binary, "-q", "generate", "--model-path", model, "--prompt", "The quick brown fox", "--max-new-tokens", "24",
           "--ignore-eos", "--json"]
    a = json.loads(run(gen).stdout)
    b = json.loads(run(gen).stdout)
    check(len(a["output_ids"]) == 24 and a["finish_reason"] == "length", "greedy run returns 24 tokens, finish length")
    check(a == {**b, "ttft_s": a["ttft_s"], "decode_tokens_per_s": a["decode_tokens_per_s"]},
          "greedy generation is deterministic")
    check(a["prompt_tokens"] == 4, f"'The quick brown fox' is 4 Qwen3 tokens (got {a['prompt_tokens']})")

    # --input-ids @FILE: the ids from a file (commas, spaces and line breaks), as given inline.
    ids_file = os.path.join(work, "ids.txt")
    with open(ids_file, "w") as f:
        f.write("785, 3974,\n13876 38835\n")
    by_ids = [binary, "-q", "generate", "--model-path", model, "--max-new-tokens", "8", "--ignore-eos", "--json"]
    inline = json.loads(run(by_ids + ["--input-ids", "785,3974,13876,38835"]).stdout)
    from_file = json.loads(run(by_ids + ["--input-ids", "@" + ids_file]).stdout)
    check(from_file["prompt_tokens"] == 4 and from_file["output_ids"] == inline["output_ids"],
          "--input-ids @FILE gives the inline ids' tokens")

    s1 = json.loads(run(gen + ["--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]).stdout)
    s2 = json.loads(run(gen + ["--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]).stdout)
    s3 = json.loads(run(gen + ["--temperature", "1.0", "--top-p", "0.9", "--seed", "8"]).stdout)
    check(s1["output_ids"] == s2["output_ids"], "same seed, same sampled tokens")
    check(s1["output_ids"] != s3["output_ids"], "another seed, other sampled tokens")

    # A stop string taken from the middle of the greedy text ends the output just before it.
    text = a["text"]
    cut = text[len(text) // 2: len(text) // 2 + 3]
    if cut.strip():
        st = json.loads(run(gen + ["--stop", cut]).stdout)
        check(st["finish_reason"] == "stop" and st["text"] == text[: text.index(cut)],
              f"--stop {cut!r} ends the text before its first occurrence")
    chat = json.loads(run([binary, "-q", "generate", "--model-path", model, "--prompt", "hi", "--chat",
                           "--max-new-tokens", "4", "--json"]).stdout)
    # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n = 9 tokens
    check(chat["prompt_tokens"] == 9, f"chat template wraps the prompt (9 tokens, got {chat['prompt_tokens']})")
    nothink = json.loads(run([binary, "-q", "generate", "--model-path", model, "--prompt", "hi", "--chat",
                              "--disable-thinking", "--max-new-tokens", "4", "--json"]).stdout)
    check(nothink["prompt_tokens"] > chat["prompt_tokens"], "--disable-thinking adds the empty think block")

    # Random weights at the demo's shape, the Qwen3 tokenizer from setup.sh: tokenizes as the checkpoint does.
    rw = json.loads(run([binary, "-q", "generate", "--random-weights", os.path.join(model, "config.json"), "--prompt",
                         "The quick brown fox", "--max-new-tokens", "3", "--ignore-eos", "--json"]).stdout)
    check(rw["prompt_tokens"] == 4 and len(rw["output_ids"]) == 3, "generate --random-weights CONFIG runs")
    p = run([binary, "generate", "--random-weights", "qwen3-30b-a3b", "--model-path", model, "--prompt", "x"],
            expect_ok=False)
    check(p.returncode != 0 and "exactly one of --model-path and --random-weights" in p.stderr,
          "--model-path with --random-weights is refused")

    # The same demo model as FP8 (e4m3 + 128x128 scales): on the CPU its linear weights stay FP8 (the
    # load report says which), or are dequantized to BF16 with --fp8-weights bf16.
    fp8 = os.path.join(work, "tiny-demo-fp8")
    shutil.rmtree(fp8, ignore_errors=True)
    run([binary, "-q", "demo-model", "--out", fp8, "--layers", "2", "--hidden", "256", "--experts", "4", "--fp8"])
    bf16 = os.path.join(work, "tiny-demo-256")
    shutil.rmtree(bf16, ignore_errors=True)
    run([binary, "-q", "demo-model", "--out", bf16, "--layers", "2", "--hidden", "256", "--experts", "4"])
    size = lambda d: os.path.getsize(os.path.join(d, "model.safetensors"))  # noqa: E731
    check(size(fp8) < size(bf16), f"the FP8 checkpoint is smaller ({size(fp8)} < {size(bf16)} bytes)")
    fp8_gen = [binary, "generate", "--model-path", fp8, "--prompt", "The quick brown fox", "--max-new-tokens", "4",
               "--ignore-eos", "--json"]
    p = run(fp8_gen)
    check(len(json.loads(p.stdout)["output_ids"]) == 4, "generate runs on the FP8 demo model")
    check("kept as FP8" in p.stderr and "self_attn.q_proj.weight" in p.stderr and "experts.*.down_proj" in p.stderr,
          "the load report names the weights kept as FP8")
    p = run(fp8_gen + ["--fp8-weights", "bf16"])
    check("dequantized to BF16" in p.stderr, "--fp8-weights bf16 dequantizes them at load")

    # The head shape is a flag (issue 13's 580M comparison model has 8 q / 2 kv heads of 128).
    heads = os.path.join(work, "tiny-demo-heads")
    shutil.rmtree(heads, ignore_errors=True)
    run([binary, "-q", "demo-model", "--out", heads, "--layers", "1", "--hidden", "64", "--experts", "4", "--heads", "8",
         "--kv-heads", "2", "--head-dim", "32"])
    hc = json.load(open(os.path.join(heads, "config.json")))
    check((hc["num_attention_heads"], hc["num_key_value_heads"], hc["head_dim"]) == (8, 2, 32),
          "--heads / --kv-heads / --head-dim reach config.json")
    hg = json.loads(run([binary, "-q", "generate", "--model-path", heads, "--prompt", "The quick brown fox",
                         "--max-new-tokens", "3", "--ignore-eos", "--json"]).stdout)
    check(len(hg["output_ids"]) == 3, "generate runs on it (q_proj [256, 64], k/v_proj [64, 64])")

    bad = [
        ([binary, "demo-model", "--out", os.path.join(work, "x"), "--heads", "6", "--kv-heads", "4"],
         "--kv-heads (4) to divide --heads (6)"),
        ([binary, "demo-model", "--out", os.path.join(work, "x"), "--head-dim", "12"], "--head-dim (12)"),
        ([binary, "generate", "--model-path", fp8, "--prompt", "x", "--fp8-weights", "int8"], "--fp8-weights"),
        ([binary, "generate", "--model-path", model, "--max-new-tokens", "4"], "exactly one of --prompt"),
        ([binary, "generate", "--model-path", model, "--prompt", "x", "--top-p", "0"], "top_p"),
        ([binary, "generate", "--model-path", model, "--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
        ([binary, "generate", "--model-path", model, "--input-ids", "1,2", "--chat"], "--chat needs --prompt"),
        ([binary, "generate", "--model-path", model, "--input-ids", "@" + os.path.join(work, "no-ids.txt")],
         "cannot read"),
        ([binary, "generate", "--model-path", model, "--prompt", "x", "--kv-cache-tokens", "8",
          "--max-new-tokens", "30"], "KV cache"),
        ([binary, "demo-model", "--out", os.path.join(work, "x"), "--tokenizer-dir", "/nonexistent"], "tokenizer"),
        ([binary, "generate", "--model-path", model, "--prompt", "x", "--device", "tpu"], "device"),
        ([binary, "generate", "--model-path", model, "--prompt", "x", "--attention-backend", "flash"],
         "--attention-backend"),
        ([binary, "generate", "--model-path", model, "--prompt", "x", "--attention-backend", "ws"],
         "the CPU back-end has one attention kernel"),
        ([binary, "generate", "--model-path", model, "--prompt", "x", "--moe-runner-backend", "cublas"],
         "the CPU back-end has one MoE kernel"),
    ]
    for cmd, needle in bad:
        p = run(cmd, expect_ok=False)
        lines = [l for l in p.stderr.strip().splitlines() if l]
        check(p.returncode != 0 and lines and needle in lines[-1],
              f"{' '.join(cmd[2:])[-70:]!r}: exit {p.returncode}, {lines[-1][:110] if lines else ''!r}")
    finish()


if __name__ == "__main__":
    main()
