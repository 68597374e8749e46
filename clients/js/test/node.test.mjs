// The client under Node.js against a real node process (python -m fanout serve).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connect } from '../dist/index.js';
import { WebSocket, next, startNode, tokenStream } from './helpers.mjs';

const CH = 'odin.token.abc.update';
const unhandled = [];
process.on('unhandledRejection', (err) => unhandled.push(err));

let node;
before(async () => { node = await startNode(); });
after(async () => {
  await node.stop();
  assert.deepEqual(unhandled, [], 'no unhandled rejection on any path');
});

test('subscribe, receive in order, unsubscribe', async () => {
  const client = connect(node.wsUrl, { WebSocket });
  try {
    await next(client, 'state', (s) => s === 'connected');
    const sub = client.subscribe([CH]);
    assert.deepEqual((await sub.ready).channels, [CH]);
    const got = [];
    sub.on('message', (msg) => got.push(msg.data.i));
    const done = next(sub, 'message', (msg) => msg.data.i === 2);
    for (let i = 0; i < 3; i++) await node.publish(CH, { i });
    await done;
    assert.deepEqual(got, [0, 1, 2]);
    sub.unsubscribe();
    assert.deepEqual(client.channels, []);
  } finally {
    client.disconnect();
  }
});

test('two subscriptions share a channel; the node keeps it until the last goes', async () => {
  const client = connect(node.wsUrl, { WebSocket });
  try {
    const a = client.subscribe(CH);
    const b = client.subscribe(CH);
    await Promise.all([a.ready, b.ready]);
    a.unsubscribe();
    const got = next(b, 'message');
    await node.publish(CH, { i: 'still here' });
    assert.equal((await got).data.i, 'still here');
  } finally {
    client.disconnect();
  }
});

test('disconnect() during a pending subscribe resolves ready with closed, rejects nothing', async () => {
  const client = connect('ws://127.0.0.1:9/ws', { WebSocket, minReconnectDelay: 10000 });   // nothing listens
  const sub = client.subscribe([CH]);
  client.disconnect();
  const r = await sub.ready;
  assert.deepEqual(r.errors.map((e) => e.code), ['closed']);
  await assert.rejects(client.heartbeat(), /not connected/);
  const it = sub[Symbol.asyncIterator]();
  assert.deepEqual(await it.next(), { value: undefined, done: true });
});

/** Publish the streams interleaved (a, b, a, b, ...); resolves when the client delivered them all. */
async function deltaRun(client, subjects, n) {
  const streams = subjects.map((_, t) => tokenStream(n, t));
  const got = new Map(subjects.map((s) => [s, []]));
  const sub = client.subscribe('odin.token.*.update');
  assert.deepEqual((await sub.ready).channels, ['odin.token.*.update']);
  sub.on('message', (msg) => got.get(msg.channel).push(JSON.stringify(msg.data)));
  const done = next(sub, 'message', () => [...got.values()].every((g) => g.length === n), 20000);
  for (let i = 0; i < n; i++) for (const [t, s] of subjects.entries()) await node.publishText(s, streams[t][i]);
  await done;
  return { streams, got };
}

test('deltas (on by default): every payload rebuilt exactly, most messages came as deltas', async () => {
  const subjects = ['odin.token.d1.update', 'odin.token.d2.update'];
  const before = await node.metric('fanout_sent_frames_total', 'kind="delta"');
  const client = connect(node.wsUrl, { WebSocket });
  try {
    const { streams, got } = await deltaRun(client, subjects, 150);
    // JSON.stringify of JSON that JSON.stringify wrote gives the same text: byte for byte.
    subjects.forEach((s, t) => assert.deepEqual(got.get(s), streams[t]));
    assert.equal(client.deltaFailures, 0);
    assert.equal(client.deltas, 2 * 149, 'all but each subject\'s first came as deltas');
    assert.equal(await node.metric('fanout_sent_frames_total', 'kind="delta"') - before, client.deltas);
  } finally {
    client.disconnect();
  }
});

test('delta: false asks for none: full messages only', async () => {
  const subjects = ['odin.token.f1.update'];
  const before = await node.metric('fanout_sent_frames_total', 'kind="delta"');
  const client = connect(node.wsUrl, { WebSocket, delta: false });
  try {
    const { streams, got } = await deltaRun(client, subjects, 20);
    assert.deepEqual(got.get(subjects[0]), streams[0]);
    assert.equal(client.deltas, 0);
    assert.equal(await node.metric('fanout_sent_frames_total', 'kind="delta"'), before);
  } finally {
    client.disconnect();
  }
});
