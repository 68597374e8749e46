"""Handshakes per second with token auth off, HS256 and RS256, and the resource
guard's own cost (server CPU per delivery, guard on vs off), in one run.

    python -m benchmarks.handshake_bench [--handshakes 3000] [--clients 200] [--messages 2000]
    python -m benchmarks.handshake_bench --only user-limit [--handshakes 3000] [--rounds 3]

Every node is a real ``fanout serve`` process (benchmarks/peers/launch.py);
clients are raw sockets on 127.0.0.1 driven by one asyncio loop, so the load
generator is cheap next to the node but shares the machine's cores with it:
compare the rows of one run, not runs on different machines.

Handshakes: ``--handshakes`` complete WebSocket handshakes (101, then close)
from ``--concurrency`` concurrent sockets, the token sent as a Bearer header
(one pre-signed token: the node's cost is the check, not the signing).
Reported: handshakes per second (wall) and the node's CPU milliseconds per
handshake. The guard's brakes and the per-user limit are off for these rows,
so nothing is refused mid-run.

Guard cost: ``--clients`` subscribers read everything; ``--messages``
publishes in batches on the embedded bus. Reported: node CPU microseconds per
delivery (messages x clients) with the guard at its defaults (interval 1 s,
loop-lag probe every 0.1 s) and with every check off (no probe, one sample a
minute), alternating ``--rounds`` times; the difference in percent. On a
shared 2-core machine that difference is within the run-to-run noise, so the
node's CPU over 10 idle seconds is also reported with the guard on and off:
the guard's absolute cost per second, to set against a loaded node's CPU.

User limit: the cluster-wide per-user limit (fanout/userlimit.py) on and off
(``WS_USER_LIMIT_SCOPE`` cluster / node) on one node in JetStream mode with a
real nats-server, HS256 tokens with a different ``sub`` per handshake (so
nothing is over the limit), alternating ``--rounds`` times; the median
handshakes per second of each and their ratio (target: on >= 0.9 x off).
With it on, every handshake writes a KV key and the close deletes it; the
node's watch reads both back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from tempfile import TemporaryDirectory

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .peers.launch import Peer, fanout_peer

SECRET = "bench-secret-0123456789abcdef0123456789"
GUARD_OFF = {"WS_CPU_REJECT_THRESHOLD": "0", "WS_CPU_THROTTLE_THRESHOLD": "0", "WS_MAX_LOOP_LAG_MS": "0",
             "WS_MEMORY_REJECT_PERCENT": "0", "WS_MEMORY_SHED_PERCENT": "0", "WS_GUARD_INTERVAL": "60s"}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _request(extra: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


async def handshakes(port: int, n: int, concurrency: int, extra: str | Callable[[], str],
                     keep: list[asyncio.StreamWriter] | None = None) -> tuple[int, int]:
    """(ok, refused) of ``n`` handshakes; ``extra`` is the extra header lines, or makes them per
    handshake. Each connection is closed after the 101, or kept open in ``keep``."""
    left = n
    ok = bad = 0

    async def worker() -> None:
        nonlocal left, ok, bad
        while left > 0:
            left -= 1
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(_request(extra if isinstance(extra, str) else extra()))
            head = await r.readuntil(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 101"):
                ok += 1
            else:
                bad += 1
            if keep is None or not head.startswith(b"HTTP/1.1 101"):
                w.close()
            else:
                keep.append(w)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, bad


def run_handshakes(name: str, env: dict[str, str], extra: str, n: int, concurrency: int) -> dict:
    peer = fanout_peer(extra_env={**GUARD_OFF, "WS_MAX_CONNECTIONS_PER_USER": "0", **env})
    peer.start()
    try:
        port = _port(peer.ws_url)
        asyncio.run(handshakes(port, min(200, n), concurrency, extra))       # warm-up
        cpu0, t0 = peer.cpu_seconds(), time.perf_counter()
        ok, bad = asyncio.run(handshakes(port, n, concurrency, extra))
        wall, cpu = time.perf_counter() - t0, peer.cpu_seconds() - cpu0
    finally:
        peer.stop()
    return {"auth": name, "handshakes": ok, "refused": bad, "per_s": round(ok / wall),
            "node_cpu_ms_per_handshake": round(1000 * cpu / max(1, ok), 3)}


async def _deliveries(peer: Peer, clients: int, messages: int, batch: int = 50) -> int:
    port = _port(peer.ws_url)
    sub = json.dumps({"type": "subscribe", "channels": ["odin.token.bench.x"]}).encode()
    conns = []
    for _ in range(clients):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_request(""))
        await r.readuntil(b"\r\n\r\n")
        mask = os.urandom(4)
        w.write(bytes([0x81, 0x80 | len(sub)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(sub)))
        conns.append((r, w))
    for r, _ in conns:
        await r.read(4096)          # the subscribed reply
    payload = b'{"price":1.2345,"volume":1000,"token":"bench"}'
    stop = False

    async def drain(r: asyncio.StreamReader) -> None:
        while not stop:
            if not await r.read(1 << 16):
                return

    readers = [asyncio.create_task(drain(r)) for r, _ in conns]
    loop = asyncio.get_running_loop()
    url = peer.publish_url + "/publish/odin.token.bench.x"

    def post() -> None:
        req = urllib.request.Request(url, data=payload, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    sent = 0
    while sent < messages:
        await asyncio.gather(*(loop.run_in_executor(None, post) for _ in range(min(batch, messages - sent))))
        sent += min(batch, messages - sent)
    await asyncio.sleep(0.5)   # let the last frames leave before the CPU reading
    stop = True
    for _, w in conns:
        w.close()
    for t in readers:
        t.cancel()
    return sent * clients


def run_guard_cost(clients: int, messages: int, rounds: int) -> dict:
    per: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for mode, env in (("on", {}), ("off", GUARD_OFF)):
            peer = fanout_peer(extra_env={"WS_COMPRESSION": "false", **env})
            peer.start()
            try:
                cpu0 = peer.cpu_seconds()
                deliveries = asyncio.run(_deliveries(peer, clients, messages))
                per[mode].append(1e6 * (peer.cpu_seconds() - cpu0) / deliveries)
            finally:
                peer.stop()
    on, off = statistics.median(per["on"]), statistics.median(per["off"])
    idle = {}
    for mode, env in (("on", {}), ("off", GUARD_OFF)):
        # The guard's absolute cost, without the publish noise: node CPU over 10 idle seconds.
        peer = fanout_peer(extra_env=env)
        peer.start()
        try:
            cpu0 = peer.cpu_seconds()
            time.sleep(10)
            idle[mode] = (peer.cpu_seconds() - cpu0) / 10
        finally:
            peer.stop()
    return {"idle_node_cpu_ms_per_s_guard_on": round(1000 * idle["on"], 3),
            "idle_node_cpu_ms_per_s_guard_off": round(1000 * idle["off"], 3),
            "clients": clients, "messages": messages, "rounds": rounds,
            "node_cpu_us_per_delivery_guard_on": round(on, 3), "node_cpu_us_per_delivery_guard_off": round(off, 3),
            "guard_cost_percent": round(100 * (on - off) / off, 2), "samples": per}


def _wait_cluster(peer: Peer, want: bool, timeout: float = 15.0) -> None:
    url = peer.publish_url + "/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as r:
            if json.loads(r.read())["user_limit"]["cluster"] is want:
                return
        time.sleep(0.05)
    raise RuntimeError(f"user limit cluster={want} not reached: {peer.log_tail()}")


async def _storm(peer: Peer, port: int, n: int, concurrency: int,
                 header: Callable[[], str], stay: bool) -> tuple[int, int, float, float]:
    """(ok, refused, wall seconds, node CPU seconds) of ``n`` handshakes. ``stay``: the
    connections stay open (a reconnect storm: each one's key is written and read back while
    the next handshakes run) and are closed after the clock stops; else each is closed after
    its 101 (its key's delete, if it was written, falls in the window too)."""
    kept: list[asyncio.StreamWriter] = []
    try:
        cpu0, t0 = peer.cpu_seconds(), time.perf_counter()
        ok, bad = await handshakes(port, n, concurrency, header, kept if stay else None)
        await asyncio.sleep(0.05)     # the last keys' writes and their echoes
        return ok, bad, time.perf_counter() - t0, peer.cpu_seconds() - cpu0
    finally:
        for w in kept:
            w.close()


def run_user_limit(n: int, concurrency: int, rounds: int, stay: bool = True) -> dict:
    from tests.helpers.nats_server import NatsServer

    exp = int(time.time()) + 3600
    serial = iter(range(10**9))

    def bearer() -> Iterator[str]:
        while True:
            yield f"Authorization: Bearer {jwt.encode({'sub': f'u{next(serial)}', 'exp': exp}, SECRET)}\r\n"

    per: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    with TemporaryDirectory() as d:
        server = NatsServer(Path(d) / "nats").start()
        try:
            for i in range(rounds):
                for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    peer = fanout_peer(extra_env={**GUARD_OFF, "WS_AUTH_SECRET": SECRET, "NATS_URL": server.url,
                                                  "JS_STREAM_NAME": "BENCH_UL", "FANOUT_NODE_ID": f"bench-{mode}-{i}",
                                                  "WS_USER_LIMIT_SCOPE": "cluster" if mode == "on" else "node"})
                    peer.start()
                    try:
                        _wait_cluster(peer, mode == "on")
                        port = _port(peer.ws_url)
                        tokens = bearer()
                        asyncio.run(handshakes(port, min(200, n), concurrency, tokens.__next__))   # warm-up
                        heads = [next(tokens) for _ in range(n)]   # signed before the clock starts
                        ok, bad, wall, used = asyncio.run(_storm(peer, port, n, concurrency, iter(heads).__next__, stay))
                        if bad:
                            raise RuntimeError(f"{bad} handshakes refused with the user limit {mode}")
                        per[mode].append(ok / wall)
                        cpu[mode].append(1000 * used / max(1, ok))
                    finally:
                        peer.stop()
        finally:
            server.kill()
    on, off = statistics.median(per["on"]), statistics.median(per["off"])
    return {"connections": "stay open" if stay else "closed after the 101",
            "user_limit_handshakes_per_s_on": round(on), "user_limit_handshakes_per_s_off": round(off),
            "ratio_on_off": round(on / off, 3),
            "node_cpu_ms_per_handshake_on": round(statistics.median(cpu["on"]), 3),
            "node_cpu_ms_per_handshake_off": round(statistics.median(cpu["off"]), 3),
            "handshakes": n, "rounds": rounds, "samples": {k: [round(v) for v in vs] for k, vs in per.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--handshakes", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--only", choices=("user-limit",), help="run only these rows")
    args = ap.parse_args()
    if args.only == "user-limit":
        ul = [run_user_limit(args.handshakes, args.concurrency, args.rounds, stay) for stay in (True, False)]
        for row in ul:
            print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"user_limit": ul}, indent=2))
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    exp = int(time.time()) + 3600
    rows = []
    with TemporaryDirectory() as d:
        pem = Path(d) / "rs256.pem"
        pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
        hs = jwt.encode({"sub": "bench", "exp": exp}, SECRET, algorithm="HS256")
        rs = jwt.encode({"sub": "bench", "exp": exp}, key, algorithm="RS256")
        for name, env, extra in (("off", {}, ""),
                                 ("HS256", {"WS_AUTH_SECRET": SECRET}, f"Authorization: Bearer {hs}\r\n"),
                                 ("RS256", {"WS_AUTH_PUBLIC_KEY_FILE": str(pem)}, f"Authorization: Bearer {rs}\r\n")):
            rows.append(run_handshakes(name, env, extra, args.handshakes, args.concurrency))
            print(json.dumps(rows[-1]), flush=True)
    guard = run_guard_cost(args.clients, args.messages, args.rounds)
    print(json.dumps(guard), flush=True)
    ul = [run_user_limit(args.handshakes, args.concurrency, args.rounds, stay) for stay in (True, False)]
    for row in ul:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"handshakes": rows, "guard": guard, "user_limit": ul}, indent=2))


if __name__ == "__main__":
    main()
