// Tabs of one browser for the one-connection-per-browser tests (tests/clients/test_js_shared.py):
// headless Chromium driven by playwright-core (the system's Chromium: playwright never downloads
// a browser here), one browser context, so its pages share an origin's SharedWorker, Web Locks
// and BroadcastChannels like the tabs of one browser profile.
//
//   CHROMIUM=/usr/bin/chromium node tabs.mjs
//
// Commands on stdin, one JSON object a line; replies on stdout, one JSON object a line:
//   {"op": "open", "id": 1, "url": "http://127.0.0.1:P/?..."}  -> {"ev": "opened", "id": 1}
//   {"op": "close", "id": 1}                                   -> {"ev": "closed", "id": 1}
// plus {"ev": "log", "id", "text"} for the pages' console errors and uncaught exceptions.
// The pages themselves report to the test over their own WebSocket (driver.mjs).
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu'],
});
const context = await browser.newContext();
const pages = new Map();

const ops = {
  async open(c) {
    const page = await context.newPage();
    pages.set(c.id, page);
    page.on('console', (msg) => { if (msg.type() === 'error') out({ ev: 'log', id: c.id, text: msg.text() }); });
    page.on('pageerror', (err) => out({ ev: 'log', id: c.id, text: String(err) }));
    await page.goto(c.url);
  },
  async close(c) {
    await pages.get(c.id).close();
    pages.delete(c.id);
  },
};

createInterface({ input: process.stdin })
  .on('line', async (line) => {
    if (!line.trim()) return;
    const c = JSON.parse(line);
    try {
      await ops[c.op](c);
      out({ ev: `${c.op === 'open' ? 'opened' : 'closed'}`, id: c.id });
    } catch (err) {
      out({ ev: 'failed', id: c.id, op: c.op, message: String(err && err.stack || err) });
    }
  })
  .on('close', async () => {
    await browser.close();
    process.exit(0);
  });
out({ ev: 'started', version: browser.version() });
