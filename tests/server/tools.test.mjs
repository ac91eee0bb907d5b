// Tool calls through the official OpenAI SDK. The random-weight test model cannot call tools, so
// the server runs with the --test-fixed-output hook: every request "generates" the fixed
// text below token by token, through the real streaming, reasoning and tool-call parsing.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, loadOpenAI } from './harness.mjs';

const FIXED = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n' +
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>';
const tools = [
  { type: 'function', function: { name: 'get_weather', description: 'Weather of a city',
                                   parameters: { type: 'object', properties: { city: { type: 'string' }, days: { type: 'integer' } },
                                                 required: ['city'] } } },
  { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: {} } } },
];
const ask = [{ role: 'user', content: 'What is the weather in Paris?' }];

let server, client;
before(async () => {
  const OpenAI = await loadOpenAI();
  server = await startServer(['--test-fixed-output', FIXED]);
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'none', maxRetries: 0 });
});
after(async () => { await server?.stop(); });

function checkCalls(calls) {
  assert.equal(calls.length, 2);
  assert.equal(calls[0].type, 'function');
  assert.equal(calls[0].function.name, 'get_weather');
  assert.deepEqual(JSON.parse(calls[0].function.arguments), { city: 'Paris', days: 2 });
  assert.equal(calls[1].function.name, 'get_time');
  assert.deepEqual(JSON.parse(calls[1].function.arguments), {});
  assert.match(calls[0].id, /^call-[0-9a-f]{16}$/);
  assert.notEqual(calls[0].id, calls[1].id);
}

describe('tool calls', () => {
  it('parsed into message.tool_calls, finish_reason tool_calls', async () => {
    const r = await client.chat.completions.create({ messages: ask, tools, max_tokens: 200, ignore_eos: true });
    const choice = r.choices[0];
    assert.equal(choice.finish_reason, 'tool_calls');
    assert.equal(choice.message.content, 'Checking.');
    checkCalls(choice.message.tool_calls);
  });

  it('streamed as tool_calls deltas that the SDK assembles', async () => {
    const stream = await client.chat.completions.create({ messages: ask, tools, max_tokens: 200, ignore_eos: true,
                                                          stream: true });
    let content = '', finish = null;
    const calls = [];
    for await (const chunk of stream) {
      const c = chunk.choices[0];
      if (!c) continue;
      if (c.delta.content) content += c.delta.content;
      for (const d of c.delta.tool_calls ?? []) {
        calls[d.index] ??= { id: d.id, type: d.type, function: { name: '', arguments: '' } };
        calls[d.index].function.name += d.function?.name ?? '';
        calls[d.index].function.arguments += d.function?.arguments ?? '';
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
    assert.equal(content.trim(), 'Checking.');
    assert.ok(!content.includes('<tool_call>'));
    assert.equal(finish, 'tool_calls');
    checkCalls(calls);
    // The SDK's own accumulating helper agrees.
    const runner = client.beta.chat.completions.stream({ messages: ask, tools, max_tokens: 200, ignore_eos: true });
    const final = await runner.finalChatCompletion();
    checkCalls(final.choices[0].message.tool_calls);
  });

  it('a round trip: the assistant calls and tool results go back in', async () => {
    const first = await client.chat.completions.create({ messages: ask, tools, max_tokens: 200, ignore_eos: true });
    const msg = first.choices[0].message;
    const messages = [...ask, msg,
      ...msg.tool_calls.map((c) => ({ role: 'tool', tool_call_id: c.id, content: JSON.stringify({ ok: c.function.name }) }))];
    const second = await client.chat.completions.create({ messages, tools, max_tokens: 200, ignore_eos: true });
    // The history is rendered into the prompt: it is longer than the first one by the calls and results.
    assert.ok(second.usage.prompt_tokens > first.usage.prompt_tokens + 40,
              `${second.usage.prompt_tokens} vs ${first.usage.prompt_tokens}`);
    checkCalls(second.choices[0].message.tool_calls);
  });

  it('tool_choice none: tools left out of the prompt, nothing parsed', async () => {
    const withTools = await client.chat.completions.create({ messages: ask, tools, max_tokens: 200, ignore_eos: true });
    const r = await client.chat.completions.create({ messages: ask, tools, tool_choice: 'none', max_tokens: 200,
                                                     ignore_eos: true });
    assert.equal(r.choices[0].finish_reason, 'stop');
    assert.equal(r.choices[0].message.tool_calls, undefined);
    assert.equal(r.choices[0].message.content, FIXED);
    assert.ok(r.usage.prompt_tokens < withTools.usage.prompt_tokens - 50);
  });

  it('without tools the same output is plain content', async () => {
    const r = await client.chat.completions.create({ messages: ask, max_tokens: 200, ignore_eos: true });
    assert.equal(r.choices[0].finish_reason, 'stop');
    assert.equal(r.choices[0].message.tool_calls, undefined);
    assert.equal(r.choices[0].message.content, FIXED);
  });

  it('tool_choice required and named open the call in the prompt', async () => {
    const base = { messages: ask, tools, max_tokens: 200, ignore_eos: true };
    const auto = await client.chat.completions.create(base);
    const required = await client.chat.completions.create({ ...base, tool_choice: 'required' });
    const named = await client.chat.completions.create({ ...base,
                                                         tool_choice: { type: 'function', function: { name: 'get_weather' } } });
    assert.ok(required.usage.prompt_tokens > auto.usage.prompt_tokens);
    assert.ok(named.usage.prompt_tokens > required.usage.prompt_tokens);
    await assert.rejects(client.chat.completions.create({ ...base, tool_choice: { type: 'function', function: { name: 'nope' } } }),
                         (e) => e.status === 400 && /nope/.test(e.message));
  });
});
