/**
 * The fanout client (PROTOCOL.md 1.2): one WebSocket, reference-counted
 * subscriptions, ordered exactly-once delivery across gaps and reconnects,
 * delta messages applied (on by default; README "Delta messages").
 *
 * Limits: at most `maxHeld` messages wait behind an unanswered seq gap (then
 * the connection is replaced and resumed); the latest message of at most
 * `maxLatest` subjects is cached for snapshots; an async iterator buffers at
 * most `maxQueue` messages (the oldest are dropped and counted); delta bases
 * are kept for at most MAX_BASES (2048) subjects per connection. Browsers
 * cannot read a refused handshake's status, so a 401 looks like a failed
 * connection: give `getToken` so each retry after a failed open gets a fresh
 * token.
 */
import { applyDelta } from './fossil.js';
import { share } from './shared.js';
import { type DataMessage, Tracker, subjectMatches } from './tracker.js';

export type ConnectionState = 'disconnected' | 'connecting' | 'connected';

export interface ThrottleInfo {
  type: 'throttle_update';
  /** 0 = full rate .. 3 = heaviest. */
  level: number;
  rate_percent: number;
  /** Data messages this client did not get since the previous notice. */
  dropped: number;
  message: string;
}

export interface ErrorInfo {
  type?: 'error';
  code: string;
  message: string;
  channel?: string;
}

export interface ResumeInfo {
  type: 'resumed';
  channels: string[];
  epoch: string | null;
  complete: boolean;
  /** Why it is incomplete: the node's retention, a new stream epoch, or no position to resume from. */
  reason?: 'retention' | 'epoch_changed' | 'no_position';
}

export interface ResetInfo {
  channels: string[];
  reason: NonNullable<ResumeInfo['reason']>;
}

export interface CloseInfo {
  code: number;
  reason: string;
  /** The client will try again (after `delay` ms, or when the browser is back online). */
  reconnecting: boolean;
  delay: number | null;
}

export interface SnapshotInfo {
  channels: string[];
  /** How many the node delivered; null when it ignored `snapshot` (a node before 1.1). */
  count: number | null;
  messages: DataMessage[];
}

export interface SubscribeResult {
  /** The accepted channels. */
  channels: string[];
  /** One per refused channel (`invalid_channel`, `forbidden`, `too_many_subscriptions`), or `closed`. */
  errors: ErrorInfo[];
}

export interface ClientEvents {
  state: (state: ConnectionState) => void;
  connected: () => void;
  disconnected: (info: CloseInfo) => void;
  message: (msg: DataMessage) => void;
  snapshot: (info: SnapshotInfo) => void;
  resumed: (info: ResumeInfo) => void;
  reset: (info: ResetInfo) => void;
  throttle_update: (info: ThrottleInfo) => void;
  missing: (range: { first: number; last: number }) => void;
  error: (err: ErrorInfo) => void;
  reconnect: (hint: { reason: string; after_ms: number }) => void;
  refreshed: (info: { exp: number }) => void;
}

/** What the client needs from a WebSocket (the browser's, Node's, or the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketCtor = new (url: string) => WebSocketLike;

/** Online/offline source; the default reads `navigator.onLine` and the window's `online` event. */
export interface NetworkMonitor {
  onLine(): boolean;
  onOnline(fn: () => void): () => void;
}

export interface ClientOptions {
  /** A JWT for `?auth=`. */
  token?: string;
  /** Fetches a JWT: at connect, after a failed open, after a 4001 close, and to `refresh` before `exp`. */
  getToken?: () => string | Promise<string>;
  WebSocket?: WebSocketCtor;
  /** Backoff: each retry waits uniformly in [0, min(maxReconnectDelay, minReconnectDelay * 2^attempt)] ms. */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  heartbeatInterval?: number;
  heartbeatTimeout?: number;
  requestTimeout?: number;
  /** Send `refresh` this many ms before the token's `exp` (needs `getToken`). */
  refreshBefore?: number;
  maxHeld?: number;
  maxLatest?: number;
  maxQueue?: number;
  /**
   * Ask for delta messages (PROTOCOL.md 1.2 `delta: "fossil"`) on every
   * subscription: default true; false: full messages only. Listeners get full
   * `data` either way.
   */
  delta?: boolean;
  network?: NetworkMonitor;
  logger?: Pick<Console, 'info' | 'warn' | 'error'>;
  /**
   * One connection per browser (default on in browsers, see README "One
   * connection per browser"): the tabs of an origin share one WebSocket per
   * URL and user. A string or URL names where `fanout-worker.js` is served;
   * false: this client opens its own. Off when `WebSocket` is given.
   */
  shared?: boolean | string | URL;
}

const DEFAULTS = {
  minReconnectDelay: 500,
  maxReconnectDelay: 20000,
  heartbeatInterval: 20000,
  heartbeatTimeout: 10000,
  requestTimeout: 10000,
  refreshBefore: 30000,
  maxHeld: 10000,
  maxLatest: 1000,
  maxQueue: 10000,
  delta: true,
};
/** Delta bases kept per connection: the last payload of at most this many subjects (least recently updated dropped). */
const MAX_BASES = 2048;

const enc = new TextEncoder();
const dec = new TextDecoder('utf-8', { fatal: true });

type Listener = (...args: never[]) => void;
type Frame = Record<string, unknown> & { type?: string; id?: number };

interface Request {
  reply: string;
  resolve(frame: Frame): void;
  reject(err: Error): void;
  timer: ReturnType<typeof setTimeout>;
  errors: ErrorInfo[];
  messages: DataMessage[];
  span?: [number, number];
  auto?: boolean;
  /** Subscriptions waiting for this subscribe's snapshot, and what came for them. */
  snap?: Set<Subscription>;
  channels?: string[];
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve(v: T): void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => { resolve = r; });
  return { promise, resolve };
}

type ChannelResult = ErrorInfo | null;

/** Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2^attempt)]. */
export function backoff(attempt: number, base: number, cap: number, random = Math.random): number {
  return random() * Math.min(cap, base * 2 ** Math.min(attempt, 30));
}

/** The `exp` (unix seconds) of a JWT, read without verifying it; null when it has none. */
export function tokenExp(token: string | null): number | null {
  try {
    const part = (token || '').split('.')[1];
    const exp = JSON.parse(atob(part!.replace(/-/g, '+').replace(/_/g, '/'))).exp;
    return typeof exp === 'number' ? exp : null;
  } catch {
    return null;
  }
}

const browserNetwork: NetworkMonitor = {
  onLine: () => typeof navigator === 'undefined' || navigator.onLine !== false,
  onOnline(fn) {
    const g = globalThis as { addEventListener?: (t: string, f: () => void) => void; removeEventListener?: (t: string, f: () => void) => void };
    if (typeof g.addEventListener !== 'function') return () => {};
    g.addEventListener('online', fn);
    return () => g.removeEventListener?.('online', fn);
  },
};

class Emitter<E> {
  protected listeners = new Map<string, Set<Listener>>();
  protected logger?: ClientOptions['logger'];

  /** Add a listener; returns a function that removes it. */
  on<K extends keyof E & string>(type: K, fn: E[K]): () => void;
  on(type: `message:${string}`, fn: (msg: DataMessage) => void): () => void;
  on(type: string, fn: unknown): () => void {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(fn as Listener);
    return () => { set!.delete(fn as Listener); };
  }

  protected emit(type: string, ...args: unknown[]): void {
    for (const fn of [...(this.listeners.get(type) || [])]) {
      try {
        (fn as (...a: unknown[]) => void)(...args);
      } catch (err) {
        this.logger?.error(`fanout: ${type} listener failed`, err);
      }
    }
  }
}

export interface SubscriptionEvents {
  message: (msg: DataMessage) => void;
  snapshot: (info: SnapshotInfo) => void;
  reset: (info: ResetInfo) => void;
  error: (err: ErrorInfo) => void;
}

/**
 * One `subscribe()` call: its channels stay subscribed on the node while any
 * subscription holds them. Messages come in order, once, to `on('message')`
 * and to `for await (const msg of sub)`.
 */
export class Subscription extends Emitter<SubscriptionEvents> implements AsyncIterable<DataMessage> {
  /** Resolves (never rejects) when the node answered for every channel. */
  readonly ready: Promise<SubscribeResult>;
  closed = false;
  /** Messages the async iterator dropped because nobody read them (over `maxQueue`). */
  dropped = 0;
  private queue: DataMessage[] = [];
  private waiting: Array<(r: IteratorResult<DataMessage>) => void> = [];
  private closing = deferred<SubscribeResult>();

  constructor(
    private client: FanoutClient,
    readonly channels: string[],
    readonly snapshot: boolean,
    results: Array<Promise<ChannelResult>>,
    private maxQueue: number,
  ) {
    super();
    const all = Promise.all(results).then((res) => {
      const errors = res.filter((e): e is ErrorInfo => e !== null);
      return { channels: channels.filter((_, i) => res[i] === null), errors };
    });
    this.ready = Promise.race([all, this.closing.promise]);
  }

  matches(subject: string): boolean {
    return this.channels.some((p) => subjectMatches(p, subject));
  }

  /** Stop: the channels are unsubscribed on the node when no other subscription holds them. */
  unsubscribe(): void {
    if (this.closed) return;
    this.client._release(this);
    this._end();
  }

  /** @internal */
  _end(): void {
    this.closed = true;
    this.closing.resolve({ channels: [], errors: this.channels.map((c) => ({ code: 'closed', message: 'subscription closed', channel: c })) });
    for (const w of this.waiting.splice(0)) w({ value: undefined, done: true });
  }

  /** @internal */
  _push(msg: DataMessage): void {
    if (this.closed) return;
    this.emit('message', msg);
    const w = this.waiting.shift();
    if (w) return w({ value: msg, done: false });
    if (this.iterating) {
      this.queue.push(msg);
      if (this.queue.length > this.maxQueue) {
        this.queue.shift();
        this.dropped += 1;
      }
    }
  }

  /** @internal */
  _emit(type: keyof SubscriptionEvents, arg: unknown): void {
    this.emit(type, arg);
  }

  private iterating = false;

  [Symbol.asyncIterator](): AsyncIterator<DataMessage> {
    this.iterating = true;
    return {
      next: () => {
        const msg = this.queue.shift();
        if (msg) return Promise.resolve({ value: msg, done: false });
        if (this.closed) return Promise.resolve({ value: undefined, done: true });
        return new Promise((r) => this.waiting.push(r));
      },
      return: () => {
        this.unsubscribe();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}

/**
 * The client. `connect(url, options)` makes one and starts it. Subscriptions
 * made before the connection is up are sent once it is; they are kept across
 * reconnects (resumed from the last `stream_seq`, deduplicated).
 */
export class FanoutClient extends Emitter<ClientEvents> {
  readonly options: typeof DEFAULTS & ClientOptions;
  readonly tracker = new Tracker();
  state: ConnectionState = 'disconnected';
  /** The last `throttle_update`, or null. */
  throttle: ThrottleInfo | null = null;
  /** [{first, last}] seqs the node could not replay. */
  missing: Array<{ first: number; last: number }> = [];
  /** Completed reconnects. */
  reconnects = 0;
  /** The newest message per subject (snapshots for later subscribers; bounded by `maxLatest`). */
  readonly latest = new Map<string, DataMessage>();
  /** Delta messages applied, and those that could not be (each fetched again: never shown). */
  deltas = 0;
  deltaFailures = 0;

  private url = '';
  private token: string | null;
  private ws: WebSocketLike | null = null;
  private stopped = true;
  private authWait = false;      // closed with 4001: wait for a new token
  private needToken: boolean;
  private refs = new Map<string, number>();
  private confirmed = new Set<string>();
  private unpositioned = new Map<string, number>();
  private waiters = new Map<string, Deferred<ChannelResult>>();
  private snapWant = new Map<string, Set<Subscription>>();
  private subs = new Set<Subscription>();
  private pending = new Map<number, Request>();
  private ids = 0;
  private attempt = 0;
  private connects = 0;
  private hintAt = 0;
  private timers: Record<'reconnect' | 'heartbeat' | 'deadline' | 'hint' | 'refresh', ReturnType<typeof setTimeout> | undefined> =
    { reconnect: undefined, heartbeat: undefined, deadline: undefined, hint: undefined, refresh: undefined };
  private offOnline: (() => void) | null = null;
  /** Delta state of this connection: the last payload per subject (a full frame's text, or bytes), the frames' text. */
  private bases = new Map<string, string | Uint8Array>();
  private raws = new WeakMap<DataMessage, string>();
  private dOn = false;
  /** The last delta that could not be applied (its seq): its replay was asked for. */
  private stuck = 0;

  constructor(options: ClientOptions = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    this.logger = options.logger;
    this.token = options.token ?? null;
    this.needToken = !this.token && !!options.getToken;
    this.tracker.decode = (m) => this.decode(m);
  }

  get channels(): string[] { return [...this.refs.keys()]; }
  get lastStreamSeq(): number { return this.tracker.position; }
  get epoch(): string | null { return this.tracker.epoch; }
  get connected(): boolean { return this.state === 'connected'; }

  /** Start (or restart after disconnect()) connecting to `url`; reconnects until disconnect(). */
  connect(url?: string): this {
    if (url) this.url = url;
    if (!this.url) throw new Error('fanout: connect() needs a url');
    share(this.options);
    if (typeof (this.options.WebSocket || globalThis.WebSocket) !== 'function') {
      throw new Error('fanout: no WebSocket here: pass options.WebSocket (e.g. the ws package on Node.js < 22)');
    }
    if (this.stopped) {
      this.stopped = false;
      this.authWait = false;
      this.open();
    }
    return this;
  }

  /** Close for good: every subscription ends (pending `ready`s resolve with `closed` errors, iterators finish). connect() starts afresh. */
  disconnect(): void {
    this.stopped = true;
    const ws = this.ws;
    this.teardown();
    clearTimeout(this.timers.reconnect);
    this.offOnline?.();
    this.offOnline = null;
    if (ws) {
      try { ws.close(1000, 'client disconnect'); } catch { /* already closed */ }
    }
    this.failPending(new Error('fanout: client disconnected'));
    for (const [ch, w] of this.waiters) w.resolve({ code: 'closed', message: 'client disconnected', channel: ch });
    for (const s of this.subs) s._end();
    for (const m of [this.waiters, this.subs, this.refs, this.confirmed, this.unpositioned, this.snapWant, this.latest]) m.clear();
    this.setState('disconnected');
  }

  /** Give the client a new token: used at the next connect, ends a 4001 wait, and is sent as `refresh` when connected. */
  setToken(token: string): void {
    this.token = token;
    this.needToken = false;
    if (this.authWait && !this.stopped) {
      this.authWait = false;
      this.open();
    } else if (this.connected) {
      this.refresh(token).catch(() => { /* reported as an error event */ });
    }
  }

  /** Send `refresh` with `token` (default: a new one from getToken); resolves with the new `exp`. */
  async refresh(token?: string): Promise<number> {
    const t = token ?? (await this.options.getToken?.());
    if (!t) throw new Error('fanout: refresh needs a token or getToken');
    const ws = this.ws;
    if (!ws || !this.connected) throw new Error('fanout: not connected');
    const reply = await this.request(ws, { type: 'refresh', token: t }, 'refreshed');
    this.token = t;
    const exp = Number(reply.exp);
    this.scheduleRefresh(exp);
    this.emit('refreshed', { exp });
    return exp;
  }

  /**
   * Subscribe to channels (NATS patterns). A channel another subscription
   * already holds is not subscribed again on the node. With `snapshot`, the
   * node first sends the newest message of every matching subject (as
   * messages with `snapshot: true`); for channels already held, the client
   * serves them from its own cache.
   */
  subscribe(channels: string | string[], opts: { snapshot?: boolean } = {}): Subscription {
    const chans = [...new Set(typeof channels === 'string' ? [channels] : channels)];
    const fresh = chans.filter((c) => !this.refs.has(c));
    for (const c of chans) this.refs.set(c, (this.refs.get(c) || 0) + 1);
    const results = chans.map((c) => {
      if (this.confirmed.has(c)) return Promise.resolve(null);
      let w = this.waiters.get(c);
      if (!w) this.waiters.set(c, (w = deferred()));
      return w.promise;
    });
    const sub = new Subscription(this, chans, !!opts.snapshot, results, this.options.maxQueue);
    this.subs.add(sub);
    if (opts.snapshot) {
      for (const c of fresh) {
        let set = this.snapWant.get(c);
        if (!set) this.snapWant.set(c, (set = new Set()));
        set.add(sub);
      }
      const held = chans.filter((c) => !fresh.includes(c));
      if (held.length) {
        // Already subscribed: the cache holds every subject's newest message since then.
        void Promise.all(held.map((c) => results[chans.indexOf(c)])).then(() => {
          const msgs = [...this.latest.values()].filter((m) => held.some((p) => subjectMatches(p, m.channel)));
          this.deliverSnapshot(new Set([sub]), held, msgs, null);
        });
      }
    }
    if (fresh.length && this.connected && this.ws) this.sendSubscribe(this.ws, fresh);
    return sub;
  }

  /** @internal (mux.ts) Go on with another client's stream: hold `channels` from `position` of `epoch`; the connection resumes them. */
  _adopt(epoch: string, position: number, channels: string[]): Subscription {
    this.tracker.setEpoch(epoch);
    this.tracker.position = position;
    for (const c of channels) this.confirmed.add(c);
    return this.subscribe(channels);
  }

  /** @internal Called by Subscription.unsubscribe(). */
  _release(sub: Subscription): void {
    this.subs.delete(sub);
    const gone: string[] = [];
    for (const c of sub.channels) {
      const n = (this.refs.get(c) || 0) - 1;
      this.snapWant.get(c)?.delete(sub);
      if (n > 0) {
        this.refs.set(c, n);
        continue;
      }
      this.refs.delete(c);
      this.snapWant.delete(c);
      this.unpositioned.delete(c);
      if (this.confirmed.delete(c)) gone.push(c);
      const w = this.waiters.get(c);
      if (w) {
        this.waiters.delete(c);
        w.resolve({ code: 'closed', message: 'unsubscribed', channel: c });
      }
    }
    for (const subject of this.latest.keys()) {
      if (!this.wants(subject)) this.latest.delete(subject);
    }
    if (gone.length && this.connected && this.ws) {
      this.request(this.ws, { type: 'unsubscribe', channels: gone }, 'unsubscribed').catch(() => { /* the next connection does not resume them */ });
    }
  }

  /** Round-trip a `heartbeat`; resolves with the node's clock (ms). Rejects when not connected. */
  async heartbeat(): Promise<number> {
    if (!this.ws || !this.connected) throw new Error('fanout: not connected');
    return Number((await this.request(this.ws, { type: 'heartbeat' }, 'heartbeat_ack')).ts);
  }

  /** Ask for copies of this connection's messages from..to (already delivered; not delivered again). */
  async replay(from: number, to: number): Promise<{ messages: DataMessage[]; missing: [number, number] | null }> {
    if (!this.ws || !this.connected) throw new Error('fanout: not connected');
    const msgs: DataMessage[] = [];
    const r = await this.request(this.ws, { type: 'replay', from_seq: from, to_seq: to }, 'replay_done', { span: [from, to], messages: msgs });
    return { messages: msgs, missing: (r.missing as [number, number] | null) ?? null };
  }

  // ------------------------------------------------------------ connection
  private setState(s: ConnectionState): void {
    if (s === this.state) return;
    this.state = s;
    this.emit('state', s);
  }

  private log(level: 'info' | 'warn' | 'error', ...args: unknown[]): void {
    this.logger?.[level](...args);
  }

  private async open(): Promise<void> {
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = undefined;
    this.setState('connecting');
    const getToken = this.options.getToken;
    if (getToken && this.needToken) {
      try {
        this.token = await getToken();
        this.needToken = false;
      } catch (err) {
        this.emit('error', { code: 'client', message: `getToken failed: ${err}` });
        return this.retry(1006);
      }
    }
    if (this.stopped || this.ws) return;
    const url = this.token ? `${this.url}${this.url.includes('?') ? '&' : '?'}auth=${encodeURIComponent(this.token)}` : this.url;
    let ws: WebSocketLike;
    try {
      ws = new (this.options.WebSocket || (globalThis.WebSocket as unknown as WebSocketCtor))(url);
    } catch (err) {
      this.emit('error', { code: 'client', message: `cannot open WebSocket: ${err}` });
      return this.retry(1006);
    }
    this.ws = ws;
    let opened = false;
    this.tracker.newConnection();
    this.bases.clear();
    this.stuck = 0;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      opened = true;
      this.onOpen(ws);
    };
    ws.onmessage = (ev) => { if (ws === this.ws) this.onRaw(ws, ev.data); };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      if (!opened && getToken) this.needToken = true;   // maybe a refused (401) token
      this.onClose(ev.code, ev.reason);
    };
    ws.onerror = () => { /* a close event follows */ };
  }

  private onOpen(ws: WebSocketLike): void {
    const reconnecting = this.connects++ > 0;
    this.heartbeatLoop(ws);
    this.restore(ws).then(() => {
      if (ws !== this.ws) return;
      // Subscribed while the restore ran: not in its list and not sent yet.
      const sent = new Set([...this.pending.values()].flatMap((r) => r.channels || []));
      const late = this.channels.filter((c) => !this.confirmed.has(c) && !sent.has(c));
      if (late.length) void this.sendSubscribe(ws, late);
      this.attempt = 0;
      if (reconnecting) this.reconnects += 1;
      this.setState('connected');
      this.emit('connected');
      this.scheduleRefresh(tokenExp(this.token));
    }, (err) => {
      if (ws !== this.ws) return;
      this.log('warn', 'fanout: resume failed, reconnecting', err);
      this.drop(ws, 'resume failed');
    });
  }

  /**
   * After (re)connecting: resume the channels that have a position, alone and
   * first (so its catch-up is not interleaved with other traffic), then
   * subscribe quiet ones and new ones (with their snapshot).
   */
  private async restore(ws: WebSocketLike): Promise<void> {
    const wanted = [...this.refs.keys()];
    const held = wanted.filter((c) => this.confirmed.has(c));
    const fresh = wanted.filter((c) => !this.confirmed.has(c));
    let quiet = held.filter((c) => this.unpositioned.has(c));
    const positioned = held.filter((c) => !this.unpositioned.has(c));
    const tr = this.tracker;
    if (positioned.length && tr.epoch !== null) {
      await this.request(ws, { type: 'resume', channels: positioned, after: tr.position, epoch: tr.epoch }, 'resumed');
    } else {
      quiet = held;
    }
    if (quiet.length) {
      const r = await this.request(ws, { type: 'subscribe', channels: quiet }, 'subscribed');
      this.onResumed({ type: 'resumed', channels: r.channels as string[], epoch: tr.epoch, complete: false, reason: 'no_position' });
    }
    if (fresh.length) await this.sendSubscribe(ws, fresh);
  }

  private sendSubscribe(ws: WebSocketLike, channels: string[]): Promise<unknown> {
    const snap = new Set<Subscription>();
    for (const c of channels) for (const s of this.snapWant.get(c) || []) snap.add(s);
    const frame: Frame = { type: 'subscribe', channels };
    if (snap.size) frame.snapshot = true;
    return this.request(ws, frame, 'subscribed', { snap, channels }).catch((err) => {
      this.log('info', 'fanout: subscribe not answered', err);     // re-sent on the next connection
    });
  }

  private onClose(code: number, reason: string): void {
    this.teardown();
    this.failPending(new Error(`fanout: connection closed (${code})`));
    this.retry(code, reason);
  }

  /** Schedule the next attempt: the drain hint's time, full-jitter backoff, a 4001 token wait, or the `online` event. */
  private retry(code: number, reason = ''): void {
    this.setState(this.stopped ? 'disconnected' : 'connecting');
    let delay: number | null = null;
    if (!this.stopped && code === 4001) {
      this.setState('disconnected');
      this.authWait = true;
      this.emit('error', { code: 'token_expired', message: 'closed with 4001: waiting for a new token' });
      const old = this.token;
      const g = this.options.getToken;
      if (g) {
        Promise.resolve().then(g).then((t) => { if (t && t !== old) this.setToken(t); }, (err) => {
          this.emit('error', { code: 'client', message: `getToken failed: ${err}` });
        });
      }
    } else if (!this.stopped) {
      const network = this.options.network || browserNetwork;
      if (!network.onLine()) {
        this.offOnline?.();
        this.offOnline = network.onOnline(() => {
          this.offOnline?.();
          this.offOnline = null;
          if (!this.stopped && !this.ws) this.open();
        });
      } else {
        delay = this.hintAt ? Math.max(0, this.hintAt - Date.now()) : backoff(this.attempt++, this.options.minReconnectDelay, this.options.maxReconnectDelay);
        this.hintAt = 0;
        this.timers.reconnect = setTimeout(() => this.open(), delay);
      }
    }
    this.emit('disconnected', { code, reason, reconnecting: !this.stopped && !this.authWait, delay });
  }

  /** Abandon a connection now (dead or unusable) and reconnect. */
  private drop(ws: WebSocketLike, why: string): void {
    if (ws !== this.ws) return;
    try { ws.close(4000, why); } catch { /* already closing */ }
    this.onClose(4000, why);
  }

  private teardown(): void {
    const ws = this.ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = null;
    this.ws = null;
    for (const k of ['heartbeat', 'deadline', 'hint', 'refresh'] as const) clearTimeout(this.timers[k]);
  }

  private failPending(err: Error): void {
    for (const r of this.pending.values()) {
      clearTimeout(r.timer);
      r.reject(err);
    }
    this.pending.clear();
  }

  private heartbeatLoop(ws: WebSocketLike): void {
    this.timers.heartbeat = setTimeout(() => {
      if (ws !== this.ws) return;
      this.timers.deadline = setTimeout(() => {
        this.log('warn', 'fanout: no frame after a heartbeat: reconnecting');
        this.drop(ws, 'heartbeat timeout');
      }, this.options.heartbeatTimeout);
      this.request(ws, { type: 'heartbeat' }, 'heartbeat_ack').catch(() => { /* the deadline decides */ });
      this.heartbeatLoop(ws);
    }, this.options.heartbeatInterval);
  }

  private scheduleRefresh(exp: number | null): void {
    clearTimeout(this.timers.refresh);
    if (exp === null || !this.options.getToken) return;
    const wait = Math.max(1000, exp * 1000 - Date.now() - this.options.refreshBefore);
    this.timers.refresh = setTimeout(() => {
      this.refresh().catch((err) => {
        this.emit('error', { code: 'refresh_failed', message: String(err?.message ?? err) });
        if (exp * 1000 - Date.now() > 4000) this.scheduleRefresh(exp - (exp * 1000 - Date.now()) / 2000);
      });
    }, wait);
  }

  private request(ws: WebSocketLike, obj: Frame, reply: string, extra: Partial<Request> = {}): Promise<Frame> {
    const sub = obj.type === 'subscribe' || obj.type === 'resume';
    return new Promise((resolve, reject) => {
      const id = ++this.ids;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`fanout: no ${reply} within ${this.options.requestTimeout} ms`));
        if (sub) this.drop(ws, `${obj.type} timeout`);
      }, this.options.requestTimeout);
      this.pending.set(id, { reply, resolve, reject, timer, errors: [], messages: [], ...extra });
      try {
        ws.send(JSON.stringify({ ...obj, id, ...(sub && this.options.delta ? { delta: 'fossil' } : {}) }));
      } catch (err) {
        this.pending.delete(id);
        clearTimeout(timer);
        reject(err instanceof Error ? err : new Error(String(err)));
      }
    });
  }

  // ----------------------------------------------------------------- input
  private onRaw(ws: WebSocketLike, raw: unknown): void {
    clearTimeout(this.timers.deadline);
    let msg: Frame;
    const text = String(raw);
    try {
      msg = JSON.parse(text);
    } catch {
      return this.log('warn', 'fanout: frame is not JSON');
    }
    if (!msg || typeof msg !== 'object') return;
    const type = msg.type;
    const req = typeof msg.id === 'number' ? this.pending.get(msg.id) : undefined;
    switch (type) {
      case 'message':
        if (this.dOn && msg.data !== undefined) this.raws.set(msg as unknown as DataMessage, text);
        return this.onData(ws, msg as unknown as DataMessage);
      case 'unsubscribed':
        this.bases.clear();     // the node's bases too: the next message of every subject is full
        break;
      case 'error': {
        const err = msg as unknown as ErrorInfo;
        if (req && err.channel !== undefined) {
          req.errors.push(err);     // one refused channel; the reply follows
          this.refuse(err);
        } else if (req) {
          this.settle(msg.id!, req, null, Object.assign(new Error(`fanout: ${err.code}: ${err.message}`), { frame: msg }));
        }
        return this.emit('error', err);
      }
      case 'subscribed':
      case 'resumed': {
        if (msg.delta) this.dOn = true;
        const changed = this.onSubscribed(msg, req);
        if (type === 'resumed') {
          const info = msg as unknown as ResumeInfo;
          if (info.complete === false) info.reason = changed ? 'epoch_changed' : 'retention';
          this.onResumed(info);
        }
        if (req?.snap) this.finishSnapshot(msg, req);
        break;
      }
      case 'replay_done':
        this.onReplayDone(ws, msg, req);
        break;
      case 'throttle_update':
        this.throttle = msg as unknown as ThrottleInfo;
        return this.emit('throttle_update', msg);
      case 'reconnect': {
        const after = Math.max(0, Number(msg.after_ms) || 0);
        this.hintAt = Date.now() + after;
        this.emit('reconnect', msg);
        clearTimeout(this.timers.hint);
        // Normally the node's close 1001 comes first; if it does not, go at the hinted time.
        this.timers.hint = setTimeout(() => this.drop(ws, 'drain'), after + this.options.heartbeatTimeout);
        return;
      }
    }
    if (req && type === req.reply) this.settle(msg.id!, req, msg, null);
  }

  private settle(id: number, req: Request, frame: Frame | null, err: Error | null): void {
    this.pending.delete(id);
    clearTimeout(req.timer);
    if (err) req.reject(err);
    else req.resolve(frame!);
  }

  private refuse(err: ErrorInfo): void {
    const ch = err.channel!;
    this.refs.delete(ch);
    this.confirmed.delete(ch);
    this.snapWant.delete(ch);
    const w = this.waiters.get(ch);
    this.waiters.delete(ch);
    w?.resolve(err);
    for (const s of this.subs) if (s.channels.includes(ch)) s._emit('error', err);
  }

  private onResumed(info: ResumeInfo): void {
    this.emit('resumed', info);
    if (info.complete !== false) return;
    const reset: ResetInfo = { channels: info.channels, reason: info.reason || 'retention' };
    for (const subject of [...this.latest.keys()]) {
      if (info.channels.some((p) => subjectMatches(p, subject))) this.latest.delete(subject);
    }
    this.emit('reset', reset);
    for (const s of this.subs) if (s.channels.some((c) => info.channels.includes(c))) s._emit('reset', reset);
  }

  /** Adopt epoch, position and channels before the next frame is handled; true when the epoch changed. */
  private onSubscribed(msg: Frame, req: Request | undefined): boolean {
    let changed = false;
    if (typeof msg.epoch === 'string' && msg.epoch) {
      changed = this.tracker.setEpoch(msg.epoch);
      if (changed) this.log('warn', `fanout: stream epoch changed to ${msg.epoch}: positions reset`);
    }
    const pos = msg.stream_seq;
    const positioned = Number.isInteger(pos) && (pos as number) >= 0;
    if (positioned) this.tracker.position = Math.max(this.tracker.position, pos as number);
    if (!req) return changed;
    const stale: string[] = [];
    for (const ch of (msg.channels as string[]) || []) {
      if (!this.refs.has(ch)) {
        stale.push(ch);     // unsubscribed while the request was on its way
        continue;
      }
      this.confirmed.add(ch);
      const w = this.waiters.get(ch);
      this.waiters.delete(ch);
      w?.resolve(null);
      if (msg.type === 'subscribed' && !positioned) {
        if (!this.unpositioned.has(ch)) this.unpositioned.set(ch, this.tracker.seenHi);
      } else {
        this.unpositioned.delete(ch);
      }
    }
    if (stale.length && this.ws) {
      this.request(this.ws, { type: 'unsubscribe', channels: stale }, 'unsubscribed').catch(() => {});
    }
    return changed;
  }

  /** Is this message a snapshot of a pending `subscribe {snapshot}`? Then: which subscriptions asked for it. */
  private snapshotFor(msg: DataMessage): Set<Subscription> | null {
    for (const req of this.pending.values()) {
      if (!req.snap?.size || !req.channels!.some((p) => subjectMatches(p, msg.channel))) continue;
      // A live message on a pattern held before is newer than everything delivered.
      const live = [...this.confirmed].some((p) => subjectMatches(p, msg.channel)) && msg.stream_seq > this.tracker.position;
      if (!live) return req.snap;
    }
    return null;
  }

  private snapTargets = new WeakMap<DataMessage, Set<Subscription>>();

  private onData(ws: WebSocketLike, msg: DataMessage): void {
    const tr = this.tracker;
    if (Number.isInteger(msg.seq) && msg.seq < tr.expected) {
      for (const r of this.pending.values()) {     // a copy asked for with replay()
        if (r.span && !r.auto && r.span[0] <= msg.seq && msg.seq <= r.span[1]) r.messages.push(msg);
      }
    }
    const snap = this.snapshotFor(msg);
    if (snap) {
      msg.snapshot = true;
      this.snapTargets.set(msg, snap);
    }
    const { deliver, gap } = tr.onMessage(msg);
    if (gap) {
      this.log('info', `fanout: seq gap ${gap[0]}..${gap[1]}: replaying`);
      this.ask(ws, gap);
    }
    this.deliver(deliver, []);
    if (tr.held.size > this.options.maxHeld) {
      this.log('warn', `fanout: ${tr.held.size} messages held behind a gap: reconnecting to resume`);
      this.drop(ws, 'gap not filled');
    }
  }

  /** An automatic `replay` (a seq gap, a delta to fetch again), answered by `replay_done`. */
  private ask(ws: WebSocketLike, span: [number, number]): void {
    const id = ++this.ids;
    const timer = setTimeout(() => this.pending.delete(id), this.options.requestTimeout);
    this.pending.set(id, { reply: 'replay_done', auto: true, span, errors: [], messages: [], timer, resolve() {}, reject() {} });
    try { ws.send(JSON.stringify({ type: 'replay', from_seq: span[0], to_seq: span[1], id })); } catch { /* close follows */ }
  }

  /**
   * In seq order (PROTOCOL.md 1.2): a full message's payload becomes its
   * subject's base; a delta is applied to the base and checked (checksum, then
   * JSON), or the message is not delivered: false, and the drain waits for its copy.
   */
  private decode(m: DataMessage & { delta?: string }): boolean {
    const { channel, delta } = m;
    const b = this.bases;
    let base = b.get(channel);
    let keep: string | Uint8Array | undefined = this.raws.get(m);
    b.delete(channel);
    if (delta !== undefined) {
      try {
        if (typeof base === 'string') base = enc.encode(base.slice(base.indexOf(',"data":') + 8, -1));
        keep = applyDelta(base!, enc.encode(delta));
        m.data = JSON.parse(dec.decode(keep));
        delete m.delta;
        this.deltas++;
      } catch (err) {
        this.deltaFailures++;
        this.log('warn', `fanout: delta ${m.seq} not applied: ${err}`);
        // PROTOCOL.md 1.2: fetch it again (a replay is full); what follows waits. The same one failing twice: resume anew.
        const s = m.seq;
        if (s === this.stuck) this.drop(this.ws!, 'delta not applied');
        else this.ask(this.ws!, [(this.stuck = s), s]);
        return false;
      }
    }
    if (keep) {
      b.set(channel, keep);
      if (b.size > MAX_BASES) b.delete(b.keys().next().value!);
    }
    return true;
  }

  private onReplayDone(ws: WebSocketLike, msg: Frame, req: Request | undefined): void {
    const a = msg.from_seq;
    const b = msg.to_seq;
    if (!Number.isInteger(a) || !Number.isInteger(b)) return;
    if (req?.auto) this.settle(msg.id!, req, msg, null);
    const tr = this.tracker;
    const s = this.stuck;
    if (s === tr.expected && (a as number) <= s && s <= (b as number)) {
      // The node cannot replay the delta that failed: resume on a new connection from the last stream_seq delivered.
      return this.drop(ws, 'delta not replayed');
    }
    const { deliver, lost } = this.tracker.onReplayDone(a as number, b as number);
    for (const [first, last] of lost) {
      this.log('warn', `fanout: seqs ${first}..${last} could not be replayed`);
      this.missing.push({ first, last });
    }
    this.deliver(deliver, lost);
  }

  private wants(subject: string): boolean {
    for (const p of this.refs.keys()) if (subjectMatches(p, subject)) return true;
    return false;
  }

  private remember(msg: DataMessage): boolean {
    const old = this.latest.get(msg.channel);
    if (old && old.stream_seq >= msg.stream_seq && old !== msg) return false;
    this.latest.delete(msg.channel);    // re-insert: Map order = least recently updated first
    this.latest.set(msg.channel, msg);
    if (this.latest.size > this.options.maxLatest) this.latest.delete(this.latest.keys().next().value!);
    return true;
  }

  private deliver(msgs: DataMessage[], lost: Array<[number, number]>): void {
    const left = [...lost];
    for (const m of msgs) {
      while (left.length && left[0]![1] < m.seq) {
        const [first, last] = left.shift()!;
        this.emit('missing', { first, last });
      }
      if (this.unpositioned.size) {
        for (const [ch, mark] of [...this.unpositioned]) if (mark < m.seq) this.unpositioned.delete(ch);
      }
      const newer = this.remember(m);
      const targets = m.snapshot ? this.snapTargets.get(m) : undefined;
      if (targets) {
        for (const s of targets) if (s.matches(m.channel)) s._push(m);
        if (!newer) continue;       // the others already had it
      }
      this.emit('message', m);
      for (const [type, set] of this.listeners) {
        if (set.size && type.startsWith('message:') && subjectMatches(type.slice(8), m.channel)) this.emit(type, m);
      }
      for (const s of this.subs) if (!targets?.has(s) && s.matches(m.channel)) s._push(m);
    }
    for (const [first, last] of left) this.emit('missing', { first, last });
  }

  private finishSnapshot(reply: Frame, req: Request): void {
    const chans = req.channels || [];
    for (const c of chans) this.snapWant.delete(c);
    const count = typeof reply.snapshot === 'number' ? reply.snapshot : null;
    const msgs = [...this.latest.values()].filter((m) => chans.some((p) => subjectMatches(p, m.channel)));
    // A node before 1.1 ignores `snapshot`: the subscribers get whatever comes first, live.
    this.deliverSnapshot(req.snap!, chans, count === null ? [] : msgs, count);
  }

  private deliverSnapshot(subs: Set<Subscription>, channels: string[], msgs: DataMessage[], count: number | null): void {
    const info: SnapshotInfo = { channels, count: count ?? (msgs.length || null), messages: msgs };
    if (count !== null || msgs.length) this.emit('snapshot', info);
    for (const s of subs) {
      if (count === null) for (const m of msgs) s._push({ ...m, snapshot: true });
      s._emit('snapshot', info);
    }
  }
}

/** Make a client and start connecting: `connect(url, {token})` or `connect(url, {getToken})`. */
export function connect(url: string, options: ClientOptions = {}): FanoutClient {
  return new FanoutClient(options).connect(url);
}
