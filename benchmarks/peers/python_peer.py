"""The pure-Python peer: what a Python team would write first.

A `websockets` (asyncio API) server speaking fanout's client protocol
(subscribe / unsubscribe / heartbeat, per-client ``seq``, JSON data messages)
and a tiny asyncio HTTP/1.1 server with ``POST /publish/<subject>`` (keep-alive
and pipelining work because requests are answered one after the other),
``GET /ready``, ``/health`` and ``/metrics``.

Fan-out is the obvious loop: for each subscribed client, bump its ``seq``,
``json.dumps`` the message and hand it to the connection without awaiting
(``websockets.asyncio.server.broadcast`` on that one connection), so one slow
client cannot stall the others. As with ``broadcast``, nothing bounds a slow
client's write buffer: that is the straightforward version's known weakness.
Compression is websockets' default (permessage-deflate offered, each message
compressed once per client).

Not a product: no auth, no replay/resume, no rate limits.

    python -m benchmarks.peers.python_peer --ws-port 3104 --http-port 3102
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed


def matches(pattern: list[str], subject: list[str]) -> bool:
    """NATS-style match: ``*`` is one token, ``>`` (last) one or more."""
    for i, p in enumerate(pattern):
        if p == ">":
            return len(subject) > i
        if i >= len(subject) or (p != "*" and p != subject[i]):
            return False
    return len(pattern) == len(subject)


class Client:
    __slots__ = ("ws", "seq", "patterns")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.seq = 0
        self.patterns: set[str] = set()


class Hub:
    def __init__(self) -> None:
        self.exact: dict[str, set[Client]] = defaultdict(set)
        self.wild: dict[str, set[Client]] = defaultdict(set)
        self.stream_seq = 0
        self.epoch = str(time.time_ns())
        self.published = 0
        self.delivered = 0
        self.connections = 0

    def subscribe(self, c: Client, pattern: str) -> None:
        c.patterns.add(pattern)
        (self.wild if ("*" in pattern or ">" in pattern) else self.exact)[pattern].add(c)

    def unsubscribe(self, c: Client, pattern: str) -> None:
        c.patterns.discard(pattern)
        for table in (self.exact, self.wild):
            s = table.get(pattern)
            if s is not None:
                s.discard(c)
                if not s:
                    del table[pattern]

    def drop(self, c: Client) -> None:
        for p in list(c.patterns):
            self.unsubscribe(c, p)

    def publish(self, subject: str, body: bytes) -> int:
        try:
            data = json.loads(body)
        except ValueError:
            data = body.decode("utf-8", "replace")
        self.stream_seq += 1
        self.published += 1
        recipients = set(self.exact.get(subject, ()))
        if self.wild:
            tokens = subject.split(".")
            for pattern, clients in self.wild.items():
                if matches(pattern.split("."), tokens):
                    recipients |= clients
        ts = int(time.time() * 1000)
        for c in recipients:
            c.seq += 1
            msg = json.dumps(
                {"seq": c.seq, "type": "message", "channel": subject, "stream_seq": self.stream_seq,
                 "ts": ts, "data": data},
                separators=(",", ":"),
            )
            broadcast([c.ws], msg)
        self.delivered += len(recipients)
        return len(recipients)


VALID_TOKEN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def valid_pattern(p: object) -> bool:
    if not isinstance(p, str) or not p or len(p) > 256:
        return False
    toks = p.split(".")
    if len(toks) > 16:
        return False
    for i, t in enumerate(toks):
        if t == "*" or (t == ">" and i == len(toks) - 1):
            continue
        if not t or len(t) > 64 or not set(t) <= VALID_TOKEN:
            return False
    return True


async def ws_handler(hub: Hub, ws: ServerConnection) -> None:
    c = Client(ws)
    hub.connections += 1
    try:
        async for raw in ws:
            try:
                msg = json.loads(raw)
                typ = msg["type"]
            except (ValueError, TypeError, KeyError):
                await ws.send(json.dumps({"type": "error", "code": "bad_request", "message": "bad frame"}))
                continue
            rid = msg.get("id")
            if typ in ("subscribe", "unsubscribe"):
                chans = msg.get("channels")
                if not isinstance(chans, list):
                    await ws.send(json.dumps({"type": "error", "code": "bad_request", "message": "channels"}))
                    continue
                ok = []
                for ch in chans:
                    if valid_pattern(ch):
                        (hub.subscribe if typ == "subscribe" else hub.unsubscribe)(c, ch)
                        ok.append(ch)
                    else:
                        await ws.send(json.dumps({"type": "error", "code": "invalid_channel", "channel": ch}))
                reply = {"type": typ + "d", "channels": ok}
                if typ == "subscribe":
                    reply["epoch"] = hub.epoch
                if rid is not None:
                    reply["id"] = rid
                await ws.send(json.dumps(reply))
            elif typ == "heartbeat":
                await ws.send(json.dumps({"type": "heartbeat_ack", "ts": int(time.time() * 1000)}))
            else:
                await ws.send(json.dumps({"type": "error", "code": "bad_request", "message": f"unknown type {typ}"}))
    except ConnectionClosed:
        pass
    finally:
        hub.connections -= 1
        hub.drop(c)


async def http_handler(hub: Hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, _, rest = head.partition(b"\r\n")
            method, path, _ = line.decode("latin-1").split(" ", 2)
            clen = 0
            for h in rest.split(b"\r\n"):
                k, _, v = h.partition(b":")
                if k.strip().lower() == b"content-length":
                    clen = int(v)
            body = await reader.readexactly(clen) if clen else b""
            if method == "POST" and path.startswith("/publish/"):
                subject = path[len("/publish/"):]
                if not valid_pattern(subject) or "*" in subject or ">" in subject:
                    status, out = b"400 Bad Request", b'{"error":"invalid subject"}'
                else:
                    n = hub.publish(subject, body)
                    status, out = b"202 Accepted", b'{"recipients":%d}' % n
            elif path in ("/ready", "/health"):
                status, out = b"200 OK", b'{"status":"ok"}'
            elif path == "/metrics":
                status = b"200 OK"
                out = (
                    f"peer_connections {hub.connections}\npeer_published_total {hub.published}\n"
                    f"peer_delivered_total {hub.delivered}\n"
                ).encode()
            else:
                status, out = b"404 Not Found", b""
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(out), out))
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main_async(args: argparse.Namespace) -> None:
    hub = Hub()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http = await asyncio.start_server(lambda r, w: http_handler(hub, r, w), args.host, args.http_port, backlog=1024)
    async with serve(
        lambda ws: ws_handler(hub, ws),
        args.host,
        args.ws_port,
        backlog=4096,
        max_size=64 * 1024,
        compression="deflate",
        ping_interval=20,
    ):
        await stop.wait()
    http.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.python_peer")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ws-port", type=int, default=3104)
    p.add_argument("--http-port", type=int, default=3102)
    args = p.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
