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
      return this.publishText(subject, JSON.stringify(payload));
    },
    /** POST these exact payload bytes (a string: its UTF-8); resolves with the stream_seq. */
    async publishText(subject, text) {
      const res = await fetch(`${ops}/publish/${subject}`, { method: 'POST', body: text });
      if (res.status !== 202) throw new Error(`publish: HTTP ${res.status}`);
      return (await res.json()).stream_seq;
    },
    /** One line of the node's /metrics (the sum of the series that match `name` and `labels`). */
    async metric(name, labels = '') {
      const text = await (await fetch(`${ops}/metrics`)).text();
      let sum = 0;
      for (const line of text.split('\n')) {
        if (line.startsWith(`${name}{`) || line.startsWith(`${name} `)) {
          if (!labels || line.includes(labels)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
        }
      }
      return sum;
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

/** A seeded PRNG (mulberry32): the same cases every run. */
export function rng(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The plan's token updates as JSON text (like tests/helpers/delta_check.py's token_stream):
 * about 25 fields, about 700 bytes, with non-ASCII text; each update changes about ten numeric fields.
 */
export function tokenStream(n, tok = 0, random = rng(tok + 1)) {
  const obj = {
    id: `tok${tok}`, symbol: `SYM${tok}`, name: `Token number ${tok} of the odin market — ünïcödé ✓ 🚀`,
    price: 1.2345, price_usd: 12.5, market_cap: 12345678, volume_24h: 345678, change_1h: 0.5,
    change_24h: -3.25, holders: 1234, trades: 56789, liquidity: 2345678, supply: 1e9, decimals: 8,
    creator: `bc1q${'x'.repeat(38)}`, created_at: 1764284630123, image: `https://cdn.odin.fun/t/${tok}.png`,
    website: 'https://example.org', twitter: '@odin', telegram: 't.me/odin', btc_liquidity: 123456,
    token_liquidity: 9876543, last_trade_ts: 1764284630000, bonded: false, verified: true,
  };
  const nums = Object.keys(obj).filter((k) => typeof obj[k] === 'number' && !['supply', 'decimals', 'created_at'].includes(k));
  const out = [];
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < 10; j++) {
      const k = nums[Math.floor(random() * nums.length)];
      obj[k] = Number.isInteger(obj[k]) ? obj[k] + 1 + Math.floor(random() * 998) : Math.round(obj[k] * (0.95 + random() / 10) * 1e6) / 1e6;
    }
    out.push(JSON.stringify(obj));
  }
  return out;
}
