// Test driver for @fanout/client under Node.js (tests/clients/test_js_client.py).
//
//   node run_client.mjs <ws-url> [--drop=3,7] [--reconnect-min=MS] [--reconnect-max=MS]
//                       [--heartbeat-interval=MS] [--heartbeat-timeout=MS] [--token=JWT]
//                       [--tokens=A,B,...] [--refresh-before=MS] [--ws=global|ws]
//                       [--corrupt=5,9] [--drop-copy=1] [--delta=0] [--bytes=1]
//
// Commands come on stdin, one JSON object a line ({"cmd": "subscribe", "channels": [...]},
// see driver.mjs); everything the client reports goes to stdout, one JSON object a line.
// It runs the built package (clients/js/dist). WebSocket: Node's global one when it has
// it (>= 22), else the `ws` package (a dev dependency of clients/js).

import { createInterface } from 'node:readline';
import { FanoutClient } from '../../dist/index.js';
import { clientOptions, drive, switchableNetwork } from './driver.mjs';

const [url, ...rest] = process.argv.slice(2);
const opts = Object.fromEntries(rest.map((a) => a.replace(/^--/, '').split('=')));
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
process.on('unhandledRejection', (err) => out({ ev: 'unhandled', message: String(err && err.stack || err) }));

let Base = globalThis.WebSocket;
let impl = 'global';
if (opts.ws === 'ws' || typeof Base !== 'function') {
  Base = (await import('ws')).WebSocket;
  impl = 'ws';
}
const network = switchableNetwork();
const client = new FanoutClient(clientOptions(opts, Base, network));
const handle = drive(client, out, network, { bytes: opts.bytes === '1' });

createInterface({ input: process.stdin })
  .on('line', (line) => { if (line.trim()) handle(JSON.parse(line)); })
  .on('close', () => { client.disconnect(); setTimeout(() => process.exit(0), 50); });

out({ ev: 'started', impl, node: process.version });
client.connect(url);
