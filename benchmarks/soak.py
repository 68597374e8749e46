"""Soak test: a real node under every kind of churn at once, its memory and
per-client state sampled over time (issue 19).

    python -m benchmarks.soak --duration SECONDS [--mode embedded|jetstream] [--out DIR]

Load, all of it at once, for ``--duration`` seconds after a warm-up:

- The project's load generator (:mod:`benchmarks.loadgen`: worker processes,
  compiled receive engine) holds ``--connections`` clients on the
  ``spread`` distribution, checking every frame's ``seq`` (gaps, dups); a
  share of them are slow readers (small receive buffer, pause/read cycles)
  that get throttled and recover; every ``--storm-every`` seconds
  ``--storm-pct`` % of them are aborted (reset, no close frame) and reconnect.
- ``--churners`` clients on :class:`fanout.client.Client` (the project's
  Python client) loop: connect, subscribe to random subjects among
  ``--subjects`` (default 50,000) plus wildcard patterns, some with
  ``snapshot: true``, unsubscribe some, ask for a replay, and leave; half of
  them by an abrupt reset after which the client resumes, the others close.
  Their tokens expire every ``--token-ttl`` seconds and are refreshed on the
  open connection (the node runs with ``WS_AUTH_SECRET``).
- Stopped readers: a few raw sockets subscribe to every churn subject
  (``odin.global.>``) and never read; 60 s later the node must have closed
  them. Then the next few.
- A publisher over both subject sets; in JetStream mode through NATS, and a
  NATS restart (SIGKILL, same store) every ``--nats-restart-every`` seconds.

The warm-up publishes every subject once (so the history and snapshot stores
are full before measuring), opens the load, publishes enough on its subjects
to fill every client's replay ring (a bounded store: see README "Memory"),
and lets it settle for ``--settle`` seconds.

Samples every ``--interval`` seconds go to ``soak.jsonl`` in ``--out``: RSS,
RssAnon, USS, fds and threads of the node (``/proc``, psutil); every
``fanout_store_*`` gauge, ``fanout_asyncio_tasks``, the core counters and the
loop lag (scraped from ``/metrics``); the load generator's delivery p99 for
the interval. At the end: the node's tracemalloc top growth by line
(``FANOUT_TRACEMALLOC=1``, ``GET /debug/tracemalloc``), ``soak.png`` (a plot
over time) and one summary line. With ``--tracemalloc`` the node traces its
Python allocations (``FANOUT_TRACEMALLOC=1``) and the summary lists its top
growth by line (``GET /debug/tracemalloc``); it slows the node several times,
so it is off by default. The growth is measured over the load phase (from
its first sample to its last, before the clients leave).

Exit status 1 when a bound is broken:

- RssAnon, from the end of the warm-up to the end of the load, grows more
  than 8 MiB, or (over a load window of 20 minutes or more: below that the
  stores' own swings are larger than the bound) more than 1 % per 10
  minutes by a least-squares slope; the summary also gives the slope of
  RssAnon less the bytes the gauged stores hold ("unaccounted");
- after every client left, fds, asyncio tasks, patterns or any per-client
  gauge (sessions, catch-ups, throttled, queued bytes, messages held...) are
  not back at the baseline taken before the first client came;
- any message was lost or duplicated for a client that checks ``seq`` (the
  load generator's gaps and dups, and the Python clients' unrecoverable
  ranges).

Only 127.0.0.1 is used; every loop and wait is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import psutil

from fanout.client import Client

from .common import Distribution, make_payload, percentile_ms, subject_name
from .loadgen import LoadConfig, LoadGen
from .publisher import HttpPublisher, NatsPublisher
from .wsclient import OP_TEXT, Url, client_frame, handshake_request, parse_handshake_response

SECRET = "soak-secret-not-for-production-0123456789abcdef"
MIB = 1 << 20
# Gauges of per-client state: back to their baseline once every client left.
#: A stopped reader must be closed this long after it subscribed: the time its
#: queue takes to pass WS_CLIENT_QUEUE_BYTES at the churn rate, three raise
#: windows and the grace, with room for a loaded box.
STOPPED_JUDGE_S = 60.0

PER_CLIENT = ("fanout_store_patterns", "fanout_store_sessions", "fanout_store_catchups",
              "fanout_store_throttled_clients", "fanout_store_watched_clients", "fanout_store_queued_bytes",
              "fanout_store_client_buffer_bytes", "fanout_store_messages",
              "fanout_store_users", "fanout_store_recipient_set_bytes", "fanout_connections", "fanout_asyncio_tasks")
# Gauges of bytes held by bounded stores (subtracted from RssAnon for the
# "unaccounted" series).
STORE_BYTES = ("fanout_store_message_bytes", "fanout_store_queued_bytes", "fanout_store_history_bytes",
               "fanout_store_snapshot_bytes", "fanout_store_recipient_set_bytes", "fanout_store_client_buffer_bytes")
# The 1 %-per-10-minutes slope is judged over load windows at least this long:
# over shorter ones the stores' own swings (queues, rings, history expiring by
# age: about +-1 MiB here) are larger than 1 % of RssAnon per 10 minutes.
SLOPE_WINDOW = 1200
_METRIC = re.compile(r"^(fanout_[a-z_]+|ws_[a-z_]+|process_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(sub: str, ttl: float) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


def churn_subject(j: int) -> str:
    """The j-th of the churn subjects: odin.global.g<a>.k<b>, 200 per group."""
    return f"odin.global.g{j // 200}.k{j % 200}"


# ----------------------------------------------------------------- the node
@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    ws_port: int
    ops_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, timeout: float = 10.0) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}{path}", timeout=timeout) as r:
            return bytes(r.read())

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.get("/metrics").decode().splitlines():
            m = _METRIC.match(line)
            if m and not m.group(2):
                out[m.group(1)] = float(m.group(3))
            elif m and m.group(1).endswith("_bucket") is False and m.group(2):
                key = m.group(1) + m.group(2)
                out[key] = float(m.group(3))
        return out


def start_node(args: argparse.Namespace, out: Path, nats_url: str) -> Node:
    ws, ops = free_port(), free_port()
    env = dict(os.environ)
    env.update({
        "WS_HOST": "127.0.0.1", "HEALTH_HOST": "127.0.0.1", "WS_PORT": str(ws), "HEALTH_PORT": str(ops),
        "WS_MAX_CONNECTIONS": str(args.max_connections), "WS_FLUSH_THREADS": str(args.flush_threads),
        "WS_AUTH_SECRET": SECRET, "WS_MAX_CONNECTIONS_PER_USER": "0",
        # The brake would refuse handshakes on this shared, busy box; the soak
        # measures memory at a fixed load, so keep the load fixed.
        "WS_CPU_REJECT_THRESHOLD": "0", "WS_CPU_THROTTLE_THRESHOLD": "0", "WS_MAX_LOOP_LAG_MS": "0",
        "FANOUT_TRACEMALLOC": "1" if args.tracemalloc else "0", "LOG_LEVEL": "warning",
        "NATS_URL": nats_url,
    })
    log = out / "node.log"
    proc = subprocess.Popen([sys.executable, "-m", "fanout", "serve"], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    node = Node(proc, ws, ops, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"node exited with {proc.returncode}; see {log}")
        try:
            if json.loads(node.get("/ready", 2)).get("ready"):
                return node
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"node not ready in 60 s; see {log}")


class Nats:
    """A nats-server (tests/helpers/nats_server.py) that the soak restarts."""

    def __init__(self, store: str) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.helpers.nats_server import NatsServer
        self.server = NatsServer(store)
        self.server.start()

    @property
    def url(self) -> str:
        return str(self.server.url)

    def restart(self) -> None:
        self.server.kill()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


# ------------------------------------------------------------- the sampler
def proc_sample(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0]) * (1024 if k != "Threads" else 1)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    try:
        out["uss"] = psutil.Process(pid).memory_full_info().uss
    except (psutil.Error, OSError):
        pass
    return out


@dataclass
class Sampler:
    node: Node
    path: Path
    lg: LoadGen | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "start"

    async def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": time.time(), "phase": self.phase, **proc_sample(self.node.pid)}
        try:
            m = await asyncio.to_thread(self.node.metrics)
            row.update({k: v for k, v in m.items() if "_bucket" not in k})
        except OSError as e:
            row["scrape_error"] = str(e)
        if self.lg is not None and self.lg.procs:
            try:
                snap = await self.lg.stats()
                row["lg_open"] = snap.open
                row["lg_gaps"], row["lg_dups"] = snap.gaps, snap.dups
                row["lg_received"] = snap.received
                row["delivery_p99_ms"] = percentile_ms(snap.interval_hist, 0.99) if snap.interval_hist.sum() else None
            except (RuntimeError, TimeoutError) as e:
                row["lg_error"] = str(e)
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


# ----------------------------------------------------------------- the load
@dataclass
class Tally:
    sessions: int = 0
    resets: int = 0
    subscribes: int = 0
    unsubscribes: int = 0
    snapshots: int = 0
    replays: int = 0
    refreshes: int = 0
    received: int = 0
    missing: int = 0
    errors: int = 0
    stopped_opened: int = 0
    stopped_closed: int = 0
    stopped_open_after: int = 0
    stopped_unjudged: int = 0
    published: int = 0
    nats_restarts: int = 0


WILD = ("odin.global.g{a}.*", "odin.global.*.k{b}")


async def churner(cid: int, url: str, args: argparse.Namespace, stop: asyncio.Event, tally: Tally) -> None:
    rnd = random.Random(cid)
    sub = f"churn-{cid}"
    while not stop.is_set():
        client = Client(url, token=lambda: token(sub, args.token_ttl), refresh_before=args.token_ttl / 2,
                        on_refreshed=lambda _exp: setattr(tally, "refreshes", tally.refreshes + 1),
                        reconnect_min=0.1, reconnect_max=2.0, heartbeat_interval=5.0, max_queue=4096)

        async def consume(c: Client = client) -> None:
            async for _msg in c:
                tally.received += 1

        reader: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(60):
                await client.start()
                reader = asyncio.create_task(consume())
                chans = [churn_subject(rnd.randrange(args.subjects)) for _ in range(rnd.randint(5, 40))]
                chans.append(WILD[rnd.randrange(2)].format(a=rnd.randrange(max(1, args.subjects // 200)),
                                                          b=rnd.randrange(200)))
                await client.subscribe(chans, snapshot=rnd.random() < 0.3)
                tally.subscribes += len(chans)
                tally.sessions += 1
                for _ in range(rnd.randint(1, 4)):
                    await asyncio.sleep(rnd.uniform(0.5, 3.0))
                    drop = rnd.sample(chans, max(1, len(chans) // 3))
                    await client.unsubscribe(drop)
                    tally.unsubscribes += len(drop)
                    chans = [c for c in chans if c not in drop]
                    more = [churn_subject(rnd.randrange(args.subjects)) for _ in range(rnd.randint(3, 15))]
                    snap = rnd.random() < 0.3
                    await client.subscribe(more, snapshot=snap)
                    tally.snapshots += snap
                    tally.subscribes += len(more)
                    chans += more
                    if rnd.random() < 0.5:
                        await client.replay(1, 5)
                        tally.replays += 1
                if cid % 2 == 0:
                    # An abrupt reset: the client reconnects and resumes.
                    ws = client.connection
                    if ws is not None and ws.transport is not None:
                        ws.transport.abort()
                        tally.resets += 1
                        await asyncio.sleep(rnd.uniform(1.0, 3.0))
                tally.missing += sum(b - a + 1 for a, b in client.missing)
        except (TimeoutError, OSError, Exception) as e:   # counted: the soak goes on
            tally.errors += 1
            if args.verbose:
                print(f"churner {cid}: {e!r}", file=sys.stderr)
        finally:
            await client.aclose()
            if reader is not None:
                reader.cancel()
        await asyncio.sleep(rnd.uniform(0.1, 1.0))


async def stopped_readers(url: str, args: argparse.Namespace, stop: asyncio.Event, tally: Tally) -> None:
    """A few clients that subscribe to a busy subject and never read: the node
    must close them (throttle, then 1008). Checked STOPPED_JUDGE_S after they
    subscribed; a batch the end of the load cuts short is closed or not
    judged (its queue may never have reached the limit)."""
    u = Url.parse(url + ("&" if "?" in url else "?") + "auth=" + token("stopped", 3600))
    while not stop.is_set():
        socks = []
        for _ in range(3):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            try:
                s.connect((u.host, u.port))
                req, key = handshake_request(u, deflate=False)
                s.sendall(req)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise OSError("closed in handshake")
                    buf += chunk
                parse_handshake_response(buf.split(b"\r\n\r\n")[0], key)
                s.sendall(client_frame(OP_TEXT, json.dumps({"type": "subscribe", "channels": ["odin.global.>"]}).encode()))
                socks.append(s)
                tally.stopped_opened += 1
            except Exception:      # refused or failed: counted as not opened
                s.close()
        opened_at = time.monotonic()
        try:
            await asyncio.wait_for(stop.wait(), STOPPED_JUDGE_S)
        except TimeoutError:
            pass
        judged = time.monotonic() - opened_at >= STOPPED_JUDGE_S
        for s in socks:
            # Now read: a closed connection ends (EOF or reset) within a bounded read.
            closed = False
            s.setblocking(False)
            for _ in range(2000):
                try:
                    if not s.recv(1 << 16):
                        closed = True
                        break
                except BlockingIOError:
                    break
                except OSError:
                    closed = True
                    break
            tally.stopped_closed += closed
            if not closed:
                if judged:
                    tally.stopped_open_after += 1
                else:
                    tally.stopped_unjudged += 1
            s.close()


async def publisher(args: argparse.Namespace, pub: Any, stop: asyncio.Event, tally: Tally) -> None:
    i = 0
    tick = 0.05
    per_tick_load = max(1, int(args.rate * tick))
    per_tick_churn = max(1, int(args.churn_rate * tick))
    rnd = random.Random(5)
    while not stop.is_set():
        t0 = time.monotonic()
        for _ in range(per_tick_load):
            pub.publish(subject_name(i % args.load_subjects), make_payload(time.time_ns(), i, args.payload))
            i += 1
        for _ in range(per_tick_churn):
            pub.publish(churn_subject(rnd.randrange(args.subjects)), make_payload(time.time_ns(), i, args.payload))
        tally.published += per_tick_load + per_tick_churn
        await asyncio.sleep(max(0.0, tick - (time.monotonic() - t0)))


async def fill_rings(args: argparse.Namespace, pub: Any) -> None:
    """Once the load's clients are in: publish enough on their subjects that
    every replay ring is full (its bound, WS_REPLAY_BUFFER = 100), so what is
    measured afterwards is steady state, not bounded stores filling."""
    rounds = -(-100 // max(1, args.per_client)) + 1
    for r in range(rounds):
        for j in range(args.load_subjects):
            pub.publish(subject_name(j), make_payload(time.time_ns(), r, args.payload))
        await pub.flush(60)


async def warm_up(args: argparse.Namespace, pub: Any) -> None:
    """Publish every subject once (load and churn sets)."""
    for j in range(args.subjects):
        pub.publish(churn_subject(j), make_payload(time.time_ns(), 0, args.payload))
        if j % 500 == 499:
            await pub.flush(60)
    for j in range(args.load_subjects):
        pub.publish(subject_name(j), make_payload(time.time_ns(), 0, args.payload))
    await pub.flush(60)


# ------------------------------------------------------------------ checks
def slope_per_10min(rows: list[dict[str, Any]], key: str) -> float:
    t = np.array([r["t"] for r in rows], dtype=float)
    y = np.array([r[key] for r in rows], dtype=float)
    if len(t) < 3 or t[-1] - t[0] <= 0:
        return 0.0
    return float(np.polyfit(t - t[0], y, 1)[0] * 600)


def judge(rows: list[dict[str, Any]], baseline: dict[str, Any], final: dict[str, Any], tally: Tally,
          lg_final: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    fails: list[str] = []
    load = [r for r in rows if r["phase"] == "load"]
    info: dict[str, Any] = {}
    if len(load) >= 2:
        a, b = load[0]["RssAnon"], load[-1]["RssAnon"]
        window = load[-1]["t"] - load[0]["t"]
        slope = slope_per_10min(load, "RssAnon")
        info.update(rss_anon_start_mib=round(a / MIB, 1), rss_anon_end_mib=round(b / MIB, 1),
                    rss_anon_growth_mib=round((b - a) / MIB, 2), window_s=round(window),
                    rss_anon_slope_pct_per_10min=round(100 * slope / a, 2))
        # RssAnon less what the gauged stores hold: flat unless something
        # outside every bounded store grows (the leak signal, less noisy).
        for r in load:
            r["unaccounted"] = r["RssAnon"] - sum(r.get(k, 0) for k in STORE_BYTES)
        info["unaccounted_slope_mib_per_10min"] = round(slope_per_10min(load, "unaccounted") / MIB, 2)
        # Where growth would be: live C blocks (a leak, or a store), free
        # blocks kept by malloc (fragmentation), Python objects.
        if "fanout_heap_in_use_bytes" in load[0]:
            info["heap_in_use_slope_mib_per_10min"] = round(slope_per_10min(load, "fanout_heap_in_use_bytes") / MIB, 2)
            info["heap_free_slope_mib_per_10min"] = round(slope_per_10min(load, "fanout_heap_free_bytes") / MIB, 2)
            info["python_blocks_slope_per_10min"] = round(slope_per_10min(load, "fanout_python_allocated_blocks"))
        if b - a > 8 * MIB:
            fails.append(f"RssAnon grew {(b - a) / MIB:.1f} MiB (> 8 MiB)")
        if window >= SLOPE_WINDOW and slope > 0.01 * a:
            fails.append(f"RssAnon grows {100 * slope / a:.2f} % per 10 min (> 1 %)")
    for key in ("fds", *PER_CLIENT):
        if key in baseline and final.get(key) != baseline[key]:
            fails.append(f"{key} {final.get(key)} after the clients left, baseline {baseline[key]}")
    gaps, dups = lg_final.get("gaps", 0), lg_final.get("dups", 0)
    info.update(gaps=gaps, dups=dups, missing=tally.missing)
    if gaps or dups:
        fails.append(f"load generator saw {gaps} gaps and {dups} duplicates")
    if tally.missing:
        fails.append(f"Python clients could not recover {tally.missing} messages")
    if tally.stopped_open_after:
        fails.append(f"{tally.stopped_open_after} stopped readers were not closed")
    return fails, info


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = rows[0]["t"]
    t = [(r["t"] - t0) / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for key in ("VmRSS", "RssAnon", "uss"):
        axes[0].plot(t, [r.get(key, 0) / MIB for r in rows], label=key)
    axes[0].set_ylabel("MiB")
    axes[0].legend()
    for key, lab in (("fds", "fds"), ("fanout_asyncio_tasks", "asyncio tasks"), ("fanout_store_sessions", "sessions"),
                     ("fanout_store_patterns", "patterns")):
        axes[1].plot(t, [r.get(key, 0) for r in rows], label=lab)
    axes[1].legend()
    axes[1].set_yscale("symlog")
    for key, lab in (("fanout_store_routes", "routes"), ("fanout_store_messages", "messages held"),
                     ("fanout_store_history_messages", "history"), ("fanout_store_snapshot_subjects", "snapshot subjects")):
        axes[2].plot(t, [r.get(key, 0) for r in rows], label=lab)
    axes[2].legend()
    axes[2].set_yscale("symlog")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for i in range(1, len(rows)):
            if rows[i]["phase"] != rows[i - 1]["phase"]:
                ax.axvline(t[i], color="grey", lw=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


# -------------------------------------------------------------------- main
async def soak(args: argparse.Namespace) -> int:
    out = Path(args.out or tempfile.mkdtemp(prefix="fanout-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.jsonl").unlink(missing_ok=True)
    nats: Nats | None = None
    store = tempfile.mkdtemp(prefix="soak-nats-")
    if args.mode == "jetstream":
        nats = Nats(store)
    node = start_node(args, out, nats.url if nats else "")
    url = f"ws://127.0.0.1:{node.ws_port}/ws"
    sampler = Sampler(node, out / "soak.jsonl")
    tally = Tally()
    lg: LoadGen | None = None
    pub: Any = NatsPublisher(nats.url) if nats else HttpPublisher(f"http://127.0.0.1:{node.ops_port}")
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    lg_final: dict[str, Any] = {}
    t_start = time.monotonic()
    try:
        await pub.connect()
        sampler.phase = "warmup"
        await warm_up(args, pub)
        await asyncio.sleep(2)
        baseline = await sampler.sample()
        lg = LoadGen(LoadConfig(url=url + "?auth=" + token("load", 10 * 86400), connections=args.connections,
                                dist=Distribution("spread", args.load_subjects, args.per_client),
                                slow_share=args.slow_share, workers=args.workers, engine=args.engine))
        await lg.start()
        sampler.lg = lg
        res = await lg.connect()
        print(f"loadgen: {res['ok']} connected, {res['failed']} failed in {res['elapsed']:.1f} s", flush=True)
        await fill_rings(args, pub)
        tasks.append(asyncio.create_task(publisher(args, pub, stop, tally)))
        for cid in range(args.churners):
            tasks.append(asyncio.create_task(churner(cid, url, args, stop, tally)))
        tasks.append(asyncio.create_task(stopped_readers(url, args, stop, tally)))
        settle = min(args.settle, args.duration / 3)
        t_end = time.monotonic() + settle + args.duration
        next_storm = time.monotonic() + args.storm_every
        next_restart = time.monotonic() + args.nats_restart_every
        await lg.reset()
        while time.monotonic() < t_end:
            phase = "settle" if time.monotonic() < t_end - args.duration else "load"
            if phase == "load" and sampler.phase != "load" and args.tracemalloc:
                await asyncio.to_thread(node.get, "/debug/tracemalloc?reset=1", 60)   # growth from here on
            sampler.phase = phase
            row = await sampler.sample()
            print(f"[{time.monotonic() - t_start:6.0f}s] {row['phase']:6s} rss_anon {row['RssAnon'] / MIB:7.1f} MiB "
                  f"fds {row['fds']:5d} tasks {row.get('fanout_asyncio_tasks', 0):5.0f} "
                  f"routes {row.get('fanout_store_routes', 0):6.0f} patterns {row.get('fanout_store_patterns', 0):6.0f} "
                  f"gaps {row.get('lg_gaps')} p99 {row.get('delivery_p99_ms')} ms", flush=True)
            now = time.monotonic()
            if args.storm_every and now >= next_storm:
                await lg.storm(args.storm_pct, seed=int(now))
                next_storm = now + args.storm_every
            if nats is not None and args.nats_restart_every and now >= next_restart:
                await asyncio.to_thread(nats.restart)
                tally.nats_restarts += 1
                next_restart = now + args.nats_restart_every
            await asyncio.sleep(max(0.0, min(args.interval, t_end - time.monotonic())))
        report: dict[str, Any] = {}
        if args.tracemalloc:
            try:
                report = json.loads(await asyncio.to_thread(node.get, "/debug/tracemalloc", 60))
                (out / "tracemalloc.json").write_text(json.dumps(report, indent=1))
            except OSError as e:
                report = {"error": str(e)}
        # The clients leave.
        sampler.phase = "leave"
        stop.set()
        snap = await lg.stats()
        lg_final = snap.summary()
        await lg.stop()
        sampler.lg = None
        await asyncio.wait(tasks, timeout=90)
        await pub.flush(10)
        # Per-client state must return to the baseline; give closes and the
        # idle sweep a bounded time.
        final: dict[str, Any] = {}
        for _ in range(60):
            await asyncio.sleep(1)
            final = await sampler.sample()
            if all(final.get(k) == baseline.get(k) for k in ("fds", *PER_CLIENT) if k in baseline):
                break
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        if lg is not None and lg.procs:
            await lg.stop()
        await pub.close()
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(30)
        except subprocess.TimeoutExpired:
            node.proc.kill()
        if nats is not None:
            nats.stop()
    fails, info = judge(sampler.rows, baseline, final, tally, lg_final)
    plot(sampler.rows, out / "soak.png", f"fanout soak, {args.mode}, {args.duration:.0f} s")
    summary = {"mode": args.mode, "duration_s": args.duration, "ok": not fails, "fails": fails, **info,
               "tally": tally.__dict__, "received": lg_final.get("received"),
               "tracemalloc_top": report.get("top", [])[:5], "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"soak {args.mode} {args.duration:.0f}s: {'OK' if not fails else 'FAIL'} "
          f"rss_anon {info.get('rss_anon_start_mib')}->{info.get('rss_anon_end_mib')} MiB "
          f"({info.get('rss_anon_slope_pct_per_10min')} %/10min, unaccounted "
          f"{info.get('unaccounted_slope_mib_per_10min')} MiB/10min), gaps {info['gaps']} dups {info['dups']} "
          f"missing {info['missing']}, sessions {tally.sessions} resets {tally.resets} refreshes {tally.refreshes} "
          f"snapshots {tally.snapshots} replays {tally.replays} stopped {tally.stopped_closed}/{tally.stopped_opened} "
          f"nats_restarts {tally.nats_restarts}; {'; '.join(fails)} [{out}]", flush=True)
    return 1 if fails else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=300, help="seconds of load after the warm-up")
    ap.add_argument("--mode", choices=("embedded", "jetstream"), default="embedded")
    ap.add_argument("--out", default="", help="directory for soak.jsonl, soak.png, summary.json (default: a temp dir)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--settle", type=float, default=60.0, help="seconds of load before measuring (at most duration/3)")
    ap.add_argument("--connections", type=int, default=400, help="load-generator connections")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engine", choices=("c", "py"), default="c")
    ap.add_argument("--load-subjects", type=int, default=200)
    ap.add_argument("--per-client", type=int, default=5)
    ap.add_argument("--slow-share", type=float, default=0.05)
    ap.add_argument("--storm-pct", type=float, default=5.0)
    ap.add_argument("--storm-every", type=float, default=10.0)
    ap.add_argument("--churners", type=int, default=30, help="Python clients churning sessions and subscriptions")
    ap.add_argument("--subjects", type=int, default=50000, help="distinct churn subjects")
    ap.add_argument("--rate", type=float, default=100.0, help="msg/s over the load subjects")
    ap.add_argument("--churn-rate", type=float, default=200.0, help="msg/s over the churn subjects")
    ap.add_argument("--payload", type=int, default=200)
    ap.add_argument("--token-ttl", type=float, default=20.0)
    ap.add_argument("--nats-restart-every", type=float, default=120.0)
    ap.add_argument("--max-connections", type=int, default=10000)
    ap.add_argument("--flush-threads", type=int, default=2)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="run the node with FANOUT_TRACEMALLOC=1 and report its top growth by line (slows it several times)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
