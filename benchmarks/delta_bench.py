"""Delta messages (PROTOCOL 1.2, issue 20): bytes on the wire per delivery
for the plan's two streams, today against deltas, in one run.

The node's own path: each message is framed as the node frames it
(``fanout.protocol.message_tail``, the per-client ``{"seq":N,`` prefix and the
WebSocket header) and queued by the compiled core for four clients, whose
queued bytes are counted (``Core.take_dirty``, the flush's own gather):

- ``full``: no compression, no delta (a client that offers neither);
- ``full+deflate``: permessage-deflate as a browser negotiates it (server
  window 15 bits, no context takeover: what the node accepts), i.e. today;
- ``delta``: ``delta: "fossil"``, no compression;
- ``delta+deflate``: both.

Streams (deterministic):

- token updates: 30 tokens (``odin.token.<id>.update``), objects of about 25
  fields and 700 bytes; each message, a trade, changes about ten numeric
  fields of that token's previous one;
- trending: ``odin.global.trending`` every 5 s, the top 100 (about 17 KB of
  JSON, the plan's ``{"type":"trending_update","data":{"top_100":[...]}}``).
  Between two lists the plan's 12 trades/s (60 in 5 s) hit the market's
  1,000 tokens by rank (Zipf, s = 1): about 40 land in the top 100, on about
  20 distinct tokens, each moving its price, volume and change; four
  neighbours swap ranks and one token leaves for a new one.
  ``--trending-trades-in-top`` puts every trade in the top 100 instead (a
  busier list: about 30 distinct tokens change per tick).

Targets (issue 20), delta + deflate against today's deflate: token updates
<= 0.6x, trending <= 0.2x. Also reported: the time to compute one delta (the
core's own counter). Bounded: a fixed number of messages, no network.

    python -m benchmarks.delta_bench [--messages 600] [--core-clients 10000] [--json out.json]

``--core-clients N`` also times match-and-enqueue alone (no sockets) with N
clients on deflate, full against deltas.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import selectors
import socket
import statistics
import sys
import time
from typing import Any

from fanout.protocol import message_tail
from fanout_core import Core

from .common import TokenPayloads

TARGETS = {"token": 0.6, "trending": 0.2}
VARIANTS = ("full", "full+deflate", "delta", "delta+deflate")
MARKET = 1000
TRADES_PER_TICK = 60
ZIPF = [1 / (r + 1) for r in range(MARKET)]


def token_messages(n: int, tokens: int = 30) -> list[tuple[str, bytes]]:
    gen = TokenPayloads()
    subjects = [f"odin.token.t{j:03d}.update" for j in range(tokens)]
    rng = random.Random(7)
    out = []
    for i in range(n):
        s = subjects[rng.randrange(tokens)]
        out.append((s, gen.make(s, 0, i, stamp=False)))
    return out


def trending_messages(n: int, all_in_top: bool = False, trades: int = TRADES_PER_TICK) -> list[tuple[str, bytes]]:
    rng = random.Random(5)
    serial = 0

    def token() -> dict[str, Any]:
        nonlocal serial
        serial += 1
        return {"id": f"tok{serial:05d}", "symbol": f"SYM{serial}", "name": f"Odin token {serial}",
                "price": round(rng.uniform(0.0001, 3), 8), "change_24h": round(rng.uniform(-60, 300), 2),
                "volume_24h": rng.randrange(10**4, 10**8), "market_cap": rng.randrange(10**6, 10**9),
                "holders": rng.randrange(50, 50_000)}

    top = [token() for _ in range(100)]
    out = []
    for _ in range(n):
        # The plan's 12 trades/s: 60 in 5 s over the whole market (1,000
        # tokens, Zipf by rank: about 40 of them hit the top 100, on about 20
        # distinct tokens); each moves its token's price, volume and change.
        for r in rng.choices(range(MARKET), weights=ZIPF, k=trades):
            if r >= 100:
                if not all_in_top:
                    continue
                r %= 100
            t = top[r]
            t["price"] = round(t["price"] * rng.uniform(0.97, 1.03), 8)
            t["volume_24h"] += rng.randrange(100, 50_000)
            t["change_24h"] = round(t["change_24h"] + rng.uniform(-2, 2), 2)
        for _ in range(4):                               # rank churn: neighbours swap
            k = rng.randrange(99)
            top[k], top[k + 1] = top[k + 1], top[k]
        top[rng.randrange(60, 100)] = token()            # one leaves, a new one enters
        body = {"type": "trending_update",
                "data": {"top_100": [{"rank": r + 1, **t} for r, t in enumerate(top)]}}
        out.append(("odin.global.trending", json.dumps(body, separators=(",", ":")).encode()))
    return out


def measure(messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    core = Core(8, delta=[">"], delta_min_bytes=128)
    slots = {"full": core.add_client(-1), "full+deflate": core.add_client(-1, 15),
             "delta": core.add_client(-1), "delta+deflate": core.add_client(-1, 15)}
    for name, slot in slots.items():
        for pattern in ("odin.token.*.update", "odin.global.>"):
            core.subscribe(slot, pattern, "delta" in name)
    total = dict.fromkeys(VARIANTS, 0)
    payload = 0
    for i, (subject, body) in enumerate(messages):
        core.publish(subject, message_tail(subject, 9_000_000 + i, 1_764_284_630_000 + i * 37, body))
        payload += len(body)
        out = core.take_dirty()
        for name, slot in slots.items():
            total[name] += len(out.get(slot, b""))
    n = len(messages)
    st = core.delta_stats()
    per = {name: round(total[name] / n, 1) for name in VARIANTS}
    return {
        "messages": n,
        "payload_bytes": round(payload / n, 1),
        "bytes_per_delivery": per,
        "delta_share": round(st["frames_delta"] / max(1, st["frames_delta"] + st["frames_full"]) * 2, 3),
        "ratio_delta_deflate_vs_deflate": round(per["delta+deflate"] / per["full+deflate"], 3),
        "ratio_delta_vs_full": round(per["delta"] / per["full"], 3),
        "deltas_computed": st["computed"],
        "us_per_delta": round(st["seconds"] / max(1, st["computed"]) * 1e6, 2),
        "refused": {"not_smaller": st["refused_not_smaller"], "not_utf8": st["refused_not_utf8"]},
    }


def core_cost(clients: int, messages: int = 3000, rounds: int = 2) -> dict[str, float]:
    """Match-and-enqueue alone (no sockets), ns per delivery: ``clients``
    clients with deflate on ``odin.token.*.update``, token updates over 30
    subjects, published 30 per batch as the hub does; full vs deltas, the
    better of ``rounds`` alternating runs (CPU time of this process)."""
    gen = TokenPayloads()
    subjects = [f"odin.token.t{j:03d}.update" for j in range(30)]
    tails = [message_tail(subjects[i % 30], 1000 + i, 1_764_284_630_000 + i,
                          gen.make(subjects[i % 30], 0, i, stamp=False)) for i in range(messages)]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, delta in (("full", False), ("delta", True)):
            core = Core(clients, delta=[">"] if delta else (), delta_min_bytes=128)
            for _ in range(clients):
                core.subscribe(core.add_client(-1, 15), "odin.token.*.update", delta)
            t0 = time.process_time()
            for k in range(0, messages, 30):
                core.publish_batch(subjects, tails[k:k + 30], [2] * 30)
                core.discard_queued()
            ns = (time.process_time() - t0) / (messages * clients) * 1e9
            best[name] = round(min(best.get(name, ns), ns), 1)
    best["ratio"] = round(best["delta"] / best["full"], 3)
    return best


def _drain(fds: list[int], deadline: float) -> None:
    """The clients' side (a child process): read everything until every socket closes."""
    sel = selectors.DefaultSelector()
    for fd in fds:
        sel.register(fd, selectors.EVENT_READ)
    left = len(fds)
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            try:
                data = os.read(key.fd, 1 << 20)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(key.fd)
                left -= 1


def socket_cost(clients: int, messages: int = 300, rounds: int = 3, per_flush: int = 1) -> dict[str, Any]:
    """The node's path with real sockets: token updates over 30 subjects,
    ``per_flush`` published (``publish_batch``) per ``flush()`` (``sendmsg`` to
    one Unix socket per client, read by a child process); 1 is what a node
    does at 30 msg/s (each message leaves in its own flush). Deflate on; CPU
    time of this process per delivery, full against deltas, alternating
    rounds. Bounded: ``messages`` per run, every wait has a deadline."""
    gen = TokenPayloads()
    subjects = [f"odin.token.t{j:03d}.update" for j in range(30)]
    tails = [message_tail(subjects[i % 30], 1000 + i, 1_764_284_630_000 + i,
                          gen.make(subjects[i % 30], 0, i, stamp=False)) for i in range(messages)]
    runs: dict[str, list[float]] = {"full": [], "delta": []}
    for rnd in range(rounds):
        order = (("full", False), ("delta", True)) if rnd % 2 == 0 else (("delta", True), ("full", False))
        for name, delta in order:
            core = Core(clients, delta=[">"] if delta else (), delta_min_bytes=128)
            pairs = [socket.socketpair() for _ in range(clients)]
            for a, _ in pairs:
                a.setblocking(False)
                core.subscribe(core.add_client(a.fileno(), 15), "odin.token.*.update", delta)
            pid = os.fork()
            if pid == 0:                                   # the clients: read until closed
                for a, _ in pairs:
                    a.close()
                _drain([b.fileno() for _, b in pairs], time.monotonic() + 120)
                os._exit(0)
            for _, b in pairs:
                b.close()
            deadline = time.monotonic() + 120
            t0 = time.process_time()
            for k in range(0, messages, per_flush):
                batch = tails[k:k + per_flush]
                core.publish_batch([subjects[(k + j) % 30] for j in range(len(batch))], batch, [2] * len(batch))
                blocked, _ = core.flush()
                for slot in blocked or ():
                    while core.flush_slot(slot) == 1 and time.monotonic() < deadline:
                        poll = select.poll()
                        poll.register(pairs[slot][0].fileno(), select.POLLOUT)
                        poll.poll(1000)
            cpu = time.process_time() - t0
            for a, _ in pairs:
                a.close()
            os.waitpid(pid, 0)
            runs[name].append(round(cpu / (messages * clients) * 1e9, 1))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"runs_ns": runs, "median_ns": med, "ratio": round(med["delta"] / med["full"], 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=600, help="messages per stream")
    ap.add_argument("--trending-trades-in-top", action="store_true",
                    help="every trade of a tick hits a top-100 token (a busier list)")
    ap.add_argument("--trades", type=int, default=TRADES_PER_TICK, help="trades per 5 s tick (the plan: 60)")
    ap.add_argument("--core-clients", type=int, default=0,
                    help="also time match-and-enqueue alone with this many clients (e.g. 10000)")
    ap.add_argument("--socket-clients", type=int, default=0,
                    help="also time publish + flush to real sockets with this many clients (e.g. 2000)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    res = {"token": measure(token_messages(args.messages)),
           "trending": measure(trending_messages(max(20, args.messages // 10), args.trending_trades_in_top,
                                                 args.trades))}
    ok = True
    print("| stream | payload B | " + " | ".join(VARIANTS) + " | delta+deflate / deflate | target | us per delta |")
    print("|---|---|" + "---|" * len(VARIANTS) + "---|---|---|")
    for name, r in res.items():
        ratio = r["ratio_delta_deflate_vs_deflate"]
        met = ratio <= TARGETS[name]
        ok &= met
        cells = " | ".join(f"{r['bytes_per_delivery'][v]:,.0f}" for v in VARIANTS)
        print(f"| {name} | {r['payload_bytes']:,.0f} | {cells} | {ratio:.3f}x | <= {TARGETS[name]}x "
              f"{'met' if met else 'MISSED'} | {r['us_per_delta']} |")
    if args.core_clients > 0:
        res["core_ns_per_delivery"] = core_cost(args.core_clients)
        c = res["core_ns_per_delivery"]
        print(f"\nmatch-and-enqueue, {args.core_clients:,} clients: full {c['full']} ns, "
              f"delta {c['delta']} ns per delivery ({c['ratio']}x)")
    if args.socket_clients > 0:
        res["socket_ns_per_delivery"] = s = socket_cost(args.socket_clients)
        print(f"publish + flush to sockets, {args.socket_clients:,} clients: full {s['median_ns']['full']} ns, "
              f"delta {s['median_ns']['delta']} ns per delivery ({s['ratio']}x; runs {s['runs_ns']})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    print(json.dumps(res, indent=2), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
