#!/usr/bin/env node
// Online serving benchmark for an OpenAI-compatible server (cpinfer serve, SGLang, vLLM), after
// sglang.bench_serving's "random" dataset: N requests of random token-id prompts arrive as a
// Poisson process at --request-rate (inf: all at once), stream their output (ignore_eos, so every
// request makes exactly --output-len tokens), and we report TTFT, TPOT, ITL and end-to-end
// latency (mean, median, p99) and throughput, as a table and as JSON.
//
//   node bench/serving/bench_serving.mjs --base-url http://127.0.0.1:30000 --num-prompts 64 \
//        --request-rate 4 --input-len 512 --output-len 64 [--output-file out.json] \
//        [--extra-request-body '{"temperature": 0.7, "top_p": 0.8}']
//
// Requests are greedy (temperature 0) unless --extra-request-body (sglang.bench_serving's flag)
// gives a JSON object whose fields are merged into every request's body (sampling parameters, e.g.).
import { parseArgs } from 'node:util';
import { writeFileSync } from 'node:fs';
import { sseEvents } from './sse.mjs';

const { values: opt } = parseArgs({
  options: {
    'base-url': { type: 'string', default: 'http://127.0.0.1:30000' },
    model: { type: 'string' },
    'num-prompts': { type: 'string', default: '64' },
    'request-rate': { type: 'string', default: 'inf' },
    'max-concurrency': { type: 'string', default: '0' },
    'input-len': { type: 'string', default: '512' },
    'output-len': { type: 'string', default: '64' },
    'range-ratio': { type: 'string', default: '1.0' },
    seed: { type: 'string', default: '1' },
    'api-key': { type: 'string', default: process.env.OPENAI_API_KEY || 'none' },
    'output-file': { type: 'string' },
    'token-id-max': { type: 'string', default: '50000' },
    'extra-request-body': { type: 'string', default: '{}' },
    help: { type: 'boolean', default: false },
  },
});
if (opt.help) {
  console.log('see the header of bench/serving/bench_serving.mjs for the flags');
  process.exit(0);
}

const N = Number(opt['num-prompts']);
const rate = opt['request-rate'] === 'inf' ? Infinity : Number(opt['request-rate']);
const maxConc = Number(opt['max-concurrency']);
const inLen = Number(opt['input-len']);
const outLen = Number(opt['output-len']);
const ratio = Number(opt['range-ratio']);
const base = opt['base-url'].replace(/\/$/, '');
for (const [k, v] of [['num-prompts', N], ['input-len', inLen], ['output-len', outLen]])
  if (!Number.isInteger(v) || v < 1) throw new Error(`--${k} must be a positive integer`);
if (!(rate > 0)) throw new Error('--request-rate must be > 0 or inf');
if (!(ratio > 0 && ratio <= 1)) throw new Error('--range-ratio must be in (0, 1]');
let extra;
try {
  extra = JSON.parse(opt['extra-request-body']);
} catch (e) {
  throw new Error(`--extra-request-body is not JSON: ${e.message}`);
}
if (extra === null || typeof extra !== 'object' || Array.isArray(extra))
  throw new Error('--extra-request-body must be a JSON object');

// Seeded PRNG (mulberry32) so that runs are comparable.
let state = Number(opt.seed) >>> 0;
const rand = () => {
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const lenIn = (n) => Math.max(1, Math.floor(n * ratio + rand() * (n - n * ratio + 1)));
const idMax = Number(opt['token-id-max']);
const requests = Array.from({ length: N }, () => {
  const n = Math.min(lenIn(inLen), inLen);
  return { prompt: Array.from({ length: n }, () => 1000 + Math.floor(rand() * (idMax - 1000))),
           maxTokens: Math.min(lenIn(outLen), outLen) };
});

async function modelName() {
  if (opt.model) return opt.model;
  const r = await fetch(`${base}/v1/models`, { headers: { Authorization: `Bearer ${opt['api-key']}` } });
  if (!r.ok) throw new Error(`GET /v1/models: HTTP ${r.status}`);
  return (await r.json()).data[0].id;
}

// One streaming request; times every SSE chunk that carries text.
async function send(model, req) {
  const out = { ok: false, inputLen: req.prompt.length, outputLen: 0, ttft: 0, itl: [], e2e: 0, error: '' };
  const t0 = performance.now();
  try {
    const res = await fetch(`${base}/v1/completions`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${opt['api-key']}` },
      body: JSON.stringify({ model, prompt: req.prompt, max_tokens: req.maxTokens, temperature: 0, ignore_eos: true,
                             stream: true, stream_options: { include_usage: true }, ...extra }),
    });
    if (!res.ok) throw new Error(`HTTP ${res.status}: ${(await res.text()).slice(0, 200)}`);
    let last = t0, first = true;
    for await (const j of sseEvents(res.body)) {
      if (j.error) throw new Error(j.error.message);
      if (j.usage) out.outputLen = j.usage.completion_tokens;
      if (!j.choices?.length || !j.choices[0].text) continue;
      const now = performance.now();
      if (first) { out.ttft = now - t0; first = false; } else out.itl.push(now - last);
      last = now;
    }
    out.e2e = performance.now() - t0;
    out.ok = true;
  } catch (e) {
    out.error = e.message;
  }
  return out;
}

const stats = (xs) => {
  if (!xs.length) return { mean: 0, median: 0, p99: 0 };
  const s = [...xs].sort((a, b) => a - b);
  const q = (p) => {
    const i = (s.length - 1) * p, lo = Math.floor(i), hi = Math.ceil(i);
    return s[lo] + (s[hi] - s[lo]) * (i - lo);
  };
  return { mean: s.reduce((a, b) => a + b, 0) / s.length, median: q(0.5), p99: q(0.99) };
};

const model = await modelName();
console.error(`[bench] ${N} requests, input ${inLen}, output ${outLen}, rate ${rate}, model ${model}, ${base}`);
let inFlight = 0;
const waiters = [];
const t0 = performance.now();
const jobs = [];
for (const req of requests) {
  if (maxConc > 0 && inFlight >= maxConc) await new Promise((r) => waiters.push(r));
  inFlight++;
  jobs.push(send(model, req).finally(() => { inFlight--; waiters.shift()?.(); }));
  if (rate !== Infinity) await new Promise((r) => setTimeout(r, (-Math.log(1 - rand()) / rate) * 1000));
}
const results = await Promise.all(jobs);
const duration = (performance.now() - t0) / 1000;

const ok = results.filter((r) => r.ok);
const inTok = ok.reduce((a, r) => a + r.inputLen, 0);
const outTok = ok.reduce((a, r) => a + r.outputLen, 0);
const tpot = ok.filter((r) => r.outputLen > 1).map((r) => (r.e2e - r.ttft) / (r.outputLen - 1));
const summary = {
  backend: 'openai-completions', base_url: base, model, num_prompts: N, request_rate: rate === Infinity ? 'inf' : rate,
  max_concurrency: maxConc || null, input_len: inLen, output_len: outLen, range_ratio: ratio,
  completed: ok.length, failed: results.length - ok.length, duration_s: duration,
  total_input_tokens: inTok, total_output_tokens: outTok,
  request_throughput: ok.length / duration, input_throughput: inTok / duration, output_throughput: outTok / duration,
  ttft_ms: stats(ok.map((r) => r.ttft)), tpot_ms: stats(tpot), itl_ms: stats(ok.flatMap((r) => r.itl)),
  e2e_ms: stats(ok.map((r) => r.e2e)),
  errors: [...new Set(results.filter((r) => !r.ok).map((r) => r.error))].slice(0, 5),
};

const f = (x, d = 2) => x.toFixed(d);
const rows = [
  ['Successful requests', ok.length], ['Failed requests', summary.failed], ['Benchmark duration (s)', f(duration)],
  ['Total input tokens', inTok], ['Total generated tokens', outTok],
  ['Request throughput (req/s)', f(summary.request_throughput)],
  ['Input token throughput (tok/s)', f(summary.input_throughput)],
  ['Output token throughput (tok/s)', f(summary.output_throughput)],
];
for (const [name, key] of [['TTFT', 'ttft_ms'], ['TPOT', 'tpot_ms'], ['ITL', 'itl_ms'], ['E2E latency', 'e2e_ms']])
  for (const s of ['mean', 'median', 'p99']) rows.push([`${s[0].toUpperCase() + s.slice(1)} ${name} (ms)`, f(summary[key][s])]);
console.log('============ Serving Benchmark Result ============');
for (const [k, v] of rows) console.log(k.padEnd(40) + String(v).padStart(10));
console.log('==================================================');
console.log(JSON.stringify(summary));
if (opt['output-file']) writeFileSync(opt['output-file'], JSON.stringify(summary, null, 2) + '\n');
if (summary.failed) {
  console.error(`[bench] ${summary.failed} requests failed: ${summary.errors.join(' | ')}`);
  process.exitCode = 1;
}
