"""Load generator for fanout (and for the peers it is compared with).

Holds many WebSocket connections over several worker processes (each under
the 20,000-open-files cap), subscribes them by a distribution, checks every
client's ``seq`` for gaps and duplicates, measures latency from the publish
timestamp inside each payload, and can publish itself at a fixed rate.

Library use (the runner, the gate)::

    lg = LoadGen(LoadConfig(url="ws://127.0.0.1:3004/ws", connections=1000))
    await lg.start(); await lg.connect(); await lg.reset()
    ... publish ...
    snap = await lg.stats()
    await lg.stop()

Command line: the plan's sustained load test interface. ``TARGET_CONNECTIONS``,
``DURATION`` and ``WS_URL`` come from the environment (flags override), a
progress line is rewritten every second, and a summary closes the run::

    TARGET_CONNECTIONS=5000 DURATION=60 WS_URL=ws://127.0.0.1:3004/ws \\
        python -m benchmarks.loadgen --publish-rate 100

See benchmarks/README.md for every flag and what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from . import native
from .common import DISTS, H_BUCKETS, Distribution, is_slow, summarize_hist
from .worker import WorkerConfig, raise_nofile, worker_main


@dataclass
class LoadConfig:
    url: str = "ws://127.0.0.1:3004/ws"
    connections: int = 1000
    proto: str = "fanout"  # "fanout" (our protocol; also the Python peer) or "nats"
    dist: Distribution = field(default_factory=Distribution)
    deflate: bool = False
    delta: bool = False     # subscribe with delta: "fossil" (PROTOCOL 1.2)
    slow_share: float = 0.0
    slow_rcvbuf: int = 4096
    slow_pause_s: float = 2.0
    slow_read_s: float = 0.25
    slow_bps: int = 0
    workers: int = 0  # 0: enough for per_worker, and at least min(2, cores)
    per_worker: int = 5000
    connect_concurrency: int = 100  # handshakes in flight per worker
    connect_timeout: float = 15.0
    engine: str = "c"  # "c" (compiled receive engine) or "py"

    def n_workers(self) -> int:
        if self.workers > 0:
            return self.workers
        need = math.ceil(self.connections / self.per_worker)
        return max(need, min(2, os.cpu_count() or 1, self.connections))


@dataclass
class ClassStats:
    """Totals for one class of clients (fast or slow readers) since reset."""

    clients: int = 0
    received: int = 0
    gaps: int = 0
    dups: int = 0
    bytes: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(H_BUCKETS, dtype=np.int64))

    def summary(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("clients", "received", "gaps", "dups", "bytes")}
        d.update(summarize_hist(self.hist))
        return d


@dataclass
class Snapshot:
    """What :meth:`LoadGen.stats` returns: totals since the last reset, and
    the latency histogram of the last interval (since the previous call)."""

    t: float
    open: int
    fast: ClassStats
    slow: ClassStats
    interval_hist: np.ndarray
    events: dict[str, int]
    cpu_s: float  # worker CPU since reset (user + system, all workers)

    @property
    def received(self) -> int:
        return self.fast.received + self.slow.received

    @property
    def gaps(self) -> int:
        return self.fast.gaps + self.slow.gaps

    @property
    def dups(self) -> int:
        return self.fast.dups + self.slow.dups

    def summary(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "received": self.received,
            "gaps": self.gaps,
            "dups": self.dups,
            "fast": self.fast.summary(),
            "slow": self.slow.summary(),
            "events": self.events,
            "loadgen_cpu_s": round(self.cpu_s, 3),
        }


class LoadGen:
    """Controller of the worker processes (see module docstring)."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self._rid = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.cpu0 = 0.0
        self.fast = ClassStats()
        self.slow = ClassStats()
        self.cids: list[list[int]] = []

    async def start(self) -> None:
        ctx = mp.get_context("spawn")
        n = self.cfg.n_workers()
        if self.cfg.connections > n * 19_000:
            raise ValueError(f"{self.cfg.connections} connections need more than {n} workers (20k fds each)")
        wcfg = WorkerConfig(
            url=self.cfg.url,
            proto=self.cfg.proto,
            dist=self.cfg.dist,
            deflate=self.cfg.deflate,
            delta=self.cfg.delta,
            slow_share=self.cfg.slow_share,
            slow_rcvbuf=self.cfg.slow_rcvbuf,
            slow_pause_s=self.cfg.slow_pause_s,
            slow_read_s=self.cfg.slow_read_s,
            slow_bps=self.cfg.slow_bps,
            connect_concurrency=self.cfg.connect_concurrency,
            connect_timeout=self.cfg.connect_timeout,
            engine=self.cfg.engine,
        )
        if self.cfg.engine == "c":
            ok, why = native.available()  # build once here, before the workers race to
            if not ok:
                raise RuntimeError(f"compiled engine unavailable ({why}); use --engine py")
        loop = asyncio.get_running_loop()
        for wid in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, wid, wcfg), daemon=True, name=f"loadgen-{wid}")
            p.start()
            child.close()
            self.procs.append(p)
            self.pipes.append(parent)
            loop.add_reader(parent.fileno(), self._on_reply, parent)
        # Interleave client ids over workers so slow readers and subjects
        # spread evenly.
        self.cids = [list(range(w, self.cfg.connections, n)) for w in range(n)]

    def _on_reply(self, pipe: Any) -> None:
        try:
            rid, result = pipe.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            for f in self._waiting.values():
                if not f.done():
                    f.set_exception(RuntimeError("a load-generator worker died"))
            return
        f = self._waiting.pop(rid, None)
        if f is not None and not f.done():
            f.set_result(result)

    async def _call(self, wid: int, name: str, timeout: float, **args: Any) -> Any:
        self._rid += 1
        rid = self._rid
        f = asyncio.get_running_loop().create_future()
        self._waiting[rid] = f
        self.pipes[wid].send((rid, name, args))
        try:
            async with asyncio.timeout(timeout):
                result = await f
        finally:
            self._waiting.pop(rid, None)
        if isinstance(result, dict) and "error" in result and "trace" in result:
            raise RuntimeError(f"worker {wid}: {result['error']}\n{result['trace']}")
        return result

    async def _all(self, name: str, timeout: float, per_worker: list[dict[str, Any]] | None = None) -> list[Any]:
        return await asyncio.gather(
            *(self._call(w, name, timeout, **(per_worker[w] if per_worker else {})) for w in range(len(self.pipes)))
        )

    async def connect(self, timeout: float = 300.0) -> dict[str, Any]:
        """Open every connection; returns ok/failed counts and the time taken."""
        t0 = time.monotonic()
        res = await self._all("connect", timeout, [{"cids": c} for c in self.cids])
        return {
            "ok": sum(r["ok"] for r in res),
            "failed": sum(r["failed"] for r in res),
            "elapsed": time.monotonic() - t0,
        }

    async def reset(self) -> None:
        """Zero every counter (start of a measurement window)."""
        res = await self._all("reset", 30.0)
        self.cpu0 = sum(r["cpu"] for r in res)
        self.fast = ClassStats()
        self.slow = ClassStats()

    async def stats(self) -> Snapshot:
        res = await self._all("stats", 30.0)
        interval = np.zeros(H_BUCKETS, dtype=np.int64)
        events: dict[str, int] = {}
        for name, acc in (("fast", self.fast), ("slow", self.slow)):
            acc.received = sum(r[name]["received"] for r in res)
            acc.gaps = sum(r[name]["gaps"] for r in res)
            acc.dups = sum(r[name]["dups"] for r in res)
            acc.bytes = sum(r[name]["bytes"] for r in res)
            acc.clients = sum(r["n_" + name] for r in res)
            for r in res:
                if r[name]["hist"] is not None:
                    h = np.frombuffer(r[name]["hist"], dtype=np.int64)
                    acc.hist += h
                    if name == "fast":
                        interval += h
        for r in res:
            for k, v in r["events"].items():
                events[k] = events.get(k, 0) + v
        return Snapshot(
            t=time.monotonic(),
            open=sum(r["open"] for r in res),
            fast=self.fast,
            slow=self.slow,
            interval_hist=interval,
            events=events,
            cpu_s=sum(r["cpu"] for r in res) - self.cpu0,
        )

    async def storm(self, pct: float, seed: int = 0) -> dict[str, Any]:
        """Close ``pct`` % of connections at once and reconnect them."""
        res = await self._all("storm", 300.0, [{"pct": pct, "seed": seed}] * len(self.pipes))
        times = sorted(t for r in res for t in r["times"])

        def q(p: float) -> float | None:
            return round(times[min(len(times) - 1, int(p * len(times)))] * 1000, 1) if times else None

        return {
            "closed": sum(r["closed"] for r in res),
            "reconnected": sum(r["reconnected"] for r in res),
            "failed": sum(r["failed"] for r in res),
            "elapsed_s": round(max(r["elapsed"] for r in res), 3),
            "reconnect_p50_ms": q(0.5),
            "reconnect_p99_ms": q(0.99),
        }

    async def heartbeat(self) -> None:
        await self._all("heartbeat", 30.0)

    async def stop(self) -> float:
        """Close every connection, end the workers; returns their CPU since reset."""
        cpu = 0.0
        try:
            res = await self._all("stop", 30.0)
            cpu = sum(r["cpu"] for r in res) - self.cpu0
        except Exception:
            pass
        loop = asyncio.get_running_loop()
        for pipe in self.pipes:
            try:
                loop.remove_reader(pipe.fileno())
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        return cpu

    def expected(self, per_subject: dict[str, int], slow: bool = False) -> int:
        """Deliveries owed to the fast (or slow) clients for what was published
        (``per_subject``: messages sent per subject), per the distribution."""
        ids = [c for c in range(self.cfg.connections) if is_slow(c, self.cfg.slow_share) == slow]
        subs = self.cfg.dist.subscribers_per_subject(ids)
        return sum(n * subs.get(s, 0) for s, n in per_subject.items())


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --- command line: the sustained load test ----------------------------------
def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Hold N WebSocket connections for a duration, with a live progress line "
        "(env TARGET_CONNECTIONS, DURATION, WS_URL; flags override).",
    )
    p.add_argument("--url", default=_env("WS_URL", "ws://127.0.0.1:3004/ws"))
    p.add_argument("-n", "--connections", type=int, default=int(_env("TARGET_CONNECTIONS", "1000")))
    p.add_argument("-d", "--duration", type=float, default=float(_env("DURATION", "30")))
    p.add_argument("--proto", choices=("fanout", "nats"), default="fanout")
    p.add_argument("--dist", choices=DISTS, default="hot")
    p.add_argument("--subjects", type=int, default=1000, help="M subjects (spread/wildcard)")
    p.add_argument("--per-client", type=int, default=10, help="K subjects per client (spread)")
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    p.add_argument("--delta", action="store_true", help="subscribe with delta: \"fossil\" (fanout proto; the "
                   "engine checks seq on delta frames and reads latency only from full ones)")
    p.add_argument("--slow-share", type=float, default=0.0, help="share of slow readers, 0..1")
    p.add_argument("--slow-rcvbuf", type=int, default=4096)
    p.add_argument("--slow-pause", type=float, default=2.0)
    p.add_argument("--slow-read", type=float, default=0.25)
    p.add_argument("--slow-bps", type=int, default=0,
                   help="slow readers read this many bytes/s, steadily (C engine), instead of pausing")
    p.add_argument("--engine", choices=("c", "py"), default=_env("LOADGEN_ENGINE", "c"),
                   help="receive engine: compiled (default) or pure Python")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--per-worker", type=int, default=5000)
    p.add_argument(
        "--publish-url",
        default=_env("PUBLISH_URL", ""),
        help="http://host:port of the publish endpoint (fanout/python peer) or nats://host:port; "
        "default: the ops port 3002 on the WS host when --publish-rate > 0",
    )
    p.add_argument("--publish-rate", type=float, default=float(_env("PUBLISH_RATE", "0")), help="msg/s; 0 = passive")
    p.add_argument("--payload-size", type=int, default=200)
    p.add_argument("--payload", choices=("pad", "token"), default="pad",
                   help="pad: {t,i,p:xxx} of --payload-size; token: the plan's token updates (~700 B, ten fields change)")
    p.add_argument("--storm-pct", type=float, default=0.0, help="reconnect storm: close and reopen this %% ...")
    p.add_argument("--storm-every", type=float, default=0.0, help="... every this many seconds")
    p.add_argument("--heartbeat-every", type=float, default=0.0, help="send heartbeat frames (fanout proto)")
    p.add_argument("--json", default="", help="write the summary as JSON to this file")
    p.add_argument("--no-progress", action="store_true")
    return p


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.1f}ms" if v < 100 else f"{v / 1000:.2f}s")


async def sustained(args: argparse.Namespace) -> dict[str, Any]:
    from .publisher import HttpPublisher, NatsPublisher, run_rate

    raise_nofile()
    cfg = LoadConfig(
        url=args.url,
        connections=args.connections,
        proto=args.proto,
        dist=Distribution(args.dist, args.subjects, args.per_client),
        deflate=args.deflate,
        delta=args.delta,
        slow_share=args.slow_share,
        slow_rcvbuf=args.slow_rcvbuf,
        slow_pause_s=args.slow_pause,
        slow_read_s=args.slow_read,
        slow_bps=args.slow_bps,
        workers=args.workers,
        per_worker=args.per_worker,
        engine=args.engine,
    )
    tty = not args.no_progress

    def line(s: str) -> None:
        if tty:
            sys.stderr.write("\r" + s[:160].ljust(100))
            sys.stderr.flush()

    lg = LoadGen(cfg)
    await lg.start()
    out: dict[str, Any] = {"config": {**asdict(cfg), "dist": asdict(cfg.dist)}, "duration_s": args.duration}
    try:
        t0 = time.monotonic()
        conn_task = asyncio.ensure_future(lg.connect())
        while not conn_task.done():  # progress while connecting, bounded by connect()'s timeout
            await asyncio.wait([conn_task], timeout=1.0)
            snap = await lg.stats()
            line(f"[connect {time.monotonic() - t0:5.1f}s] open {snap.open}/{cfg.connections}")
        out["connect"] = conn_task.result()
        await lg.reset()

        pub = None
        pub_task = None
        if args.publish_rate > 0:
            purl = args.publish_url or f"http://{urlsplit(args.url).hostname}:3002"
            pub = NatsPublisher(purl) if purl.startswith("nats://") else HttpPublisher(purl)
            await pub.connect()
            pub_task = asyncio.ensure_future(
                run_rate(pub, cfg.dist.publish_subjects(), args.publish_rate, args.duration, args.payload_size,
                         payload=args.payload)
            )
        start = time.monotonic()
        last_recv, last_t = 0, start
        next_storm = start + args.storm_every if args.storm_pct > 0 and args.storm_every > 0 else math.inf
        next_hb = start + args.heartbeat_every if args.heartbeat_every > 0 else math.inf
        storms: list[dict[str, Any]] = []
        cpu_c0 = self_cpu()
        while (now := time.monotonic()) < start + args.duration:
            await asyncio.sleep(min(1.0, start + args.duration - now))
            now = time.monotonic()
            if now >= next_storm:
                storms.append(await lg.storm(args.storm_pct, seed=len(storms)))
                next_storm = time.monotonic() + args.storm_every
            if now >= next_hb:
                await lg.heartbeat()
                next_hb = now + args.heartbeat_every
            snap = await lg.stats()
            rate = (snap.received - last_recv) / max(1e-9, snap.t - last_t)
            last_recv, last_t = snap.received, snap.t
            iv = summarize_hist(snap.interval_hist)
            cpu_pct = 100 * snap.cpu_s / max(1e-9, snap.t - start)
            line(
                f"[{snap.t - start:6.1f}s] open {snap.open}/{cfg.connections} recv {snap.received} "
                f"({rate / 1000:.1f}k/s) gaps {snap.gaps} dups {snap.dups} "
                f"p50 {_fmt_ms(iv['p50_ms'])} p99 {_fmt_ms(iv['p99_ms'])} lg-cpu {cpu_pct:.0f}%"
            )
        publish = None
        if pub_task is not None and pub is not None:
            pres = await pub_task
            await asyncio.sleep(1.0)  # let the last messages arrive (bounded)
            await pub.close()
            publish = {"sent": pres.sent, "rate": round(pres.rate, 1), "max_lag_s": round(pres.max_lag_s, 3),
                       "errors": pres.errors}
            publish["expected_fast"] = lg.expected(pres.per_subject, slow=False)
        snap = await lg.stats()
        elapsed = time.monotonic() - start
        out.update(snap.summary())
        out["elapsed_s"] = round(elapsed, 2)
        out["received_per_s"] = round(snap.received / elapsed, 1)
        out["publisher_cpu_s"] = round(self_cpu() - cpu_c0, 3)
        if publish:
            out["publish"] = publish
        if storms:
            out["storms"] = storms
    finally:
        out["loadgen_cpu_total_s"] = round(await lg.stop(), 3)
    if tty:
        sys.stderr.write("\n")
    return out


def print_summary(s: dict[str, Any]) -> None:
    f = s.get("fast", {})
    print("== summary ==")
    print(f"connections held : {s.get('open')} of {s['config']['connections']} "
          f"(connect: {s.get('connect', {}).get('ok')} ok, {s.get('connect', {}).get('failed')} failed, "
          f"{s.get('connect', {}).get('elapsed', 0):.1f}s)")
    print(f"messages received: {s.get('received')} ({s.get('received_per_s')}/s over {s.get('elapsed_s')}s)")
    print(f"gaps / dups      : {s.get('gaps')} / {s.get('dups')}")
    print(f"latency (fast)   : p50 {_fmt_ms(f.get('p50_ms'))}  p99 {_fmt_ms(f.get('p99_ms'))}  "
          f"p99.9 {_fmt_ms(f.get('p999_ms'))}  max {_fmt_ms(f.get('max_ms'))}")
    sl = s.get("slow", {})
    if sl.get("clients") or sl.get("received"):
        print(f"latency (slow)   : p50 {_fmt_ms(sl.get('p50_ms'))}  p99 {_fmt_ms(sl.get('p99_ms'))}  "
              f"({sl.get('clients')} slow clients still open, {sl.get('received')} msgs)")
    if "publish" in s:
        p = s["publish"]
        print(f"published        : {p['sent']} at {p['rate']}/s (max lag {p['max_lag_s']}s, errors {p['errors']}); "
              f"owed to fast clients {p['expected_fast']}, got {f.get('received')}")
    for st in s.get("storms", []):
        print(f"storm            : {st}")
    print(f"events           : {s.get('events')}")
    print(f"loadgen CPU      : {s.get('loadgen_cpu_total_s')}s workers + {s.get('publisher_cpu_s')}s controller")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = asyncio.run(sustained(args))
    print_summary(s)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(s, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
