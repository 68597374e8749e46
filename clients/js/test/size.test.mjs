// The size budgets (esbuild --minify, gzipped): the core client bundle (dist/fanout-client.min.js,
// what every page loads) at most 8 KiB; the worker file (dist/fanout-worker.js: the shared
// connection's owner and the tab's side of it, loaded only where tabs share) at most 12 KiB.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';

export const BUDGET = 8 * 1024;
export const WORKER_BUDGET = 12 * 1024;

for (const [file, budget] of [['fanout-client.min.js', BUDGET], ['fanout-worker.js', WORKER_BUDGET]]) {
  test(`${file} is at most ${budget} bytes min+gzip`, () => {
    const min = readFileSync(new URL(`../dist/${file}`, import.meta.url));
    const gz = gzipSync(min, { level: 9 }).length;
    console.log(`${file}: ${min.length} bytes minified, ${gz} bytes gzipped (budget ${budget})`);
    assert.ok(gz <= budget, `${gz} > ${budget}`);
  });
}
