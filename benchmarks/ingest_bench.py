"""Ingest alone: how fast one node consumes and acks a JetStream stream.

Starts its own ``nats-server -js`` (loopback, temp store), fills a stream with
N small messages (each with a ``Fanout-Priority`` header, as backends publish
them), then, on the same stream and in the same run, reads all N with:

- ``nats-py fetch``: nats-py's own pull consumer, ``fetch(batch)`` + ``ack()``
  per message (the plain way to consume a stream from Python);
- ``nats-py pipelined``: a nats-py subscription callback fed by pull requests
  kept two batches ahead, ack per message, nothing else (the ceiling for the
  broker's way of reading);
- ``JetStreamBroker``: the node's broker into a trivial sink (counts, checks
  order), with everything it does per message (sequence tracking, priority
  header, Message, dispatch, explicit ack).

Each reader gets its own durable consumer, so each reads every message. Time
runs from the start of consumption (broker: ``start()``, which includes
connect and consumer creation) to the last message handed over and acked;
the ack floor is checked afterwards. Rounds alternate the readers; the table
shows the median round.

    python benchmarks/ingest_bench.py --messages 200000 --json benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats  # noqa: E402
from nats.js import api  # noqa: E402

from fanout.brokers.base import Message  # noqa: E402
from fanout.brokers.jetstream import JetStreamBroker  # noqa: E402
from fanout.config import load  # noqa: E402
from tests.helpers.nats_server import NatsServer  # noqa: E402

STREAM = "BENCH"
SUBJECTS = ["odin.token.>", "odin.global.>"]


async def fill(url: str, n: int, payload_size: int) -> None:
    """Publish N messages (core publish, then wait until the stream holds them all)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=SUBJECTS, max_msgs=-1, max_bytes=-1, max_age=3600)
    body = (b'{"price":1.2345,"vol":42,"pad":"' + b"x" * max(0, payload_size - 40) + b'"}')[:max(payload_size, 16)]
    prios = ["low", "medium", "high", "critical"]
    for i in range(n):
        await nc.publish(f"odin.token.t{i % 1000}.update", body, headers={"Fanout-Priority": prios[i % 4]})
        if i % 5000 == 4999:
            await nc.flush()
            # Let the server catch up; core publish has no backpressure.
            while (await js.stream_info(STREAM)).state.messages < i - 20000:
                await asyncio.sleep(0.01)
    await nc.flush()
    deadline = time.monotonic() + 60
    while (await js.stream_info(STREAM)).state.messages < n:
        if time.monotonic() > deadline:
            raise RuntimeError("stream did not fill")
        await asyncio.sleep(0.05)
    await nc.close()


async def ack_floor(url: str, durable: str) -> int:
    nc = await nats.connect(url)
    try:
        ci = await nc.jetstream().consumer_info(STREAM, durable)
        return ci.ack_floor.stream_seq if ci.ack_floor else 0
    finally:
        await nc.close()


async def run_fetch(url: str, n: int, batch: int, durable: str) -> tuple[float, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_consumer(STREAM, api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                                     max_ack_pending=20000))
    sub = await js.pull_subscribe_bind(durable, stream=STREAM)
    got = 0
    t, c = time.perf_counter(), time.process_time()
    while got < n:
        try:
            msgs = await sub.fetch(batch, timeout=2)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            await m.ack()
        got += len(msgs)
    took, cpu = time.perf_counter() - t, time.process_time() - c
    await nc.flush()
    await nc.close()
    return took, cpu


async def run_pipelined(url: str, n: int, batch: int, durable: str) -> tuple[float, float]:
    nc = await nats.connect(url, skip_subject_validation=True)
    js = nc.jetstream()
    await js.add_consumer(STREAM, api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                                     max_ack_pending=20000))
    inbox = nc.new_inbox()
    nxt = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}"
    state = {"got": 0, "pending": 0}
    done = asyncio.Event()

    async def pull() -> None:
        want = 2 * batch - state["pending"]
        if want >= batch:
            state["pending"] += want
            await nc.publish(nxt, json.dumps({"batch": want, "expires": 30_000_000_000}).encode(), reply=inbox)

    async def cb(msg: Any) -> None:
        if not msg.reply:
            return  # status
        await msg.ack()
        state["got"] += 1
        state["pending"] -= 1
        if state["pending"] <= batch:
            await pull()
        if state["got"] >= n:
            done.set()

    await nc.subscribe(inbox, cb=cb, pending_msgs_limit=-1, pending_bytes_limit=-1)
    t, c = time.perf_counter(), time.process_time()
    await pull()
    await done.wait()
    took, cpu = time.perf_counter() - t, time.process_time() - c
    await nc.flush()
    await nc.close()
    return took, cpu


class CountingSink:
    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.last = 0
        self.disorder = 0
        self.done = asyncio.Event()

    @property
    def last_stream_seq(self) -> int:
        return self.last

    def set_epoch(self, epoch: str) -> None:
        pass

    def dispatch(self, msg: Message) -> int:
        if msg.stream_seq <= self.last:
            self.disorder += 1
            return -1
        self.last = msg.stream_seq
        self.count += 1
        if self.count >= self.n:
            self.done.set()
        return 1


async def run_broker(url: str, n: int, batch: int, node: str) -> tuple[float, float]:
    cfg = load(environ={
        "NATS_URL": url, "JS_STREAM_NAME": STREAM, "JS_STREAM_SUBJECTS": ",".join(SUBJECTS),
        "JS_STREAM_MAX_MSGS": str(10 * n), "JS_STREAM_MAX_BYTES": str(2**34), "JS_STREAM_MAX_AGE": "1h",
        "FANOUT_NODE_ID": node, "JS_FETCH_BATCH": str(batch),
    })
    counts: dict[str, int] = {}

    def hook(event: str, **fields: Any) -> None:
        counts[event] = counts.get(event, 0) + int(fields.get("n", 1))

    sink = CountingSink(n)
    broker = JetStreamBroker(cfg, metrics_hook=hook)
    t, c = time.perf_counter(), time.process_time()
    await broker.start(sink)
    await sink.done.wait()
    took, cpu = time.perf_counter() - t, time.process_time() - c
    await broker.stop()
    if sink.disorder or sink.count != n:
        raise RuntimeError(f"broker delivered {sink.count}/{n}, {sink.disorder} out of order")
    if counts.get("acked", 0) < n:
        raise RuntimeError(f"broker reported {counts.get('acked', 0)}/{n} acks")
    return took, cpu


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256, help="JS_FETCH_BATCH (and fetch batch)")
    ap.add_argument("--payload", type=int, default=64, help="payload bytes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    n = args.messages

    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "store").start()
        try:
            t = time.perf_counter()
            await fill(server.url, n, args.payload)
            print(f"filled {n} messages ({args.payload} B + priority header) in {time.perf_counter() - t:.1f}s",
                  file=sys.stderr)
            results: dict[str, list[float]] = {"nats-py fetch": [], "nats-py pipelined": [], "JetStreamBroker": []}
            cpu_us: dict[str, list[float]] = {k: [] for k in results}
            for r in range(args.rounds):
                order = list(results)
                if r % 2:
                    order.reverse()
                for name in order:
                    durable = f"{name.split()[0].replace('-', '')}{name.split()[-1]}{r}".replace(".", "")
                    if name == "nats-py fetch":
                        took, cpu = await run_fetch(server.url, n, args.batch, durable)
                        floor = await ack_floor(server.url, durable)
                    elif name == "nats-py pipelined":
                        took, cpu = await run_pipelined(server.url, n, args.batch, durable)
                        floor = await ack_floor(server.url, durable)
                    else:
                        node = f"bench{r}"
                        took, cpu = await run_broker(server.url, n, args.batch, node)
                        floor = await ack_floor(server.url, f"ws-server-{node}")
                    if floor < n:
                        raise RuntimeError(f"{name}: ack floor {floor} < {n}")
                    results[name].append(n / took)
                    cpu_us[name].append(cpu / n * 1e6)
                    print(f"round {r + 1} {name:18s} {n / took:10,.0f} msgs/s {cpu / n * 1e6:6.1f} us CPU/msg",
                          file=sys.stderr)
        finally:
            server.kill()

    med = {k: statistics.median(v) for k, v in results.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_us.items()}
    fetch, pipe, broker = med["nats-py fetch"], med["nats-py pipelined"], med["JetStreamBroker"]
    print()
    print(f"ingest: {n} messages, batch {args.batch}, {args.payload} B payload, median of {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'reader':20s} {'msgs/s':>10s} {'vs fetch':>9s} {'vs pipelined':>13s} {'us CPU/msg':>11s} "
          f"{'msgs/CPU-s':>11s}")
    for k, v in med.items():
        print(f"{k:20s} {v:10,.0f} {v / fetch:8.2f}x {v / pipe:12.2f}x {med_cpu[k]:11.1f} {1e6 / med_cpu[k]:11,.0f}")
    ok = broker >= 50_000 and broker >= 0.8 * fetch
    print(f"target >= 50,000 msgs/s and >= 0.8x raw: {'met' if ok else 'MISSED'}")
    if args.json:
        out = {
            "benchmark": "ingest", "messages": n, "batch": args.batch, "payload_bytes": args.payload,
            "rounds": args.rounds, "msgs_per_s": results, "median_msgs_per_s": med,
            "cpu_us_per_msg": cpu_us, "median_cpu_us_per_msg": med_cpu, "load_average": os.getloadavg()[0],
            "broker_vs_fetch": broker / fetch, "broker_vs_pipelined": broker / pipe, "target_met": ok,
            "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
            "nats_py": getattr(nats, "__version__", "2.x"),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
