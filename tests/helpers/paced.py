"""Paced readers and a steady publisher for the throttle tests (embedded and
JetStream): real sockets to a real node, a 4 KiB receive buffer, readers that
read a set share of the stream's bytes.

A reader's pace is tied to what was published, not to the clock: "reads half
the stream's bytes" then holds whatever speed the (shared, loaded) machine
publishes at. Readers are plain sockets read in bulk from one thread (frames
are parsed from the bytes afterwards), so 200 of them cost the test process
little.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ByteReader", "Pacer", "Stream", "frames_of"]

#: The issue's mix: a quarter critical, the rest spread over high, medium, low.
PRIORITIES = ("critical", "high", "medium", "low")


def frames_of(buf: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Whole server frames (opcode, payload) at the start of ``buf``, and the bytes they take."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + 2 <= len(buf):
        n, h = buf[pos + 1] & 0x7F, 2
        if n == 126:
            if pos + 4 > len(buf):
                break
            n, h = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
        elif n == 127:
            if pos + 10 > len(buf):
                break
            n, h = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
        if pos + h + n > len(buf):
            break
        out.append((buf[pos] & 0x0F, buf[pos + h:pos + h + n]))
        pos += h + n
    return out, pos


class ByteReader:
    """A raw WebSocket client on a blocking-then-non-blocking socket.

    ``pace``: the share of the stream's bytes it may have read (None: as fast
    as it can). :meth:`pump` reads up to its allowance; :meth:`parse` turns
    what it read into messages, notices and the close code."""

    def __init__(self, port: int, channels: list[str], pace: float | None, rcvbuf: int = 4096) -> None:
        self.pace = pace
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)   # before connect: a small window
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, "handshake: connection closed"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        payload = json.dumps({"type": "subscribe", "channels": channels}).encode()
        mask = os.urandom(4)
        assert len(payload) < 126
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        self.sock.setblocking(False)
        self.data = bytearray()
        self.eof = False
        self.parsed = 0
        self.messages: list[dict[str, Any]] = []
        self.notices: list[dict[str, Any]] = []
        self.notice_at: list[int] = []       # len(messages) when each notice came: its place in the stream
        self.replies: list[dict[str, Any]] = []
        self.close_code: int | None = None

    def pump(self, allowance: int, parse: bool = True) -> int:
        """Read at most ``allowance`` bytes (those there are), then parse them."""
        got = 0
        while got < allowance and not self.eof:
            try:
                chunk = self.sock.recv(min(65536, allowance - got))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            self.data += chunk
            got += len(chunk)
        if got and parse:
            self.parse()
        return got

    def parse(self) -> None:
        """Turn the bytes read so far into messages, notices, replies, the close code."""
        frames, used = frames_of(bytes(self.data[self.parsed:]))
        self.parsed += used
        for op, payload in frames:
            if op == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            elif op == 0x1:
                m = json.loads(payload)
                if m["type"] == "message":
                    self.messages.append(m)
                elif m["type"] == "throttle_update":
                    self.notices.append(m)
                    self.notice_at.append(len(self.messages))
                else:
                    self.replies.append(m)

    @property
    def level(self) -> int:
        return self.notices[-1]["level"] if self.notices else 0

    @property
    def closed(self) -> bool:
        return self.close_code is not None or self.eof

    def close(self) -> None:
        self.sock.close()


class Stream:
    """Publishes ``rate`` msg/s from a thread through the node's HTTP endpoint
    (one keep-alive connection), recording (stream_seq, subject, priority, bytes)."""

    def __init__(self, port: int, rate: float, size: int, subjects: list[str],
                 priority: Callable[[int], str] = lambda i: PRIORITIES[i % 4], limit: int = 20_000,
                 payload: Callable[[int, str], dict[str, Any]] | None = None) -> None:
        self.port = port
        self.rate = rate
        self.size = size
        self.subjects = subjects
        self.priority = priority
        self.limit = limit
        self.payload = payload or (lambda i, s: {"i": i})
        self.published: list[tuple[int, str, str, int]] = []
        self.bytes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        t = time.monotonic()
        i = 0
        while not self.stop.is_set() and i < self.limit:      # bounded
            subject = self.subjects[i % len(self.subjects)]
            body = self.payload(i, subject)
            body["pad"] = "x" * max(0, self.size - len(json.dumps(body)) - 9)
            raw = json.dumps(body).encode()
            prio = self.priority(i)
            conn.request("POST", f"/publish/{subject}", raw, {"Fanout-Priority": prio})
            resp = conn.getresponse()
            out = resp.read()
            assert resp.status == 202, (resp.status, out)
            seq = int(json.loads(out)["stream_seq"])
            # What a reader receives for it: the frame header and the envelope around the payload.
            nbytes = len(raw) + len(subject) + 90
            self.published.append((seq, subject, prio, nbytes))
            self.bytes += nbytes
            i += 1
            t += 1.0 / self.rate
            delay = t - time.monotonic()
            if delay > 0:
                time.sleep(delay)         # pacing the load, not synchronisation
            else:
                t = time.monotonic()
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(15)


class Pacer:
    """Reads every reader up to its allowance (its pace times the stream's
    bytes so far) every ``tick`` seconds, on one thread; a reader with no
    pace (or ``full`` set) reads all it can."""

    def __init__(self, readers: list[ByteReader], stream: Stream, tick: float = 0.02, parse: bool = True) -> None:
        self.readers = readers
        self.parse = parse          # False: the caller parses (r.parse()) when it looks
        self.stream = stream
        self.tick = tick
        self.full = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            published = self.stream.bytes
            for r in self.readers:
                if r.eof:
                    continue
                if r.pace is None or self.full:
                    r.pump(1 << 24, self.parse)
                else:
                    r.pump(int(r.pace * published) - len(r.data), self.parse)
            time.sleep(self.tick)         # pacing the readers, not synchronisation

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(15)
