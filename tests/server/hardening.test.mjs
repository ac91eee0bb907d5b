// cpinfer serve against the faults an adversarial test found (issue 14): a full waiting queue is
// answered 429 with Retry-After; SIGTERM drains for at most --shutdown-timeout, then ends the
// remaining streams with an error event and exits 0; a second signal exits at once; a million
// header lines do not grow the server; pipelined requests are all answered; an invalid
// Content-Length is refused.
import { describe, it, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { readFileSync } from 'node:fs';
import { startServer, metrics, waitFor } from './harness.mjs';

const servers = [];
after(async () => { await Promise.all(servers.map((s) => s.stop())); });
async function start(args) {
  const s = await startServer(args);
  servers.push(s);
  return s;
}

const rssKb = (pid) => Number(readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1]);

// Opens a streaming completion (resolves when the response starts: the server has queued it);
// `done` resolves with the raw stream when the server ends it; cancel() aborts it.
async function openStream(url, body) {
  const abort = new AbortController();
  const res = await fetch(`${url}/v1/completions`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }),
    signal: abort.signal });
  assert.equal(res.status, 200);
  const done = res.text().catch(() => '');
  return { done, cancel: () => abort.abort() };
}

// A raw TCP exchange: writes `data` (a string or a function that writes), returns what comes back
// until the server closes (or, with `untilAnswer`, until one whole answer is in).
function rawExchange(url, write, { untilAnswer = false } = {}) {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const sock = net.connect(Number(port), hostname);
    let got = '';
    sock.on('data', (d) => {
      got += d.toString('latin1');
      const m = got.match(/Content-Length: (\d+)\r\n[\s\S]*?\r\n\r\n/);
      if (untilAnswer && m && got.length >= m.index + m[0].length + Number(m[1])) {
        sock.destroy();
        resolve(got);
      }
    });
    sock.on('error', () => {});
    sock.on('close', () => resolve(got));
    sock.on('connect', () => (typeof write === 'string' ? sock.write(write) : write(sock)));
    sock.setTimeout(20000, () => sock.destroy());
  });
}

describe('queue limit', () => {
  it('a full waiting queue is answered 429 with Retry-After', async () => {
    const s = await start(['--max-running-requests', '1', '--max-queued-requests', '2']);
    const long = { prompt: 'Once', max_tokens: 4000, ignore_eos: true, temperature: 0 };
    const running = await openStream(s.url, long);
    // The first request must be running, not waiting, before the queue fills: else it is one of
    // the two waiting and a queued one is refused instead of the probe below.
    await waitFor(async () => (await metrics(s.url)).get('cpinfer_num_running_reqs') === 1, 10000, 'the first to run');
    const queued = [openStream(s.url, long), openStream(s.url, long)];
    await waitFor(async () => (await metrics(s.url)).get('cpinfer_num_waiting_reqs') === 2, 10000, 'two waiting');
    const res = await fetch(`${s.url}/v1/completions`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ prompt: 'x', max_tokens: 1 }) });
    assert.equal(res.status, 429);
    assert.equal(res.headers.get('retry-after'), '1');
    const err = (await res.json()).error;
    assert.equal(err.code, 'rate_limit_exceeded');
    assert.match(err.message, /--max-queued-requests 2/);
    running.cancel();
    // The queue moves: a waiting request starts, and a new one is accepted again.
    await waitFor(async () => (await metrics(s.url)).get('cpinfer_num_waiting_reqs') < 2, 20000, 'the queue to move');
    const accepted = await openStream(s.url, { prompt: 'x', max_tokens: 1 });
    for (const q of [...await Promise.all(queued), accepted]) q.cancel();
  });
});

describe('shutdown', () => {
  it('SIGTERM ends streams still running after --shutdown-timeout with an error event, then exits 0', async () => {
    const s = await start(['--shutdown-timeout', '1', '--context-length', '30000', '--kv-cache-tokens', '32768']);
    // No max_tokens on chat: the whole context, minutes of decoding.
    const res = await fetch(`${s.url}/v1/chat/completions`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ messages: [{ role: 'user', content: 'hi' }], stream: true, ignore_eos: true }) });
    assert.equal(res.status, 200);
    const body = res.text();
    await waitFor(async () => (await metrics(s.url)).get('cpinfer_num_running_reqs') === 1, 10000, 'the stream to run');
    const t0 = Date.now();
    s.proc.kill('SIGTERM');
    const raw = await body;
    const { code } = await s.exited;
    const elapsed = Date.now() - t0;
    assert.equal(code, 0, s.log().slice(-2000));
    assert.ok(elapsed < 10000, `exit took ${elapsed} ms`);
    const events = raw.split('\n\n').filter(Boolean);
    assert.equal(events.at(-1), 'data: [DONE]');
    const last = JSON.parse(events.at(-2).slice(6));
    assert.match(last.error.message, /^the server is shutting down/);
    assert.equal(last.error.type, 'server_error');
  });

  it('a second signal exits at once', async () => {
    const s = await start(['--shutdown-timeout', '600']);
    const stream = await openStream(s.url, { prompt: 'Once', max_tokens: 20000, ignore_eos: true });
    await waitFor(async () => (await metrics(s.url)).get('cpinfer_num_running_reqs') === 1, 10000, 'the stream to run');
    s.proc.kill('SIGTERM');
    await waitFor(async () => (await fetch(`${s.url}/health`)).status === 503, 5000, '/health to answer 503');
    const t0 = Date.now();
    s.proc.kill('SIGINT');
    const { code } = await s.exited;
    assert.ok(Date.now() - t0 < 3000);
    assert.equal(code, 128 + 2);
    stream.cancel();
  });
});

describe('hostile HTTP', () => {
  it('a million header lines are refused with 431 early; 24 of them do not grow the server', async () => {
    const s = await start(['--api-key', 'secret']);
    const before = rssKb(s.proc.pid);
    let block = '';
    for (let i = 0; i < 10000; i++) block += `X-Filler-${i}: y\r\n`;
    for (let round = 0; round < 24; round++) {
      const reply = await rawExchange(s.url, (sock) => {
        sock.write('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n');
        let i = 0;
        const more = () => { while (i < 100 && sock.writable) { i++; if (!sock.write(block)) return sock.once('drain', more); } };
        more();
      }, { untilAnswer: true });
      assert.match(reply, /^HTTP\/1\.1 431 /);
      assert.match(reply, /"type":"invalid_request_error"/);
    }
    const grown = rssKb(s.proc.pid) - before;
    assert.ok(grown < 32 * 1024, `server RSS grew by ${grown} kB`);
    assert.equal((await fetch(`${s.url}/health`)).status, 200);
  });

  let plain;
  const plainServer = () => (plain ??= start([]));

  it('pipelined requests are all answered, in order', async () => {
    const s = await plainServer();
    const body = '{"prompt": "a", "max_tokens": 2}';
    const reply = await rawExchange(s.url,
      'GET /health HTTP/1.1\r\nHost: x\r\n\r\n' +
      `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n` +
      body +
      'GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
    const statuses = [...reply.matchAll(/HTTP\/1\.1 (\d+) /g)].map((m) => m[1]);
    assert.deepEqual(statuses, ['200', '200', '200'], reply);
    assert.ok(reply.indexOf('"status":"ok"') < reply.indexOf('"text_completion"'));
    assert.ok(reply.indexOf('"text_completion"') < reply.indexOf('"object":"list"'));
  });

  it('an invalid Content-Length is refused in OpenAI\'s error shape', async () => {
    const s = await plainServer();
    for (const cl of ['-1', '18446744073709551616', '12abc']) {
      const reply = await rawExchange(s.url,
        `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ${cl}\r\n\r\n{"prompt": "a"}`);
      assert.match(reply, /^HTTP\/1\.1 400 /, reply);
      assert.match(reply, /"error":\{/);
    }
  });
});
