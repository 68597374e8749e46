// The platform-neutral half of the client test driver, shared by run_client.mjs
// (Node.js: stdin/stdout) and the page tests/clients/test_js_client.py serves to
// Chromium (a WebSocket back to the test). Commands in, the client's events out,
// as JSON objects. Options come as strings (a query string or --flags).

/** Change one literal byte of a Fossil delta, keeping its length: only the checksum can tell. */
export function corruptDelta(delta) {
  const i = delta.indexOf(':', delta.indexOf('\n')) + 1;
  return delta.slice(0, i) + (delta[i] !== '1' ? '1' : '2') + delta.slice(i + 1);
}

/**
 * A WebSocket class injected through the client's `WebSocket` option. It loses
 * the first (live) copy of the data messages whose seq is in `drop` (a seq
 * gap); for each seq in `corrupt`, it corrupts the delta of the first delta
 * message at or after it (a checksum mismatch), and with `dropCopy` it also
 * loses that message's second copy (the replay), so the replay cannot serve it.
 */
export function faultyWebSocket(Base, drop, corrupt = new Set(), dropCopy = false) {
  const copies = new Map();        // seq of a corrupted message -> copies seen
  return class FaultyWebSocket extends Base {
    set onmessage(fn) {
      super.onmessage = fn && ((ev) => {
        if ((drop.size || corrupt.size || copies.size) && typeof ev.data === 'string') {
          const msg = JSON.parse(ev.data);
          if (msg.type === 'message' && drop.delete(msg.seq)) return;
          const at = [...corrupt].find((s) => s <= msg.seq);
          if (msg.type === 'message' && msg.delta !== undefined && at !== undefined && !copies.has(msg.seq)) {
            corrupt.delete(at);
            copies.set(msg.seq, 1);
            msg.delta = corruptDelta(msg.delta);
            return fn({ data: JSON.stringify(msg) });
          }
          if (msg.type === 'message' && copies.has(msg.seq)) {
            const n = copies.get(msg.seq) + 1;
            copies.set(msg.seq, n);
            if (n === 2 && dropCopy) return;
          }
        }
        fn(ev);
      });
    }

    get onmessage() { return super.onmessage; }
  };
}

/** A network monitor the test switches with the `offline` / `online` commands. */
export function switchableNetwork() {
  let online = true;
  const fns = new Set();
  return {
    onLine: () => online,
    onOnline(fn) { fns.add(fn); return () => fns.delete(fn); },
    set(v) { online = v; if (v) for (const fn of [...fns]) fn(); },
  };
}

/** Client options from the driver's string options. */
export function clientOptions(opts, WebSocket, network) {
  const num = (k, d) => (opts[k] !== undefined ? Number(opts[k]) : d);
  const tokens = opts.tokens ? opts.tokens.split(',') : null;
  let next = 0;
  // shared=1: the client's default, one connection per browser (a given WebSocket class turns it off).
  const shared = opts.shared === '1' && !opts.drop && !opts.corrupt;
  const seqs = (list) => new Set((list || '').split(',').filter(Boolean).map(Number));
  return {
    WebSocket: shared ? undefined : faultyWebSocket(WebSocket, seqs(opts.drop), seqs(opts.corrupt), opts['drop-copy'] === '1'),
    delta: opts.delta !== '0',
    shared: opts.worker || undefined,       // where fanout-worker.js is (default: next to the client)
    network,
    token: opts.token || undefined,
    getToken: tokens ? async () => tokens[Math.min(next++, tokens.length - 1)] : undefined,
    minReconnectDelay: num('reconnect-min', 50),
    maxReconnectDelay: num('reconnect-max', 500),
    heartbeatInterval: num('heartbeat-interval', 20000),
    heartbeatTimeout: num('heartbeat-timeout', 10000),
    refreshBefore: num('refresh-before', 30000),
    requestTimeout: 5000,
  };
}

const brief = (m) => ({ seq: m.seq, stream_seq: m.stream_seq, channel: m.channel, data: m.data, snapshot: !!m.snapshot });

/**
 * The payload bytes the client holds for `channel` as its delta base (base64),
 * when its internals are readable (dist/index.js, not the minified bundle):
 * right after a message is delivered, they are that message's payload.
 */
function baseOf(client, channel) {
  const b = client.bases?.get(channel);
  if (b === undefined) return undefined;
  const bytes = typeof b === 'string' ? new TextEncoder().encode(b.slice(b.indexOf(',"data":') + 8, -1)) : b;
  let bin = '';
  for (const x of bytes) bin += String.fromCharCode(x);
  return btoa(bin);
}

/** Report the client's events through `out`; returns `handle(cmd)` for the commands. */
export function drive(client, out, network, opts = {}) {
  client.on('message', (msg) => out({ ev: 'message', ...brief(msg), ...(opts.bytes ? { b64: baseOf(client, msg.channel) } : {}) }));
  for (const type of ['connected', 'disconnected', 'resumed', 'reset', 'missing', 'throttle_update', 'error', 'reconnect', 'refreshed', 'state']) {
    client.on(type, (arg) => out({ ev: type, ...(typeof arg === 'object' ? arg : { value: arg }) }));
  }
  client.on('snapshot', (info) => out({ ev: 'snapshot', channels: info.channels, count: info.count, n: info.messages.length }));
  const subs = [];
  const commands = {
    async subscribe(c) {
      const sub = client.subscribe(c.channels, { snapshot: !!c.snapshot });
      const id = subs.push(sub) - 1;
      sub.on('message', (msg) => out({ ev: 'sub_message', sub: id, ...brief(msg) }));
      sub.on('reset', (info) => out({ ev: 'sub_reset', sub: id, ...info }));
      sub.on('snapshot', (info) => out({ ev: 'sub_snapshot', sub: id, count: info.count }));
      if (c.nowait) return { sub: id };
      const r = await sub.ready;
      return { sub: id, channels: r.channels, errors: r.errors.map((e) => e.code) };
    },
    async ready(c) {
      const r = await subs[c.sub].ready;
      return { channels: r.channels, errors: r.errors.map((e) => e.code) };
    },
    async unsubscribe(c) { subs[c.sub].unsubscribe(); return {}; },
    async iterate(c) {
      const got = [];
      // The loop below starts the iterator in this same tick, so no message
      // can arrive in between: the test publishes only after this event.
      out({ ev: 'iterating', sub: c.sub });
      for await (const msg of subs[c.sub]) {
        got.push(msg.stream_seq);
        if (got.length >= c.n) break;
      }
      return { stream_seqs: got };
    },
    async heartbeat() { return { ts: await client.heartbeat() }; },
    async replay(c) {
      const r = await client.replay(c.from, c.to);
      return { seqs: r.messages.map((m) => m.seq), missing: r.missing };
    },
    async listen(c) {
      client.on(`message:${c.pattern}`, (msg) => out({ ev: 'channel_message', pattern: c.pattern, channel: msg.channel, data: msg.data }));
      return {};
    },
    async set_token(c) { client.setToken(c.token); return {}; },
    async offline() { network.set(false); return {}; },
    async online() { network.set(true); return {}; },
    async disconnect() { client.disconnect(); return {}; },
    async state() {
      return {
        channels: client.channels, lastStreamSeq: client.lastStreamSeq, epoch: client.epoch, reconnects: client.reconnects,
        missing: client.missing, throttle: client.throttle, duplicates: client.tracker.duplicates, connected: client.connected,
        state: client.state, deltas: client.deltas, deltaFailures: client.deltaFailures,
      };
    },
    async exit() { client.disconnect(); return {}; },
  };
  return async (c) => {
    try {
      out({ ev: `${c.cmd}_done`, ...(await commands[c.cmd](c)) });
    } catch (err) {
      out({ ev: `${c.cmd}_failed`, message: String(err && err.message) });
    }
  };
}
