"""A/B runs of the node under the same load, alternating, in one run.

Each variant is a checkout (a directory holding ``fanout/`` and a built
``fanout_core``) plus env vars for the node and extra load-generator flags.
Rounds alternate A, B, A, B... so drift on a shared machine hits both alike;
the table gives the median of each and the B/A ratios. Node CPU is measured
from psutil between "every connection is open" and the load generator's exit,
so handshake cost stays out of the per-delivery figure.

Presets (``--preset``), the numbers quoted in the closing notes:

- ``refactor``: a checkout of the code before a change (``--a-dir``) against
  this one, 10k connections, 30 msg/s on one hot subject;
- ``throttle-cost``: ``WS_THROTTLE_ENABLED`` false vs true, nobody slow;
- ``guard-cost``: the resource guard's brakes and shedding off vs the defaults;
- ``slow-readers``: 10k connections without and with 1 % slow readers (the
  fast clients' p99 is the figure);
- ``sndbuf``: ``WS_SOCKET_SNDBUF=0`` (kernel autotuning) vs the default, at
  ``--connections`` (run it with 1000 and 10000).
- ``delta-cost``: deflate (today) vs deflate + deltas (PROTOCOL 1.2) on the
  plan's token updates (``--payload token``, 30 subjects, every client on
  ``odin.token.*.update``): node CPU per delivery, issue 20's 1.10x bound.

Bounded: every run has a duration, every wait a deadline; 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .peers.launch import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Variant:
    name: str
    checkout: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)
    loadgen: list[str] = field(default_factory=list)


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def run_once(v: Variant, connections: int, rate: float, duration: float, extra: list[str]) -> dict[str, Any]:
    ws, ops = free_port(), free_port()
    env = {**os.environ, "WS_HOST": "127.0.0.1", "WS_PORT": str(ws), "HEALTH_HOST": "127.0.0.1",
           "HEALTH_PORT": str(ops), "WS_MAX_CONNECTIONS": str(connections + 500), "LOG_LEVEL": "warning",
           "PYTHONPATH": str(v.checkout), **v.env}
    node = subprocess.Popen([sys.executable, "-m", "fanout", "serve"], cwd=v.checkout, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if _get(f"http://127.0.0.1:{ops}/ready").get("ready"):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline or node.poll() is not None:
                raise RuntimeError(f"{v.name}: node did not become ready")
            time.sleep(0.1)
        out = tempfile.mktemp(suffix=".json")
        lg = subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", "--url", f"ws://127.0.0.1:{ws}/ws",
                               "-n", str(connections), "-d", str(duration), "--publish-rate", str(rate),
                               "--publish-url", f"http://127.0.0.1:{ops}", "--no-progress", "--json", out,
                               *extra, *v.loadgen],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = psutil.Process(node.pid)
        deadline = time.monotonic() + 120
        cpu0 = None
        while lg.poll() is None:
            if cpu0 is None:
                try:
                    if _get(f"http://127.0.0.1:{ops}/health").get("connections", 0) >= connections:
                        t = proc.cpu_times()
                        cpu0 = t.user + t.system
                except Exception:
                    pass
            if time.monotonic() > deadline:
                lg.kill()
                raise RuntimeError(f"{v.name}: load generator did not finish")
            time.sleep(0.05)
        t = proc.cpu_times()
        cpu = t.user + t.system - (cpu0 if cpu0 is not None else 0.0)
        counters = _counters(ops)
        with open(out) as fh:
            s = json.load(fh)
        os.unlink(out)
    finally:
        node.terminate()
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
    fast = s.get("fast", {})
    received = s.get("received", 0)
    expected = s.get("publish", {}).get("expected_fast", 0)
    return {"cpu_s": round(cpu, 3), "received": received,
            "cpu_s_per_m": round(cpu / max(1, received) * 1e6, 3),
            "p50_ms": fast.get("p50_ms"), "p99_ms": fast.get("p99_ms"),
            "fast_received": fast.get("received"), "fast_expected": expected,
            "gaps": s.get("gaps"), "dups": s.get("dups"), "open": s.get("open"), **counters}


def _counters(ops: int) -> dict[str, int]:
    """What throttling did over the run: level changes (up and down), drops, 1008 closes."""
    want = {"fanout_throttle_raises_total": "level_raises", "fanout_throttled_drops_total": "throttled_drops",
            "fanout_slow_clients_total": "slow_closed"}
    out = {v: 0 for v in want.values()}
    out["level_changes"] = 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                name, _, value = line.partition(" ")
                if name in want:
                    out[want[name]] = int(float(value))
                elif name.startswith("ws_throttle_transitions_total{"):
                    out["level_changes"] += int(float(line.rsplit(" ", 1)[1]))
    except (OSError, ValueError):
        pass
    return out


def compare(a: Variant, b: Variant, connections: int, rate: float, duration: float, rounds: int,
            extra: list[str]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {a.name: [], b.name: []}
    for i in range(rounds):
        for v in (a, b) if i % 2 == 0 else (b, a):
            r = run_once(v, connections, rate, duration, extra)
            runs[v.name].append(r)
            print(f"  {v.name:>18}: {json.dumps(r)}", file=sys.stderr)

    def med(name: str, key: str) -> float | None:
        vals = [r[key] for r in runs[name] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    table = {}
    for key in ("cpu_s_per_m", "p50_ms", "p99_ms"):
        va, vb = med(a.name, key), med(b.name, key)
        table[key] = {a.name: va, b.name: vb, "ratio": (round(vb / va, 3) if va and vb else None)}
    return {"runs": runs, "median": table}


def preset(name: str, args: argparse.Namespace) -> tuple[Variant, Variant, list[str]]:
    if name == "refactor":
        return Variant("before", Path(args.a_dir)), Variant("after", Path(args.b_dir) if args.b_dir else ROOT), []
    if name == "throttle-cost":
        return (Variant("throttle off", env={"WS_THROTTLE_ENABLED": "false"}),
                Variant("throttle on", env={"WS_THROTTLE_ENABLED": "true"}), [])
    if name == "slow-readers":
        # Slow enough to be throttled: a steady 35 % of their stream's bytes (one hot
        # subject at --rate, --payload-size 200 plus ~110 B of envelope); between the
        # heaviest level's 25 % and level 2's 50 %, so they are held at levels 2-3.
        # At 30 msg/s such a reader falls behind by ~6 KB/s: the default 256 KiB queue
        # limit would take 40 s to reach, so both variants run with 32 KiB (~5 s).
        bps = int(0.35 * args.rate * (200 + 110))
        env = {"WS_CLIENT_QUEUE_BYTES": "32768"}
        return (Variant("no slow readers", env=env),
                Variant("1% slow readers", env=env, loadgen=["--slow-share", "0.01", "--slow-rcvbuf", "4096",
                                                             "--slow-bps", str(bps)]), [])
    if name == "guard-cost":
        off = {"WS_CPU_REJECT_THRESHOLD": "0", "WS_CPU_THROTTLE_THRESHOLD": "0", "WS_MAX_LOOP_LAG_MS": "0",
               "WS_MEMORY_REJECT_PERCENT": "0", "WS_MEMORY_SHED_PERCENT": "0"}
        return Variant("guard off", env=off), Variant("guard on"), []
    if name == "delta-cost":
        # Today (deflate, full messages) against deltas + deflate, on the plan's
        # token updates spread over 30 subjects that every client matches.
        # The guard's brakes are off in both: on the shared box a loop-lag
        # brake during the connect phase refuses handshakes at random, and
        # the two variants would then serve different connection counts.
        common = ["--payload", "token", "--dist", "wildcard", "--subjects", "30"]
        off = {"WS_CPU_REJECT_THRESHOLD": "0", "WS_CPU_THROTTLE_THRESHOLD": "0", "WS_MAX_LOOP_LAG_MS": "0",
               "WS_MEMORY_REJECT_PERCENT": "0", "WS_MEMORY_SHED_PERCENT": "0"}
        return (Variant("deflate", env=off, loadgen=["--deflate"]),
                Variant("deflate+delta", env=off, loadgen=["--deflate", "--delta"]), common)
    if name == "sndbuf":
        return (Variant("kernel autotune", env={"WS_SOCKET_SNDBUF": "0"}),
                Variant("SNDBUF 256 KiB", env={"WS_SOCKET_SNDBUF": "262144"}), [])
    raise SystemExit(f"unknown preset {name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True, choices=("refactor", "throttle-cost", "guard-cost", "slow-readers", "sndbuf",
                                                      "delta-cost"))
    ap.add_argument("--a-dir", default="", help="checkout for 'before' (refactor preset)")
    ap.add_argument("--b-dir", default="", help="checkout for 'after' (refactor preset; default this one)")
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each variant (alternating)")
    ap.add_argument("--json", default="")
    ap.add_argument("--loadgen-args", default="", help="extra load-generator flags for both variants, e.g. "
                    "'--dist spread --subjects 1000 --per-client 10'")
    args = ap.parse_args(argv)
    a, b, extra = preset(args.preset, args)
    extra = [*extra, *args.loadgen_args.split()]
    res = compare(a, b, args.connections, args.rate, args.duration, args.rounds, extra)
    res["setup"] = {"preset": args.preset, "connections": args.connections, "rate": args.rate,
                    "duration": args.duration, "rounds": args.rounds}
    print(json.dumps(res["median"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
