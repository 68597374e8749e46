// The size budget: the core client bundle (dist/fanout-client.min.js, esbuild --minify) at most 8 KiB gzipped.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';

export const BUDGET = 8 * 1024;

test(`core bundle is at most ${BUDGET} bytes min+gzip`, () => {
  const min = readFileSync(new URL('../dist/fanout-client.min.js', import.meta.url));
  const gz = gzipSync(min, { level: 9 }).length;
  console.log(`fanout-client.min.js: ${min.length} bytes minified, ${gz} bytes gzipped (budget ${BUDGET})`);
  assert.ok(gz <= BUDGET, `${gz} > ${BUDGET}`);
});
