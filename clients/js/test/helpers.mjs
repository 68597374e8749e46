// Shared by the node:test files: a real fanout node process (like tests/helpers/node.py)
// and the WebSocket class for Node.js < 22.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../..', import.meta.url));

/** The WebSocket constructor: Node's global one (>= 22) or the `ws` dev dependency. */
export const WebSocket = globalThis.WebSocket ?? (await import('ws')).WebSocket;

/**
 * Start `python -m fanout serve` on ephemeral ports ($FANOUT_PYTHON, default python3);
 * resolves when its "fanout listening" log line names the ports.
 */
export async function startNode(env = {}) {
  const proc = spawn(process.env.FANOUT_PYTHON || 'python3', ['-m', 'fanout', 'serve'], {
    cwd: ROOT,
    env: { ...process.env, WS_HOST: '127.0.0.1', HEALTH_HOST: '127.0.0.1', WS_PORT: '0', HEALTH_PORT: '0', ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const log = [];
  const listening = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`node did not start:\n${log.join('\n')}`)), 20000);
    createInterface({ input: proc.stderr }).on('line', (line) => {
      log.push(line);
      try {
        const obj = JSON.parse(line);
        if (obj.msg === 'fanout listening') {
          clearTimeout(timer);
          resolve(obj);
        }
      } catch { /* not JSON */ }
    });
    proc.on('exit', (code) => reject(new Error(`node exited (${code}):\n${log.join('\n')}`)));
  });
  const info = await listening;
  const ops = `http://127.0.0.1:${info.health_port}`;
  return {
    wsUrl: `ws://127.0.0.1:${info.ws_port}/ws`,
    log,
    /** POST a payload to the embedded bus; resolves with its stream_seq. */
    async publish(subject, payload) {
      const res = await fetch(`${ops}/publish/${subject}`, { method: 'POST', body: JSON.stringify(payload) });
      if (res.status !== 202) throw new Error(`publish: HTTP ${res.status}`);
      return (await res.json()).stream_seq;
    },
    stop() {
      return new Promise((resolve) => {
        if (proc.exitCode !== null) return resolve();
        proc.once('exit', () => resolve());
        proc.kill('SIGTERM');
      });
    },
  };
}

/** Resolve with the first event `type` of `emitter` for which `pred` holds (bounded by `ms`). */
export function next(emitter, type, pred = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`no ${type} within ${ms} ms`)); }, ms);
    const off = emitter.on(type, (arg) => {
      if (!pred(arg)) return;
      clearTimeout(timer);
      off();
      resolve(arg);
    });
  });
}
