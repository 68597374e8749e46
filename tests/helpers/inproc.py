"""In-process parts for hub and session unit tests: a real compiled ``Core``
behind a real :class:`~fanout.hub.Hub`, real socketpairs, a fake clock, and a
minimal host for sessions. No node process, no TCP: each test takes
milliseconds, and time moves only when the test moves it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from fanout.brokers.embedded import EmbeddedBroker
from fanout.config import Config, load
from fanout.hub import Hub
from fanout.metrics import Metrics
from fanout.session import Refusal, Session

__all__ = ["FakeClock", "make_cfg", "Host", "WsPeer", "RecPeer", "drain_loop", "pair"]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make_cfg(**env: Any) -> Config:
    return load(environ={"WS_MAX_CONNECTIONS": "64", **{k: str(v) for k, v in env.items()}})


def pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected non-blocking socketpair (server end, client end)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    if rcvbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return a, b


async def drain_loop(turns: int = 5) -> None:
    """Let the loop run its ready callbacks (flushes are call_soon)."""
    for _ in range(turns):
        await asyncio.sleep(0)


class RecPeer:
    """A hub Peer that records what the hub tells it and reads its socketpair on demand."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        self.server, self.client = pair(rcvbuf)
        self.fd = self.server.fileno()
        self.calls: list[str] = []

    def on_blocked(self) -> None:
        self.calls.append("blocked")

    def on_dead(self, why: str) -> None:
        self.calls.append("dead")

    def on_slow(self) -> None:
        self.calls.append("slow")

    def on_drained(self) -> None:
        self.calls.append("drained")

    def read(self) -> bytes:
        """Everything the client end can read now (never blocks)."""
        out = b""
        while True:
            try:
                data = self.client.recv(1 << 20)
            except BlockingIOError:
                return out
            if not data:
                return out
            out += data


class Host:
    """A SessionHost with one hub, no listener: sessions are made on socketpairs."""

    def __init__(self, cfg: Config | None = None, **env: Any) -> None:
        self.cfg = cfg or make_cfg(**env)
        self.metrics = Metrics()
        self.loop = asyncio.get_running_loop()
        self.clock = FakeClock()
        self._hub = Hub(self.cfg, self.metrics, self.clock)
        self.broker = EmbeddedBroker(self.cfg)
        self._hub.bind(self.loop, self.broker)
        self.extensions = None
        self.auth = None
        self.refusal: Refusal | None = None
        self.sessions: set[Session] = set()
        self.opened_ids: list[int] = []
        self.closed_ids: list[int] = []

    @property
    def hub(self) -> Hub:
        return self._hub

    async def start(self) -> None:
        await self.broker.start(self._hub)

    def admission(self) -> Refusal | None:
        return self.refusal

    def admit_user(self, claims: object) -> Refusal | None:
        return None

    def opened(self, session: Session) -> None:
        self.opened_ids.append(session.id)

    def closed(self, session: Session) -> None:
        self.sessions.discard(session)
        self.closed_ids.append(session.id)

    def session(self, sock: socket.socket) -> Session:
        s = Session(self, sock, ("127.0.0.1", 1))
        self.sessions.add(s)
        return s

    def publish(self, subject: str, payload: bytes | str, priority: int = 2) -> int:
        return self.broker.publish_now(subject, payload.encode() if isinstance(payload, str) else payload, priority)


class WsPeer:
    """The client end of a socketpair speaking WebSocket through websockets'
    Sans-I/O ClientProtocol (masking, framing, close handshake)."""

    def __init__(self, sock: socket.socket, path: str = "/ws") -> None:
        self.sock = sock
        self.proto = ClientProtocol(parse_uri(f"ws://127.0.0.1{path}"), max_size=None)
        self.response: Any = None
        self.frames: list[Frame] = []
        self.eof = False

    def handshake(self, headers: dict[str, str] | None = None) -> None:
        req = self.proto.connect()
        for k, v in (headers or {}).items():
            req.headers[k] = v
        self.proto.send_request(req)
        self._out()

    def _out(self) -> None:
        for chunk in self.proto.data_to_send():
            if chunk:
                try:
                    self.sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass    # the server already dropped us (e.g. after a flooding close)

    def send(self, obj: Any) -> None:
        import json
        self.proto.send_text((obj if isinstance(obj, str) else json.dumps(obj)).encode())
        self._out()

    def send_frame(self, opcode: Opcode, data: bytes, fin: bool = True) -> None:
        """A raw client frame, masked (for frames websockets would not send)."""
        mask = b"\x01\x02\x03\x04"
        head = bytes([(0x80 if fin else 0) | int(opcode)])
        n = len(data)
        head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def pump(self, limit: int = 1 << 24) -> int:
        """Read what is there now (never blocks); returns bytes read."""
        got = 0
        while got < limit:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not data:
                self.proto.receive_eof()
                self.eof = True
                break
            got += len(data)
            self.proto.receive_data(data)
        for ev in self.proto.events_received():
            if isinstance(ev, Frame):
                self.frames.append(ev)
            else:
                self.response = ev
        self._out()   # pongs, close replies
        return got

    def texts(self) -> list[dict[str, Any]]:
        import json
        out = [json.loads(f.data) for f in self.frames if f.opcode is Opcode.TEXT]
        self.frames = [f for f in self.frames if f.opcode is not Opcode.TEXT]
        return out

    def close_code(self) -> int | None:
        for f in self.frames:
            if f.opcode is Opcode.CLOSE:
                return int(struct.unpack("!H", f.data[:2])[0])
        return None


async def until(pred: Callable[[], Any], peer: WsPeer | None = None, turns: int = 200) -> Any:
    """Run the loop (and read the peer) until ``pred()`` is truthy; bounded in turns."""
    for _ in range(turns):
        if peer is not None:
            peer.pump()
        v = pred()
        if v:
            return v
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")
