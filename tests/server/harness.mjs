// Starts `cpinfer serve` on a tiny demo model for the server tests and stops it again (also when a
// test fails or the runner exits). The binary comes from $CPINFER_BIN (ctest sets it).
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.CPINFER_BIN || path.join(here, '../../build/cpinfer');
const TMP = process.env.CPINFER_TEST_TMP || tmpdir();

export async function loadOpenAI() {
  try {
    return (await import('openai')).default;
  } catch (e) {
    throw new Error(`the npm package "openai" is missing in ${here}/node_modules: run scripts/setup.sh ` +
                    `(npm install --prefix tests/server) [${e.message}]`);
  }
}

// A 1-layer, hidden-64 random-weight Qwen3-MoE with the real Qwen3 tokenizer, written once.
export function tinyModel() {
  if (!existsSync(BIN)) throw new Error(`no cpinfer binary at ${BIN}: build it or set CPINFER_BIN`);
  const dir = path.join(TMP, 'server-test-model');
  if (!existsSync(path.join(dir, 'model.safetensors'))) {
    // Written beside and renamed: test files running in parallel never see half a model.
    const tmp = `${dir}.tmp${process.pid}`;
    mkdirSync(tmp, { recursive: true });
    execFileSync(BIN, ['-q', 'demo-model', '--out', tmp, '--layers', '1', '--hidden', '64', '--experts', '4'],
                 { stdio: 'inherit' });
    try {
      renameSync(tmp, dir);
    } catch {
      rmSync(tmp, { recursive: true, force: true });  // another test file won the race
    }
  }
  return dir;
}

const live = new Set();
process.on('exit', () => { for (const p of live) p.kill('SIGKILL'); });

// Starts the server on a free port (--port 0) and resolves once its ready line names the address.
// `env`: extra environment variables.
export async function startServer(extraArgs = [], { timeoutMs = 60000, env = {} } = {}) {
  const model = tinyModel();
  const args = ['serve', '--model-path', model, '--port', '0', '--log-interval', '0', ...extraArgs];
  const proc = spawn(BIN, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
  live.add(proc);
  let log = '';
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => { live.delete(proc); resolve({ code, signal }); }));
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server not ready after ${timeoutMs} ms:\n${log}`)), timeoutMs);
    proc.stderr.on('data', (d) => {
      log += d.toString();
      const m = log.match(/ready: .* at (http:\/\/[\d.]+:\d+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    exited.then(({ code }) => { clearTimeout(timer); reject(new Error(`server exited (${code}) before ready:\n${log}`)); });
  });
  return {
    url,
    proc,
    exited,
    log: () => log,
    // SIGTERM, then the exit status; SIGKILL when it does not drain in time.
    async stop(graceMs = 15000) {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited;
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
      const res = await exited;
      clearTimeout(timer);
      return res;
    },
  };
}

export async function metrics(url) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const get = (name) => {
    const m = text.match(new RegExp(`^${name} ([0-9.e+-]+)$`, 'm'));
    return m ? Number(m[1]) : NaN;
  };
  return { text, get };
}

export async function waitFor(pred, timeoutMs, what) {
  const t0 = Date.now();
  for (;;) {
    if (await pred()) return Date.now() - t0;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function postRaw(url, route, body, headers = {}) {
  const res = await fetch(url + route, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* checked by the caller */ }
  return { status: res.status, text, json };
}
