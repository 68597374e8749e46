"""What one ``resume`` costs the node, timed at the hub (a real Core, socketpairs), in one process.

A full window (``--rate`` msg/s for ``JS_STREAM_MAX_AGE`` = 30 s: 9,000 messages
over ``--subjects`` 20,000 subjects ``odin.token.s<j>.update``) is dispatched on a
fake clock; then ``--n`` clients each connect, ``resume`` ``--per-client`` (5)
subjects from an ``after`` at the window's start (a client on quiet subjects:
the worst case for a scan of the window), read everything and leave. Beside it,
same run, same clients:

- ``subscribe``: a plain (re)subscribe of the same subjects: what a reconnect
  without resume costs; ``resume - subscribe`` is what resume adds.
- ``scan``: the old way (before issue 19), reading the window from ``after``
  and testing every message against the client's patterns (the same Python
  matcher), without delivering: the cost that grew with the window.
- ``wildcard``: ``resume`` of ``odin.token.*.update`` (all subjects), for scale.

With ``--js NATS_URL`` (``--js auto`` starts a nats-server) the hub is fed by the JetStream broker from a real
stream (the node's JetStream mode); ``--js-restart`` then starts a second hub
whose memory begins after the window (a node that just restarted), so every
resume reads its subjects from the stream (CPU of this process only; the
nats-server's is not counted).

    python -m benchmarks.resume_bench [--n 2000] [--json out.json]

Target (issue 19): resume <= 1 ms of CPU per resume of 5 subjects against a
full 30 s window of 9,000 messages, in both modes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import time
from typing import Any

from fanout.brokers.base import Message
from fanout.config import load
from fanout.hub import Hub, Resumed
from fanout.metrics import Metrics
from fanout.subjects import matches_any


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Peer:
    def __init__(self) -> None:
        self.server, self.client = socket.socketpair()
        for s in (self.server, self.client):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.fd = self.server.fileno()

    def on_blocked(self) -> None: ...
    def on_dead(self, why: str) -> None: ...
    def on_slow(self) -> None: ...
    def on_drained(self) -> None: ...

    def read(self) -> int:
        n = 0
        while True:
            try:
                data = self.client.recv(1 << 20)
            except BlockingIOError:
                return n
            if not data:
                return n
            n += len(data)

    def close(self) -> None:
        self.server.close()
        self.client.close()


def subjects_of(rng: random.Random, n_subjects: int, k: int) -> list[str]:
    return [f"odin.token.s{j}.update" for j in rng.sample(range(n_subjects), k)]


def fill(hub: Hub, clock: Clock, n_subjects: int, rate: float, seconds: float, seed: int = 1) -> int:
    rng = random.Random(seed)
    n = int(rate * seconds)
    payload = json.dumps({"price": 1.2345, "pad": "x" * 80}).encode()
    for i in range(1, n + 1):
        clock.t += 1.0 / rate
        hub.dispatch(Message(f"odin.token.s{rng.randrange(n_subjects)}.update", payload, i, 1, 2))
        if i % 256 == 0:
            hub.publish_pending()
    hub.publish_pending()
    return n


async def run_clients(hub: Hub, kind: str, requests: list[tuple[list[str], int]]) -> dict[str, float]:
    """Each request: attach, resume/subscribe, pump to the end, read, detach. CPU per request."""
    peers = [Peer() for _ in range(min(64, len(requests)))]
    got = 0
    delivered_bytes = 0
    complete = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i, (chans, after) in enumerate(requests):
        p = peers[i % len(peers)]
        slot = hub.attach(p, 0)
        if kind == "subscribe":
            hub.subscribe(slot, chans)
        else:
            done: list[Resumed] = []
            hub.resume(slot, chans, after, None, done.append)
            for _ in range(10000):
                if done:
                    break
                hub.flush()
                delivered_bytes += p.read()
                hub.flush_one(slot)
                if not done:
                    cu = hub._catchups.get(slot)
                    # A fetch from JetStream runs on the loop: wait for it without spinning.
                    await asyncio.sleep(0.0005 if cu is not None and cu.fetching else 0)
            got += 1
            complete += bool(done and done[0].complete)
        hub.flush()
        delivered_bytes += p.read()
        hub.detach(slot)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - t0
    for p in peers:
        p.close()
    n = len(requests)
    return {"n": n, "cpu_ms_per": 1000 * cpu / n, "wall_ms_per": 1000 * wall / n,
            "complete": complete, "bytes": delivered_bytes}


def old_scan(hub: Hub, requests: list[tuple[list[str], int]]) -> dict[str, float]:
    """The window scan resume did before: every retained message after ``after`` tested."""
    q = list(hub.recent._q)          # the window in stream order
    seqs = [e.stream_seq for e in q]
    import bisect
    found = 0
    cpu0 = time.process_time()
    for chans, after in requests:
        i = bisect.bisect_right(seqs, after)
        for e in q[i:]:
            if matches_any(chans, e.subject):
                found += 1
    cpu = time.process_time() - cpu0
    return {"n": len(requests), "cpu_ms_per": 1000 * cpu / len(requests), "found": found}


def make_hub(clock: Clock, **env: Any) -> Hub:
    cfg = load(environ={"WS_MAX_CONNECTIONS": "256", **{k: str(v) for k, v in env.items()}})
    hub = Hub(cfg, Metrics(), clock)
    return hub


async def embedded(args: argparse.Namespace) -> dict[str, Any]:
    clock = Clock()
    hub = make_hub(clock)
    hub.bind(asyncio.get_running_loop(), None)
    n = fill(hub, clock, args.subjects, args.rate, 30.0)
    rng = random.Random(7)
    first = hub.recent._q[0].stream_seq
    reqs = [(subjects_of(rng, args.subjects, args.per_client), first) for _ in range(args.n)]
    out: dict[str, Any] = {"mode": "embedded", "window": len(hub.recent), "dispatched": n}
    ex0 = getattr(hub.recent, "examined", 0)
    out["resume"] = await run_clients(hub, "resume", reqs)
    out["resume"]["examined_per"] = (getattr(hub.recent, "examined", 0) - ex0) / len(reqs)
    out["subscribe"] = await run_clients(hub, "subscribe", reqs)
    out["scan_old"] = old_scan(hub, reqs[: max(50, len(reqs) // 20)])
    wild = [(["odin.token.*.update"], first)] * 10
    out["wildcard"] = await run_clients(hub, "resume", wild)
    return out


async def jetstream(args: argparse.Namespace) -> dict[str, Any]:
    import nats

    from fanout.brokers.jetstream import JetStreamBroker

    env = {"NATS_URL": args.js, "JS_STREAM_NAME": "RESUMEBENCH", "JS_CONSUMER_NAME": "rb",
           "FANOUT_NODE_ID": "rb1", "JS_STREAM_STORAGE": "memory"}
    nc = await nats.connect(args.js)
    js = nc.jetstream()
    try:
        await js.delete_stream("RESUMEBENCH")
    except Exception:
        pass
    clock = Clock()
    hub = make_hub(clock, **env)
    broker = JetStreamBroker(hub.cfg)
    hub.bind(asyncio.get_running_loop(), broker)
    await broker.start(hub)
    await broker.wait_ready(20)
    rng = random.Random(1)
    n = int(args.rate * 30)
    payload = json.dumps({"price": 1.2345, "pad": "x" * 80}).encode()
    # Publish the window; the broker dispatches it into the hub's memory.
    for _ in range(n):
        await js.publish(f"odin.token.s{rng.randrange(args.subjects)}.update", payload)
    deadline = time.monotonic() + 60
    while hub.last_stream_seq < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        hub.flush()
    out: dict[str, Any] = {"mode": "jetstream", "window": len(hub.recent), "dispatched": hub.last_stream_seq}
    rng = random.Random(7)
    reqs = [(subjects_of(rng, args.subjects, args.per_client), 1) for _ in range(args.n)]
    ex0 = hub.recent.examined
    out["resume"] = await run_clients(hub, "resume", reqs)
    out["resume"]["examined_per"] = (hub.recent.examined - ex0) / len(reqs)
    out["subscribe"] = await run_clients(hub, "subscribe", reqs)
    out["scan_old"] = old_scan(hub, reqs[: max(50, len(reqs) // 20)])
    if args.js_restart:
        # A node that just started: its memory begins after the window. Warmed from the
        # stream at start (the default) every resume is served from memory; not warmed,
        # every resume reads its subjects from the stream (one ephemeral consumer each).
        await broker.stop()
        k = max(20, args.n // 20)
        for warm in (True, False):
            hub2 = make_hub(Clock(), **env)
            if not warm:
                hub2.seed_history = lambda messages, after: 0     # type: ignore[method-assign]
            broker2 = JetStreamBroker(hub2.cfg)
            hub2.bind(asyncio.get_running_loop(), broker2)
            await broker2.start(hub2)
            await broker2.wait_ready(20)
            await js.publish("odin.token.other.update", payload)     # memory's floor: the window's end
            deadline = time.monotonic() + 20
            while hub2.last_stream_seq <= n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for task in (getattr(broker2, "_seed_task", None), getattr(broker2, "_warm_task", None)):
                if task is not None:      # start-up reads, not part of a resume
                    await asyncio.wait_for(task, 30)
            f0 = hub2.metrics.catchup_fetches._value.get()
            key = "restart_warmed" if warm else "restart_cold"
            out[key] = await run_clients(hub2, "resume", reqs[:k])
            out[key]["stream_reads"] = hub2.metrics.catchup_fetches._value.get() - f0
            out[key]["warmed"] = len(hub2.recent)
            await broker2.stop()
    else:
        await broker.stop()
    await js.delete_stream("RESUMEBENCH")
    await nc.close()
    return out


def report(r: dict[str, Any]) -> None:
    res, sub, scan = r["resume"], r["subscribe"], r["scan_old"]
    print(f"[{r['mode']}] window {r['window']} messages ({r['dispatched']} dispatched)")
    print(f"  resume of 5 subjects from the window's start: {res['cpu_ms_per']:.3f} ms CPU "
          f"({res['complete']}/{res['n']} complete, {res.get('examined_per', float('nan')):.1f} examined each)")
    print(f"  plain subscribe (reconnect without resume):  {sub['cpu_ms_per']:.3f} ms CPU")
    print(f"  resume - subscribe:                          {res['cpu_ms_per'] - sub['cpu_ms_per']:.3f} ms")
    print(f"  old window scan alone (before issue 19):     {scan['cpu_ms_per']:.3f} ms "
          f"({scan['cpu_ms_per'] / max(1e-9, res['cpu_ms_per']):.1f}x the whole new resume)")
    if "wildcard" in r:
        print(f"  resume of odin.token.*.update (all {r['window']} messages): {r['wildcard']['cpu_ms_per']:.2f} ms")
    for key, what in (("restart_warmed", "after a restart, memory warmed from the stream"),
                      ("restart_cold", "after a restart, not warmed (each resume reads JetStream)")):
        if key in r:
            rs = r[key]
            print(f"  {what}: {rs['cpu_ms_per']:.3f} ms CPU, {rs['wall_ms_per']:.2f} ms wall "
                  f"({rs['complete']}/{rs['n']} complete, {rs['stream_reads']} stream reads)")


async def jetstream_auto(args: argparse.Namespace) -> dict[str, Any]:
    """JetStream mode against a nats-server of our own (tests/helpers/nats_server.py), on loopback."""
    import tempfile

    from tests.helpers.nats_server import NatsServer

    with tempfile.TemporaryDirectory(prefix="resume-bench-") as d:
        server = NatsServer(d)
        await server.astart()
        try:
            args.js = server.url
            return await jetstream(args)
        finally:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="resumes timed")
    p.add_argument("--subjects", type=int, default=20000)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--rate", type=float, default=300.0, help="msg/s over the 30 s window")
    p.add_argument("--js", default="", help="NATS URL: JetStream mode against this server ('auto': start one)")
    p.add_argument("--js-restart", action="store_true", help="also time resumes a restarted node reads from the stream")
    p.add_argument("--json", default="")
    args = p.parse_args()
    r = asyncio.run(jetstream_auto(args) if args.js == "auto" else jetstream(args) if args.js else embedded(args))
    report(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
