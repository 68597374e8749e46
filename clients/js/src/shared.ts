/**
 * One connection per browser, the tab's side (README "One connection per
 * browser"). A sharing client gets a WebSocket class whose sockets are
 * tunnels ("virtual sockets") to the owner of the one real connection: a
 * SharedWorker running fanout-worker.js, else the tab elected with the Web
 * Locks API, reached over a BroadcastChannel (it loads the owner code, mux.ts,
 * from the same file). The client itself is unchanged: it speaks the protocol
 * over the tunnel, and the owner answers as a node would (mux.ts).
 *
 * Every tab holds the Web Lock `<key>:tab:<id>` while it lives; the owner
 * waits on it to learn when a tab is gone, closed or crashed. The key is the
 * URL without `auth` plus the token's `sub`: tabs of another user never share.
 * Without Web Locks, or without both SharedWorker and BroadcastChannel, or when
 * neither owner can start (the worker file is missing), each tab connects alone.
 */
import type { ClientOptions, WebSocketLike } from './client.js';

type Msg = Record<string, any>;     // eslint-disable-line @typescript-eslint/no-explicit-any
const g = globalThis as Msg;
const TAB = Math.random().toString(36).slice(2);
let peers = 0;
let vcs = 0;
const links = new Map<string, Promise<Link | null>>();

/** What a client's sockets share: its id at the owner, the last stream position it surely got. */
interface Peer {
  id: string;
  seen: number;
  link: Link | null;
}

/** This tab's way to one owner (one per key). */
class Link {
  post: (m: Msg) => void = () => {};
  vcs = new Map<number, VirtualSocket>();
  asks = new Map<number, (m: Msg) => void>();
  asked = 0;
  /** What this tab saw of the owner, so that it can go on as the next leader: epoch, position, channels. */
  ep = '';
  seen = 0;
  ch: string[] = [];

  in(m: Msg): void {
    if (m.tab) return;                   // a tab to the owner (BroadcastChannel)
    if (m.o === 'lead') {
      for (const v of [...this.vcs.values()]) v.lead();
      return;
    }
    if (m.o === 'ch') {
      this.ch = m.ch;
      return;
    }
    if (m.ss !== undefined) {
      // Frames come in order: a frame to anyone means that every earlier frame to an open socket of this tab arrived.
      for (const v of this.vcs.values()) {
        if (v.readyState === 1) {
          v.peer.seen = Math.max(v.peer.seen, m.ss);
          this.seen = Math.max(this.seen, m.ss);
          if (m.ep) this.ep = m.ep;
        }
      }
    }
    if (typeof m.to === 'string' && !m.to.startsWith(`${TAB}.`)) return;
    if (m.o === 'tok') {
      this.asks.get(m.id)?.(m);
      this.asks.delete(m.id);
    } else {
      this.vcs.get(m.vc)?.in(m);
    }
  }

  ask(m: Msg): Promise<Msg> {
    const id = ++this.asked;
    return new Promise((resolve) => {
      this.asks.set(id, resolve);
      this.post({ ...m, id });
      setTimeout(() => resolve({ fetch: true }), 5000);   // no owner right now (a leader change): fetch alone
    });
  }
}

function claims(token: string): Msg {
  try {
    return JSON.parse(atob(token.split('.')[1]!.replace(/-/g, '+').replace(/_/g, '/')));
  } catch {
    return {};
  }
}

const forever = () => new Promise<void>(() => {});

async function makeLink(key: string, url: string): Promise<Link | null> {
  const locks = g.navigator.locks;
  try {
    // Held while this tab lives: the owner learns from it that the tab is gone.
    await new Promise<void>((held) => locks.request(`${key}:tab:${TAB}`, () => { held(); return forever(); }));
    const link = new Link();
    const send = (port: { postMessage(m: Msg): void }) => (m: Msg) => port.postMessage({ ...m, tab: TAB });
    addEventListener('pagehide', (e) => { if (!e.persisted) link.post({ o: 'bye' }); });
    if (g.SharedWorker) {
      const ok = await new Promise<boolean>((resolve) => {
        const w = new g.SharedWorker(url, { type: 'module', name: key });
        w.onerror = () => resolve(false);           // e.g. fanout-worker.js is not served there
        w.port.onmessage = (e: MessageEvent) => (e.data.o === 'hi' ? resolve(true) : link.in(e.data));
        link.post = send(w.port);
        setTimeout(() => resolve(false), 10000);
      });
      if (ok) return link;
    }
    if (!g.BroadcastChannel) return null;
    // The owner code comes from the worker file (never bundled into the core).
    const { Mux } = await import(/* webpackIgnore: true */ /* @vite-ignore */ url);
    const bc = new BroadcastChannel(key);
    link.post = send(bc);
    bc.onmessage = (e) => link.in(e.data);
    locks.request(`${key}:leader`, () => {
      // This tab leads now: own the connection, going on from what the last leader sent.
      const own = new BroadcastChannel(key);
      const mux = new Mux(key, (m: Msg) => own.postMessage(m), true,
        link.ep ? { ep: link.ep, ss: link.seen, ch: link.ch } : undefined);
      own.onmessage = (e) => mux.handle(e.data, (m: Msg) => own.postMessage(m));
      own.postMessage({ o: 'lead' });
      return forever();
    });
    return link;
  } catch {
    return null;
  }
}

/** A WebSocket-like tunnel to the owner; with no owner, a plain WebSocket. */
class VirtualSocket implements WebSocketLike {
  readyState = 0;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  private id = ++vcs;
  private link: Link | null = null;
  private real: WebSocket | null = null;
  private hello: Msg = {};

  constructor(url: string, readonly peer: Peer, worker: string, opts: Msg) {
    const u = new URL(url);
    const token = u.searchParams.get('auth') || '';
    u.searchParams.delete('auth');
    const key = `fanout:${u.href}|${claims(token).sub ?? ''}`;
    let link = links.get(key);
    if (!link) links.set(key, (link = makeLink(key, worker)));
    void link.then((l) => {
      if (this.readyState > 1) return;
      if (!l) return this.direct(url);
      this.link = peer.link = l;
      l.vcs.set(this.id, this);
      this.hello = { o: 'open', p: peer.id, vc: this.id, url, seen: peer.seen, opts };
      l.post(this.hello);
    });
  }

  private direct(url: string): void {
    const ws = (this.real = new WebSocket(url));
    ws.onopen = (e) => { this.readyState = 1; this.onopen?.(e); };
    ws.onmessage = (e) => this.onmessage?.(e);
    ws.onclose = (e) => { this.readyState = 3; this.onclose?.(e); };
    ws.onerror = (e) => this.onerror?.(e);
  }

  send(data: string): void {
    if (this.real) return this.real.send(data);
    if (this.readyState !== 1) throw new Error('fanout: shared socket not open');
    this.link!.post({ o: 'send', p: this.peer.id, vc: this.id, d: data });
  }

  close(code = 1000, reason = ''): void {
    if (this.real) return this.real.close(code, reason);
    if (this.readyState > 1) return;
    this.readyState = 3;
    this.link?.vcs.delete(this.id);
    this.link?.post({ o: 'close', p: this.peer.id, vc: this.id, code });
    if (code === 1000) this.peer.link = null;     // disconnect(): the next token is the app's own again
  }

  /** A message of the owner to this socket. */
  in(m: Msg): void {
    if (m.o === 'open' && this.readyState === 0) {
      this.readyState = 1;
      this.onopen?.({});
    } else if (m.o === 'msg' && this.readyState === 1) {
      this.onmessage?.({ data: m.d });
    } else if (m.o === 'close') {
      this.ended(m.code, m.reason);
    }
  }

  /** A new leader: a waiting socket asks it again, an open one ends (the client resumes through the new one). */
  lead(): void {
    if (this.readyState === 0) this.link!.post(this.hello);
    else this.ended(1006, 'leader changed');
  }

  private ended(code: number, reason: string): void {
    if (this.readyState > 1) return;
    this.readyState = 3;
    this.link?.vcs.delete(this.id);
    this.onclose?.({ code, reason });
  }
}

const HUB_OPTIONS = ['minReconnectDelay', 'maxReconnectDelay', 'heartbeatInterval', 'heartbeatTimeout',
  'requestTimeout', 'maxHeld', 'maxLatest', 'delta'] as const;

/**
 * Called by FanoutClient.connect(): make `o` share this browser's connection
 * (its `WebSocket` becomes the tunnel, its `getToken` asks the owner first, so
 * that one tab fetches a token for all). A no-op where sharing is off or impossible.
 */
export function share(o: ClientOptions): void {
  if (o.shared === false || o.WebSocket || typeof document === 'undefined' || !g.navigator?.locks
    || !(g.SharedWorker || g.BroadcastChannel)) return;
  const worker = typeof o.shared === 'string' || o.shared instanceof URL
    ? new URL(o.shared, location.href).href
    : new URL('./fanout-worker.js', import.meta.url).href;
  const peer: Peer = { id: `${TAB}.${++peers}`, seen: 0, link: null };
  const opts: Msg = {};
  for (const k of HUB_OPTIONS) if (o[k] !== undefined) opts[k] = o[k];
  const fetch = o.getToken;
  if (fetch) {
    let have = o.token;
    o.getToken = async () => {
      const l = peer.link;
      const r = l ? await l.ask({ o: 'tok?', p: peer.id, have }) : { fetch: true };
      if (r.token) return (have = r.token as string);
      try {
        have = await fetch();
        l?.post({ o: 'tok!', p: peer.id, token: have });
        return have;
      } catch (err) {
        l?.post({ o: 'tok!', p: peer.id });
        throw err;
      }
    };
  }
  o.WebSocket = class extends VirtualSocket {
    constructor(url: string) { super(url, peer, worker, opts); }
  };
}
