"""Clients for the node tests: a well-behaved one over ``websockets`` and a raw
one over a plain socket for clients that must misbehave (never pong, never
read, send garbage).

Every wait is bounded: ``recv`` and friends take a timeout and fail the test
with what was seen so far instead of hanging.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed

from tests.helpers.node import NodeProcess

__all__ = ["TIMEOUT", "Client", "RawClient", "connect", "apublish", "sentinel", "LogMark", "wait_metric"]

TIMEOUT = 5.0


class Client:
    """A ``websockets`` connection speaking the JSON protocol."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws

    async def send(self, obj: Any) -> None:
        await self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))

    async def recv_raw(self, timeout: float = TIMEOUT) -> str | bytes:
        async with asyncio.timeout(timeout):
            return await self.ws.recv()

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        obj = json.loads(await self.recv_raw(timeout))
        assert isinstance(obj, dict), obj
        return obj

    async def request(self, obj: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv(timeout)

    async def recv_until(self, pred: Callable[[dict[str, Any]], bool], limit: int = 10_000,
                         timeout: float = TIMEOUT) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Frames before the first that satisfies ``pred``, and that frame."""
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            for _ in range(limit):
                m = await self.recv(timeout)
                if pred(m):
                    return seen, m
                seen.append(m)
        raise AssertionError(f"no matching frame in {limit}; last seen: {seen[-5:]}")

    async def messages(self, n: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        out = [await self.recv(timeout) for _ in range(n)]
        assert all(m["type"] == "message" for m in out), out
        return out

    async def subscribe(self, *channels: str, **extra: Any) -> dict[str, Any]:
        r = await self.request({"type": "subscribe", "channels": list(channels), **extra})
        assert r["type"] == "subscribed", r
        return r

    async def heartbeat(self) -> dict[str, Any]:
        """Prove the connection is open and answering (and that nothing else was queued before)."""
        r = await self.request({"type": "heartbeat"})
        assert r["type"] == "heartbeat_ack", r
        return r

    async def closed(self, timeout: float = TIMEOUT) -> tuple[int | None, list[Any]]:
        """Read until the server closes; the close code and every frame read before it."""
        frames: list[Any] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    frames.append(await self.ws.recv())
                except ConnectionClosed as exc:
                    rcvd = exc.rcvd
                    return (rcvd.code if rcvd else None), frames


@asynccontextmanager
async def connect(node: NodeProcess, path: str = "/ws", **kwargs: Any) -> AsyncIterator[Client]:
    kwargs.setdefault("open_timeout", TIMEOUT)
    kwargs.setdefault("close_timeout", 1)
    async with websockets.connect(f"ws://127.0.0.1:{node.ws_port}{path}", **kwargs) as ws:
        yield Client(ws)


async def apublish(node: NodeProcess, subject: str, payload: Any, priority: str | None = None) -> int:
    """``node.publish`` off the event loop, so clients keep reading meanwhile."""
    return await asyncio.to_thread(node.publish, subject, payload, priority)


async def sentinel(node: NodeProcess, client: Client, subject: str = "odin.global.sentinel") -> list[dict[str, Any]]:
    """Publish a marker on ``subject`` (the client must be subscribed to it) and
    return every frame the client got before it: messages are dispatched in
    order, so anything not among them was not sent."""
    marker = os.urandom(4).hex()
    node.publish(subject, {"sentinel": marker})
    before, _ = await client.recv_until(
        lambda m: m.get("type") == "message" and isinstance(m.get("data"), dict) and m["data"].get("sentinel") == marker)
    return before


async def wait_metric(node: NodeProcess, name: str, labels: str = "",
                      pred: Callable[[float], bool] = bool, timeout: float = TIMEOUT) -> float:
    """Poll one metric until ``pred`` holds: only for state the node signals in no other way."""
    value = 0.0
    async with asyncio.timeout(timeout):
        while True:
            value = await asyncio.to_thread(node.metric, name, labels)
            if pred(value):
                return value
            await asyncio.sleep(0.02)


class LogMark:
    """Wait for a log line written after this mark (the shared node's log holds
    earlier tests' lines too)."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self._old = {id(line) for line in list(node.lines)}

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT) -> dict[str, Any]:
        return self.node.wait_log(lambda d: id(d) not in self._old and pred(d), timeout)

    def new(self) -> list[dict[str, Any]]:
        """The log lines written since the mark, so far."""
        return [d for d in list(self.node.lines) if id(d) not in self._old]


class RawClient:
    """A WebSocket client on a plain socket: it does only what the test tells it.

    No permessage-deflate, no automatic pong, and it reads only when asked, so
    the kernel buffers fill up when it stops.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    async def open(cls, port: int, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect(), so the advertised window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # A small stream limit: the reader pauses the transport soon instead of
        # pulling megabytes into user space while the test "stops reading".
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        return cls(reader, writer)

    @classmethod
    async def connect(cls, port: int, path: str = "/ws", headers: dict[str, str] | None = None,
                      rcvbuf: int | None = None) -> RawClient:
        c = await cls.open(port, rcvbuf)
        await c.handshake(path, headers)
        assert c.status == 101, (c.status, c.headers)
        return c

    async def handshake(self, path: str = "/ws", headers: dict[str, str] | None = None) -> int:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(TIMEOUT):
            head = await self.reader.readuntil(b"\r\n\r\n")
        first, *rest = head.decode("latin-1").split("\r\n")
        self.status = int(first.split(" ")[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in rest if ln)}
        return self.status

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        head = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    def send_text(self, obj: Any) -> None:
        self.send_frame(0x1, (obj if isinstance(obj, str) else json.dumps(obj)).encode())

    def send_close(self, code: int = 1000) -> None:
        self.send_frame(0x8, struct.pack("!H", code))

    async def read_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame."""
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            assert not b1 & 0x80, "server frames must not be masked"
            assert b0 & 0x80, "this client expects unfragmented server frames"
            assert not b0 & 0x70, "RSV bits set, but this client negotiated no extension"
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def read_json(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        while True:
            op, payload = await self.read_frame(timeout)
            if op == 0x1:
                return json.loads(payload)
            assert op in (0x9, 0xA), (op, payload)  # pings may come in between

    async def read_until_close(self, timeout: float = TIMEOUT, limit: int = 100_000) -> tuple[int | None, list[tuple[int, bytes]]]:
        """Frames up to the server's close frame; its code (None if the socket just ended)."""
        frames: list[tuple[int, bytes]] = []
        async with asyncio.timeout(timeout):
            for _ in range(limit):
                try:
                    op, payload = await self.read_frame(timeout)
                except asyncio.IncompleteReadError:
                    return None, frames
                if op == 0x8:
                    return (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None), frames
                frames.append((op, payload))
        raise AssertionError(f"no close frame in {limit} frames")

    async def eof(self, timeout: float = TIMEOUT) -> bytes:
        """Everything left until the server closes the socket."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()
