"""Side-by-side runner: the same scenarios against fanout, the pure-Python
peer and nats-server's WebSocket listener, in one run.

For each (scenario, peer): start the peer fresh, open the connections, wait
a second idle and read the server's RSS (RSS per connection), zero the
counters, publish at the scenario's rate for ``duration`` seconds, wait for
the deliveries to drain (bounded), then read the server's CPU. Writes
``results.json``, ``results.md`` and PNG plots to ``--out``.

    python -m benchmarks.compare --set quick --duration 8
    python -m benchmarks.compare --scenarios hot-10k,hot-1k --peers fanout,nats
    python -m benchmarks.compare --list
    python -m benchmarks.compare --set flush                  # flush threads and budget, one run
    python -m benchmarks.compare --set scaling --threads 1-8  # a bigger machine: scaling table

Peers: fanout, python, nats, and fanout with flush settings in the name:
fanout-t2 (WS_FLUSH_THREADS=2), fanout-t1-b0 (WS_FLUSH_LATENCY_MS=0).

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from .common import Distribution
from .loadgen import LoadConfig, LoadGen, self_cpu
from .peers.launch import Peer, fanout_counters, fanout_variant_env, make_peer
from .publisher import HttpPublisher, NatsPublisher, run_rate
from .worker import raise_nofile


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    rate: float  # published messages per second
    dist: Distribution = field(default_factory=Distribution)
    size: int = 200
    deflate: bool = False
    slow_share: float = 0.0
    slow_pace: float = 0.35  # slow readers read this share of their stream's bytes, steadily
    group: str = ""  # which plot it belongs to ("conns", "load")

    def slow_bps(self) -> int:
        """Bytes/s a slow reader reads: ``slow_pace`` of what one client of the
        scenario gets (deliveries per client x frame size, ~110 B of envelope).
        0.35 is below level 2's 50 % and above level 3's 25 %: really throttled,
        held at the heaviest levels, not closed."""
        if not self.slow_share:
            return 0
        return int(self.slow_pace * self.offered() / self.connections * (self.size + 110))

    def offered(self) -> float:
        """Deliveries per second offered (rate x subscribers per message)."""
        subs = self.dist.subscribers_per_subject(range(self.connections))
        per_msg = sum(subs.values()) / max(1, len(subs))
        return self.rate * per_msg


HOT = Distribution("hot")
SPREAD = Distribution("spread", subjects=1000, per_client=10)
WILD = Distribution("wildcard", subjects=100)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    # Connections axis at ~300k deliveries/s offered (CPU vs connections);
    # hot-1k is the target (b), hot-10k its target (a).
    Scenario("hot-1k", 1000, 300, HOT, group="conns"),
    Scenario("hot-10k", 10000, 30, HOT, group="conns"),
    # "20k": 19,800, because a process may hold at most 20,000 open files
    # here and a single-process server needs some for itself.
    Scenario("hot-20k", 19800, 15, HOT, group="conns"),
    # One hot subject vs 1,000 subjects (10 per client, 100 subscribers each).
    Scenario("subj1000-10k", 10000, 1000, SPREAD),
    Scenario("wild-2k", 2000, 100, WILD),
    # Payload size.
    Scenario("hot-1k-4k", 1000, 50, HOT, size=4096),
    # At 100k deliveries/s: the reference for compression and slow readers.
    # (Compression is compared at 100k/s, not 300k/s: inflating costs the
    # load generator more than compress-once costs the server, so at 300k/s
    # the load generator, not the server, would be measured.)
    Scenario("hot-1k-100", 1000, 100, HOT),
    Scenario("hot-1k-100-deflate", 1000, 100, HOT, deflate=True),
    Scenario("hot-1k-100-slow1", 1000, 100, HOT, slow_share=0.01),
    Scenario("hot-10k-10", 10000, 10, HOT),
    Scenario("hot-10k-10-deflate", 10000, 10, HOT, deflate=True),
    # Latency vs offered load (2k connections, 50k..300k deliveries/s).
    *[Scenario(f"load-2k-{r}", 2000, r, HOT, group="load") for r in (25, 50, 100, 150)],
]}

SETS = {
    "quick": ["hot-1k-100", "hot-1k-100-deflate", "hot-1k-100-slow1", "wild-2k"],
    "full": ["hot-1k", "hot-10k", "hot-20k", "subj1000-10k", "wild-2k", "hot-1k-4k", "hot-1k-100",
             "hot-1k-100-deflate", "hot-1k-100-slow1", "hot-10k-10", "hot-10k-10-deflate"],
    "targets": ["hot-10k", "hot-1k", "hot-1k-100", "hot-1k-100-deflate"],
    "sweep": ["load-2k-25", "load-2k-50", "load-2k-100", "load-2k-150"],
    # Issue 12's rows: 1 vs 2 flush threads, budget 0 vs default, in one run.
    "flush": ["hot-10k", "hot-1k", "subj1000-10k"],
    # With --threads 1-N on a bigger host: CPU and latency against threads.
    "scaling": ["hot-10k", "hot-20k", "subj1000-10k"],
}
SETS["all"] = SETS["full"] + SETS["sweep"]
# Peers a set runs when --peers is not given.
SET_PEERS = {
    "flush": "fanout-t1,fanout-t2,fanout-t1-b0,fanout-t2-b0,nats",
    "scaling": "fanout",
}
DEFAULT_PEERS = "fanout,python,nats"


def expand_threads(peers: list[str], spec: str) -> list[str]:
    """``--threads 1-8`` or ``1,2,4``: each plain ``fanout`` peer becomes
    fanout-t1, fanout-t2, ... (one row per thread count)."""
    if not spec:
        return peers
    counts: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        counts += list(range(int(lo), int(hi or lo) + 1))
    out: list[str] = []
    for p in peers:
        out += [f"{p}-t{n}" for n in counts] if p == "fanout" else [p]
    return out


def machine_busy() -> tuple[float, float]:
    """CPU-seconds the whole machine has been busy (all cores, not
    idle/iowait), and the part of it spent in softirq (on loopback, mostly
    TCP receive processing)."""
    t = psutil.cpu_times()
    softirq = getattr(t, "softirq", 0.0)
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + softirq + getattr(t, "steal", 0), softirq


def _r(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(v, nd)


async def run_scenario(peer: Peer, sc: Scenario, duration: float, *, engine: str = "c",
                       drain_max: float = 8.0, log: Any = print) -> dict[str, Any]:
    """Run one scenario against an already started peer; returns one result row."""
    row: dict[str, Any] = {"peer": peer.name, "scenario": sc.name, "connections": sc.connections,
                           "rate": sc.rate, "size": sc.size, "deflate": sc.deflate, "dist": sc.dist.kind,
                           "slow_share": sc.slow_share, "offered_per_s": round(sc.offered())}
    cfg = LoadConfig(url=peer.ws_url, connections=sc.connections, proto=peer.proto, dist=sc.dist,
                     deflate=sc.deflate, slow_share=sc.slow_share, slow_bps=sc.slow_bps(), engine=engine)
    lg = LoadGen(cfg)
    rss0 = peer.rss_bytes()
    await lg.start()
    pub = None
    try:
        con = await lg.connect()
        row["connect_failed"] = con["failed"]
        row["connect_s"] = round(con["elapsed"], 2)
        await asyncio.sleep(1.0)
        snap = await lg.stats()
        row["held_idle"] = snap.open
        row["connect_events"] = snap.events  # failures, deflate negotiated (reset clears them)
        rss1 = peer.rss_bytes()
        row["rss_mb"] = round(rss1 / 2**20, 1)
        row["rss_per_conn_kb"] = round((rss1 - rss0) / max(1, snap.open) / 1024, 1)
        if snap.open == 0:
            raise RuntimeError(f"no connection held ({snap.events})")

        pub = NatsPublisher(peer.publish_url) if peer.proto == "nats" else HttpPublisher(peer.publish_url)
        await pub.connect()
        await lg.reset()
        fc0 = fanout_counters(peer)
        cpu0 = peer.cpu_seconds()
        pcpu0 = self_cpu()
        busy0 = machine_busy()
        t0 = time.monotonic()
        pres = await run_rate(pub, sc.dist.publish_subjects(), sc.rate, duration, sc.size)
        exp_fast = lg.expected(pres.per_subject, slow=False)
        exp_slow = lg.expected(pres.per_subject, slow=True)
        # Drain: until the fast clients have everything, or nothing moved for 1 s.
        last, last_t = -1, time.monotonic()
        deadline = time.monotonic() + drain_max
        while time.monotonic() < deadline:
            snap = await lg.stats()
            if snap.received != last:
                last, last_t = snap.received, time.monotonic()
            elif time.monotonic() - last_t > 1.0:
                break
            if snap.fast.received >= exp_fast and (sc.slow_share == 0 or snap.slow.received >= exp_slow):
                break
            await asyncio.sleep(0.25)
        window = max(1e-9, last_t - t0)
        cpu = peer.cpu_seconds() - cpu0
        fc1 = fanout_counters(peer)
        if fc0 and fc1 and fc1["send_calls"] > fc0["send_calls"]:
            # Frames per sendmsg() (includes pings and control frames: a handful).
            row["frames_per_send"] = round((fc1["deliveries"] - fc0["deliveries"])
                                           / (fc1["send_calls"] - fc0["send_calls"]), 2)
        if fc0 and fc1 and sc.slow_share:
            # What the slow readers caused: throttle level changes, messages dropped, 1008 closes.
            for key in ("level_raises", "throttled_drops", "slow_closed"):
                row[key] = int(fc1.get(key, 0) - fc0.get(key, 0))
        pcpu = self_cpu() - pcpu0
        busy1 = machine_busy()
        busy, softirq = busy1[0] - busy0[0], busy1[1] - busy0[1]
        snap = await lg.stats()
        delivered = snap.received
        f, s = snap.fast.summary(), snap.slow.summary()
        row.update({
            "published": pres.sent,
            "publish_rate": round(pres.rate, 1),
            "publish_max_lag_s": round(pres.max_lag_s, 3),
            "publish_errors": pres.errors,
            "expected_fast": exp_fast,
            "delivered": delivered,
            "delivered_fast": snap.fast.received,
            "complete": snap.fast.received >= exp_fast and snap.fast.gaps == 0,
            "delivered_per_s": round(delivered / window),
            "window_s": round(window, 2),
            "gaps": snap.gaps,
            "dups": snap.dups,
            "p50_ms": _r(f["p50_ms"]), "p99_ms": _r(f["p99_ms"]), "p999_ms": _r(f["p999_ms"]),
            "max_ms": _r(f["max_ms"]),
            "slow_clients": s["clients"], "slow_received": s["received"], "slow_p99_ms": _r(s["p99_ms"]),
            "server_cpu_s": round(cpu, 3),
            "server_cpu_per_M": _r(cpu / delivered * 1e6 if delivered else None),
            "loadgen_cpu_s": round(snap.cpu_s, 3),
            "loadgen_cpu_per_M": _r(snap.cpu_s / delivered * 1e6 if delivered else None),
            "publisher_cpu_s": round(pcpu, 3),
            # Machine CPU in the window that is none of server, load
            # generator or publisher: other jobs on the machine (the row is
            # then noisy) and softirq work in ksoftirqd. Softirq time (mostly
            # loopback TCP) is also given machine-wide; most of it is already
            # inside the processes' CPU, charged to whoever it interrupted.
            "softirq_cpu_s": round(softirq, 3),
            "other_cpu_s": round(busy - cpu - snap.cpu_s - pcpu, 3),
            "held": snap.open,
            "events": snap.events,
        })
    finally:
        if pub is not None:
            try:
                await pub.close()
            except Exception:
                pass
        await lg.stop()
    return row


async def run_one(peer_name: str, sc: Scenario, duration: float, engine: str, log: Any) -> dict[str, Any]:
    peer = make_peer(peer_name)
    try:
        peer.start()
    except Exception as e:
        return {"peer": peer_name, "scenario": sc.name, "error": f"start: {e}"[:500]}
    try:
        return await run_scenario(peer, sc, duration, engine=engine, log=log)
    except Exception as e:
        return {"peer": peer_name, "scenario": sc.name, "error": f"{type(e).__name__}: {e}"[:500],
                "server_log": peer.log_tail(600)}
    finally:
        peer.stop()


# --- output --------------------------------------------------------------------
COLUMNS = [
    ("scenario", "scenario"), ("peer", "peer"), ("connections", "conns"), ("offered_per_s", "offered/s"),
    ("delivered_per_s", "delivered/s"), ("complete", "all delivered"), ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"), ("p999_ms", "p99.9 ms"), ("server_cpu_per_M", "server CPU-s/M"),
    ("loadgen_cpu_per_M", "loadgen CPU-s/M"), ("rss_per_conn_kb", "RSS/conn KiB"), ("held", "held"),
    ("gaps", "gaps"), ("dups", "dups"), ("slow_p99_ms", "slow p99 ms"), ("frames_per_send", "frames/sendmsg"),
    ("other_cpu_s", "other CPU-s"),
]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"Run {meta['started']} on {meta['machine']} ({meta['cores']} cores), {meta['duration_s']} s per "
           "scenario; load generator on the same cores.", ""]
    out.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
    out.append("|" + "---|" * len(COLUMNS))
    for r in rows:
        if "error" in r:
            out.append(f"| {r['scenario']} | {r['peer']} | error: {r['error'][:120].replace('|', '/')} |")
            continue
        cells = []
        for k, _ in COLUMNS:
            v = r.get(k)
            cells.append("yes" if v is True else "NO" if v is False else "-" if v is None else str(v))
        out.append("| " + " | ".join(cells) + " |")
    ratios = ratio_lines(rows)
    if ratios:
        out += ["", "Server CPU per delivery, fanout against the peers (lower is better for fanout):", ""]
        out += [f"- {line}" for line in ratios]
    out += scaling_table(rows)
    return "\n".join(out) + "\n"


def scaling_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per scenario, the fanout-tN rows side by side: CPU per delivery
    against 1 thread (or the fewest threads run), latency, rate."""
    by: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
    for r in rows:
        env = fanout_variant_env(str(r.get("peer", "")))
        if "error" in r or not env or "WS_FLUSH_THREADS" not in env or not r.get("server_cpu_per_M"):
            continue
        by.setdefault(r["scenario"], []).append((int(env["WS_FLUSH_THREADS"]), r["peer"], r))
    out: list[str] = []
    for sc, items in by.items():
        items.sort(key=lambda t: (t[0], t[1]))
        if len(items) < 2:
            continue
        base = items[0][2]["server_cpu_per_M"]
        out += ["", f"Flush threads, {sc}:", "",
                "| peer | threads | delivered/s | all | p50 ms | p99 ms | server CPU-s/M | CPU vs first | frames/sendmsg |",
                "|---|---|---|---|---|---|---|---|---|"]
        for n, name, r in items:
            out.append(f"| {name} | {n} | {r['delivered_per_s']} | {'yes' if r['complete'] else 'NO'} | {r['p50_ms']} | "
                       f"{r['p99_ms']} | {r['server_cpu_per_M']} | {r['server_cpu_per_M'] / base:.2f}x | "
                       f"{r.get('frames_per_send', '-')} |")
    return out


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r and r.get("server_cpu_per_M"):
            by.setdefault(r["scenario"], {})[r["peer"]] = r
    lines = []
    for sc, peers in by.items():
        for name, fo in peers.items():
            if not name.startswith("fanout"):
                continue
            parts = [f"{p}: {fo['server_cpu_per_M'] / peers[p]['server_cpu_per_M']:.2f}x"
                     for p in ("nats", "python") if p in peers]
            if parts:
                lines.append(f"{sc}: {name} CPU/delivery = " + ", ".join(parts) + " of the peer's")
    return lines


def plots(rows: list[dict[str, Any]], outdir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = [r for r in rows if "error" not in r]
    peers = sorted({r["peer"] for r in ok})
    load = [r for r in ok if SCENARIOS.get(r["scenario"], Scenario("", 0, 0)).group == "load"]
    if load:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in peers:
            pts = sorted((r["offered_per_s"], r["p99_ms"], r["p50_ms"]) for r in load if r["peer"] == p and r["p99_ms"])
            if pts:
                line, = ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=f"{p} p99")
                ax.plot([x for x, _, _ in pts], [z for _, _, z in pts], marker=".", ls="--", color=line.get_color(),
                        label=f"{p} p50")
        ax.set_xlabel("offered deliveries/s (2k connections, one hot subject, 200 B)")
        ax.set_ylabel("latency, ms (log)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_title("Latency vs offered load")
        fig.tight_layout()
        fig.savefig(outdir / "latency_vs_load.png", dpi=110)
        plt.close(fig)
        made.append("latency_vs_load.png")
    conns = [r for r in ok if SCENARIOS.get(r["scenario"], Scenario("", 0, 0)).group == "conns"]
    if conns:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in peers:
            pts = sorted((r["connections"], r["server_cpu_per_M"]) for r in conns if r["peer"] == p and r["server_cpu_per_M"])
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        lgp = sorted((r["connections"], r["loadgen_cpu_per_M"]) for r in conns if r.get("peer") == "fanout"
                     and r["loadgen_cpu_per_M"])
        if lgp:
            ax.plot([x for x, _ in lgp], [y for _, y in lgp], marker="x", ls=":", color="grey",
                    label="load generator (fanout runs)")
        ax.set_xlabel("connections (one hot subject, ~300k deliveries/s offered)")
        ax.set_ylabel("server CPU-seconds per million deliveries")
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_title("CPU vs connections")
        fig.tight_layout()
        fig.savefig(outdir / "cpu_vs_connections.png", dpi=110)
        plt.close(fig)
        made.append("cpu_vs_connections.png")
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="quick", choices=sorted(SETS), help="named scenario set")
    ap.add_argument("--scenarios", default="", help="comma-separated scenario names (overrides --set)")
    ap.add_argument("--peers", default="", help=f"comma-separated (default: the set's, else {DEFAULT_PEERS}); "
                    "fanout-t<N>-b<ms> sets WS_FLUSH_THREADS / WS_FLUSH_LATENCY_MS")
    ap.add_argument("--threads", default="", help="flush thread counts, e.g. 1-8 or 1,2,4: each plain "
                    "'fanout' peer runs once per count (scaling table)")
    ap.add_argument("--duration", type=float, default=10.0, help="publishing seconds per scenario")
    ap.add_argument("--connections", type=int, default=0, help="override every scenario's connection count")
    ap.add_argument("--engine", choices=("c", "py"), default="c", help="load-generator receive engine")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:18} conns={s.connections:6} rate={s.rate:6} dist={s.dist.kind:8} size={s.size:5} "
                  f"deflate={s.deflate!s:5} slow={s.slow_share} offered={s.offered():,.0f}/s")
        for k, v in SETS.items():
            print(f"set {k}: {','.join(v)}")
        return 0
    names = [n for n in (args.scenarios.split(",") if args.scenarios else SETS[args.set]) if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; see --list")
    peer_spec = args.peers or (SET_PEERS.get(args.set, DEFAULT_PEERS) if not args.scenarios else DEFAULT_PEERS)
    peers = expand_threads([p for p in peer_spec.split(",") if p], args.threads)
    raise_nofile()
    outdir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
            "cores": os.cpu_count(), "duration_s": args.duration, "peers": peers, "scenarios": names,
            "engine": args.engine}
    rows: list[dict[str, Any]] = []
    for n in names:
        sc = SCENARIOS[n]
        if args.connections:
            sc = replace(sc, connections=args.connections)
        for p in peers:
            print(f"== {sc.name} / {p}: {sc.connections} conns, {sc.rate} msg/s, ~{sc.offered():,.0f} deliveries/s offered",
                  flush=True)
            row = asyncio.run(run_one(p, sc, args.duration, args.engine, print))
            rows.append(row)
            if "error" in row:
                print(f"   error: {row['error']}", flush=True)
            else:
                print(f"   delivered {row['delivered_per_s']}/s complete={row['complete']} p50 {row['p50_ms']} "
                      f"p99 {row['p99_ms']} ms  server {row['server_cpu_per_M']} CPU-s/M  loadgen "
                      f"{row['loadgen_cpu_per_M']} CPU-s/M  rss/conn {row['rss_per_conn_kb']} KiB  "
                      f"held {row['held']} gaps {row['gaps']}", flush=True)
            (outdir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    md = markdown(rows, meta)
    (outdir / "results.md").write_text(md)
    made = plots(rows, outdir)
    print()
    print(md)
    print(f"wrote {outdir}/results.json, results.md" + (", " + ", ".join(made) if made else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
