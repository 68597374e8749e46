// The client under Node.js against a real node process (python -m fanout serve).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connect } from '../dist/index.js';
import { WebSocket, next, startNode } from './helpers.mjs';

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
