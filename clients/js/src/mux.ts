/**
 * The owner of a browser's one connection (in fanout-worker.js: run by the
 * SharedWorker, or by the leader tab). It holds one FanoutClient (the hub) and
 * answers every tab's tunnel (shared.ts) as a node would (PROTOCOL.md): each
 * tab has its own `seq`, gets exactly its channels, its snapshots, throttle
 * and drain notices; `subscribe` and `unsubscribe` become reference counts on
 * the hub. When the hub's connection closes, every tunnel closes with the same
 * code, so each tab sees the same `disconnected`, `resumed`, `reset` and 4001
 * events as with a connection of its own; its `resume` is answered from the
 * ring of the hub's recent messages.
 *
 * Limits: the ring keeps the last RING messages (a tab that comes back from
 * further behind gets `complete: false`, i.e. `reset`); each tab's last SENT
 * frames serve its `replay`.
 */
import { FanoutClient, tokenExp, type ErrorInfo, type Subscription } from './client.js';
import { subjectMatches, type DataMessage } from './tracker.js';

type Msg = Record<string, any>;
type Post = (m: Msg) => void;

const RING = 4096;
const SENT = 100;
/** How long a new leader holds the last leader's channels for tabs to claim them again. */
const SEED_GRACE = 10000;

interface Peer {
  id: string;
  tab: string;
  post: Post;
  /** The tunnel now (0: none), and whether it is open (the hub is connected). */
  vc: number;
  open: boolean;
  /** The tab's last position it surely got (sent with `open`). */
  seen: number;
  seq: number;
  sent: Array<[number, string]>;
  subs: Map<string, Subscription>;
  /** Channels whose messages go to the tunnel now. */
  live: Set<string>;
  /** Held before this tunnel: released unless its first resume/subscribe claims them. */
  stale: Set<string> | null;
  /** The hub's resume was incomplete while this tab was away. */
  reset: boolean;
}

export interface Seed {
  ep: string;
  ss: number;
  ch: string[];
}

export class Mux {
  hub: FanoutClient | null = null;
  private peers = new Map<string, Peer>();
  private watched = new Set<string>();
  private ring: DataMessage[] = [];
  private ringFrom = 0;
  private epoch: string | null = null;
  private refs = new Map<string, number>();
  /** Per held channel: the hub's position from which its messages are all in the ring. */
  private since = new Map<string, number>();
  private token: string | undefined;
  private using: [string, Promise<number>] | undefined;
  private fetcher: string | null = null;
  private waiting: Array<[Peer, number, string | undefined]> = [];

  /** `leader`: the owner is a tab, tabs hear each other (BroadcastChannel): tell them the channels, for the next leader. */
  constructor(private key: string, private bcast?: Post, private leader = false, private seed?: Seed) {}

  /** A message from a tab; `post` answers it. */
  handle(m: Msg, post: Post): void {
    if (!m.tab) return;
    if (m.o === 'bye') return this.gone(m.tab);
    let p = this.peers.get(m.p);
    if (!p) {
      this.watch(m.tab);
      p = { id: m.p, tab: m.tab, post, vc: 0, open: false, seen: 0, seq: 0, sent: [], subs: new Map(), live: new Set(), stale: null, reset: false };
      this.peers.set(m.p, p);
    }
    switch (m.o) {
      case 'open': return this.open(p, m);
      case 'send': {
        if (m.vc !== p.vc || !p.open) return;
        let r: Msg;
        try {
          r = JSON.parse(m.d);
        } catch {
          r = {};
        }
        return this.request(p, m.vc, r && typeof r === 'object' ? r : {});
      }
      case 'close':
        if (m.vc !== p.vc) return;
        this.closed(p);
        if (m.code === 1000) {              // disconnect(): the tab lets go of everything
          for (const c of [...p.subs.keys()]) this.drop(p, c);
          this.idle();
        }
        return;
      case 'tok?': return this.tokenFor(p, m.id, m.have);
      case 'tok!': return this.fetched(p, m.token);
    }
  }

  // ----------------------------------------------------------- tabs
  private watch(tab: string): void {
    if (this.watched.has(tab)) return;
    this.watched.add(tab);
    // Granted when the tab's own lock goes: the tab closed or crashed, goodbye or not.
    (globalThis as Msg).navigator?.locks?.request(`${this.key}:tab:${tab}`, () => this.gone(tab));
  }

  private gone(tab: string): void {
    this.watched.delete(tab);
    for (const p of [...this.peers.values()]) {
      if (p.tab !== tab) continue;
      for (const c of [...p.subs.keys()]) this.drop(p, c);
      this.peers.delete(p.id);
      if (this.fetcher === p.id) this.fetched(p, undefined);
    }
    this.idle();
  }

  /** No tab holds anything: let the connection go. */
  private idle(): void {
    if ([...this.peers.values()].some((p) => p.vc || p.subs.size)) return;
    this.hub?.disconnect();
    this.hub = null;
    this.ring = [];
    this.ringFrom = 0;
    this.epoch = null;
    this.refs.clear();
    this.since.clear();
  }

  private open(p: Peer, m: Msg): void {
    Object.assign(p, { vc: m.vc, open: false, seen: m.seen || 0, seq: 0, sent: [], stale: new Set(p.subs.keys()) });
    p.live.clear();
    const u = new URL(m.url);
    const t = u.searchParams.get('auth');
    u.searchParams.delete('auth');
    if (t) this.offer(t);
    if (!this.hub) this.start(u.href, m.opts || {});
    else if (this.hub.connected) this.ack(p);
  }

  private ack(p: Peer): void {
    p.open = true;
    p.post({ o: 'open', to: p.id, vc: p.vc });
    this.channels();      // a tab that joins hears the channels too
  }

  /** Leader mode: every tab learns the connection's channels, to go on with them if it leads next. */
  private channels(): void {
    if (this.leader) this.bcast?.({ o: 'ch', ch: [...this.refs.keys()] });
  }

  private closed(p: Peer): void {
    p.vc = 0;
    p.open = false;
    p.live.clear();
  }

  // ------------------------------------------------------------ hub
  private start(url: string, opts: Msg): void {
    const hub = (this.hub = new FanoutClient({ ...opts, token: this.token, shared: false }));
    hub.on('message', (m) => this.onData(m));
    hub.on('state', (s) => {
      if (s === 'connected') for (const p of this.peers.values()) if (p.vc && !p.open) this.ack(p);
    });
    hub.on('disconnected', (i) => {
      // Every tunnel, open or waiting, closes as a connection of its own would (a refused reconnect too).
      for (const p of this.peers.values()) {
        if (p.vc) {
          p.post({ o: 'close', to: p.id, vc: p.vc, code: i.code, reason: i.reason });
          this.closed(p);
        }
      }
    });
    hub.on('reset', (r) => {
      for (const p of this.peers.values()) if ([...p.subs.keys()].some((c) => r.channels.includes(c))) p.reset = true;
    });
    hub.on('throttle_update', (t) => this.toAll(t));
    hub.on('reconnect', (h) => this.toAll(h));
    hub.on('missing', () => {
      for (const p of this.peers.values()) if (p.open) p.seq += 1;     // a seq gap its replay reports as missing
    });
    const seed = this.seed;
    this.seed = undefined;
    if (seed?.ch.length) {
      const sub = hub._adopt(seed.ep, seed.ss, seed.ch);
      this.epoch = seed.ep;
      this.ringFrom = seed.ss;
      for (const c of seed.ch) {
        this.refs.set(c, (this.refs.get(c) || 0) + 1);
        this.since.set(c, seed.ss);
      }
      const off = hub.on('connected', () => {
        off();
        setTimeout(() => {
          if (this.hub !== hub) return;      // let go already (no tab left)
          sub.unsubscribe();
          for (const c of seed.ch) this.unref(c);
        }, SEED_GRACE);
      });
    }
    hub.connect(url);
  }

  /** A new stream epoch: positions of the old one mean nothing. */
  private sync(): void {
    const ep = this.hub!.epoch;
    if (ep === this.epoch) return;
    this.epoch = ep;
    this.ring = [];
    this.ringFrom = 0;
    for (const c of this.since.keys()) this.since.set(c, 0);
  }

  private onData(m: DataMessage): void {
    if (m.snapshot) return;        // goes to the tab that asked, through its subscription
    this.sync();
    this.ring.push(m);
    if (this.ring.length > RING) this.ringFrom = this.ring.shift()!.stream_seq;
    for (const p of this.peers.values()) if (p.open && this.wants(p, m.channel)) this.data(p, m);
  }

  private wants(p: Peer, subject: string): boolean {
    for (const c of p.live) if (subjectMatches(c, subject)) return true;
    return false;
  }

  // ------------------------------------------------------- frames out
  private frame(p: Peer, obj: Msg): void {
    this.raw(p, JSON.stringify(obj));
  }

  /** `ss`: every message up to it was sent to this tunnel before this frame (the tab's `seen`). */
  private raw(p: Peer, d: string, ss = this.hub?.lastStreamSeq ?? 0): void {
    p.post({ o: 'msg', to: p.id, vc: p.vc, d, ss, ep: this.hub?.epoch });
  }

  private toAll(obj: unknown): void {
    for (const p of this.peers.values()) if (p.open) this.frame(p, obj as Msg);
  }

  private data(p: Peer, m: DataMessage): void {
    const { seq: _seq, snapshot: _snap, ...rest } = m;
    const seq = ++p.seq;
    const d = JSON.stringify({ seq, ...rest });
    p.sent.push([seq, d]);
    if (p.sent.length > SENT) p.sent.shift();
    this.raw(p, d, m.stream_seq);     // not the hub's position: it may be ahead, within one delivered batch
  }

  // ------------------------------------------------------ subscriptions
  private ref(c: string, s: Subscription): void {
    const n = this.refs.get(c) || 0;
    this.refs.set(c, n + 1);
    if (n) return;
    this.since.delete(c);
    void s.ready.then(() => {
      if (this.refs.get(c) && !this.since.has(c)) this.since.set(c, this.hub?.lastStreamSeq ?? 0);
    });
    this.channels();
  }

  private unref(c: string): void {
    const n = (this.refs.get(c) || 0) - 1;
    if (n > 0) return void this.refs.set(c, n);
    this.refs.delete(c);
    this.since.delete(c);
    this.channels();
  }

  /** The tab's hub subscription of `c` (a new one when it asks for a snapshot). */
  private claim(p: Peer, c: string, snapshot: boolean): Subscription {
    p.stale?.delete(c);
    const old = p.subs.get(c);
    if (old && !snapshot) return old;
    const s = this.hub!.subscribe(c, { snapshot });
    p.subs.set(c, s);
    this.ref(c, s);
    if (old) {
      old.unsubscribe();
      this.unref(c);
    }
    return s;
  }

  private drop(p: Peer, c: string): void {
    const s = p.subs.get(c);
    if (!s) return;
    s.unsubscribe();
    p.subs.delete(c);
    p.live.delete(c);
    this.unref(c);
  }

  /** Claimed channels' results: refused ones get the node's `error` frame and are let go. */
  private async claimAll(p: Peer, id: unknown, chans: string[], snapshot: boolean): Promise<{ ok: string[]; count: number } | null> {
    const vc = p.vc;
    const subs = chans.map((c) => this.claim(p, c, snapshot));
    let count = 0;
    let asking = snapshot;
    const snaps = snapshot
      ? subs.map((s) => new Promise<void>((resolve) => {
        // The snapshot's messages go to this tunnel only, before the reply (as from a node).
        const offMsg = s.on('message', (m) => { if (asking && m.snapshot && p.vc === vc && p.open) this.data(p, m); });
        const off = s.on('snapshot', (i) => { off(); offMsg(); count += i.count || 0; resolve(); });
      }))
      : [];
    const res = await Promise.all(subs.map((s) => s.ready));
    await Promise.all(snaps);
    asking = false;
    if (p.vc !== vc || !p.open) return null;
    const ok: string[] = [];
    res.forEach((r, i) => {
      const c = chans[i]!;
      const err: ErrorInfo | undefined = r.errors[0];
      if (!err) return void ok.push(c);
      this.frame(p, { type: 'error', id, code: err.code, message: err.message, channel: c });
      this.drop(p, c);
    });
    if (p.stale) {
      for (const c of p.stale) this.drop(p, c);
      p.stale = null;
    }
    return { ok, count };
  }

  // ----------------------------------------------------------- requests
  private request(p: Peer, vc: number, r: Msg): void {
    const hub = this.hub!;
    const id = r.id;
    const done = (obj: Msg) => { if (p.vc === vc && p.open) this.frame(p, { ...obj, id }); };
    const chans: string[] = Array.isArray(r.channels) ? r.channels.map(String) : [];
    switch (r.type) {
      case 'subscribe':
        void this.claimAll(p, id, chans, !!r.snapshot).then((got) => {
          if (!got) return;
          for (const c of got.ok) p.live.add(c);
          done({ type: 'subscribed', channels: got.ok, epoch: hub.epoch, stream_seq: hub.lastStreamSeq, ...(r.snapshot ? { snapshot: got.count } : {}) });
        });
        return;
      case 'resume':
        void this.claimAll(p, id, chans, false).then((got) => {
          if (!got) return;
          this.sync();
          const from = Math.max(Number(r.after) || 0, p.seen);
          const same = r.epoch === hub.epoch;
          const complete = same && !p.reset && this.ringFrom <= from
            && got.ok.every((c) => (this.since.get(c) ?? Infinity) <= from);
          if (same) {
            for (const m of this.ring) if (m.stream_seq > from && got.ok.some((c) => subjectMatches(c, m.channel))) this.data(p, m);
          }
          p.reset = false;
          for (const c of got.ok) p.live.add(c);
          done({ type: 'resumed', channels: got.ok, epoch: hub.epoch, complete, stream_seq: hub.lastStreamSeq });
        });
        return;
      case 'unsubscribe':
        for (const c of chans) this.drop(p, c);
        return done({ type: 'unsubscribed', channels: chans });
      case 'replay': {
        // Copies of what this tunnel sent (the last SENT); what it no longer has, or skipped, is `missing`.
        const a = Number(r.from_seq);
        const b = Number(r.to_seq);
        const hi = Math.min(b, p.seq);
        let missing: number[] | null = null;
        let next = a;
        for (const [s, d] of p.sent) {
          if (s < a || s > hi) continue;
          if (s > next) missing = [missing ? missing[0]! : next, s - 1];
          this.raw(p, d);
          next = s + 1;
        }
        if (next <= hi) missing = [missing ? missing[0]! : next, hi];
        return done({ type: 'replay_done', from_seq: a, to_seq: b, missing });
      }
      case 'heartbeat':
        hub.heartbeat().catch(() => Date.now()).then((ts) => done({ type: 'heartbeat_ack', ts }));
        return;
      case 'refresh':
        this.use(String(r.token)).then(
          (exp) => done({ type: 'refreshed', exp }),
          (err) => done({ type: 'error', code: 'unauthorized', message: String(err?.frame?.message ?? err) }),
        );
        return;
      default:
        return done({ type: 'error', code: 'bad_request', message: `unknown type ${r.type}` });
    }
  }

  // -------------------------------------------------------------- tokens
  /** A tab's token (from its tunnel's URL): the hub takes it when it is newer. */
  private offer(t: string): void {
    if (t === this.token) return;
    const e = tokenExp(t);
    const cur = tokenExp(this.token ?? null);
    if (this.token && e !== null && cur !== null && e <= cur) return;
    void this.use(t).catch(() => { /* the node keeps the old one */ });
  }

  /** Make `t` the connection's token, once however many tabs bring it: `refresh` when connected. */
  private use(t: string): Promise<number> {
    if (this.using?.[0] === t) return this.using[1];
    const hub = this.hub;
    this.token = t;
    let run: Promise<number>;
    if (hub?.connected) {
      run = hub.refresh(t);
    } else {
      hub?.setToken(t);
      run = Promise.resolve(tokenExp(t) ?? 0);
    }
    this.using = [t, run];
    run.catch(() => { if (this.using?.[0] === t) this.using = undefined; });
    return run;
  }

  /** A tab's getToken: the newest token a tab fetched, unless the asker has it (or it expired): then one tab fetches. */
  private tokenFor(p: Peer, id: number, have: string | undefined): void {
    const t = this.token;
    const exp = tokenExp(t ?? null);
    const mine = tokenExp(have ?? null);
    if (t && t !== have && (exp === null || (exp * 1000 > Date.now() && (mine === null || exp > mine)))) {
      return p.post({ o: 'tok', to: p.id, id, token: t });
    }
    if (this.fetcher) return void this.waiting.push([p, id, have]);
    this.fetcher = p.id;
    p.post({ o: 'tok', to: p.id, id, fetch: true });
  }

  private fetched(p: Peer, token: string | undefined): void {
    if (p.id !== this.fetcher) return;
    this.fetcher = null;
    if (token) this.offer(token);
    for (const [q, id, have] of this.waiting.splice(0)) this.tokenFor(q, id, have);
  }
}
