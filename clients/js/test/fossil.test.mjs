// The client's Fossil delta decoder (src/fossil.ts) against an independent encoder: npm's
// fossil-delta (createDelta), on payloads like the node's (JSON token updates, UTF-8 text) and
// on arbitrary bytes; and every corruption is refused, never decoded into wrong bytes.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createDelta } from 'fossil-delta';
import { applyDelta, checksum } from '../dist/fossil.js';
import { rng, tokenStream } from './helpers.mjs';

const enc = new TextEncoder();

/** The token updates as bytes. */
function tokenBytes(n, random) {
  return tokenStream(n, 42, random).map((t) => enc.encode(t));
}

function randomBytes(n, random) {
  return Uint8Array.from({ length: n }, () => Math.floor(random() * 256));
}

/** Copy `b` with a few random edits (replace, insert, delete runs). */
function mutate(b, random) {
  let out = [...b];
  for (let e = 0; e < 1 + Math.floor(random() * 6); e++) {
    const at = Math.floor(random() * (out.length + 1));
    const len = Math.floor(random() * 40);
    const kind = Math.floor(random() * 3);
    const bytes = [...randomBytes(len, random)];
    if (kind === 0) out.splice(at, len, ...bytes);
    else if (kind === 1) out.splice(at, 0, ...bytes);
    else out.splice(at, len);
  }
  return Uint8Array.from(out);
}

/** Fossil's checksum() in delta.c, as written there (four byte lanes, then the tail). */
function fossilChecksum(z) {
  let s0 = 0; let s1 = 0; let s2 = 0; let s3 = 0; let i = 0; let n = z.length;
  for (; n >= 4; n -= 4, i += 4) {
    s0 = (s0 + z[i]) >>> 0; s1 = (s1 + z[i + 1]) >>> 0; s2 = (s2 + z[i + 2]) >>> 0; s3 = (s3 + z[i + 3]) >>> 0;
  }
  s3 = (s3 + ((s2 << 8) >>> 0) + ((s1 << 16) >>> 0) + ((s0 << 24) >>> 0)) >>> 0;
  if (n === 3) s3 = (s3 + (z[i + 2] << 8)) >>> 0;
  if (n >= 2) s3 = (s3 + ((z[i + 1] << 16) >>> 0)) >>> 0;
  if (n >= 1) s3 = (s3 + ((z[i] << 24) >>> 0)) >>> 0;
  return s3;
}

test('checksum is Fossil\'s, on every length and on high bytes', () => {
  const random = rng(1);
  for (let n = 0; n < 70; n++) {
    const b = randomBytes(n, random);
    assert.equal(checksum(b), fossilChecksum(b), `length ${n}`);
  }
  assert.equal(checksum(new Uint8Array(4096).fill(0xff)), fossilChecksum(new Uint8Array(4096).fill(0xff)));
});

test('applies fossil-delta\'s deltas: token updates, one after the other (each result the next base)', () => {
  const stream = tokenBytes(300, rng(2));
  let base = stream[0];
  let sizes = 0;
  for (const target of stream.slice(1)) {
    const delta = Uint8Array.from(createDelta(base, target));
    sizes += delta.length;
    const got = applyDelta(base, delta);
    assert.deepEqual(Buffer.from(got), Buffer.from(target));
    base = got;
  }
  assert.ok(sizes / 299 < stream[0].length / 2, `deltas are small (${sizes / 299} bytes on average)`);
});

test('applies fossil-delta\'s deltas: arbitrary bytes, edits, empty and unrelated sources', () => {
  const random = rng(3);
  const cases = [];
  for (let i = 0; i < 300; i++) {
    const src = randomBytes(Math.floor(random() * 3000), random);
    cases.push([src, mutate(src, random)]);
  }
  cases.push([new Uint8Array(0), enc.encode('{"a":1}')], [enc.encode('{"a":1}'), new Uint8Array(0)],
    [randomBytes(500, random), randomBytes(700, random)], [enc.encode('x'.repeat(5000)), enc.encode('x'.repeat(5001))]);
  for (const [src, target] of cases) {
    const delta = Uint8Array.from(createDelta(src, target));
    assert.deepEqual(Buffer.from(applyDelta(src, delta)), Buffer.from(target));
  }
});

test('a corrupted delta, a truncated one or a wrong base is refused, never decoded into other bytes', () => {
  const random = rng(4);
  const stream = tokenBytes(60, random);
  let refused = 0;
  for (let i = 1; i < stream.length; i++) {
    const base = stream[i - 1];
    const delta = Uint8Array.from(createDelta(base, stream[i]));
    // Every single-byte change of the delta (every position, a few values): refused or (rarely) the same target.
    for (let at = 0; at < delta.length; at++) {
      const bad = Uint8Array.from(delta);
      bad[at] = (bad[at] + 1 + Math.floor(random() * 254)) & 0xff;
      let got = null;
      try { got = applyDelta(base, bad); } catch { refused += 1; continue; }
      assert.deepEqual(Buffer.from(got), Buffer.from(stream[i]), `byte ${at} changed gave other bytes`);
    }
    for (let cut = 0; cut < delta.length; cut++) assert.throws(() => applyDelta(base, delta.subarray(0, cut)));
    if (i > 1) {
      // Not its base: refused, unless every byte it copies is the same there (then it is the target).
      let got = null;
      try { got = applyDelta(stream[i - 2], delta); } catch { refused += 1; }
      if (got) assert.deepEqual(Buffer.from(got), Buffer.from(stream[i]));
    }
    assert.throws(() => applyDelta(undefined, delta));                                 // no base at all
  }
  assert.ok(refused > 1000, `refused ${refused}`);
  // A size larger than any command list could make is refused before any allocation.
  assert.throws(() => applyDelta(new Uint8Array(10), enc.encode('zzzzzz\n1:a0;')), /fossil/);
});
