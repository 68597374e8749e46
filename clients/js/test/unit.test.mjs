// Pure parts of the client: ordering, subject matching, backoff, token exp.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { Tracker, backoff, subjectMatches, tokenExp } from '../dist/index.js';

const m = (seq, ss, extra = {}) => ({ type: 'message', seq, stream_seq: ss, channel: 'a.b', ts: 0, data: null, ...extra });

describe('Tracker', () => {
  test('delivers in order, holds back behind a gap, asks for the range', () => {
    const t = new Tracker();
    assert.deepEqual(t.onMessage(m(1, 10)).deliver.map((x) => x.seq), [1]);
    const r = t.onMessage(m(4, 13));
    assert.deepEqual(r.gap, [2, 3]);
    assert.deepEqual(r.deliver, []);
    t.onMessage(m(2, 11));
    assert.deepEqual(t.onMessage(m(3, 12)).deliver.map((x) => x.seq), [3, 4]);
    assert.equal(t.position, 13);
  });

  test('replay_done reports what never came and skips it', () => {
    const t = new Tracker();
    t.onMessage(m(1, 1));
    t.onMessage(m(5, 5));
    const r = t.onReplayDone(2, 4);
    assert.deepEqual(r.lost, [[2, 4]]);
    assert.deepEqual(r.deliver.map((x) => x.seq), [5]);
  });

  test('dedupes by stream_seq across connections; snapshots pass', () => {
    const t = new Tracker();
    t.onMessage(m(1, 7));
    t.newConnection();
    assert.deepEqual(t.onMessage(m(1, 7)).deliver, []);
    assert.equal(t.duplicates, 1);
    assert.equal(t.onMessage(m(2, 3, { snapshot: true })).deliver.length, 1);
    assert.equal(t.position, 7);
  });

  test('decode (deltas): a message it cannot apply stops the drain there until its copy comes', () => {
    const t = new Tracker();
    const bad = new Set([2]);
    t.decode = (msg) => !bad.has(msg.seq) || msg.full === true;
    assert.deepEqual(t.onMessage(m(1, 1)).deliver.map((x) => x.seq), [1]);
    assert.deepEqual(t.onMessage(m(2, 2)).deliver, []);          // not applied: not delivered
    assert.deepEqual(t.onMessage(m(3, 3)).deliver, []);          // held behind it
    assert.equal(t.expected, 2);
    assert.deepEqual(t.onMessage(m(2, 2, { full: true })).deliver.map((x) => x.seq), [2, 3]);   // the replayed copy
    assert.equal(t.position, 3);
  });

  test('a new epoch voids the position', () => {
    const t = new Tracker();
    assert.equal(t.setEpoch('e1'), false);
    t.onMessage(m(1, 9));
    assert.equal(t.setEpoch('e2'), true);
    assert.equal(t.position, 0);
  });
});

test('subjectMatches: * one token, > the rest', () => {
  assert.ok(subjectMatches('odin.token.*.update', 'odin.token.abc.update'));
  assert.ok(!subjectMatches('odin.token.*.update', 'odin.token.abc.def.update'));
  assert.ok(subjectMatches('odin.global.>', 'odin.global.trending'));
  assert.ok(!subjectMatches('odin.global.>', 'odin.global'));
});

test('backoff is full jitter under an exponential cap', () => {
  assert.equal(backoff(0, 500, 20000, () => 0), 0);
  assert.equal(backoff(0, 500, 20000, () => 0.999999) < 500, true);
  assert.equal(backoff(3, 500, 20000, () => 0.5), 2000);
  assert.equal(backoff(30, 500, 20000, () => 0.5), 10000);    // capped
});

test('tokenExp reads a JWT exp without verifying; null otherwise', () => {
  const body = Buffer.from(JSON.stringify({ sub: 'u', exp: 1764284630 })).toString('base64url');
  assert.equal(tokenExp(`e30.${body}.x`), 1764284630);
  assert.equal(tokenExp('not-a-jwt'), null);
  assert.equal(tokenExp(null), null);
});
