// examples/react-app in headless Chromium, driven by playwright-core (the system's Chromium:
// playwright never downloads a browser here). Run by tests/clients/test_react_app.py.
//
//   PAGE_URL=http://127.0.0.1:P/?ws=...&token=tok3  CHROMIUM=/usr/bin/chromium  SHOT=out.png
//   MODE=live      start examples/node-publisher's demo against OPS_URL, then expect the trending
//                  table, the token's price, and live updates of it
//   MODE=snapshot  (a 1.1 node) the state was published before the page opened: it renders at once
//   MODE=throttle  the server sends a throttle_update: the banner shows it
// Prints one JSON line with what it saw; exits 1 (with the reason on stderr) when an expectation fails.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const { PAGE_URL, CHROMIUM, SHOT, MODE = 'live', OPS_URL } = process.env;
const PUBLISHER = fileURLToPath(new URL('../../../../examples/node-publisher/publisher.js', import.meta.url));
const T = 15000;

const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu'] });
const errors = [];
let publisher = null;
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 900 } });
  page.on('pageerror', (err) => errors.push(String(err)));
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()); });
  await page.goto(PAGE_URL);
  const result = { mode: MODE };
  if (MODE === 'throttle') {
    const banner = await page.waitForSelector('#throttle', { timeout: T });
    result.throttle = await banner.textContent();
    result.level = await banner.getAttribute('data-level');
  } else {
    await page.waitForFunction(() => document.querySelector('#conn')?.textContent === 'connected', null, { timeout: T });
    if (MODE === 'live') {
      publisher = spawn(process.execPath, [PUBLISHER, 'demo'], {
        env: { ...process.env, FANOUT_PUBLISH_URL: OPS_URL, DEMO_TRADES: '400', DEMO_INTERVAL_MS: '10' },
        stdio: ['ignore', 'ignore', 'inherit'],
      });
    }
    await page.waitForSelector('#trending tbody tr', { timeout: T });
    result.rows = await page.$$eval('#trending tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
    await page.waitForSelector('#price', { timeout: T });
    result.firstPrice = await page.textContent('#price');
    result.firstUpdates = Number(await page.textContent('#updates'));
    if (MODE === 'live') {
      // Live: the count of updates grows past what was there when the price first showed.
      await page.waitForFunction((n) => Number(document.querySelector('#updates')?.textContent) >= n + 3,
        result.firstUpdates, { timeout: T });
      result.laterPrice = await page.textContent('#price');
      result.updates = Number(await page.textContent('#updates'));
    }
  }
  if (SHOT) await page.screenshot({ path: SHOT, fullPage: true });
  result.errors = errors;
  console.log(JSON.stringify(result));
} catch (err) {
  console.error(`react-app check failed: ${err?.stack || err}\npage errors: ${errors.join('\n')}`);
  process.exitCode = 1;
} finally {
  publisher?.kill();
  await browser.close();
}
