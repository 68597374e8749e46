/**
 * One connection per browser (README "One connection per browser"): the
 * stub in the core bundle. A sharing client's WebSocket class makes Tunnels;
 * the code behind them (tab.ts, and the owner, mux.ts) comes with import()
 * from fanout-worker.js, the same file the SharedWorker runs. Where that file
 * cannot be loaded, a Tunnel is a plain WebSocket. Off where the browser has
 * no Web Locks, or neither SharedWorker nor BroadcastChannel, and outside
 * browsers.
 */
import type { ClientOptions, WebSocketLike } from './client.js';

const g = globalThis as Record<string, any>;
const TAB = Math.random().toString(36).slice(2);
let clients = 0;
const loaded = new Map<string, Promise<TabSide>>();

interface TabSide {
  tunnel(s: Tunnel, url: string, peer: Peer): void;
  token(peer: Peer, fetch: () => string | Promise<string>): Promise<string>;
}

/** One client at the owner: its id, its owner link, the last stream position it surely got, its token. */
export interface Peer {
  id: string;
  worker: string;
  opts: Record<string, unknown>;
  seen: number;
  link: unknown;
  have?: string;
}

/** A client's WebSocket: a tunnel to the owner (tab.ts drives it through `t`), or a plain WebSocket. */
export class Tunnel implements WebSocketLike {
  readyState = 0;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  t: { send(d: string): void; close(code?: number, reason?: string): void } | null = null;

  constructor(url: string, peer: Peer, side: Promise<TabSide>) {
    side.then((m) => m.tunnel(this, url, peer), () => this.direct(url));
  }

  /** No owner: a WebSocket of this client's own. */
  direct(url: string): void {
    if (this.readyState > 1) return;
    const ws = (this.t = new WebSocket(url));
    ws.onopen = (e) => { this.readyState = 1; this.onopen?.(e); };
    ws.onmessage = (e) => this.onmessage?.(e);
    ws.onclose = (e) => { this.readyState = 3; this.onclose?.(e); };
    ws.onerror = (e) => this.onerror?.(e);
  }

  send(data: string): void {
    if (!this.t) throw new Error('fanout: socket not open');
    this.t.send(data);
  }

  close(code = 1000, reason = ''): void {
    if (this.t) this.t.close(code, reason);
    else this.readyState = 3;
  }
}

const HUB_OPTIONS = ['minReconnectDelay', 'maxReconnectDelay', 'heartbeatInterval', 'heartbeatTimeout',
  'requestTimeout', 'maxHeld', 'maxLatest', 'delta'] as const;

/**
 * Called by FanoutClient.connect(): make `o` share this browser's connection
 * (its `WebSocket` makes Tunnels; its `getToken` asks the owner first, so that
 * one tab fetches a token for all). A no-op where sharing is off or impossible.
 */
export function share(o: ClientOptions): void {
  if (o.shared === false || o.WebSocket || typeof document === 'undefined' || !g.navigator?.locks
    || !(g.SharedWorker || g.BroadcastChannel)) return;
  const worker = typeof o.shared === 'string' || o.shared instanceof URL
    ? new URL(o.shared, location.href).href
    : new URL('./fanout-worker.js', import.meta.url).href;
  const peer: Peer = { id: `${TAB}.${++clients}`, worker, opts: {}, seen: 0, link: null, have: o.token };
  for (const k of HUB_OPTIONS) if (o[k] !== undefined) peer.opts[k] = o[k];
  const side = () => {
    let s = loaded.get(worker);
    if (!s) loaded.set(worker, (s = import(/* webpackIgnore: true */ /* @vite-ignore */ worker)));
    return s;
  };
  const fetch = o.getToken;
  if (fetch) o.getToken = () => side().then((m) => m.token(peer, fetch), () => fetch());
  o.WebSocket = class extends Tunnel {
    constructor(url: string) { super(url, peer, side()); }
  };
}
