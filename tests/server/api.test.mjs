// cpinfer serve through the official OpenAI SDK: chat and completions, streaming equals
// non-streaming, seeds, stop strings, usage, bad input in OpenAI's error shape, 64 concurrent
// requests, and cancellation of abandoned requests.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { startServer, loadOpenAI, metrics, waitFor, postRaw, BIN, tinyModel } from './harness.mjs';

const KEY = 'test-key';
const MODEL = 'tiny';
let server, client, OpenAI;

before(async () => {
  OpenAI = await loadOpenAI();
  server = await startServer(['--api-key', KEY, '--served-model-name', MODEL, '--kv-cache-tokens', '16384',
                              '--context-length', '4096']);
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: KEY, maxRetries: 0, timeout: 60000 });
});

after(async () => {
  if (!server) return;
  const { code } = await server.stop();
  assert.equal(code, 0, `server exit status ${code}:\n${server.log().slice(-2000)}`);
});

const chatMsgs = [{ role: 'user', content: 'Tell me about context parallelism.' }];

async function collectChat(params) {
  const stream = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  let content = '', reasoning = '', finish = null, usage = null, role = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) role = c.delta.role;
      content += c.delta.content ?? '';
      reasoning += c.delta.reasoning_content ?? '';
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  return { content, reasoning, finish, usage, role };
}

describe('endpoints', () => {
  it('health and models', async () => {
    const h = await fetch(`${server.url}/health`);
    assert.equal(h.status, 200);
    const models = await client.models.list();
    assert.deepEqual(models.data.map((m) => m.id), [MODEL]);
  });

  it('chat completion, non-streaming', async () => {
    const r = await client.chat.completions.create({ model: MODEL, messages: chatMsgs, max_tokens: 12, temperature: 0 });
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices.length, 1);
    assert.equal(r.choices[0].message.role, 'assistant');
    assert.equal(typeof r.choices[0].message.content, 'string');
    assert.ok(['length', 'stop'].includes(r.choices[0].finish_reason));
    assert.ok(r.usage.prompt_tokens > 5);
    assert.ok(r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= 12);
    assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
  });

  it('chat streaming equals non-streaming (greedy), with usage', async () => {
    const params = { model: MODEL, messages: chatMsgs, max_tokens: 24, temperature: 0, ignore_eos: true };
    const full = await client.chat.completions.create(params);
    const s = await collectChat(params);
    assert.equal(s.role, 'assistant');
    assert.equal(s.content, full.choices[0].message.content);
    assert.equal(s.finish, 'length');
    assert.deepEqual(s.usage, full.usage);
    assert.equal(s.usage.completion_tokens, 24);
  });

  it('completion streaming equals non-streaming; the raw stream ends with [DONE]', async () => {
    const params = { model: MODEL, prompt: 'The capital of France is', max_tokens: 20, temperature: 0, ignore_eos: true };
    const full = await client.completions.create(params);
    assert.equal(full.object, 'text_completion');
    let text = '';
    for await (const chunk of await client.completions.create({ ...params, stream: true })) text += chunk.choices[0]?.text ?? '';
    assert.equal(text, full.choices[0].text);
    const raw = await postRaw(server.url, '/v1/completions', { ...params, stream: true }, { Authorization: `Bearer ${KEY}` });
    assert.equal(raw.status, 200);
    assert.ok(raw.text.endsWith('data: [DONE]\n\n'), raw.text.slice(-100));
    for (const ev of raw.text.split('\n\n').filter(Boolean)) assert.ok(ev.startsWith('data: '), ev);
  });

  it('same seed, same sample; max_completion_tokens is honoured', async () => {
    const params = { model: MODEL, messages: chatMsgs, max_completion_tokens: 16, temperature: 0.9, top_k: 40,
                     top_p: 0.95, min_p: 0.01, seed: 1234, ignore_eos: true };
    const a = await client.chat.completions.create(params);
    const b = await client.chat.completions.create(params);
    assert.equal(a.choices[0].message.content, b.choices[0].message.content);
    assert.equal(a.usage.completion_tokens, 16);
    const greedy = await client.chat.completions.create({ ...params, temperature: 0 });
    const other = await client.chat.completions.create({ ...params, seed: 99 });
    assert.ok(a.choices[0].message.content !== greedy.choices[0].message.content ||
              a.choices[0].message.content !== other.choices[0].message.content, 'sampling ignores the seed');
  });

  it('n choices: choice i is the single request with seed + i; streamed by index; usage sums them', async () => {
    const params = { model: MODEL, messages: chatMsgs, max_tokens: 10, temperature: 1.0, seed: 77, ignore_eos: true };
    const many = await client.chat.completions.create({ ...params, n: 3 });
    assert.deepEqual(many.choices.map((c) => c.index), [0, 1, 2]);
    for (let i = 0; i < 3; i++) {
      const one = await client.chat.completions.create({ ...params, seed: 77 + i });
      assert.equal(many.choices[i].message.content, one.choices[0].message.content, `choice ${i}`);
      if (i === 0) assert.equal(many.usage.prompt_tokens, one.usage.prompt_tokens);
    }
    assert.equal(many.usage.completion_tokens, 30);
    assert.ok(new Set(many.choices.map((c) => c.message.content)).size > 1, 'the choices are all the same');
    const texts = ['', '', ''];
    const finishes = [];
    for await (const chunk of await client.chat.completions.create({ ...params, n: 3, stream: true })) {
      for (const c of chunk.choices) {
        texts[c.index] += c.delta.content ?? '';
        if (c.finish_reason) finishes[c.index] = c.finish_reason;
      }
    }
    assert.deepEqual(texts, many.choices.map((c) => c.message.content));
    assert.deepEqual(finishes, ['length', 'length', 'length']);
    const comp = await client.completions.create({ model: MODEL, prompt: 'Once', max_tokens: 5, n: 2, seed: 5,
                                                   temperature: 1, ignore_eos: true });
    assert.deepEqual(comp.choices.map((c) => c.index), [0, 1]);
    assert.equal(comp.usage.completion_tokens, 10);
  });

  it('stop strings end the output before the match (string and list)', async () => {
    const params = { model: MODEL, prompt: 'Once upon a time', max_tokens: 24, temperature: 0, ignore_eos: true };
    const full = (await client.completions.create(params)).choices[0].text;
    assert.ok(full.length > 8, `output too short to test stops: ${JSON.stringify(full)}`);
    const cps = Array.from(full);  // code points: never cut a surrogate pair
    const stop = cps.slice(Math.floor(cps.length / 2), Math.floor(cps.length / 2) + 3).join('');
    const cut = full.slice(0, full.indexOf(stop));
    for (const s of [stop, [stop, '\u0000never']]) {
      const r = await client.completions.create({ ...params, stop: s });
      assert.equal(r.choices[0].text, cut);
      assert.equal(r.choices[0].finish_reason, 'stop');
      let streamed = '';
      for await (const c of await client.completions.create({ ...params, stop: s, stream: true })) streamed += c.choices[0]?.text ?? '';
      assert.equal(streamed, cut);
    }
  });

  it('enable_thinking=false renders the empty think block; reasoning_content is null without <think>', async () => {
    const on = await client.chat.completions.create({ model: MODEL, messages: chatMsgs, max_tokens: 2, temperature: 0 });
    const off = await client.chat.completions.create({ model: MODEL, messages: chatMsgs, max_tokens: 2, temperature: 0,
                                                       chat_template_kwargs: { enable_thinking: false } });
    assert.equal(off.usage.prompt_tokens, on.usage.prompt_tokens + 4);  // <think> \n\n </think> \n\n
    assert.equal(on.choices[0].message.reasoning_content ?? null, null);
  });

  it('metrics in Prometheus text', async () => {
    const m = await metrics(server.url);
    for (const name of ['cpinfer_num_running_reqs', 'cpinfer_num_waiting_reqs', 'cpinfer_kv_cache_usage',
                        'cpinfer_prompt_tokens_total', 'cpinfer_generation_tokens_total']) assert.ok(!Number.isNaN(m.get(name)), name);
    assert.ok(m.get('cpinfer_generation_tokens_total') > 0);
    assert.match(m.text, /cpinfer_time_to_first_token_seconds_bucket\{le="\+Inf"\} [1-9]/);
    assert.match(m.text, /cpinfer_inter_token_latency_seconds_count [1-9]/);
    assert.match(m.text, /cpinfer_e2e_request_latency_seconds_count [1-9]/);
  });
});

describe('bad input', () => {
  const auth = { Authorization: `Bearer ${KEY}` };
  const msgs = [{ role: 'user', content: 'hi' }];
  const long = Array(5000).fill(1).map((_, i) => 100 + (i % 1000));
  // [route, body, status, param or undefined, code or undefined]
  const cases = [
    ['/v1/chat/completions', '{"messages": [', 400],
    ['/v1/chat/completions', '[1, 2]', 400],
    ['/v1/chat/completions', {}, 400, 'messages'],
    ['/v1/chat/completions', { messages: 'hi' }, 400, 'messages'],
    ['/v1/chat/completions', { messages: [] }, 400, 'messages'],
    ['/v1/chat/completions', { messages: [42] }, 400, 'messages[0]'],
    ['/v1/chat/completions', { messages: [{ role: 'wizard', content: 'x' }] }, 400, 'messages[0].role'],
    ['/v1/chat/completions', { messages: [{ role: 'user', content: 7 }] }, 400, 'messages[0].content'],
    ['/v1/chat/completions', { messages: [{ role: 'user' }] }, 400, 'messages[0].content'],
    ['/v1/chat/completions', { messages: msgs, temperature: 'warm' }, 400, 'temperature'],
    ['/v1/chat/completions', { messages: msgs, temperature: 5 }, 400, 'temperature'],
    ['/v1/chat/completions', { messages: msgs, top_p: 1.5 }, 400, 'top_p'],
    ['/v1/chat/completions', { messages: msgs, top_k: 0 }, 400, 'top_k'],
    ['/v1/chat/completions', { messages: msgs, min_p: -0.1 }, 400, 'min_p'],
    ['/v1/chat/completions', { messages: msgs, max_tokens: 0 }, 400, 'max_tokens'],
    ['/v1/chat/completions', { messages: msgs, max_tokens: 'ten' }, 400, 'max_tokens'],
    ['/v1/chat/completions', { messages: msgs, max_completion_tokens: -5 }, 400, 'max_completion_tokens'],
    ['/v1/chat/completions', { messages: msgs, seed: 'abc' }, 400, 'seed'],
    ['/v1/chat/completions', { messages: msgs, stop: 3 }, 400, 'stop'],
    ['/v1/chat/completions', { messages: msgs, stop: ['a', null] }, 400, 'stop'],
    ['/v1/chat/completions', { messages: msgs, n: 65 }, 400, 'n'],
    ['/v1/chat/completions', { messages: msgs, stream: 'true' }, 400, 'stream'],
    ['/v1/chat/completions', { messages: msgs, stream_options: { include_usage: true } }, 400, 'stream_options'],
    ['/v1/chat/completions', { messages: msgs, chat_template_kwargs: 'x' }, 400, 'chat_template_kwargs'],
    ['/v1/chat/completions', { messages: msgs, max_tokens: 5000 }, 400, 'max_tokens', 'context_length_exceeded'],
    ['/v1/chat/completions', { messages: msgs, model: 'gpt-4o' }, 404, 'model', 'model_not_found'],
    ['/v1/completions', {}, 400, 'prompt'],
    ['/v1/completions', { prompt: '' }, 400, 'prompt'],
    ['/v1/completions', { prompt: { text: 'x' } }, 400, 'prompt'],
    ['/v1/completions', { prompt: ['a', 'b'] }, 400, 'prompt'],
    ['/v1/completions', { prompt: [1, 2, 999999999] }, 400, 'prompt'],
    ['/v1/completions', { prompt: long, max_tokens: 16 }, 400, 'max_tokens', 'context_length_exceeded'],
    ['/v1/completions', { prompt: 'a', logprobs: true }, 400, 'logprobs'],
    ['/v1/completions', { prompt: 'a', presence_penalty: 0.5 }, 400, 'presence_penalty'],
  ];
  for (const [route, body, status, param, code] of cases) {
    const label = typeof body === 'string' ? body : JSON.stringify(body).slice(0, 80);
    it(`${status} ${route} ${label}`, async () => {
      const r = await postRaw(server.url, route, body, auth);
      assert.equal(r.status, status, r.text);
      assert.ok(r.json && r.json.error, r.text);
      const e = r.json.error;
      assert.equal(typeof e.message, 'string');
      assert.ok(e.message.length > 0);
      assert.equal(typeof e.type, 'string');
      assert.ok('param' in e && 'code' in e, r.text);
      if (param !== undefined) assert.equal(e.param, param);
      if (code !== undefined) assert.equal(e.code, code);
    });
  }

  it('context_length_exceeded names the token counts', async () => {
    const r = await postRaw(server.url, '/v1/completions', { prompt: long, max_tokens: 16 }, auth);
    assert.match(r.json.error.message, /4096/);
    assert.match(r.json.error.message, /5000/);
  });

  it('401 for a wrong or missing API key, also through the SDK', async () => {
    for (const headers of [{ Authorization: 'Bearer nope' }, {}]) {
      const r = await postRaw(server.url, '/v1/chat/completions', { messages: msgs }, headers);
      assert.equal(r.status, 401);
      assert.equal(r.json.error.code, 'invalid_api_key');
    }
    const bad = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'wrong', maxRetries: 0 });
    await assert.rejects(bad.chat.completions.create({ model: MODEL, messages: msgs }), (e) => e.status === 401);
  });

  it('404 for unknown routes and models, 405 for GET on a POST route', async () => {
    const r = await fetch(`${server.url}/v1/nothing`, { headers: { Authorization: `Bearer ${KEY}` } });
    assert.equal(r.status, 404);
    assert.ok((await r.json()).error.message.includes('/v1/nothing'));
    const m = await fetch(`${server.url}/v1/models/other`, { headers: { Authorization: `Bearer ${KEY}` } });
    assert.equal(m.status, 404);
    const g = await fetch(`${server.url}/v1/completions`, { headers: { Authorization: `Bearer ${KEY}` } });
    assert.equal(g.status, 405);
    await assert.rejects(client.chat.completions.create({ model: 'nope', messages: msgs }), (e) => e.status === 404);
  });

  it('the server is still healthy after all that', async () => {
    assert.equal((await fetch(`${server.url}/health`)).status, 200);
  });
});

describe('load', () => {
  it('64 concurrent requests all complete', async () => {
    const jobs = Array.from({ length: 64 }, (_, i) => client.completions.create({
      model: MODEL, prompt: `Request number ${i}:`, max_tokens: 8, temperature: 0, ignore_eos: true }));
    const results = await Promise.all(jobs);
    for (const r of results) assert.equal(r.usage.completion_tokens, 8);
    // Same prompt prefix, different numbers: the batch did not mix up sequences.
    const again = await client.completions.create({ model: MODEL, prompt: 'Request number 17:', max_tokens: 8,
                                                    temperature: 0, ignore_eos: true });
    assert.equal(again.choices[0].text, results[17].choices[0].text);
  });

  it('abandoned requests are cancelled and their KV blocks freed', async () => {
    // A client timeout of 0.5 s: the SDK's own for the non-streaming half, an abort signal for the
    // streaming half (the SDK's timeout ends once the headers arrived).
    const impatient = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: KEY, maxRetries: 0, timeout: 500 });
    const jobs = Array.from({ length: 200 }, (_, i) => {
      const p = { model: MODEL, prompt: `Write a long story ${i}`, max_tokens: 2000, ignore_eos: true, temperature: 0 };
      if (i % 2) return impatient.completions.create(p);
      const signal = AbortSignal.timeout(500);
      // The SDK ends a stream quietly when it is aborted: no finish_reason tells it was cut.
      return impatient.completions.create({ ...p, stream: true }, { signal }).then(async (s) => {
        for await (const c of s) if (c.choices[0]?.finish_reason) return 'finished';
        return Promise.reject(new Error('aborted'));
      });
    });
    const settled = await Promise.allSettled(jobs);
    assert.ok(settled.every((s) => s.status === 'rejected'), 'some 2000-token request finished within 0.5 s');
    await waitFor(async () => {
      const m = await metrics(server.url);
      return m.get('cpinfer_num_running_reqs') === 0 && m.get('cpinfer_num_waiting_reqs') === 0 &&
             m.get('cpinfer_kv_cache_usage') === 0;
    }, 5000, 'running, waiting and KV usage to return to 0');
    const t0 = Date.now();
    const r = await client.completions.create({ model: MODEL, prompt: 'Fresh', max_tokens: 4, temperature: 0 });
    assert.ok(r.choices[0].text.length >= 0);
    assert.ok(Date.now() - t0 < 5000, `fresh request took ${Date.now() - t0} ms`);
    const m = await metrics(server.url);
    // Requests the client gave up on before they reached the server are not counted there.
    assert.ok(m.get('cpinfer_requests_aborted_total') >= 20, `aborted ${m.get('cpinfer_requests_aborted_total')}`);
  });
});

// A logprobs token's bytes: its text, or for a piece of a UTF-8 character "bytes:\\xNN...".
const tokBytes = (t) => (t.startsWith('bytes:')
  ? Buffer.from(t.slice(6).split('\\x').filter(Boolean).map((h) => parseInt(h, 16)))
  : Buffer.from(t, 'utf8'));

describe('logprobs', () => {
  it('chat: greedy tokens are the top alternative; the text is the tokens; sampling is unchanged by logprobs', async () => {
    const params = { model: MODEL, messages: chatMsgs, max_tokens: 12, temperature: 0, ignore_eos: true };
    const r = await client.chat.completions.create({ ...params, logprobs: true, top_logprobs: 3 });
    const entries = r.choices[0].logprobs.content;
    assert.equal(entries.length, 12);
    assert.equal(Buffer.concat(entries.map((e) => Buffer.from(e.bytes))).toString(), r.choices[0].message.content);
    for (const e of entries) {
      assert.equal(e.top_logprobs.length, 3);
      assert.equal(e.top_logprobs[0].token, e.token);
      assert.equal(e.top_logprobs[0].logprob, e.logprob);
      assert.ok(e.logprob <= 0);
      assert.ok(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob && e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob);
      assert.deepEqual(e.bytes, [...tokBytes(e.token)]);
    }
    const sampled = { ...params, temperature: 1.0, seed: 4242 };
    const a = await client.chat.completions.create(sampled);
    const b = await client.chat.completions.create({ ...sampled, logprobs: true });
    assert.equal(b.choices[0].message.content, a.choices[0].message.content);
    assert.equal(b.choices[0].logprobs.content[0].top_logprobs.length, 0);
    const plain = await client.chat.completions.create(params);
    assert.equal(plain.choices[0].logprobs, null);
  });

  it('completions: the values are the log-softmax of the model\'s logits (cpinfer logits)', async () => {
    const ids = [9707, 11, 1879, 0, 576, 374, 264];
    const r = await client.completions.create({ model: MODEL, prompt: ids, max_tokens: 1, temperature: 0, logprobs: 5 });
    const lp = r.choices[0].logprobs;
    const out = execFileSync(BIN, ['-q', 'logits', '--model-path', tinyModel(), '--input-ids', ids.join(','), '--last', '1', '--json'],
                             { maxBuffer: 1 << 28 });
    const logits = JSON.parse(out.toString()).logits[0];
    const max = logits.reduce((m, x) => Math.max(m, x), -Infinity);
    const logZ = max + Math.log(logits.reduce((s, x) => s + Math.exp(x - max), 0));
    const want = logits.map((x) => x - logZ).sort((x, y) => y - x).slice(0, 5);
    const got = Object.values(lp.top_logprobs[0]).sort((x, y) => y - x);
    assert.equal(got.length, 5);
    for (let k = 0; k < 5; k++) assert.ok(Math.abs(got[k] - want[k]) < 1e-4, `${got[k]} vs ${want[k]}`);
    assert.ok(Math.abs(lp.token_logprobs[0] - want[0]) < 1e-4);
    assert.deepEqual(lp.text_offset, [0]);
    // Streamed: the tokens of all chunks make the text; offsets count the bytes before each.
    let text = '';
    const tokens = [], offsets = [];
    for await (const chunk of await client.completions.create({ model: MODEL, prompt: 'Once', max_tokens: 8, temperature: 0,
                                                                 logprobs: 0, ignore_eos: true, stream: true })) {
      const c = chunk.choices[0];
      text += c.text;
      if (c.logprobs) { tokens.push(...c.logprobs.tokens); offsets.push(...c.logprobs.text_offset); }
    }
    assert.equal(tokens.length, 8);
    assert.equal(Buffer.concat(tokens.map(tokBytes)).toString(), text);
    let off = 0;
    tokens.forEach((t, k) => { assert.equal(offsets[k], off); off += tokBytes(t).length; });
  });
});
