// Backend publisher for the fanout node (PROTOCOL.md, "Publishers").
//
// Two transports, one API (publish / publishTokenUpdate / publishTrending /
// startTrendingLoop / close):
//   - FanoutPublisher: NATS JetStream with the `nats` npm package (loaded only
//     when used), waiting for each publish ack, so when `publish` resolves the
//     message is stored and every fan-out node will deliver it;
//   - HttpPublisher: a node in embedded mode (`fanout serve` without NATS_URL),
//     POST /publish/<subject> on its ops port, 202 = accepted.
// What is published:
//   - token updates on `odin.token.<id>.update` (priority high), with a
//     Nats-Msg-Id made from the event, so a retry after a timeout is stored
//     once (JetStream drops a repeated id inside the stream's duplicate window);
//   - the trending list on `odin.global.trending` every 5 seconds (priority
//     medium: a throttled client may skip one, the next comes 5 s later). The
//     id is the 5-second slot, so two backend replicas running the same loop
//     store one message per slot.
//
// Configuration (the node's env names):
//   NATS_URL            comma-separated servers (default nats://127.0.0.1:4222);
//                       `npm start` uses JetStream only when it is set
//   FANOUT_PUBLISH_URL  the embedded node's ops URL (default http://127.0.0.1:3002),
//                       used by `npm start` when NATS_URL is not set
//   NATS_CREDS_FILE     or NATS_USER + NATS_PASSWORD, or NATS_TOKEN
//   NATS_TLS_CA / NATS_TLS_CERT / NATS_TLS_KEY
//   JS_STREAM_NAME      expected stream (default ODIN_TOKENS); a subject that
//                       would land elsewhere is refused
//
// Use as a module:
//   import { FanoutPublisher } from "./publisher.js";
//   const pub = await FanoutPublisher.connect();
//   await pub.publishTokenUpdate(token, { eventId: trade.txId });
//   const stop = pub.startTrendingLoop(() => getTrendingTokens(100));
//
// Or run `npm start` (= `node publisher.js demo`) to publish simulated trades
// on odin.token.tok0..tok19.update and the trending list: to JetStream when
// NATS_URL is set, else to `fanout serve` on 127.0.0.1:3002. DEMO_TRADES=N
// stops after N trades; DEMO_INTERVAL_MS (100) is the pause between trades.

import { readFileSync } from "node:fs";
import process from "node:process";
import { pathToFileURL } from "node:url";

export const PRIORITIES = ["low", "medium", "high", "critical"];
export const TRENDING_SUBJECT = "odin.global.trending";
export const TRENDING_INTERVAL_MS = 5000;

const TOKEN_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** Why `subject` is not a valid channel (PROTOCOL.md, "Subjects"), or null. */
export function subjectError(subject) {
  if (typeof subject !== "string" || subject.length === 0) return "empty subject";
  if (Buffer.byteLength(subject) > 256) return "longer than 256 bytes";
  const tokens = subject.split(".");
  if (tokens.length > 16) return "more than 16 tokens";
  const bad = tokens.find((t) => !TOKEN_RE.test(t));
  return bad === undefined ? null : `bad token ${JSON.stringify(bad)}: tokens are 1..64 of A-Z a-z 0-9 _ -`;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Connection options for the `nats` package from the node's env variables. */
export function optionsFromEnv(env = process.env, credsAuthenticator = null) {
  const opts = {
    servers: (env.NATS_URL || "nats://127.0.0.1:4222").split(",").map((s) => s.trim()).filter(Boolean),
    name: env.PUBLISHER_NAME || "fanout-node-publisher",
    maxReconnectAttempts: -1, // reconnect forever; publishes wait up to their timeout meanwhile
    reconnectTimeWait: 2000,
  };
  if (env.NATS_CREDS_FILE) {
    if (!credsAuthenticator) throw new Error("NATS_CREDS_FILE needs the nats package's credsAuthenticator");
    opts.authenticator = credsAuthenticator(readFileSync(env.NATS_CREDS_FILE));
  }
  if (env.NATS_USER) Object.assign(opts, { user: env.NATS_USER, pass: env.NATS_PASSWORD || "" });
  if (env.NATS_TOKEN) opts.token = env.NATS_TOKEN;
  if (env.NATS_TLS_CA || env.NATS_TLS_CERT) {
    opts.tls = {};
    if (env.NATS_TLS_CA) opts.tls.caFile = env.NATS_TLS_CA;
    if (env.NATS_TLS_CERT) Object.assign(opts.tls, { certFile: env.NATS_TLS_CERT, keyFile: env.NATS_TLS_KEY });
  }
  return opts;
}

/** Why a publish is refused before it is sent, or nothing. */
function checkPublish(subject, priority) {
  const problem = subjectError(subject);
  if (problem) throw new Error(`invalid subject ${JSON.stringify(subject)}: ${problem}`);
  if (!PRIORITIES.includes(priority)) throw new Error(`priority must be one of ${PRIORITIES.join(", ")}`);
}

function encode(payload) {
  return payload instanceof Uint8Array ? payload
    : new TextEncoder().encode(typeof payload === "string" ? payload : JSON.stringify(payload));
}

/** What both transports share: the message shapes and the trending loop. */
class PublisherBase {
  /** A token changed (trade, liquidity, metadata): `odin.token.<id>.update`, priority high. */
  publishTokenUpdate(token, { eventId, priority = "high" } = {}) {
    const id = eventId ?? `${token.updated_at ?? Date.now()}`;
    return this.publish(`odin.token.${token.id}.update`, token, { priority, msgId: `token-${token.id}-${id}` });
  }

  /** One trending snapshot: `odin.global.trending` as `{type: "trending_update", data: {top_100}, ts}`, deduped per 5-second slot. */
  publishTrending(top100, now = Date.now()) {
    const slot = Math.floor(now / TRENDING_INTERVAL_MS);
    return this.publish(
      TRENDING_SUBJECT,
      { type: "trending_update", data: { top_100: top100 }, ts: now },
      { priority: "medium", msgId: `trending-${slot}` },
    );
  }

  /**
   * Publish `await getTrending()` every 5 seconds (the plan's cron job).
   * Ticks do not overlap: a slow publish delays the next tick instead of
   * stacking publishes up. Returns a function that stops the loop.
   */
  startTrendingLoop(getTrending, { intervalMs = TRENDING_INTERVAL_MS, onError = console.error } = {}) {
    let stopped = false;
    let timer = null;
    const tick = async () => {
      const started = Date.now();
      try {
        const { seq } = await this.publishTrending(await getTrending(), started);
        if (process.env.VERBOSE) console.log(`trending published, stream_seq ${seq}`);
      } catch (err) {
        onError(`trending publish failed: ${err.message ?? err}`);
      }
      if (!stopped) timer = setTimeout(tick, Math.max(0, intervalMs - (Date.now() - started)));
    };
    timer = setTimeout(tick, 0);
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }
}

/**
 * Publishes to an embedded-mode node's ops endpoint (POST /publish/<subject>).
 * No acks beyond the 202 and no dedupe by id: the embedded bus has neither.
 */
export class HttpPublisher extends PublisherBase {
  constructor(baseUrl = "http://127.0.0.1:3002", { timeoutMs = 5000 } = {}) {
    super();
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.timeoutMs = timeoutMs;
  }

  describe() {
    return `fanout node ${this.baseUrl} (embedded mode, HTTP publish)`;
  }

  /** POST the payload; returns { seq, duplicate: false } (seq = the node's stream_seq). */
  async publish(subject, payload, { priority = "high" } = {}) {
    checkPublish(subject, priority);
    const res = await fetch(`${this.baseUrl}/publish/${subject}`, {
      method: "POST", body: encode(payload), headers: { "Fanout-Priority": priority },
      signal: AbortSignal.timeout(this.timeoutMs),
    });
    const body = await res.text();
    if (res.status !== 202) throw new Error(`publish ${subject}: HTTP ${res.status} ${body.slice(0, 200)}`);
    return { seq: JSON.parse(body).stream_seq, duplicate: false };
  }

  async close() {}
}

export class FanoutPublisher extends PublisherBase {
  /** @param {import("nats").NatsConnection} nc  @param {typeof import("nats")} nats the loaded package */
  constructor(nc, { stream = "ODIN_TOKENS", timeoutMs = 5000, retries = 3, nats } = {}) {
    super();
    this.natsApi = nats;
    this.nc = nc;
    this.js = nc.jetstream({ timeout: timeoutMs });
    this.stream = stream;
    this.timeoutMs = timeoutMs;
    this.retries = retries;
  }

  static async connect(env = process.env) {
    const nats = await import("nats");
    const nc = await nats.connect(optionsFromEnv(env, nats.credsAuthenticator));
    (async () => {
      for await (const s of nc.status()) {
        if (s.type === "disconnect" || s.type === "reconnect" || s.type === "error") {
          console.error(`nats ${s.type}: ${s.data}`);
        }
      }
    })();
    return new FanoutPublisher(nc, { stream: env.JS_STREAM_NAME || "ODIN_TOKENS", nats });
  }

  describe() {
    return `NATS ${this.nc.getServer()}, stream ${this.stream}`;
  }

  /**
   * Publish `payload` (object -> JSON, string or Uint8Array) and wait for the
   * JetStream ack; returns { seq, duplicate }. `msgId` becomes Nats-Msg-Id:
   * the retries below reuse it, so a message is stored at most once.
   */
  async publish(subject, payload, { priority = "high", msgId } = {}) {
    checkPublish(subject, priority);
    const data = encode(payload);
    const h = this.natsApi.headers();
    h.set("Fanout-Priority", priority);
    const opts = { headers: h, expect: { streamName: this.stream }, timeout: this.timeoutMs };
    if (msgId) opts.msgID = msgId; // sent as the Nats-Msg-Id header
    for (let attempt = 0; ; attempt++) {
      try {
        const ack = await this.js.publish(subject, data, opts);
        return { seq: ack.seq, duplicate: ack.duplicate };
      } catch (err) {
        // A timeout may mean "stored, ack lost": only retry with an id.
        if (!msgId || attempt >= this.retries) throw err;
        await sleep(200 * 2 ** attempt);
      }
    }
  }

  async close() {
    await this.nc.drain();
  }
}

// ---------------------------------------------------------------------- demo
/** JetStream when NATS_URL is set, else the embedded node at FANOUT_PUBLISH_URL. */
export async function publisherFromEnv(env = process.env) {
  if (env.NATS_URL) return FanoutPublisher.connect(env);
  return new HttpPublisher(env.FANOUT_PUBLISH_URL || "http://127.0.0.1:3002");
}

async function demo() {
  const pub = await publisherFromEnv();
  console.log(`publishing to ${pub.describe()}`);
  const tokens = Array.from({ length: 20 }, (_, i) => ({
    id: `tok${i}`, price: 1 + i / 10, volume: 0, holder_count: 10 + i, updated_at: Date.now(),
  }));
  const stopTrending = pub.startTrendingLoop(async () =>
    [...tokens].sort((a, b) => b.volume - a.volume).slice(0, 100).map(({ id, price, volume }) => ({ id, price, volume })));
  const limit = Number(process.env.DEMO_TRADES || 0); // 0 = until interrupted
  let trades = 0;
  let stopping = false;
  const stop = () => { stopping = true; };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
  while (!stopping && (limit === 0 || trades < limit)) {
    const t = tokens[Math.floor(Math.random() * tokens.length)];
    t.price = +(t.price * (1 + (Math.random() - 0.5) / 50)).toFixed(6);
    t.volume += Math.round(Math.random() * 1000);
    t.updated_at = Date.now();
    trades += 1;
    const { seq, duplicate } = await pub.publishTokenUpdate(t, { eventId: `trade-${trades}` });
    if (process.env.VERBOSE) console.log(`odin.token.${t.id}.update stream_seq ${seq}${duplicate ? " (duplicate)" : ""}`);
    await sleep(Number(process.env.DEMO_INTERVAL_MS || 100));
  }
  stopTrending();
  await pub.close();
  console.log(`published ${trades} token updates`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href && process.argv[2] === "demo") {
  demo().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
