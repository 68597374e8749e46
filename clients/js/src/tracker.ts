/**
 * Ordering state with no I/O: per-connection `seq` gaps, hold-back, dedupe by
 * `stream_seq`, stream position. The same algorithm as fanout.client.Tracker
 * (Python); both are unit-tested against the same cases.
 *
 * Limits: `held` is unbounded here; the client drops the connection (and
 * resumes) once it holds more than its `maxHeld` messages behind a gap.
 */

/** A data message as the node sends it (PROTOCOL.md, "Server to client"). */
export interface DataMessage<T = unknown> {
  seq: number;
  type: 'message';
  channel: string;
  stream_seq: number;
  /** When the node received it (ms since epoch). */
  ts: number;
  /** The payload (JSON as published, or its text as a string). */
  data?: T;
  /** Present instead of `data` when the payload was not UTF-8. */
  data_b64?: string;
  /** Set by the client: this message came as a `subscribe` snapshot, not live. */
  snapshot?: boolean;
}

export class Tracker {
  /** Highest `stream_seq` delivered in `epoch`: the next resume's `after`. */
  position = 0;
  epoch: string | null = null;
  /** Messages dropped because their `stream_seq` was already delivered. */
  duplicates = 0;
  /** The next seq to deliver. */
  expected = 1;
  /** The highest seq received on this connection. */
  seenHi = 0;
  held = new Map<number, DataMessage>();
  /** [first, last] seq ranges known lost on this connection. */
  lost: Array<[number, number]> = [];
  /**
   * Set by the client (PROTOCOL.md 1.2): makes a delta message full when it
   * is next in seq order; false when it cannot, and then the drain stops
   * there, without it, until its replayed (full) copy comes.
   */
  decode?: (msg: DataMessage) => boolean;

  /** Forget per-connection state; held messages are dropped (the resume brings them again). */
  newConnection(): void {
    this.expected = 1;
    this.seenHi = 0;
    this.held = new Map();
    this.lost = [];
  }

  /** Adopt the stream's epoch; true when it changed (positions of the old one are void). */
  setEpoch(epoch: string): boolean {
    if (epoch === this.epoch) return false;
    const changed = this.epoch !== null;
    this.epoch = epoch;
    if (changed) this.position = 0;
    return changed;
  }

  /** A data message arrived: what may be delivered now, in order, and a seq range to replay. */
  onMessage(msg: DataMessage): { deliver: DataMessage[]; gap: [number, number] | null } {
    const seq = msg.seq;
    if (!Number.isInteger(seq)) return { deliver: this.fresh(msg) ? [msg] : [], gap: null };
    const gap: [number, number] | null = seq > this.seenHi + 1 ? [this.seenHi + 1, seq - 1] : null;
    this.seenHi = Math.max(this.seenHi, seq);
    if (seq < this.expected || this.held.has(seq)) return { deliver: [], gap };
    this.held.set(seq, msg);
    return { deliver: this.drain(), gap };
  }

  /**
   * A replay finished. Everything the node sent before `replay_done` arrived
   * before it, so a seq of the range at or below seenHi that is still not
   * here never will be: it is reported in `lost` and skipped.
   */
  onReplayDone(fromSeq: number, toSeq: number): { deliver: DataMessage[]; lost: Array<[number, number]> } {
    const lost: Array<[number, number]> = [];
    const hi = Math.min(toSeq, this.seenHi);
    let start: number | null = null;
    for (let s = Math.max(fromSeq, this.expected); s <= hi; s++) {
      if (!this.held.has(s) && !this.isLost(s)) {
        if (start === null) start = s;
      } else if (start !== null) {
        lost.push([start, s - 1]);
        start = null;
      }
    }
    if (start !== null) lost.push([start, hi]);
    this.lost.push(...lost);
    return { deliver: this.drain(), lost };
  }

  private isLost(seq: number): boolean {
    return this.lost.some(([a, b]) => a <= seq && seq <= b);
  }

  private drain(): DataMessage[] {
    const out: DataMessage[] = [];
    for (;;) {
      const msg = this.held.get(this.expected);
      if (msg !== undefined) {
        this.held.delete(this.expected);
        if (this.decode && !this.decode(msg)) return out;
        this.expected += 1;
        if (this.fresh(msg)) out.push(msg);
        continue;
      }
      const range = this.lost.find(([a, b]) => a <= this.expected && this.expected <= b);
      if (!range) return out;
      this.expected = range[1] + 1;
    }
  }

  /**
   * Dedupe by stream_seq. One connection gets its channels in stream order,
   * so one position covers every channel. Snapshot messages are older
   * state by design and pass (the client routes them to whoever asked).
   */
  private fresh(msg: DataMessage): boolean {
    const ss = msg.stream_seq;
    if (!Number.isInteger(ss)) return true;
    if (msg.snapshot) {
      this.position = Math.max(this.position, ss);
      return true;
    }
    if (ss <= this.position) {
      this.duplicates += 1;
      return false;
    }
    this.position = ss;
    return true;
  }
}

/** True when NATS subject `subject` matches `pattern` (`*` one token, `>` one or more at the end). */
export function subjectMatches(pattern: string, subject: string): boolean {
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
