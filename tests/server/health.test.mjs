// /health while the model loads: the listener is up before the engine, and /health (and the
// generation routes) answer 503 until the model is ready, then 200.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { BIN, tinyModel } from './harness.mjs';

test('/health is 503 while loading, then 200', async () => {
  const model = tinyModel();
  const proc = spawn(BIN, ['serve', '--model-path', model, '--port', '0', '--log-interval', '0',
    '--test-load-delay-ms', '3000'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  const waitLog = (re, what) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${what} after 60 s:\n${log}`)), 60000);
    const check = () => { const m = log.match(re); if (m) { clearTimeout(timer); resolve(m); } };
    proc.stderr.on('data', (d) => { log += d.toString(); check(); });
    check();
  });
  try {
    const [, url] = await waitLog(/listening on (http:\/\/[\d.]+:\d+)/, 'listening line');
    const loading = await fetch(`${url}/health`);
    assert.equal(loading.status, 503);
    assert.deepEqual(await loading.json(), { status: 'loading' });
    const early = await fetch(`${url}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'hi', max_tokens: 2 }),
    });
    assert.equal(early.status, 503);
    assert.ok((await early.json()).error.message.includes('loading'));
    const [readyLine] = await waitLog(/ready: [^\n]*/, 'ready line');
    // No --chunked-prefill-size: the CPU's default step budget (8192 is the GPU's).
    assert.match(readyLine, /chunked prefill 2048,/);
    const ready = await fetch(`${url}/health`);
    assert.equal(ready.status, 200);
  } finally {
    proc.kill('SIGKILL');
  }
});
