// The React hooks over delta messages in headless Chromium (tests/clients/test_js_delta.py):
// a page that uses @fanout/client/react as an app would (FanoutProvider with a url, useLatest,
// useChannel; nothing about deltas), against a real node at its defaults. This script bundles
// the page with esbuild (React from examples/react-app), serves it and fanout-worker.js from
// 127.0.0.1, publishes N token updates (~700 bytes, ~10 numeric fields changed each) and M
// trending lists (top 100, ~4 KB) to the node, and reports what the page showed.
//
//   CHROMIUM=/usr/bin/chromium WS_URL=ws://... OPS_URL=http://... N=1000 M=100 SHARED=1 node react_delta.mjs
//
// SHARED=1: the client's default (one connection per browser: the SharedWorker applies the
// deltas); SHARED=0: options {shared: false} (the page applies them). Prints one JSON line:
// {all, rendered, final, trendingAll, trendingFinal, errors}; exits 1 on a failed expectation.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { chromium } from 'playwright-core';
import { rng, tokenStream } from '../helpers.mjs';

const { CHROMIUM, WS_URL, OPS_URL, N = '1000', M = '100', SHARED = '1' } = process.env;
const PKG = fileURLToPath(new URL('../..', import.meta.url));
const APP = fileURLToPath(new URL('../../../../examples/react-app/node_modules', import.meta.url));
const TOKEN = 'odin.token.tok7.update';
const TRENDING = 'odin.global.trending';
const T = 20000;

const PAGE = `
import { createElement as h, useEffect } from 'react';
import { createRoot } from 'react-dom/client';
import { FanoutProvider, useChannel, useConnectionState, useLatest } from '@fanout/client/react';

const q = new URLSearchParams(location.search);
const seen = (window.seen = { all: [], rendered: [], trending: [] });

function Token() {
  const token = useLatest('${TOKEN}');                                    // snapshot, then live
  useChannel('${TOKEN}', (msg) => seen.all.push(JSON.stringify(msg.data)));   // every message
  useEffect(() => { if (token) seen.rendered.push(JSON.stringify(token)); }, [token]);
  return h('pre', { id: 'token' }, token ? JSON.stringify(token) : '');
}

function Trending() {
  const list = useChannel('${TRENDING}', (msg) => seen.trending.push(JSON.stringify(msg.data)));
  return h('pre', { id: 'trending' }, list ? JSON.stringify(list.data) : '');
}

function App() {
  return h('main', null, h('span', { id: 'conn' }, useConnectionState()), h(Token), h(Trending));
}

const options = q.get('shared') === '0' ? { shared: false } : undefined;
createRoot(document.getElementById('root')).render(h(FanoutProvider, { url: q.get('ws'), options }, h(App)));
`;

/** The trending list: 100 entries, ~4 KB; each update moves a few prices and volumes, sometimes the order. */
function trendingStream(n, random) {
  const list = Array.from({ length: 100 }, (_, i) => ({
    id: `tok${i}`, price: Math.round(random() * 1e4) / 1e4, volume: Math.floor(random() * 1e6),
  }));
  const out = [];
  for (let k = 0; k < n; k++) {
    for (let j = 0; j < 8; j++) {
      const e = list[Math.floor(random() * 100)];
      e.price = Math.round(e.price * (0.95 + random() / 10) * 1e4) / 1e4;
      e.volume += Math.floor(random() * 999);
    }
    if (random() < 0.3) {
      const i = Math.floor(random() * 99);
      [list[i], list[i + 1]] = [list[i + 1], list[i]];
    }
    out.push(JSON.stringify({ type: 'trending_update', data: { top_100: list }, ts: 1764284630000 + k }));
  }
  return out;
}

async function publish(subject, text) {
  const res = await fetch(`${OPS_URL}/publish/${subject}`, { method: 'POST', body: text });
  if (res.status !== 202) throw new Error(`publish: HTTP ${res.status}`);
}

const bundle = await esbuild.build({
  stdin: { contents: PAGE, resolveDir: PKG, loader: 'js' },
  bundle: true, format: 'esm', target: 'es2020', minify: true, write: false, logLevel: 'silent',
  alias: { react: `${APP}/react`, 'react-dom': `${APP}/react-dom`, '@fanout/client/react': `${PKG}/dist/react.js` },
  define: { 'process.env.NODE_ENV': '"production"' },
});
const files = {
  '/': ['<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><div id="root"></div><script type="module" src="/app.js"></script>', 'text/html'],
  '/app.js': [bundle.outputFiles[0].text, 'text/javascript'],
  // Where the client looks for it by default: next to the module that holds it.
  '/fanout-worker.js': [readFileSync(`${PKG}/dist/fanout-worker.js`), 'text/javascript'],
};
const http = createServer((req, res) => {
  const f = files[req.url.split('?')[0]];
  res.writeHead(f ? 200 : 404, { 'Content-Type': f ? f[1] : 'text/plain', 'Cache-Control': 'no-store' });
  res.end(f ? f[0] : 'not found');
});
await new Promise((resolve) => http.listen(0, '127.0.0.1', resolve));

const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu'] });
const errors = [];
try {
  const page = await browser.newPage();
  page.on('pageerror', (err) => errors.push(String(err)));
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()); });
  await page.goto(`http://127.0.0.1:${http.address().port}/?ws=${encodeURIComponent(WS_URL)}&shared=${SHARED}`);
  await page.waitForFunction(() => document.querySelector('#conn')?.textContent === 'connected', null, { timeout: T });
  const tokens = tokenStream(Number(N), 7, rng(7));
  const lists = trendingStream(Number(M), rng(8));
  // Each subject's messages one at a time (each publish answered before the next: its order), both subjects at once.
  const t0 = Date.now();
  const chain = async (subject, payloads) => { for (const p of payloads) await publish(subject, p); };
  await Promise.all([chain(TOKEN, tokens), chain(TRENDING, lists)]);
  const publishMs = Date.now() - t0;
  await page.waitForFunction(([n, m]) => window.seen.all.length >= n && window.seen.trending.length >= m,
    [tokens.length, lists.length], { timeout: T });
  // The last value is on screen once React rendered it.
  await page.waitForFunction((last) => document.querySelector('#token')?.textContent === last, tokens.at(-1), { timeout: T });
  const seen = await page.evaluate(() => window.seen);
  const result = {
    published: tokens, publishedTrending: lists, all: seen.all, rendered: seen.rendered,
    final: await page.textContent('#token'), trendingAll: seen.trending,
    trendingFinal: await page.textContent('#trending'),
    publishMs, totalMs: Date.now() - t0, errors,
  };
  console.log(JSON.stringify(result));
} catch (err) {
  console.error(`react delta check failed: ${err?.stack || err}\npage errors: ${errors.join('\n')}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  http.close();
}
