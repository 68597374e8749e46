// The platform-neutral half of the JS client test driver, shared by run_client.mjs
// (Node.js: stdin/stdout) and the page tests/clients/test_js_client.py serves to Chromium
// (a WebSocket back to the test). Commands in, the client's events out, as JSON objects.

/**
 * A WebSocket class that loses the first (live) copy of the data messages whose
 * seq is in `drop`, injected through the client's `WebSocket` option: a seq gap.
 */
export function faultyWebSocket(Base, drop) {
  return class FaultyWebSocket extends Base {
    set onmessage(fn) {
      super.onmessage = fn && ((ev) => {
        if (drop.size && typeof ev.data === 'string') {
          const msg = JSON.parse(ev.data);
          if (msg.type === 'message' && drop.delete(msg.seq)) return;
        }
        fn(ev);
      });
    }

    get onmessage() { return super.onmessage; }
  };
}

/** Report the client's events through `out`; returns `handle(cmd)` for the commands. */
export function drive(client, out) {
  client.on('message', (data, msg) => out({ ev: 'message', seq: msg.seq, stream_seq: msg.stream_seq, channel: msg.channel, data }));
  for (const type of ['open', 'close', 'resumed', 'missing', 'throttle_update', 'error']) {
    client.on(type, (arg) => out({ ev: type, ...(arg || {}) }));
  }
  const commands = {
    async subscribe(c) {
      const r = await client.subscribe(c.channels);
      return { channels: r.channels, errors: r.errors.map((e) => e.code) };
    },
    async unsubscribe(c) { await client.unsubscribe(c.channels); return {}; },
    async heartbeat() { return { ts: await client.heartbeat() }; },
    async replay(c) {
      const r = await client.replay(c.from, c.to);
      return { seqs: r.messages.map((m) => m.seq), missing: r.missing };
    },
    async listen(c) {
      client.on(`message:${c.pattern}`, (data, msg) => out({ ev: 'channel_message', pattern: c.pattern, channel: msg.channel, data }));
      return {};
    },
    async state() {
      return {
        channels: client.channels, lastStreamSeq: client.lastStreamSeq, epoch: client.epoch, reconnects: client.reconnects,
        missing: client.missing, throttle: client.throttle, duplicates: client.tracker.duplicates, connected: client.connected,
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
