// What applying a delta message (PROTOCOL.md 1.2) costs @fanout/client in Chromium, per message,
// beside what a full message of the same payload costs it.
//
//   CHROMIUM=/usr/bin/chromium node benchmarks/js_delta_apply.mjs [--rounds 5] [--n 1000]
//
// Needs clients/js installed and built (npm ci && npm run build there: playwright-core and
// fossil-delta come from its node_modules). Two payload streams: token updates (~700 bytes, ~10
// numeric fields changed each; tests/helpers/delta_check.py's shape) and the trending list (top
// 100, ~4 KB, a few prices and volumes changed, sometimes two entries swapped). The deltas are
// made with npm's fossil-delta (the algorithm of the node's encoder). In the page:
//
// - apply: the client's decode step alone (UTF-8 encode of the delta text, applyDelta with its
//   checksum, UTF-8 decode, JSON.parse), each result the next base;
// - client: whole frames through the real client (dist/fanout-client.min.js, a FanoutClient on a
//   WebSocket class that hands it the frames): frame JSON.parse, ordering, decode, delivery to a
//   subscription's listener; the same payloads as full frames, for the ratio.
//
// Prints a Markdown table and one JSON line (ms per message: the median of the rounds).
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const PKG = fileURLToPath(new URL('../clients/js/', import.meta.url));
const require = createRequire(`${PKG}package.json`);
const { chromium } = require('playwright-core');
const { createDelta } = await import(require.resolve('fossil-delta'));

const arg = (name, d) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : d;
};
const ROUNDS = arg('rounds', 5);
const N = arg('n', 1000);

function rng(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function tokens(n, random) {
  const obj = {
    id: 'tok0007', symbol: 'SYM7', name: 'Token number 7 of the odin market', price: 1.2345, price_usd: 12.5,
    market_cap: 12345678, volume_24h: 345678, change_1h: 0.5, change_24h: -3.25, holders: 1234, trades: 56789,
    liquidity: 2345678, supply: 1e9, decimals: 8, creator: `bc1q${'x'.repeat(38)}`, created_at: 1764284630123,
    image: 'https://cdn.odin.fun/t/7.png', website: 'https://example.org', twitter: '@odin', telegram: 't.me/odin',
    btc_liquidity: 123456, token_liquidity: 9876543, last_trade_ts: 1764284630000, bonded: false, verified: true,
  };
  const nums = Object.keys(obj).filter((k) => typeof obj[k] === 'number' && !['supply', 'decimals', 'created_at'].includes(k));
  return Array.from({ length: n }, () => {
    for (let j = 0; j < 10; j++) {
      const k = nums[Math.floor(random() * nums.length)];
      obj[k] = Number.isInteger(obj[k]) ? obj[k] + 1 + Math.floor(random() * 998) : Math.round(obj[k] * (0.95 + random() / 10) * 1e6) / 1e6;
    }
    return JSON.stringify(obj);
  });
}

function trending(n, random) {
  const list = Array.from({ length: 100 }, (_, i) => ({
    id: `tok${i}`, price: Math.round(random() * 1e4) / 1e4, volume: Math.floor(random() * 1e6),
  }));
  return Array.from({ length: n }, (_, k) => {
    for (let j = 0; j < 8; j++) {
      const e = list[Math.floor(random() * 100)];
      e.price = Math.round(e.price * (0.95 + random() / 10) * 1e4) / 1e4;
      e.volume += Math.floor(random() * 999);
    }
    if (random() < 0.3) {
      const i = Math.floor(random() * 99);
      [list[i], list[i + 1]] = [list[i + 1], list[i]];
    }
    return JSON.stringify({ type: 'trending_update', data: { top_100: list }, ts: 1764284630000 + k });
  });
}

const enc = new TextEncoder();
const dec = new TextDecoder();
/** Payloads (n + 1), and the n deltas between them as text (all ASCII here: valid UTF-8). */
function stream(payloads) {
  const deltas = payloads.slice(1).map((p, i) => dec.decode(Uint8Array.from(createDelta(enc.encode(payloads[i]), enc.encode(p)))));
  return { payloads, deltas };
}

const cases = {
  token: stream(tokens(N + 1, rng(7))),
  trending: stream(trending(N + 1, rng(8))),
};

const files = {
  '/': ['<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>delta apply</title>', 'text/html'],
  '/fossil.js': [readFileSync(`${PKG}dist/fossil.js`), 'text/javascript'],
  '/client.js': [readFileSync(`${PKG}dist/fanout-client.min.js`), 'text/javascript'],
};
const http = createServer((req, res) => {
  const f = files[req.url];
  res.writeHead(f ? 200 : 404, { 'Content-Type': f ? f[1] : 'text/plain' });
  res.end(f ? f[0] : '');
});
await new Promise((resolve) => http.listen(0, '127.0.0.1', resolve));

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: ['--no-sandbox', '--disable-gpu'] });
try {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${http.address().port}/`);
  const out = await page.evaluate(async ({ cases, rounds }) => {
    const { applyDelta } = await import('/fossil.js');
    const { FanoutClient } = await import('/client.js');
    const enc = new TextEncoder();
    const dec = new TextDecoder('utf-8', { fatal: true });
    const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

    /** The client's decode step alone, per delta (ms). */
    function apply({ payloads, deltas }) {
      let base = enc.encode(payloads[0]);
      const t0 = performance.now();
      for (const d of deltas) {
        base = applyDelta(base, enc.encode(d));
        JSON.parse(dec.decode(base));
      }
      const ms = (performance.now() - t0) / deltas.length;
      if (dec.decode(base) !== payloads.at(-1)) throw new Error('wrong result');
      return ms;
    }

    /** Frames through a real FanoutClient: ms per message (after the first, full, one). */
    function client(frames, last) {
      let ws;
      class Feed {
        constructor() { ws = this; this.readyState = 1; queueMicrotask(() => this.onopen?.({})); }
        send(text) {
          const m = JSON.parse(text);
          const reply = { type: m.type === 'resume' ? 'resumed' : m.type === 'subscribe' ? 'subscribed' : `${m.type}_done`, id: m.id, channels: m.channels, epoch: 'e', stream_seq: 0, complete: true };
          if (m.delta) reply.delta = 'fossil';
          if (m.type === 'subscribe') queueMicrotask(() => this.onmessage?.({ data: JSON.stringify(reply) }));
        }
        close() {}
      }
      return new Promise((resolve, reject) => {
        const c = new FanoutClient({ WebSocket: Feed, shared: false, heartbeatInterval: 1e9 });
        const sub = c.subscribe('odin.>');
        let got = null;
        sub.on('message', (m) => { got = m.data; });
        c.on('connected', () => {
          ws.onmessage({ data: frames[0] });
          const t0 = performance.now();
          for (let i = 1; i < frames.length; i++) ws.onmessage({ data: frames[i] });
          const ms = (performance.now() - t0) / (frames.length - 1);
          c.disconnect();
          if (JSON.stringify(got) !== last) return reject(new Error('wrong result'));
          resolve({ ms, deltas: c.deltas });
        });
        c.connect('ws://feed.invalid/ws');
      });
    }

    const frame = (i, channel, body) => `{"seq":${i + 1},"type":"message","channel":"${channel}","stream_seq":${i + 1},"ts":0,${body}}`;
    const res = {};
    for (const [name, s] of Object.entries(cases)) {
      const channel = name === 'token' ? 'odin.token.tok7.update' : 'odin.global.trending';
      const full = s.payloads.map((p, i) => frame(i, channel, `"data":${p}`));
      const delta = [full[0], ...s.deltas.map((d, i) => frame(i + 1, channel, `"delta":${JSON.stringify(d)}`))];
      const r = { apply: [], client_delta: [], client_full: [] };
      for (let k = 0; k < rounds; k++) {
        r.apply.push(apply(s));
        const cd = await client(delta, s.payloads.at(-1));
        if (cd.deltas !== s.deltas.length) throw new Error(`deltas applied: ${cd.deltas}`);
        r.client_delta.push(cd.ms);
        r.client_full.push((await client(full, s.payloads.at(-1))).ms);
      }
      const avg = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
      res[name] = {
        payload_bytes: Math.round(avg(s.payloads.map((p) => enc.encode(p).length))),
        delta_bytes: Math.round(avg(s.deltas.map((d) => enc.encode(d).length))),
        apply_ms: median(r.apply), client_delta_ms: median(r.client_delta), client_full_ms: median(r.client_full),
      };
    }
    return { res, ua: navigator.userAgent };
  }, { cases, rounds: ROUNDS });

  console.log(`Chromium ${browser.version()}, ${N} messages per stream, median of ${ROUNDS} rounds, ms per message\n`);
  console.log('| stream | payload | delta | apply (decode step) | client, delta frames | client, full frames | delta / full |');
  console.log('|---|---|---|---|---|---|---|');
  for (const [name, r] of Object.entries(out.res)) {
    console.log(`| ${name} | ${r.payload_bytes} B | ${r.delta_bytes} B | ${r.apply_ms.toFixed(4)} | ${r.client_delta_ms.toFixed(4)} | ${r.client_full_ms.toFixed(4)} | ${(r.client_delta_ms / r.client_full_ms).toFixed(2)} |`);
  }
  console.log(JSON.stringify({ chromium: browser.version(), n: N, rounds: ROUNDS, ...out.res }));
} finally {
  await browser.close();
  http.close();
}
