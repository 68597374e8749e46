// Test driver for clients/browser/fanout-client.js under Node.js (tests/clients/test_js_client.py).
//
//   node run_client.mjs <ws-url> [--drop=3,7] [--reconnect-min=MS] [--reconnect-max=MS]
//                       [--heartbeat-interval=MS] [--heartbeat-timeout=MS] [--ws=global|ws]
//
// Commands come on stdin, one JSON object a line ({"cmd": "subscribe", "channels": [...]},
// "unsubscribe", "heartbeat", "replay" {from, to}, "listen" {pattern}, "state", "exit");
// everything the client reports goes to stdout, one JSON object a line ({"ev": ...}); see
// driver.mjs. WebSocket: Node's global one when it has it (>= 22), else the `ws` package
// from ./node_modules (npm ci in this folder). --drop=SEQS loses the first (live) copy of
// those data messages inside an injected WebSocket class, so the client sees a seq gap.

import { createInterface } from 'node:readline';
import { FanoutClient } from '../../../clients/browser/fanout-client.js';
import { drive, faultyWebSocket } from './driver.mjs';

const [url, ...rest] = process.argv.slice(2);
const opts = Object.fromEntries(rest.map((a) => a.replace(/^--/, '').split('=')));
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

let Base = globalThis.WebSocket;
let impl = 'global';
if (opts.ws === 'ws' || typeof Base !== 'function') {
  Base = (await import('ws')).WebSocket;
  impl = 'ws';
}
const drop = new Set((opts.drop || '').split(',').filter(Boolean).map(Number));
const num = (k, d) => (opts[k] !== undefined ? Number(opts[k]) : d);

const client = new FanoutClient({
  WebSocket: faultyWebSocket(Base, drop),
  reconnectMin: num('reconnect-min', 50),
  reconnectMax: num('reconnect-max', 500),
  heartbeatInterval: num('heartbeat-interval', 20000),
  heartbeatTimeout: num('heartbeat-timeout', 10000),
  requestTimeout: 5000,
});
const handle = drive(client, out);

createInterface({ input: process.stdin })
  .on('line', (line) => { if (line.trim()) handle(JSON.parse(line)); })
  .on('close', () => { client.disconnect(); process.exit(0); });

out({ ev: 'started', impl, node: process.version });
client.connect(url);
