"""Connection churn with ``resume`` (issue 19): what reconnects cost a node.

One node in embedded mode (``--js``: JetStream mode, with a nats-server of
its own on loopback, publishing over NATS) at its defaults; ``--clients`` (5,000) WebSocket
clients with ``--per-client`` (5) subjects each out of ``--subjects``
(20,000) ``odin.token.s<j>.update``; ``--rate`` (300) msg/s published over
those subjects through ``POST /publish``; every ``--every`` (3) s, ``--pct``
(20) % of the clients close and reconnect, spread over the interval. A
reconnecting client either subscribes again (a plain reconnect) or, with
probability ``resume share``, sends ``resume`` with the newest ``stream_seq``
it knows (from data messages and from its last ``subscribed``/``resumed``
reply) and the epoch.

Each node runs two phases back to back, same clients, same publisher:
resume share 0 (the baseline: churn without resume) and ``--resume-share``
(0.5). Per phase: node CPU (percent of one core, from /proc), handshakes
refused (HTTP 503) and failed, clients connected at the end, resumes
complete / incomplete, reconnect time p50/p99 (connect to reply), the node's
largest loop lag (``fanout_guard_loop_lag_seconds``, sampled each second).

``--old DIR`` runs the same two phases first against another source tree (e.g.
``git archive <commit> | tar -x -C DIR`` with its core built in place), so old
and new builds are compared in one run on the same box; ``--load`` prints the
box's load average beside the numbers (other processes share the cores).

    python -m benchmarks.churn [--clients 5000] [--phase 20] [--old /tmp/fanout-old] [--json out.json]

Targets (issue 19): the node holds all 5,000 with no handshake refused, at no
more than 60 % of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import struct
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .peers.launch import Peer, free_port
from .wsclient import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    HandshakeError,
    Url,
    client_frame,
    close_payload,
    handshake_request,
    parse_handshake_response,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------- node
class Node(Peer):
    """A fanout node run from ``tree`` (this checkout, or an older one for the
    same-run baseline), started and stopped as every benchmark peer is."""

    def __init__(self, tree: Path, env: dict[str, str]) -> None:
        self.ws_port, self.ops_port = free_port(), free_port()
        super().__init__(
            name="churn-node", cmd=[sys.executable, "-m", "fanout", "serve"], cwd=tree,
            ready_url=f"http://127.0.0.1:{self.ops_port}/ready",
            env={"PYTHONPATH": str(tree), "WS_HOST": "127.0.0.1", "WS_PORT": str(self.ws_port),
                 "HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(self.ops_port), "LOG_LEVEL": "warning", **env})

    def cpu(self) -> float:
        return self.cpu_seconds()

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line and not line.startswith("#"):
                        k, _, v = line.rpartition(" ")
                        try:
                            out[k] = float(v)
                        except ValueError:
                            pass
        except OSError:
            pass
        return out


# ------------------------------------------------------------------ clients
@dataclass
class Tally:
    connects: int = 0
    refused: int = 0            # HTTP 503 (or 429) to the handshake
    failed: int = 0             # timeouts, resets, other statuses
    resumes: int = 0
    complete: int = 0
    incomplete: int = 0
    messages: int = 0
    closed_by_server: int = 0
    times: list[float] = field(default_factory=list)


class Client(asyncio.Protocol):
    def __init__(self, w: Worker, cid: int, resume: bool) -> None:
        self.w = w
        self.cid = cid
        self.resume = resume
        self.buf = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.t0 = time.monotonic()
        self.accept = b""
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.ready = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        req, self.accept = handshake_request(self.w.url, False)
        transport.write(req)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            h = self.buf.find(b"\r\n\r\n")
            if h < 0:
                return
            head, self.buf = self.buf[:h], self.buf[h + 4:]
            try:
                parse_handshake_response(head, self.accept)
            except HandshakeError as e:
                self._settle("refused" if e.status in (503, 429) else f"status_{e.status}")
                self.abort()
                return
            self.upgraded = True
            st = self.w.state[self.cid]
            if self.resume and st["epoch"]:
                req = {"type": "resume", "channels": st["channels"], "after": st["pos"], "epoch": st["epoch"]}
            else:
                req = {"type": "subscribe", "channels": st["channels"]}
            assert self.transport is not None
            self.transport.write(client_frame(OP_TEXT, json.dumps(req).encode()))
        self._frames()

    def _frames(self) -> None:
        buf = self.buf
        i = 0
        while len(buf) - i >= 2:
            op = buf[i] & 0x0F
            n = buf[i + 1] & 0x7F
            j = i + 2
            if n == 126:
                if len(buf) - j < 2:
                    break
                n = struct.unpack_from("!H", buf, j)[0]
                j += 2
            elif n == 127:
                if len(buf) - j < 8:
                    break
                n = struct.unpack_from("!Q", buf, j)[0]
                j += 8
            if len(buf) - j < n:
                break
            payload = buf[j:j + n]
            i = j + n
            if op == OP_TEXT:
                self._text(payload)
            elif op == OP_PING:
                assert self.transport is not None
                self.transport.write(client_frame(OP_PONG, payload))
            elif op == OP_CLOSE:
                self.w.tally.closed_by_server += 1
                self.abort()
                break
        self.buf = buf[i:]

    def _text(self, payload: bytes) -> None:
        m = json.loads(payload)
        st = self.w.state[self.cid]
        t = m.get("type")
        if t == "message":
            self.w.tally.messages += 1
            st["pos"] = max(st["pos"], m["stream_seq"])
        elif t in ("subscribed", "resumed"):
            st["epoch"] = m.get("epoch", st["epoch"])
            st["pos"] = max(st["pos"], int(m.get("stream_seq") or 0))
            if t == "resumed":
                self.w.tally.resumes += 1
                if m.get("complete"):
                    self.w.tally.complete += 1
                else:
                    self.w.tally.incomplete += 1
            if not self.ready:
                self.ready = True
                self.w.tally.times.append(time.monotonic() - self.t0)
                self._settle("ok")

    def _settle(self, what: str) -> None:
        if not self.done.done():
            self.done.set_result(what)

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle("lost")
        self.w.open.pop(self.cid, None) if self.w.open.get(self.cid) is self else None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(OP_CLOSE, close_payload(1000)))
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Worker:
    def __init__(self, pipe: Connection, wid: int, url: str, cids: list[int], channels: dict[int, list[str]]) -> None:
        self.pipe = pipe
        self.wid = wid
        self.url = Url.parse(url)
        self.state = {c: {"channels": channels[c], "pos": 0, "epoch": ""} for c in cids}
        self.cids = cids
        self.open: dict[int, Client] = {}
        self.tally = Tally()
        self.rng = random.Random(wid)
        self.pending: set[asyncio.Task[None]] = set()

    async def connect(self, cid: int, resume: bool, tries: int = 20) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(tries):
            self.tally.connects += 1
            try:
                async with asyncio.timeout(15):
                    _, c = await loop.create_connection(lambda: Client(self, cid, resume), self.url.host, self.url.port)
                    what = await c.done
            except (TimeoutError, OSError):
                self.tally.failed += 1
                await asyncio.sleep(0.5 + self.rng.random())
                continue
            if what == "ok":
                self.open[cid] = c
                return
            if what == "refused":
                self.tally.refused += 1
            else:
                self.tally.failed += 1
            await asyncio.sleep(min(5.0, 0.5 * (attempt + 1)) + self.rng.random())

    async def connect_all(self, concurrency: int = 64) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(cid: int) -> None:
            async with sem:
                await self.connect(cid, False)

        await asyncio.gather(*(one(c) for c in self.cids))

    async def churn(self, seconds: float, pct: float, every: float, share: float) -> None:
        """Close and reconnect ``pct`` % of the clients every ``every`` s, spread over time."""
        tick = 0.1
        per_tick = len(self.cids) * pct / 100 * tick / every
        carry = 0.0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            carry += per_tick
            k = int(carry)
            carry -= k
            ids = [c for c in self.rng.sample(list(self.open), min(k, len(self.open)))]
            for cid in ids:
                c = self.open.pop(cid)
                c.close()
                t = asyncio.create_task(self.connect(cid, self.rng.random() < share))
                self.pending.add(t)
                t.add_done_callback(self.pending.discard)
            await asyncio.sleep(tick)
        if self.pending:
            await asyncio.wait(self.pending, timeout=20)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            cmd, args = await loop.run_in_executor(None, self.pipe.recv)
            if cmd == "connect":
                await self.connect_all()
            elif cmd == "churn":
                self.tally = Tally()
                await self.churn(**args)
            elif cmd == "stop":
                for c in list(self.open.values()):
                    c.abort()
                self.pipe.send({})
                return
            t = self.tally
            self.pipe.send({"open": len(self.open), "connects": t.connects, "refused": t.refused,
                            "failed": t.failed, "resumes": t.resumes, "complete": t.complete,
                            "incomplete": t.incomplete, "messages": t.messages,
                            "closed_by_server": t.closed_by_server, "times": t.times})


def _worker_main(pipe: Connection, wid: int, url: str, cids: list[int], channels: dict[int, list[str]]) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(Worker(pipe, wid, url, cids, channels).run())


# --------------------------------------------------------------- the run
def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def publisher(ops_port: int, subjects: int, rate: float, stop: asyncio.Event, nats_url: str = "") -> int:
    from .publisher import HttpPublisher, NatsPublisher
    pub: HttpPublisher | NatsPublisher = NatsPublisher(nats_url) if nats_url else HttpPublisher(f"http://127.0.0.1:{ops_port}")
    await pub.connect()
    rng = random.Random(3)
    sent = 0
    t0 = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - t0) * rate) - sent
        for _ in range(max(0, due)):
            pub.publish(f"odin.token.s{rng.randrange(subjects)}.update", b'{"price":1.2345,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}')
            sent += 1
        await asyncio.sleep(0.01)
    await pub.flush(10)
    await pub.close()
    return sent


async def run_node(tree: Path, args: argparse.Namespace, label: str) -> dict[str, Any]:
    env = {"WS_MAX_CONNECTIONS": str(max(10000, args.clients + 1000))}
    if args.nats_url:
        env.update({"NATS_URL": args.nats_url, "JS_STREAM_NAME": f"CHURN_{label.upper()}", "FANOUT_NODE_ID": f"churn-{label}"})
    node = Node(tree, env)
    node.start()
    rng = random.Random(11)
    channels = {c: [f"odin.token.s{j}.update" for j in rng.sample(range(args.subjects), args.per_client)]
                for c in range(args.clients)}
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for w in range(args.workers):
        a, b = ctx.Pipe()
        cids = list(range(w, args.clients, args.workers))
        p = ctx.Process(target=_worker_main, args=(b, w, f"ws://127.0.0.1:{node.ws_port}/ws", cids,
                                                   {c: channels[c] for c in cids}), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    loop = asyncio.get_running_loop()

    async def all_(cmd: str, a: dict[str, Any]) -> list[dict[str, Any]]:
        for p in pipes:
            p.send((cmd, a))
        return list(await asyncio.gather(*(loop.run_in_executor(None, p.recv) for p in pipes)))

    out: dict[str, Any] = {"label": label, "tree": str(tree), "phases": []}
    stop = asyncio.Event()
    pub_task = asyncio.create_task(publisher(node.ops_port, args.subjects, args.rate, stop, args.nats_url))
    try:
        t0 = time.monotonic()
        res = await all_("connect", {})
        out["connected"] = sum(r["open"] for r in res)
        out["connect_s"] = round(time.monotonic() - t0, 1)
        for share in (0.0, args.resume_share):
            lag_max = 0.0
            cpu0, w0 = node.cpu(), time.monotonic()
            fut = asyncio.ensure_future(all_("churn", {"seconds": args.phase, "pct": args.pct, "every": args.every,
                                                       "share": share}))
            load = []
            while not fut.done():
                await asyncio.sleep(1.0)
                m = await asyncio.to_thread(node.metrics)
                lag_max = max(lag_max, m.get("fanout_guard_loop_lag_seconds", 0.0))
                load.append(os.getloadavg()[0])
            res = fut.result()
            cpu = (node.cpu() - cpu0) / (time.monotonic() - w0) * 100
            times = [t for r in res for t in r["times"]]
            ph = {"resume_share": share, "node_cpu_pct": round(cpu, 1), "open_end": sum(r["open"] for r in res),
                  "refused": sum(r["refused"] for r in res), "failed": sum(r["failed"] for r in res),
                  "connects": sum(r["connects"] for r in res), "resumes": sum(r["resumes"] for r in res),
                  "complete": sum(r["complete"] for r in res), "incomplete": sum(r["incomplete"] for r in res),
                  "messages": sum(r["messages"] for r in res), "closed_by_server": sum(r["closed_by_server"] for r in res),
                  "reconnect_p50_ms": round(_pct(times, 0.5) * 1000, 1), "reconnect_p99_ms": round(_pct(times, 0.99) * 1000, 1),
                  "loop_lag_max_ms": round(lag_max * 1000, 1), "box_load_avg": round(sum(load) / max(1, len(load)), 2),
                  "node_cpu_ms_per_reconnect": round(cpu / 100 * args.phase * 1000 / max(1, len(times)), 2)}
            out["phases"].append(ph)
            print(f"  [{label}] resume share {share:.0%}: node {ph['node_cpu_pct']}% of a core, "
                  f"open {ph['open_end']}/{args.clients}, refused {ph['refused']}, failed {ph['failed']}, "
                  f"resumes {ph['resumes']} ({ph['incomplete']} incomplete), reconnect p50/p99 "
                  f"{ph['reconnect_p50_ms']}/{ph['reconnect_p99_ms']} ms, loop lag max {ph['loop_lag_max_ms']} ms, "
                  f"node CPU {ph['node_cpu_ms_per_reconnect']} ms per reconnect, "
                  f"box load {ph['box_load_avg']}", flush=True)
    finally:
        stop.set()
        out["published"] = await pub_task
        try:
            await asyncio.wait_for(all_("stop", {}), 20)
        except Exception:
            pass
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        node.stop()
    return out


async def run_one(tree: Path, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """One node's phases; with ``--js`` on a nats-server of its own (a fresh stream)."""
    if not args.js:
        return await run_node(tree, args, label)
    from tests.helpers.nats_server import NatsServer
    with tempfile.TemporaryDirectory(prefix="churn-nats-") as d:
        server = NatsServer(d)
        await server.astart()
        try:
            args.nats_url = server.url
            return await run_node(tree, args, label)
        finally:
            server.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    if args.old:
        runs.append(await run_one(Path(args.old), args, "old"))
    runs.append(await run_one(REPO, args, "new"))
    return {"args": {k: v for k, v in vars(args).items() if k != "nats_url"}, "cpus": os.cpu_count(), "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--subjects", type=int, default=20000)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--pct", type=float, default=20.0, help="percent of the clients reconnecting every --every s")
    p.add_argument("--every", type=float, default=3.0)
    p.add_argument("--resume-share", type=float, default=0.5)
    p.add_argument("--phase", type=float, default=20.0, help="seconds per phase (no resume, then resume share)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--old", default="", help="another source tree to run first (its core built in place)")
    p.add_argument("--js", action="store_true", help="JetStream mode: a nats-server of our own, publishing over NATS")
    p.add_argument("--json", default="")
    args = p.parse_args()
    args.nats_url = ""
    print(f"churn: {args.clients} clients x {args.per_client} of {args.subjects} subjects, {args.rate:g} msg/s, "
          f"{args.pct:g} % reconnecting every {args.every:g} s; box load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
          flush=True)
    r = asyncio.run(main_async(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
