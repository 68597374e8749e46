"""A minimal WebSocket client codec (RFC 6455 + RFC 7692), Sans-I/O.

Only what the load generator needs: build the opening handshake, check the
answer, build masked client frames, and parse the permessage-deflate
parameters the server accepted. Frame *parsing* is inlined in the load
generator's protocol class (:mod:`benchmarks.loadgen`) because it is the hot
path and a call per frame costs more than the parsing itself.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFLATE_TAIL = b"\x00\x00\xff\xff"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


@dataclass(frozen=True)
class Url:
    host: str
    port: int
    path: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Url:
        u = urlsplit(url)
        if u.scheme not in ("ws", "wss"):
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        tls = u.scheme == "wss"
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        return cls(u.hostname or "127.0.0.1", u.port or (443 if tls else 80), path, tls)


def handshake_request(url: Url, deflate: bool) -> tuple[bytes, bytes]:
    """The opening handshake and the ``Sec-WebSocket-Accept`` value to expect."""
    key = base64.b64encode(os.urandom(16))
    lines = [
        b"GET %s HTTP/1.1" % url.path.encode(),
        b"Host: %s:%d" % (url.host.encode(), url.port),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
    ]
    if deflate:
        lines.append(b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return b"\r\n".join(lines) + b"\r\n\r\n", accept


class HandshakeError(Exception):
    """The server did not switch protocols (status and first line kept)."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(f"handshake refused: {line}")
        self.status = status


@dataclass
class Deflate:
    """Negotiated permessage-deflate parameters (only what inflating needs)."""

    server_no_context_takeover: bool = False
    server_max_window_bits: int = 15

    def new_inflater(self) -> zlib._Decompress:
        # A 15-bit window inflates streams made with any smaller window too.
        return zlib.decompressobj(-15)


def parse_handshake_response(head: bytes, accept: bytes) -> Deflate | None:
    """Check a response head (up to, not including, the blank line).

    Returns the negotiated deflate parameters, or None when the server did
    not accept permessage-deflate. Raises :class:`HandshakeError`.
    """
    lines = head.split(b"\r\n")
    first = lines[0].decode("latin-1")
    parts = first.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status != 101:
        raise HandshakeError(status, first)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        name = k.strip().lower()
        headers[name] = (headers[name] + b", " + v.strip()) if name in headers else v.strip()
    if headers.get(b"sec-websocket-accept") != accept:
        raise HandshakeError(status, "bad Sec-WebSocket-Accept")
    ext = headers.get(b"sec-websocket-extensions")
    if not ext:
        return None
    for offer in ext.split(b","):
        params = [p.strip() for p in offer.split(b";")]
        if params[0].lower() != b"permessage-deflate":
            continue
        d = Deflate()
        for p in params[1:]:
            k, _, v = p.partition(b"=")
            k = k.strip().lower()
            if k == b"server_no_context_takeover":
                d.server_no_context_takeover = True
            elif k == b"server_max_window_bits" and v:
                d.server_max_window_bits = int(v.strip(b'"'))
        return d
    return None


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final, uncompressed client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    if n:
        m = int.from_bytes(mask * (n // 4 + 1), "little") & ((1 << (8 * n)) - 1)
        payload = (int.from_bytes(payload, "little") ^ m).to_bytes(n, "little")
    return head + mask + payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason
