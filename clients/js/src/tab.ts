/**
 * One connection per browser, the tab's side. shared.ts (in the core bundle)
 * loads it with import() from fanout-worker.js, so the core carries only a
 * stub. A tab's sockets are tunnels to the owner of the one real connection:
 * a SharedWorker running fanout-worker.js, else the tab elected with the Web
 * Locks API, reached over a BroadcastChannel (it runs the owner, mux.ts, from
 * this same file). The client is unchanged: it speaks the protocol over the
 * tunnel, and the owner answers as a node would (mux.ts).
 *
 * Every tab holds the Web Lock `<key>:tab:<id>` while it lives; the owner
 * waits on it to learn when a tab is gone, closed or crashed. The key is the
 * URL without `auth` plus the token's `sub`: tabs of another user never share.
 * When neither owner can start, the tunnel becomes a plain WebSocket.
 */
import { Mux } from './mux.js';
import type { Peer, Tunnel } from './shared.js';

type Msg = Record<string, any>;
const g = globalThis as Msg;
/** This tab's id: the prefix of its clients' ids (shared.ts makes them). */
let TAB = '';
let vcs = 0;
const links = new Map<string, Promise<Link | null>>();
type Port = { postMessage(m: Msg): void };

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
        if (v.open) {
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
    const send = (port: Port) => (m: Msg) => port.postMessage({ ...m, tab: TAB });
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

/** Drives one socket of a client (a Tunnel of shared.ts) through the link. */
class VirtualSocket {
  private id = ++vcs;
  private link: Link | null = null;
  private hello: Msg = {};

  constructor(private s: Tunnel, url: string, readonly peer: Peer) {
    TAB ||= peer.id.split('.')[0]!;
    const u = new URL(url);
    const token = u.searchParams.get('auth') || '';
    u.searchParams.delete('auth');
    const key = `fanout:${u.href}|${claims(token).sub ?? ''}`;
    let link = links.get(key);
    if (!link) links.set(key, (link = makeLink(key, peer.worker)));
    void link.then((l) => {
      if (s.readyState > 1) return;
      if (!l) return s.direct(url);
      this.link = peer.link = l;
      l.vcs.set(this.id, this);
      this.hello = { o: 'open', p: peer.id, vc: this.id, url, seen: peer.seen, opts: peer.opts };
      l.post(this.hello);
      s.t = this;
    });
  }

  get open(): boolean { return this.s.readyState === 1; }

  send(data: string): void {
    if (!this.open) throw new Error('fanout: shared socket not open');
    this.link!.post({ o: 'send', p: this.peer.id, vc: this.id, d: data });
  }

  close(code = 1000): void {
    if (this.s.readyState > 1) return;
    this.s.readyState = 3;
    this.link!.vcs.delete(this.id);
    this.link!.post({ o: 'close', p: this.peer.id, vc: this.id, code });
    if (code === 1000) this.peer.link = null;     // disconnect(): the next token is the app's own again
  }

  /** A message of the owner to this socket. */
  in(m: Msg): void {
    const s = this.s;
    if (m.o === 'open' && s.readyState === 0) {
      s.readyState = 1;
      s.onopen?.({});
    } else if (m.o === 'msg' && s.readyState === 1) {
      s.onmessage?.({ data: m.d });
    } else if (m.o === 'close') {
      this.ended(m.code, m.reason);
    }
  }

  /** A new leader: a waiting socket asks it again, an open one ends (the client resumes through the new one). */
  lead(): void {
    if (this.s.readyState === 0) this.link!.post(this.hello);
    else this.ended(1006, 'leader changed');
  }

  private ended(code: number, reason: string): void {
    if (this.s.readyState > 1) return;
    this.s.readyState = 3;
    this.link?.vcs.delete(this.id);
    this.s.onclose?.({ code, reason });
  }
}

/** Connect a client's socket to this browser's owner for its URL and user. */
export function tunnel(s: Tunnel, url: string, peer: Peer): void {
  new VirtualSocket(s, url, peer);
}

/** A client's getToken: the owner's newer token, else this tab fetches one (with the app's `fetch`) for all. */
export async function token(peer: Peer, fetch: () => string | Promise<string>): Promise<string> {
  const l = peer.link as Link | null;
  const r = l ? await l.ask({ o: 'tok?', p: peer.id, have: peer.have }) : { fetch: true };
  if (r.token) return (peer.have = r.token as string);
  try {
    peer.have = await fetch();
    l?.post({ o: 'tok!', p: peer.id, token: peer.have });
    return peer.have;
  } catch (err) {
    l?.post({ o: 'tok!', p: peer.id });
    throw err;
  }
}
