// cpinfer serve under load: chunked prefill keeps a short request's TTFT low next to a long
// prompt; the same seed gives the same output at CP size 1 and 2; SIGTERM drains in-flight
// requests, then the server exits 0.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, loadOpenAI, metrics, waitFor } from './harness.mjs';

let OpenAI, cp1, cp2;
const clientOf = (s) => new OpenAI({ baseURL: `${s.url}/v1`, apiKey: 'none', maxRetries: 0, timeout: 120000 });

before(async () => {
  OpenAI = await loadOpenAI();
  const common = ['--kv-cache-tokens', '32768', '--context-length', '20000', '--chunked-prefill-size', '256'];
  [cp1, cp2] = await Promise.all([
    startServer(common),
    startServer([...common, '--attn-cp-size', '2', '--enable-prefill-cp', '--cp-min-tokens', '4']),
  ]);
});

after(async () => {
  await Promise.all([cp1?.stop(), cp2?.stop()]);
});

// Token ids of ordinary words (the tokenizer has ~151k; these are all plain text tokens).
const tokenPrompt = (n, salt = 0) => Array.from({ length: n }, (_, i) => 1000 + ((i * 7919 + salt) % 50000));

describe('chunked prefill', () => {
  it('a long prompt does not hold back a short request', async () => {
    const client = clientOf(cp1);
    const before = (await metrics(cp1.url)).get('cpinfer_prompt_tokens_total');
    const t0 = performance.now();
    const long = client.completions.create({ prompt: tokenPrompt(12000), max_tokens: 1 })
      .then(() => performance.now() - t0);
    // Wait (by polling, not sleeping) until the long prompt is being prefilled.
    await waitFor(async () => (await metrics(cp1.url)).get('cpinfer_prompt_tokens_total') > before, 20000,
                  'the long prefill to start');
    const t1 = performance.now();
    let ttft = null;
    const stream = await client.completions.create({ prompt: 'Hi', max_tokens: 4, temperature: 0, stream: true });
    for await (const chunk of stream) if (ttft === null && chunk.choices.length) ttft = performance.now() - t1;
    const shortDone = performance.now() - t0;
    const longMs = await long;
    assert.ok(ttft !== null);
    // The long prefill takes many 256-token steps; the short request needs about one of them.
    assert.ok(shortDone < longMs, `short request finished after the long one (${shortDone} vs ${longMs} ms)`);
    assert.ok(ttft < longMs / 3, `short TTFT ${ttft.toFixed(0)} ms vs long request ${longMs.toFixed(0)} ms`);
  });
});

describe('KV cache pressure', () => {
  it('preempted requests are recomputed and give the same output as alone', async () => {
    // Admission counts one output token per request: all six start, then outgrow the cache.
    const small = await startServer(['--kv-cache-tokens', '512', '--context-length', '512', '--decode-reserve-tokens', '1']);
    try {
      const client = clientOf(small);
      const reqs = Array.from({ length: 6 }, (_, i) => ({ prompt: tokenPrompt(60 + i, i), max_tokens: 120,
                                                            temperature: 0, ignore_eos: true }));
      const together = await Promise.all(reqs.map((r) => client.completions.create(r)));
      const m = await metrics(small.url);
      assert.ok(m.get('cpinfer_preemptions_total') > 0, '6 x 180 positions in a 512-position cache: no preemption?');
      // The gauges are published at the end of the scheduler step that sent the last response.
      await waitFor(async () => (await metrics(small.url)).get('cpinfer_kv_cache_usage') === 0, 5000,
                    'KV usage to return to 0');
      for (let i = 0; i < reqs.length; ++i) {
        const alone = await client.completions.create(reqs[i]);
        assert.equal(together[i].usage.completion_tokens, 120);
        assert.equal(together[i].choices[0].text, alone.choices[0].text, `request ${i}`);
      }
    } finally {
      await small.stop();
    }
  });
});

describe('context parallelism', () => {
  it('same seed, same output at CP size 1 and 2 (prompts long enough to split)', async () => {
    const [a, b] = [clientOf(cp1), clientOf(cp2)];
    const chat = { messages: [{ role: 'user', content: 'Explain context parallelism. '.repeat(20) }],
                   max_tokens: 16, ignore_eos: true };
    const comp = { prompt: tokenPrompt(301, 3), max_tokens: 16, ignore_eos: true };
    for (const sampling of [{ temperature: 0 }, { temperature: 0.8, top_k: 50, seed: 7 }]) {
      const [ca, cb] = await Promise.all([a.chat.completions.create({ ...chat, ...sampling }),
                                          b.chat.completions.create({ ...chat, ...sampling })]);
      assert.equal(ca.choices[0].message.content, cb.choices[0].message.content);
      assert.ok(ca.usage.prompt_tokens > 100);
      const [pa, pb] = await Promise.all([a.completions.create({ ...comp, ...sampling }),
                                          b.completions.create({ ...comp, ...sampling })]);
      assert.equal(pa.choices[0].text, pb.choices[0].text);
    }
    // Concurrent requests on the CP server: decode batches mixed with split prefills.
    const many = await Promise.all(Array.from({ length: 8 }, (_, i) =>
      b.completions.create({ prompt: tokenPrompt(50 + 37 * i, i), max_tokens: 6, temperature: 0, ignore_eos: true })));
    const solo = await b.completions.create({ prompt: tokenPrompt(50 + 37 * 5, 5), max_tokens: 6, temperature: 0,
                                              ignore_eos: true });
    assert.equal(many[5].choices[0].text, solo.choices[0].text);
  });

  it('logprobs at CP size 2 (the other rank follows the host-logits steps) equal CP size 1', async () => {
    const comp = { prompt: tokenPrompt(301, 4), max_tokens: 6, ignore_eos: true, logprobs: 3, temperature: 0.8, seed: 9 };
    // One request without logprobs in the same batch: device-drawn and host-drawn rows side by side.
    const [pa, pb, plain] = await Promise.all([clientOf(cp1).completions.create(comp), clientOf(cp2).completions.create(comp),
                                               clientOf(cp2).completions.create({ ...comp, logprobs: undefined })]);
    assert.equal(pa.choices[0].text, pb.choices[0].text);
    assert.equal(plain.choices[0].text, pa.choices[0].text);
    assert.deepEqual(pa.choices[0].logprobs.tokens, pb.choices[0].logprobs.tokens);
    pa.choices[0].logprobs.token_logprobs.forEach((x, k) =>
      assert.ok(Math.abs(x - pb.choices[0].logprobs.token_logprobs[k]) < 1e-4, `${x} vs ${pb.choices[0].logprobs.token_logprobs[k]}`));
  });
});

describe('shutdown', () => {
  it('SIGTERM drains in-flight requests, refuses new ones, then exits 0', async () => {
    for (const server of [cp2, cp1]) {
      const client = clientOf(server);
      const stream = await client.completions.create({ prompt: 'Once', max_tokens: 300, temperature: 0,
                                                       ignore_eos: true, stream: true, stream_options: { include_usage: true } });
      const it = stream[Symbol.asyncIterator]();
      const first = await it.next();
      assert.ok(!first.done);
      server.proc.kill('SIGTERM');
      await waitFor(async () => (await fetch(`${server.url}/health`)).status === 503, 5000, '/health to answer 503');
      const refused = await fetch(`${server.url}/v1/completions`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ prompt: 'x' }) });
      assert.equal(refused.status, 503);
      assert.equal((await refused.json()).error.type, 'server_error');
      let finish = null, usage = null;
      for (let r = await it.next(); !r.done; r = await it.next()) {
        if (r.value.usage) usage = r.value.usage;
        if (r.value.choices[0]?.finish_reason) finish = r.value.choices[0].finish_reason;
      }
      assert.equal(finish, 'length');
      assert.equal(usage.completion_tokens, 300);
      const { code } = await server.exited;
      assert.equal(code, 0, server.log().slice(-2000));
    }
  });
});
