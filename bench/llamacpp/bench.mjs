#!/usr/bin/env node
// llama.cpp on the CPU, through node-llama-cpp's prebuilt binaries: prefill and greedy decode speed of
// a GGUF model, and the greedy tokens themselves (for the fidelity check against cpinfer).
//
//   node bench/llamacpp/bench.mjs --model FILE.gguf [--threads 2] [--prompt-tokens 512 | --input-ids 1,2,3]
//        [--max-new-tokens 64] [--repeats 3] [--f32-kv] [--flash-attention auto|on|off] [--batch-size 512]
//        [--seed 1] [--no-decode]
// Prompt: --input-ids, or --prompt-tokens ids from a 32-bit LCG seeded by --seed.
// Prefill: the prompt evaluated into an empty sequence, median of --repeats runs after one warm-up.
// Decode: greedy (temperature 0) generation of --max-new-tokens tokens after the prompt, EOS ignored;
// tokens/s = (M - 1) / (time from the first generated token to the last), the definition cpinfer
// generate --json uses. Prints one JSON object.
import { getLlama, LlamaLogLevel } from "node-llama-cpp";
import { performance } from "node:perf_hooks";
import os from "node:os";
import { readFileSync } from "node:fs";

function parseArgs(argv) {
  const a = {
    model: null, threads: 2, promptTokens: 512, inputIds: null, maxNewTokens: 64, repeats: 3,
    f32Kv: false, flashAttention: "auto", batchSize: 512, seed: 1, vocabLimit: 151643, decode: true,
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i], v = () => {
      if (i + 1 >= argv.length) throw new Error(`${k} needs a value`);
      return argv[++i];
    };
    switch (k) {
      case "--model": a.model = v(); break;
      case "--threads": a.threads = Number(v()); break;
      case "--prompt-tokens": a.promptTokens = Number(v()); break;
      case "--input-ids": a.inputIds = v().split(",").filter((s) => s !== "").map(Number); break;
      case "--max-new-tokens": a.maxNewTokens = Number(v()); break;
      case "--repeats": a.repeats = Number(v()); break;
      case "--f32-kv": a.f32Kv = true; break;
      case "--flash-attention": a.flashAttention = v(); break;
      case "--batch-size": a.batchSize = Number(v()); break;
      case "--seed": a.seed = Number(v()); break;
      case "--no-decode": a.decode = false; break;
      case "-h": case "--help":
        console.log(readFileSync(new URL(import.meta.url)).toString().split("\n").slice(1, 12)
          .map((l) => l.replace(/^\/\/ ?/, "")).join("\n"));
        process.exit(0);
      default: throw new Error(`unknown argument ${k} (see --help)`);
    }
  }
  if (!a.model) throw new Error("--model FILE.gguf is required");
  if (!["auto", "on", "off"].includes(a.flashAttention)) throw new Error("--flash-attention is auto, on or off");
  for (const [name, n] of [["--threads", a.threads], ["--prompt-tokens", a.promptTokens],
    ["--repeats", a.repeats], ["--batch-size", a.batchSize]])
    if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer`);
  if (!Number.isInteger(a.maxNewTokens) || a.maxNewTokens < 0) throw new Error("--max-new-tokens must be >= 0");
  return a;
}

// Deterministic prompt ids: a 32-bit LCG over the ordinary (non-special) Qwen3 vocabulary, the same
// sequence run.sh hands to cpinfer (it reads "prompt_ids" from this script's JSON).
function randomIds(n, seed, limit) {
  let s = seed >>> 0;
  const ids = [];
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    ids.push(s % limit);
  }
  return ids;
}

const median = (xs) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const prompt = a.inputIds ?? randomIds(a.promptTokens, a.seed, a.vocabLimit);
  const llama = await getLlama({ gpu: false, logLevel: LlamaLogLevel.error, maxThreads: a.threads });
  const model = await llama.loadModel({ modelPath: a.model, gpuLayers: 0 });
  const ctxOptions = {
    contextSize: prompt.length + a.maxNewTokens + 16,
    batchSize: Math.min(a.batchSize, prompt.length + a.maxNewTokens + 16),
    threads: { ideal: a.threads, min: a.threads },
    flashAttention: a.flashAttention === "auto" ? "auto" : a.flashAttention === "on",
  };
  if (a.f32Kv) {
    ctxOptions.experimentalKvCacheKeyType = "F32";
    ctxOptions.experimentalKvCacheValueType = "F32";
  }
  const context = await model.createContext(ctxOptions);
  const seq = context.getSequence();

  // Prefill: one warm-up, then the median of --repeats.
  const prefillS = [];
  for (let r = 0; r <= a.repeats; r++) {
    await seq.clearHistory();
    const t0 = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(prompt);
    const dt = (performance.now() - t0) / 1e3;
    if (r > 0) prefillS.push(dt);
  }

  // Decode: greedy, EOS ignored (the raw token stream does not stop on it), after a fresh prefill.
  const out = [];
  let ttft = 0, decodeS = 0;
  if (a.decode && a.maxNewTokens > 0) {
    await seq.clearHistory();
    const t0 = performance.now();
    let tFirst = 0;
    for await (const token of seq.evaluate(prompt, { temperature: 0 })) {
      const now = performance.now();
      out.push(token);
      if (out.length === 1) {
        tFirst = now;
        ttft = (now - t0) / 1e3;
      }
      if (out.length >= a.maxNewTokens) {
        decodeS = (now - tFirst) / 1e3;
        break;
      }
    }
  }
  const prefill = median(prefillS);
  const result = {
    engine: "llama.cpp",
    binding: `node-llama-cpp ${JSON.parse(readFileSync(new URL("./node_modules/node-llama-cpp/package.json",
      import.meta.url))).version}`,
    llama_cpp_release: llama.llamaCppRelease?.release ?? null,
    model: a.model,
    cpu: os.cpus()[0]?.model ?? "unknown",
    threads: context.currentThreads ?? a.threads,
    batch_size: ctxOptions.batchSize,
    flash_attention: context.flashAttention,
    kv_cache: a.f32Kv ? "F32" : "F16",
    prompt_tokens: prompt.length,
    prefill_s: prefill,
    prefill_runs_s: prefillS,
    prefill_tokens_per_s: prompt.length / prefill,
    new_tokens: out.length,
    ttft_s: ttft,
    decode_s: decodeS,
    decode_tokens_per_s: out.length > 1 && decodeS > 0 ? (out.length - 1) / decodeS : 0,
    output_ids: out.map(Number),
    prompt_ids: prompt,
    date: new Date().toISOString(),
  };
  await context.dispose();
  await model.dispose();
  await llama.dispose();
  console.log(JSON.stringify(result));
}

main().catch((e) => {
  console.error(`bench.mjs: ${e.message}`);
  process.exit(1);
});
