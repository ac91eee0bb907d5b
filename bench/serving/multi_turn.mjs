#!/usr/bin/env node
// Multi-turn chat benchmark of the prefix cache: one conversation with a long shared system prompt
// (--system-tokens, about that many tokens of text) and --turns user turns; each turn sends the
// whole history (system, earlier questions and answers, the new question) and streams a greedy
// answer of --max-tokens. TTFT per turn is measured on a server started with the prefix cache and
// on one started with --disable-radix-cache (same binary, model and flags), and printed side by
// side with the ratio; --output-file writes the numbers as JSON.
//
//   node bench/serving/multi_turn.mjs --bin build/cpinfer --model build/demo-model \
//        [--system-tokens 8192] [--turns 20] [--max-tokens 16] [--server-args "--kv-cache-tokens 32768"]
import { parseArgs } from 'node:util';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import os from 'node:os';
import { sseEvents } from './sse.mjs';

const { values: opt } = parseArgs({
  options: {
    bin: { type: 'string', default: 'build/cpinfer' },
    model: { type: 'string', default: 'build/demo-model' },
    'system-tokens': { type: 'string', default: '8192' },
    turns: { type: 'string', default: '20' },
    'max-tokens': { type: 'string', default: '16' },
    'server-args': { type: 'string', default: '--kv-cache-tokens 32768 --context-length 32768' },
    'output-file': { type: 'string' },
    help: { type: 'boolean', default: false },
  },
});
if (opt.help) {
  console.log('see the header of bench/serving/multi_turn.mjs for the flags');
  process.exit(0);
}
const turns = Number(opt.turns);
const maxTokens = Number(opt['max-tokens']);

// Common English words (one Qwen3 token each, with their leading space) in a pseudo-random order,
// so that the text does not repeat; about n tokens.
const words = ('the of and to in is that for it as was with be by on not he this are or his from at which but have ' +
               'an they you were her she there been one all we their has would when if so no what up out who them ' +
               'some could more into only other time new about then two may first any like now my such make over').split(' ');
function text(n, seed) {
  const out = [];
  let x = seed >>> 0;
  for (let i = 0; i < n; ++i) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    out.push(words[x % words.length]);
  }
  return out.join(' ');
}

async function startServer(extra) {
  const args = ['serve', '--model-path', opt.model, '--port', '0', '--log-interval', '0', '--served-model-name', 'm',
                ...opt['server-args'].split(' ').filter(Boolean), ...extra];
  const proc = spawn(opt.bin, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  const url = await new Promise((resolve, reject) => {
    proc.stderr.on('data', (d) => {
      log += d.toString();
      const m = log.match(/ready: .* at (http:\/\/[\d.]+:\d+)/);
      if (m) resolve(m[1]);
    });
    proc.on('exit', (code) => reject(new Error(`server exited (${code}):\n${log}`)));
  });
  return { url, proc };
}

// One streamed chat completion: TTFT (first content chunk), the answer and the prompt size.
async function turn(url, messages) {
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages, max_tokens: maxTokens, temperature: 0, stream: true,
                           stream_options: { include_usage: true } }),
  });
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  let ttft = null, answer = '', promptTokens = 0;
  for await (const chunk of sseEvents(res.body)) {
    if (chunk.usage) promptTokens = chunk.usage.prompt_tokens;
    for (const c of chunk.choices ?? []) {
      if (ttft === null && (c.delta.content || c.delta.reasoning_content)) ttft = performance.now() - t0;
      answer += (c.delta.reasoning_content ?? '') + (c.delta.content ?? '');
    }
  }
  return { ttft_ms: ttft ?? performance.now() - t0, answer, prompt_tokens: promptTokens };
}

async function conversation(extra) {
  const server = await startServer(extra);
  try {
    await turn(server.url, [{ role: 'user', content: 'warm up' }]);  // first-request costs out of turn 1
    const messages = [{ role: 'system', content: text(Number(opt['system-tokens']), 1) }];
    const out = [];
    for (let t = 0; t < turns; ++t) {
      messages.push({ role: 'user', content: `Question ${t + 1}: ${text(24, t + 2)}?` });
      const r = await turn(server.url, messages);
      messages.push({ role: 'assistant', content: r.answer });
      out.push({ ttft_ms: r.ttft_ms, prompt_tokens: r.prompt_tokens });
    }
    const m = await (await fetch(`${server.url}/metrics`)).text();
    const get = (name) => Number((m.match(new RegExp(`^${name} ([0-9.e+-]+)$`, 'm')) ?? [])[1] ?? NaN);
    return { turns: out, hit_rate: get('cpinfer_prefix_cache_hit_rate'), prefilled: get('cpinfer_prompt_tokens_total') };
  } finally {
    server.proc.kill('SIGTERM');
  }
}

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
const on = await conversation([]);
const off = await conversation(['--disable-radix-cache']);
console.log('turn  prompt_tokens  ttft_ms(cache)  ttft_ms(--disable-radix-cache)  ratio');
for (let t = 0; t < turns; ++t) {
  const a = on.turns[t], b = off.turns[t];
  console.log(`${String(t + 1).padStart(4)}  ${String(a.prompt_tokens).padStart(13)}  ${a.ttft_ms.toFixed(1).padStart(14)}  ` +
              `${b.ttft_ms.toFixed(1).padStart(29)}  ${(b.ttft_ms / a.ttft_ms).toFixed(1).padStart(5)}`);
}
const later = (r) => median(r.turns.slice(1).map((x) => x.ttft_ms));
console.log(`median TTFT of turns 2..${turns}: ${later(on).toFixed(1)} ms with the prefix cache, ` +
            `${later(off).toFixed(1)} ms without: ${(later(off) / later(on)).toFixed(1)}x`);
console.log(`prefix cache hit rate ${on.hit_rate.toFixed(3)}; prompt tokens prefilled ${on.prefilled} vs ${off.prefilled}`);
if (opt['output-file'])
  writeFileSync(opt['output-file'], JSON.stringify({ date: new Date().toISOString(), cpu: os.cpus()[0]?.model,
                                                      cores: os.cpus().length, options: opt, cache: on, no_cache: off }, null, 2));
