// The prefix cache through the official OpenAI SDK: two chats that share a long system prompt give
// the same answers as on a server started with --disable-radix-cache, and /metrics shows that the
// second chat found the shared prefix in the cache (and prefilled fewer tokens). Also at CP size 2
// with prefill CP, where the uncached rest is split over the ranks, and with --kv-shard at CP size 2
// and 3, where each rank keeps its shard of the cached pages.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, loadOpenAI, metrics } from './harness.mjs';

const servers = [];
after(async () => {
  for (const s of servers) {
    const { code } = await s.stop();
    assert.equal(code, 0, `server exit status ${code}:\n${s.log().slice(-2000)}`);
  }
});

const system = Array.from({ length: 60 }, (_, i) =>
  `Rule ${i}: answer questions about context parallelism, paged KV caches and mixture-of-experts models.`).join(' ');
const questions = ['What is a radix tree?', 'Why split a prompt in zigzag blocks?'];

// Answers of the two chats (one after the other, greedy) and the server's prefix cache counters.
async function chats(extraArgs) {
  const OpenAI = await loadOpenAI();
  const server = await startServer(['--served-model-name', 'tiny', '--kv-cache-tokens', '8192', '--chunked-prefill-size', '256', ...extraArgs]);
  servers.push(server);
  const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60000 });
  const answers = [];
  const usage = [];
  for (const q of questions) {
    const r = await client.chat.completions.create({
      model: 'tiny', max_tokens: 12, temperature: 0,
      messages: [{ role: 'system', content: system }, { role: 'user', content: q }],
    });
    answers.push(r.choices[0].message.content);
    usage.push(r.usage.prompt_tokens);
  }
  const m = await metrics(server.url);
  return {
    answers, usage,
    hit: m.get('cpinfer_prefix_cache_hit_tokens_total'),
    queried: m.get('cpinfer_prefix_cache_queried_tokens_total'),
    rate: m.get('cpinfer_prefix_cache_hit_rate'),
    prefilled: m.get('cpinfer_prompt_tokens_total'),
    cached: m.get('cpinfer_prefix_cache_cached_blocks'),
  };
}

describe('prefix cache', () => {
  let off;
  it('a cache-disabled server finds nothing and prefills every prompt token', async () => {
    off = await chats(['--disable-radix-cache']);
    assert.ok(off.usage[0] > 600, `the system prompt should be long (${off.usage[0]} tokens)`);
    assert.equal(off.hit, 0);
    assert.equal(off.queried, 0);
    assert.equal(off.cached, 0);
    assert.equal(off.prefilled, off.usage[0] + off.usage[1]);
  });

  for (const [cp, shard] of [[1, false], [2, false], [2, true], [3, true]]) {
    it(`the second chat reuses the shared system prompt and answers the same (CP size ${cp}${shard ? ', --kv-shard' : ''})`, async () => {
      const args = cp > 1 ? ['--attn-cp-size', String(cp), '--enable-prefill-cp'] : [];
      if (shard) args.push('--kv-shard');
      const on = await chats(args);
      assert.deepEqual(on.answers, off.answers);
      assert.deepEqual(on.usage, off.usage);  // usage counts the whole prompt, cached or not
      // The first chat found nothing; the second most of its prompt (the system prompt's whole pages).
      assert.ok(on.hit >= off.usage[0] - 64 && on.hit < on.usage[1], `hit ${on.hit} of ${on.usage[1]}`);
      assert.equal(on.queried, on.usage[0] + on.usage[1]);
      assert.ok(Math.abs(on.rate - on.hit / on.queried) < 1e-6);
      assert.equal(on.prefilled, on.queried - on.hit);
      assert.ok(on.cached > 0);
    });
  }
});
