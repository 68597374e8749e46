"""Publish-to-client latency through JetStream against embedded mode, same load, same run.

Starts a nats-server (JetStream, temp dir) and two fanout nodes in turn: one
embedded (publishes over HTTP to /publish) and one consuming the stream
(publishes with core NATS into a stream subject: JetStream stores it, the
node's durable pull consumer delivers it). The same load generator measures
latency from the timestamp in each payload.

    python -m benchmarks.js_latency [--connections 10000] [--rate 30] [--duration 8] [--json out.json]

Target (issue 3): p99 through JetStream no more than 5 ms above embedded mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from typing import Any

from . import compare
from .common import Distribution
from .peers.launch import fanout_peer
from .publisher import NatsPublisher


async def run(connections: int, rate: float, duration: float, size: int) -> list[dict[str, Any]]:
    from tests.helpers.nats_server import NatsServer

    sc = compare.Scenario(f"hot-{connections // 1000}k-js", connections, rate, Distribution("hot"), size=size)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ns = NatsServer(d).start()
        try:
            for mode in ("embedded", "jetstream"):
                env = {"NATS_URL": ns.url, "FANOUT_NODE_ID": "bench"} if mode == "jetstream" else {}
                peer = fanout_peer(extra_env=env)
                peer.name = f"fanout-{mode}"
                original = compare.HttpPublisher
                if mode == "jetstream":
                    peer.publish_url = ns.url
                    compare.HttpPublisher = NatsPublisher  # type: ignore[misc,assignment]
                peer.start()
                try:
                    rows.append(await compare.run_scenario(peer, sc, duration))
                finally:
                    compare.HttpPublisher = original  # type: ignore[misc]
                    peer.stop()
        finally:
            ns.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=30)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = asyncio.run(run(args.connections, args.rate, args.duration, args.size))
    print("| mode | conns | delivered/s | all delivered | p50 ms | p99 ms | p99.9 ms | server CPU-s/M |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['peer']} | {r['connections']} | {r.get('delivered_per_s')} | {'yes' if r.get('complete') else 'NO'} "
              f"| {r.get('p50_ms')} | {r.get('p99_ms')} | {r.get('p999_ms')} | {r.get('server_cpu_per_M')} |")
    if len(rows) == 2 and rows[0].get("p99_ms") is not None and rows[1].get("p99_ms") is not None:
        print(f"\nJetStream p99 - embedded p99 = {rows[1]['p99_ms'] - rows[0]['p99_ms']:+.1f} ms (target <= +5 ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
