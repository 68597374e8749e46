// Backend publisher for the fanout node (PROTOCOL.md, "Publishers").
//
// Publishes to NATS JetStream with the `nats` npm package and waits for each
// publish ack, so when `publish` resolves the message is stored and every
// fan-out node will deliver it:
//   - token updates on `odin.token.<id>.update` (priority high), with a
//     Nats-Msg-Id made from the event, so a retry after a timeout is stored
//     once (JetStream drops a repeated id inside the stream's duplicate window);
//   - the trending list on `odin.global.trending` every 5 seconds (priority
//     medium: a throttled client may skip one, the next comes 5 s later). The
//     id is the 5-second slot, so two backend replicas running the same loop
//     store one message per slot.
//
// Configuration (the node's env names):
//   NATS_URL            comma-separated servers (default nats://127.0.0.1:4222)
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
// Or run `node publisher.js demo` to publish simulated trades and trending.

import { readFileSync } from "node:fs";
import process from "node:process";
import { pathToFileURL } from "node:url";
import { connect, credsAuthenticator, headers, JSONCodec } from "nats";

export const PRIORITIES = ["low", "medium", "high", "critical"];
export const TRENDING_SUBJECT = "odin.global.trending";
export const TRENDING_INTERVAL_MS = 5000;

const TOKEN_RE = /^[A-Za-z0-9_-]{1,64}$/;
const jc = JSONCodec();

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
export function optionsFromEnv(env = process.env) {
  const opts = {
    servers: (env.NATS_URL || "nats://127.0.0.1:4222").split(",").map((s) => s.trim()).filter(Boolean),
    name: env.PUBLISHER_NAME || "fanout-node-publisher",
    maxReconnectAttempts: -1, // reconnect forever; publishes wait up to their timeout meanwhile
    reconnectTimeWait: 2000,
  };
  if (env.NATS_CREDS_FILE) opts.authenticator = credsAuthenticator(readFileSync(env.NATS_CREDS_FILE));
  if (env.NATS_USER) Object.assign(opts, { user: env.NATS_USER, pass: env.NATS_PASSWORD || "" });
  if (env.NATS_TOKEN) opts.token = env.NATS_TOKEN;
  if (env.NATS_TLS_CA || env.NATS_TLS_CERT) {
    opts.tls = {};
    if (env.NATS_TLS_CA) opts.tls.caFile = env.NATS_TLS_CA;
    if (env.NATS_TLS_CERT) Object.assign(opts.tls, { certFile: env.NATS_TLS_CERT, keyFile: env.NATS_TLS_KEY });
  }
  return opts;
}

export class FanoutPublisher {
  /** @param {import("nats").NatsConnection} nc */
  constructor(nc, { stream = "ODIN_TOKENS", timeoutMs = 5000, retries = 3 } = {}) {
    this.nc = nc;
    this.js = nc.jetstream({ timeout: timeoutMs });
    this.stream = stream;
    this.timeoutMs = timeoutMs;
    this.retries = retries;
  }

  static async connect(env = process.env) {
    const nc = await connect(optionsFromEnv(env));
    (async () => {
      for await (const s of nc.status()) {
        if (s.type === "disconnect" || s.type === "reconnect" || s.type === "error") {
          console.error(`nats ${s.type}: ${s.data}`);
        }
      }
    })();
    return new FanoutPublisher(nc, { stream: env.JS_STREAM_NAME || "ODIN_TOKENS" });
  }

  /**
   * Publish `payload` (object -> JSON, string or Uint8Array) and wait for the
   * JetStream ack; returns { seq, duplicate }. `msgId` becomes Nats-Msg-Id:
   * the retries below reuse it, so a message is stored at most once.
   */
  async publish(subject, payload, { priority = "high", msgId } = {}) {
    const problem = subjectError(subject);
    if (problem) throw new Error(`invalid subject ${JSON.stringify(subject)}: ${problem}`);
    if (!PRIORITIES.includes(priority)) throw new Error(`priority must be one of ${PRIORITIES.join(", ")}`);
    const data = payload instanceof Uint8Array ? payload
      : typeof payload === "string" ? new TextEncoder().encode(payload) : jc.encode(payload);
    const h = headers();
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

  /** A token changed (trade, liquidity, metadata): `odin.token.<id>.update`, priority high. */
  publishTokenUpdate(token, { eventId, priority = "high" } = {}) {
    const id = eventId ?? `${token.updated_at ?? Date.now()}`;
    return this.publish(`odin.token.${token.id}.update`, token, { priority, msgId: `token-${token.id}-${id}` });
  }

  /** One trending snapshot: `odin.global.trending`, deduped per 5-second slot. */
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

  async close() {
    await this.nc.drain();
  }
}

// ---------------------------------------------------------------------- demo
async function demo() {
  const pub = await FanoutPublisher.connect();
  console.log(`connected to ${pub.nc.getServer()}, stream ${pub.stream}`);
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
