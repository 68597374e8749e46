/**
 * fanout-client.js: a dependency-free client for a fanout node (PROTOCOL.md, version 1).
 *
 * An ES module for browsers, Node.js >= 22 (global WebSocket) or any runtime
 * given a WHATWG-compatible WebSocket constructor (`options.WebSocket`, e.g.
 * the `ws` package on older Node.js).
 *
 *   import { FanoutClient } from './fanout-client.js';
 *   const client = new FanoutClient();
 *   client.on('message:odin.global.trending', (data) => render(data.top_100));
 *   client.on('resumed', (info) => { if (!info.complete) reloadState(); });
 *   client.connect('wss://ws.example.com/ws', token);
 *   client.subscribe(['odin.global.trending']);
 *
 * What it does:
 * - Gaps: a jump in the per-connection `seq` sends `replay` for the missing
 *   range; later messages are held back until the replay is answered, so
 *   listeners see messages in order. What the node can no longer replay
 *   (WS_REPLAY_BUFFER, default 100 per client) is emitted as `missing`
 *   ({first, last}) and skipped.
 * - Reconnects: on any close or a missed heartbeat it reconnects with
 *   exponential backoff and jitter and sends `resume` with its channels,
 *   `after` = the last delivered `stream_seq` and the stream `epoch`;
 *   messages are deduplicated by `stream_seq`, so none is delivered twice.
 *   `resumed` reports the outcome: when `info.complete` is false (the node no
 *   longer retains everything since then, the stream was recreated, or the
 *   channel had no traffic since it was subscribed: `info.reason` is
 *   `retention`, `epoch_changed` or `no_position`) reload state from your API.
 * - Subscriptions are kept across reconnects; subscribe/unsubscribe work
 *   while disconnected (they are sent when the connection is back).
 * - Heartbeats: a `heartbeat` every `heartbeatInterval` ms; no frame at all
 *   within `heartbeatTimeout` ms after one means the connection is dead.
 *
 * Events (`on(type, fn)` returns a function that removes the listener):
 *   'message'            (data, msg) every data message
 *   'message:<pattern>'  (data, msg) data messages whose channel matches the
 *                        pattern (NATS wildcards: `*` one token, `>` the rest)
 *   'throttle_update'    (msg) {level, rate_percent, message}
 *   'resumed'            (info) {channels, epoch, complete, reason?}
 *   'missing'            ({first, last}) seqs the node could not replay
 *   'error'              (err) server `error` frames ({code, message, channel?})
 *                        and client-side failures ({code: 'client', message})
 *   'open'               () connected (and, after a reconnect, resumed)
 *   'close'              ({code, reason, reconnecting}) connection lost
 *
 * Limits: browsers cannot read the handshake status, so a refused token
 * (HTTP 401) looks like a failed connection and is retried with backoff; pass
 * `token` as a function (sync or async) to fetch a fresh one per attempt.
 * At most `maxHeld` (10000) messages are held behind an unanswered gap;
 * beyond that the connection is dropped and resumed. Browsers give no read
 * backpressure: a listener that is too slow makes the node throttle this
 * client (`throttle_update`).
 */

const DEFAULTS = {
  reconnectMin: 500,        // ms; the first retry waits between min/2 and min
  reconnectMax: 30000,      // ms; the exponential cap
  heartbeatInterval: 20000, // ms
  heartbeatTimeout: 10000,  // ms
  requestTimeout: 10000,    // ms, for subscribe/heartbeat/replay replies
  maxHeld: 10000,
  WebSocket: undefined,     // a constructor; default: globalThis.WebSocket
  logger: undefined,        // e.g. console; default: silent
};

/** True when NATS subject `subject` matches `pattern` (`*` one token, `>` one or more at the end). */
export function subjectMatches(pattern, subject) {
  if (pattern === subject) return true;
  const p = pattern.split('.');
  const s = subject.split('.');
  for (let i = 0; i < p.length; i++) {
    if (p[i] === '>') return i === p.length - 1 && s.length > i;
    if (i >= s.length) return false;
    if (p[i] !== '*' && p[i] !== s[i]) return false;
  }
  return p.length === s.length;
}

/**
 * Ordering state with no I/O: seq gaps, hold-back, dedupe by stream_seq,
 * stream position. The same algorithm as fanout.client.Tracker (Python).
 */
export class Tracker {
  constructor() {
    this.position = 0;      // highest stream_seq delivered in `epoch`: the next resume's `after`
    this.epoch = null;
    this.duplicates = 0;
    this.newConnection();
  }

  /** Forget per-connection state; held messages are dropped (the resume brings them again). */
  newConnection() {
    this.expected = 1;      // the next seq to deliver
    this.seenHi = 0;        // the highest seq received on this connection
    this.held = new Map();
    this.lost = [];         // [first, last] ranges known lost on this connection
  }

  /** Adopt the stream's epoch; true when it changed (positions of the old one are void). */
  setEpoch(epoch) {
    if (epoch === this.epoch) return false;
    const changed = this.epoch !== null;
    this.epoch = epoch;
    if (changed) this.position = 0;
    return changed;
  }

  /** A data message arrived: {deliver: [...msgs], gap: [from, to] | null}. */
  onMessage(msg) {
    const seq = msg.seq;
    if (!Number.isInteger(seq)) return { deliver: this._fresh(msg) ? [msg] : [], gap: null };
    const gap = seq > this.seenHi + 1 ? [this.seenHi + 1, seq - 1] : null;
    this.seenHi = Math.max(this.seenHi, seq);
    if (seq < this.expected || this.held.has(seq)) return { deliver: [], gap };
    this.held.set(seq, msg);
    return { deliver: this._drain(), gap };
  }

  /**
   * A replay finished: {deliver, lost}. Everything the node sent before
   * `replay_done` arrived before it, so a seq of the range at or below
   * seenHi that is still not here never will be.
   */
  onReplayDone(fromSeq, toSeq) {
    const lost = [];
    const hi = Math.min(toSeq, this.seenHi);
    let start = null;
    for (let s = Math.max(fromSeq, this.expected); s <= hi; s++) {
      if (!this.held.has(s) && !this._isLost(s)) {
        if (start === null) start = s;
      } else if (start !== null) {
        lost.push([start, s - 1]);
        start = null;
      }
    }
    if (start !== null) lost.push([start, hi]);
    this.lost.push(...lost);
    return { deliver: this._drain(), lost };
  }

  _isLost(seq) {
    return this.lost.some(([a, b]) => a <= seq && seq <= b);
  }

  _drain() {
    const out = [];
    for (;;) {
      const msg = this.held.get(this.expected);
      if (msg !== undefined) {
        this.held.delete(this.expected);
        this.expected += 1;
        if (this._fresh(msg)) out.push(msg);
        continue;
      }
      const range = this.lost.find(([a, b]) => a <= this.expected && this.expected <= b);
      if (!range) return out;
      this.expected = range[1] + 1;
    }
  }

  _fresh(msg) {
    const ss = msg.stream_seq;
    if (!Number.isInteger(ss)) return true;
    if (ss <= this.position) {
      this.duplicates += 1;
      return false;
    }
    this.position = ss;
    return true;
  }
}

export class FanoutClient {
  /** @param {Partial<typeof DEFAULTS>} [options] */
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.tracker = new Tracker();
    /** [{first, last}] seqs the node could not replay (per-connection seqs). */
    this.missing = [];
    /** The last throttle_update, or null. */
    this.throttle = null;
    /** Completed reconnects. */
    this.reconnects = 0;
    this._url = null;
    this._token = null;
    this._ws = null;
    this._ready = false;        // open, and resumed when reconnecting
    this._stopped = true;
    this._channels = new Set();        // wanted subscriptions
    this._confirmed = new Set();       // confirmed by the node on some connection
    this._unpositioned = new Map();    // channel -> seenHi when its subscribe was confirmed
    this._listeners = new Map();
    this._pending = new Map();         // id -> {reply, resolve, reject, timer, errors, messages, span, auto}
    this._outbox = [];                 // requests waiting for a connection
    this._ids = 0;
    this._attempt = 0;
    this._connects = 0;
    this._timers = { reconnect: null, heartbeat: null, deadline: null };
    this._lastRx = 0;
  }

  // ----------------------------------------------------------- state
  get channels() { return [...this._channels]; }
  get lastStreamSeq() { return this.tracker.position; }
  get epoch() { return this.tracker.epoch; }
  get connected() { return this._ready; }

  // -------------------------------------------------------- listeners
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    const set = this._listeners.get(type);
    if (set) set.delete(fn);
  }

  _emit(type, ...args) {
    const set = this._listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        this._log('error', `fanout: ${type} listener failed`, err);
      }
    }
  }

  _emitData(msg) {
    const data = 'data' in msg ? msg.data : msg.data_b64;
    this._emit('message', data, msg);
    for (const [type, set] of this._listeners) {
      if (set.size && type.startsWith('message:') && subjectMatches(type.slice(8), msg.channel)) {
        this._emit(type, data, msg);
      }
    }
  }

  _log(level, ...args) {
    const logger = this.options.logger;
    if (logger && typeof logger[level] === 'function') logger[level](...args);
  }

  // -------------------------------------------------------- lifecycle
  /**
   * Connect (and keep reconnecting until disconnect()). `token` is a string
   * or a function returning one (or a Promise of one), called per attempt;
   * it goes in `?auth=`.
   */
  connect(url, token) {
    if (url !== undefined) this._url = url;
    if (token !== undefined) this._token = token;
    if (!this._url) throw new Error('fanout: connect(url, token) needs a url');
    if (typeof (this.options.WebSocket || globalThis.WebSocket) !== 'function') {
      throw new Error('fanout: no WebSocket here: pass options.WebSocket (e.g. the ws package on Node.js < 22)');
    }
    this._stopped = false;
    if (!this._ws && !this._timers.reconnect) this._open();
    return this;
  }

  /** Close for good; pending requests are rejected. connect() starts again. */
  disconnect() {
    this._stopped = true;
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    const ws = this._ws;
    this._teardown();
    if (ws) {
      try { ws.close(1000, 'client disconnect'); } catch { /* already closed */ }
    }
    this._failPending(new Error('fanout: client disconnected'), false);
    for (const req of this._outbox.splice(0)) req.reject(new Error('fanout: client disconnected'));
  }

  async _open() {
    const WS = this.options.WebSocket || globalThis.WebSocket;
    this._timers.reconnect = -1;    // an attempt is in progress
    let url = this._url;
    try {
      const token = typeof this._token === 'function' ? await this._token() : this._token;
      if (token) url += (url.includes('?') ? '&' : '?') + 'auth=' + encodeURIComponent(token);
    } catch (err) {
      this._emit('error', { code: 'client', message: `token provider failed: ${err}` });
      this._timers.reconnect = null;
      this._scheduleReconnect();
      return;
    }
    this._timers.reconnect = null;
    if (this._stopped) return;
    let ws;
    try {
      ws = new WS(url);
    } catch (err) {
      this._emit('error', { code: 'client', message: `cannot open WebSocket: ${err}` });
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    this.tracker.newConnection();
    this._lastRx = Date.now();
    ws.onopen = () => { if (ws === this._ws) this._onOpen(ws); };
    ws.onmessage = (ev) => { if (ws === this._ws) this._onRaw(ws, ev.data); };
    ws.onclose = (ev) => { if (ws === this._ws) this._onClose(ev.code, ev.reason); };
    ws.onerror = () => { /* a close event follows */ };
  }

  _onOpen(ws) {
    const reconnecting = this._connects > 0;
    this._connects += 1;
    this._startHeartbeat(ws);
    const done = () => {
      if (ws !== this._ws) return;
      this._ready = true;
      this._attempt = 0;
      if (reconnecting) this.reconnects += 1;
      this._emit('open');
      for (const req of this._outbox.splice(0)) this._send(ws, req);
    };
    this._restore(ws).then(done, (err) => {
      if (ws !== this._ws) return;
      this._log('warn', 'fanout: resume failed, reconnecting', err);
      this._drop(ws, 'resume failed');
    });
  }

  /**
   * After a reconnect: resume the channels that have a position, alone and
   * first (so its catch-up is not interleaved with other live traffic), then
   * plainly subscribe the rest (quiet since subscribed: no position).
   */
  async _restore(ws) {
    const queued = new Set(this._outbox.filter((r) => r.obj.type === 'subscribe').flatMap((r) => r.obj.channels));
    const chans = [...this._channels].filter((c) => this._confirmed.has(c));
    // Wanted but never confirmed and not waiting in the outbox (a subscribe that gave up).
    const fresh = [...this._channels].filter((c) => !this._confirmed.has(c) && !queued.has(c));
    const positioned = chans.filter((c) => !this._unpositioned.has(c));
    let quiet = chans.filter((c) => this._unpositioned.has(c));
    const tr = this.tracker;
    if (positioned.length && tr.epoch !== null) {
      await this._request(ws, { type: 'resume', channels: positioned, after: tr.position, epoch: tr.epoch }, 'resumed');
    } else {
      quiet = chans;
    }
    if (quiet.length) {
      const r = await this._request(ws, { type: 'subscribe', channels: quiet }, 'subscribed');
      this._emit('resumed', { type: 'resumed', channels: r.channels, epoch: tr.epoch, complete: false, reason: 'no_position' });
    }
    if (fresh.length) {
      await this._request(ws, { type: 'subscribe', channels: fresh }, 'subscribed');
    }
    const stale = chans.filter((c) => !this._channels.has(c));   // unsubscribed while we resumed
    if (stale.length) await this._request(ws, { type: 'unsubscribe', channels: stale }, 'unsubscribed');
  }

  _onClose(code, reason) {
    const ws = this._ws;
    this._teardown();
    this._failPending(new Error(`fanout: connection closed (${code})`), true);
    const reconnecting = !this._stopped;
    this._emit('close', { code, reason, reconnecting });
    if (ws) this._log('info', `fanout: connection closed (${code} ${reason || ''})`);
    if (reconnecting) this._scheduleReconnect();
  }

  /** Abandon a connection now (dead or unusable) and reconnect. */
  _drop(ws, why) {
    if (ws !== this._ws) return;
    try { ws.close(4000, why); } catch { /* already closing */ }
    this._onClose(4000, why);
  }

  _teardown() {
    const ws = this._ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.onerror = () => {};
    }
    this._ws = null;
    this._ready = false;
    clearInterval(this._timers.heartbeat);
    clearTimeout(this._timers.deadline);
    this._timers.heartbeat = this._timers.deadline = null;
  }

  _scheduleReconnect() {
    if (this._stopped || this._timers.reconnect) return;
    const { reconnectMin: min, reconnectMax: max } = this.options;
    const cap = Math.min(max, min * 2 ** Math.min(this._attempt, 30));
    const delay = min / 2 + Math.random() * Math.max(0, cap - min / 2);
    this._attempt += 1;
    this._timers.reconnect = setTimeout(() => {
      this._timers.reconnect = null;
      if (!this._stopped) this._open();
    }, delay);
  }

  _startHeartbeat(ws) {
    const { heartbeatInterval, heartbeatTimeout } = this.options;
    this._timers.heartbeat = setInterval(() => {
      if (ws !== this._ws) return;
      const sent = Date.now();
      this._sendRaw(ws, { type: 'heartbeat', id: `hb${++this._ids}` });
      if (this._timers.deadline) return;    // the oldest unanswered heartbeat's deadline stands
      this._timers.deadline = setTimeout(() => {
        this._timers.deadline = null;
        if (ws === this._ws && this._lastRx < sent) {
          this._log('warn', `fanout: nothing received within ${heartbeatTimeout} ms of a heartbeat: reconnecting`);
          this._drop(ws, 'heartbeat timeout');
        }
      }, heartbeatTimeout);
    }, heartbeatInterval);
  }

  // --------------------------------------------------------- requests
  /**
   * Subscribe to channels (NATS patterns). Kept across reconnects. Resolves
   * to {channels: accepted, errors: [error frames of refused channels]};
   * refused channels are also emitted as 'error' and dropped from the set.
   */
  subscribe(channels) {
    const chans = [...new Set(channels)];
    for (const ch of chans) this._channels.add(ch);
    return this._enqueue({ type: 'subscribe', channels: chans }, 'subscribed', { retry: true });
  }

  /** Unsubscribe; messages already in flight may still arrive. */
  unsubscribe(channels) {
    const chans = [...new Set(channels)];
    for (const ch of chans) {
      this._channels.delete(ch);
      this._confirmed.delete(ch);
      this._unpositioned.delete(ch);
    }
    if (!this._ready) return Promise.resolve({ channels: chans });
    return this._enqueue({ type: 'unsubscribe', channels: chans }, 'unsubscribed', {}).catch(() => ({ channels: chans }));
  }

  /** Round-trip a heartbeat; resolves to the node's clock (ms since epoch). */
  heartbeat() {
    return this._enqueue({ type: 'heartbeat' }, 'heartbeat_ack', {}).then((r) => r.ts);
  }

  /**
   * Ask for this connection's messages fromSeq..toSeq again (gaps are
   * replayed automatically). Resolves to {messages: copies, missing}.
   */
  replay(fromSeq, toSeq) {
    return this._enqueue({ type: 'replay', from_seq: fromSeq, to_seq: toSeq }, 'replay_done',
      { span: [fromSeq, toSeq] }).then((r) => ({ messages: r.messages, missing: r.missing }));
  }

  _enqueue(obj, reply, opts) {
    return new Promise((resolve, reject) => {
      const req = { obj, reply, resolve, reject, tries: 0, ...opts };
      if (this._ready && this._ws) this._send(this._ws, req);
      else this._outbox.push(req);    // sent once connected (connect() may come later)
    });
  }

  /** Promise-returning request on a specific connection (used while restoring). */
  _request(ws, obj, reply) {
    return new Promise((resolve, reject) => this._send(ws, { obj, reply, resolve, reject, tries: 0 }));
  }

  _send(ws, req) {
    const id = ++this._ids;
    req.errors = [];
    req.messages = [];
    req.timer = setTimeout(() => {
      if (this._pending.get(id) === req) {
        this._pending.delete(id);
        req.reject(new Error(`fanout: no ${req.reply} within ${this.options.requestTimeout} ms`));
      }
    }, this.options.requestTimeout);
    this._pending.set(id, req);
    req.tries += 1;
    this._sendRaw(ws, { ...req.obj, id });
  }

  _sendRaw(ws, obj) {
    try {
      ws.send(JSON.stringify(obj));
    } catch (err) {
      this._log('warn', 'fanout: send failed', err);
    }
  }

  _failPending(err, requeue) {
    for (const req of this._pending.values()) {
      clearTimeout(req.timer);
      if (req.auto) continue;
      if (requeue && req.retry && req.tries < 3) this._outbox.push(req);
      else req.reject(err);
    }
    this._pending.clear();
  }

  // ------------------------------------------------------------ input
  _onRaw(ws, raw) {
    this._lastRx = Date.now();
    if (typeof raw !== 'string') return;     // the node sends text frames only
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      this._log('warn', 'fanout: frame is not JSON', raw.slice(0, 200));
      return;
    }
    if (msg && typeof msg === 'object') this._onFrame(ws, msg);
  }

  _onFrame(ws, msg) {
    const type = msg.type;
    const pending = msg.id !== undefined ? this._pending.get(msg.id) : undefined;
    switch (type) {
      case 'message':
        this._onData(ws, msg);
        return;
      case 'error':
        if (pending && msg.channel !== undefined) {
          pending.errors.push(msg);         // one refused channel; the reply follows
          this._channels.delete(msg.channel);
          this._confirmed.delete(msg.channel);
          this._unpositioned.delete(msg.channel);
        } else if (pending) {
          this._settle(msg.id, pending, null, Object.assign(new Error(`fanout: ${msg.code}: ${msg.message}`), { frame: msg }));
        }
        this._emit('error', msg);
        return;
      case 'subscribed':
      case 'resumed': {
        const epochChanged = this._onSubscribed(msg, pending);
        if (type === 'resumed') {
          if (msg.complete === false) msg.reason = epochChanged ? 'epoch_changed' : 'retention';
          this._emit('resumed', msg);
        }
        break;
      }
      case 'replay_done':
        this._onReplayDone(msg, pending);
        break;
      case 'throttle_update':
        this.throttle = msg;
        this._log(msg.level >= 2 ? 'warn' : 'info', `fanout: throttle level ${msg.level} (${msg.rate_percent}%)`);
        this._emit('throttle_update', msg);
        return;
      default:
        break;
    }
    if (pending && type === pending.reply) {
      const result = { ...msg };
      if (type === 'replay_done') result.messages = pending.messages;
      if (type === 'subscribed' || type === 'resumed') result.errors = pending.errors;
      this._settle(msg.id, pending, result, null);
    }
  }

  _settle(id, req, result, err) {
    this._pending.delete(id);
    clearTimeout(req.timer);
    if (err) req.reject(err);
    else req.resolve(result);
  }

  /** Adopt epoch, position and channels before the next frame is handled; true when the epoch changed. */
  _onSubscribed(msg, pending) {
    let changed = false;
    if (typeof msg.epoch === 'string' && msg.epoch) {
      changed = this.tracker.setEpoch(msg.epoch);
      if (changed) this._log('warn', `fanout: stream epoch changed to ${msg.epoch}: positions reset`);
    }
    const pos = msg.stream_seq;      // not in protocol v1; used if a node sends it
    if (Number.isInteger(pos) && pos >= 0) this.tracker.position = Math.max(this.tracker.position, pos);
    if (!pending) return changed;
    for (const ch of msg.channels || []) {
      if (!this._channels.has(ch)) continue;    // unsubscribed meanwhile
      this._confirmed.add(ch);
      if (msg.type === 'subscribed' && !Number.isInteger(pos)) {
        if (!this._unpositioned.has(ch)) this._unpositioned.set(ch, this.tracker.seenHi);
      } else {
        this._unpositioned.delete(ch);
      }
    }
    return changed;
  }

  _onData(ws, msg) {
    const tr = this.tracker;
    if (Number.isInteger(msg.seq) && msg.seq < tr.expected) {
      for (const req of this._pending.values()) {     // a copy asked for with replay()
        if (req.span && !req.auto && req.span[0] <= msg.seq && msg.seq <= req.span[1]) req.messages.push(msg);
      }
    }
    const { deliver, gap } = tr.onMessage(msg);
    if (gap) {
      this._log('info', `fanout: seq gap ${gap[0]}..${gap[1]}: replaying`);
      const id = ++this._ids;
      this._pending.set(id, { reply: 'replay_done', auto: true, span: gap, errors: [], messages: [],
        resolve() {}, reject() {} });
      this._sendRaw(ws, { type: 'replay', from_seq: gap[0], to_seq: gap[1], id });
    }
    this._deliver(deliver, []);
    if (tr.held.size > this.options.maxHeld) {
      this._log('warn', `fanout: ${tr.held.size} messages held behind a gap: reconnecting to resume`);
      this._drop(ws, 'gap not filled');
    }
  }

  _onReplayDone(msg, pending) {
    if (!Number.isInteger(msg.from_seq) || !Number.isInteger(msg.to_seq)) return;
    if (pending && pending.auto) this._pending.delete(msg.id);
    const { deliver, lost } = this.tracker.onReplayDone(msg.from_seq, msg.to_seq);
    for (const [first, last] of lost) {
      this._log('warn', `fanout: seqs ${first}..${last} could not be replayed`);
      this.missing.push({ first, last });
    }
    this._deliver(deliver, lost);
  }

  _deliver(msgs, lost) {
    const left = [...lost];
    for (const m of msgs) {
      while (left.length && Number.isInteger(m.seq) && left[0][1] < m.seq) {
        const [first, last] = left.shift();
        this._emit('missing', { first, last });
      }
      if (this._unpositioned.size && Number.isInteger(m.seq)) {
        for (const [ch, mark] of [...this._unpositioned]) if (mark < m.seq) this._unpositioned.delete(ch);
      }
      this._emitData(m);
    }
    for (const [first, last] of left) this._emit('missing', { first, last });
  }
}

/** The name the deployment plan uses. */
export { FanoutClient as OdinWebSocket };
export default FanoutClient;
