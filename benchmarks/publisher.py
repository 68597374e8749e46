"""Publish at a fixed rate to the server under test.

- :class:`HttpPublisher`: ``POST /publish/<subject>`` (fanout embedded mode and
  the Python peer) over a few persistent keep-alive connections, raw asyncio,
  with up to ``window`` requests in flight per connection (HTTP/1.1
  pipelining: responses come back in order). Each subject always goes through
  the same connection so its messages reach the server in publish order.
- :class:`NatsPublisher`: nats-py core publish (for the nats-server peer).

:func:`run_rate` sends ``rate`` messages per second for ``duration`` seconds
over the distribution's subjects, round-robin. Every payload carries ``t``
(``time.time_ns()`` when built) and ``i`` (a per-subject counter). When the
publisher falls behind it sends the backlog in batches (at most
``max_batch`` per tick) rather than silently lowering the rate; the achieved
rate is reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from .common import TokenPayloads, make_payload


class Publisher(Protocol):
    async def connect(self) -> None: ...
    def publish(self, subject: str, body: bytes) -> None: ...
    async def flush(self, timeout: float) -> None: ...
    async def close(self) -> None: ...
    errors: int


class _HttpConn:
    """One keep-alive HTTP/1.1 connection with pipelined POSTs."""

    def __init__(self, host: str, port: int, window: int) -> None:
        self.host, self.port, self.window = host, port, window
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.inflight = 0
        self.queue: deque[bytes] = deque()
        self.statuses: dict[int, int] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.task = asyncio.ensure_future(self._read_responses())

    def send(self, req: bytes) -> None:
        if self.inflight < self.window:
            self.inflight += 1
            self.idle.clear()
            self.writer.write(req)  # type: ignore[union-attr]
        else:
            self.queue.append(req)

    async def _read_responses(self) -> None:
        r = self.reader
        assert r is not None
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            clen = 0
            i = head.lower().find(b"content-length:")
            if i >= 0:
                clen = int(head[i + 15 : head.find(b"\r\n", i)])
            if clen:
                await r.readexactly(clen)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.inflight -= 1
            if self.queue:
                self.inflight += 1
                self.writer.write(self.queue.popleft())  # type: ignore[union-attr]
            elif self.inflight == 0:
                self.idle.set()


class HttpPublisher:
    """See module docstring. ``base`` is like ``http://127.0.0.1:3002``."""

    def __init__(self, base: str, conns: int = 2, window: int = 32, priority: str | None = None) -> None:
        u = urlsplit(base)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.prefix = (u.path.rstrip("/") + "/publish/").encode()
        self.conns = [_HttpConn(self.host, self.port, window) for _ in range(conns)]
        self.extra = b"Fanout-Priority: %s\r\n" % priority.encode() if priority else b""
        self.errors = 0
        self._route: dict[str, _HttpConn] = {}

    async def connect(self) -> None:
        for c in self.conns:
            await c.connect()

    def publish(self, subject: str, body: bytes) -> None:
        c = self._route.get(subject)
        if c is None:
            c = self._route[subject] = self.conns[len(self._route) % len(self.conns)]
        c.send(
            b"POST %s%s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (self.prefix, subject.encode(), self.host.encode(), self.port, self.extra, len(body), body)
        )

    async def flush(self, timeout: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                for c in self.conns:
                    await c.idle.wait()
        except TimeoutError:
            self.errors += sum(c.inflight + len(c.queue) for c in self.conns)

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for c in self.conns:
            for k, v in c.statuses.items():
                out[k] = out.get(k, 0) + v
        return out

    async def close(self) -> None:
        for c in self.conns:
            if c.task:
                c.task.cancel()
            if c.writer:
                c.writer.close()
        bad = {k: v for k, v in self.statuses().items() if k not in (200, 202)}
        self.errors += sum(bad.values())


class NatsPublisher:
    """Core NATS publish via nats-py (the nats-server peer)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc = None
        self.errors = 0

    async def connect(self) -> None:
        import nats

        async def quiet(e: Exception) -> None:  # counted, not printed with a traceback
            self.errors += 1

        self.nc = await nats.connect(self.url, max_reconnect_attempts=3, pending_size=64 << 20, error_cb=quiet)

    def publish(self, subject: str, body: bytes) -> None:
        # nats-py's publish only appends to its pending buffer (a flusher task
        # writes it out), so scheduling it as a task keeps this call sync.
        self._pending.append(asyncio.ensure_future(self.nc.publish(subject, body)))  # type: ignore[union-attr]

    @property
    def _pending(self) -> list[asyncio.Future[None]]:
        if not hasattr(self, "_p"):
            self._p: list[asyncio.Future[None]] = []
        if len(self._p) > 1000:
            self._p = [f for f in self._p if not f.done()]
        return self._p

    async def flush(self, timeout: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=timeout)
        try:
            await self.nc.flush(timeout=timeout)  # type: ignore[union-attr]
        except Exception:
            self.errors += 1

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


@dataclass
class PublishResult:
    sent: int = 0
    elapsed: float = 0.0
    per_subject: dict[str, int] = field(default_factory=dict)
    max_lag_s: float = 0.0  # how far behind schedule the publisher got
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0


async def run_rate(
    pub: Publisher,
    subjects: list[str],
    rate: float,
    duration: float,
    size: int = 200,
    *,
    stop: asyncio.Event | None = None,
    max_batch: int = 2000,
    counters: dict[str, int] | None = None,
    payload: str = "pad",
) -> PublishResult:
    """Publish ``rate`` msg/s for ``duration`` s (or until ``stop``), then flush.

    ``counters`` (subject -> next ``i``) carries the per-subject counters over
    several calls so receivers see one unbroken sequence per subject.
    """
    res = PublishResult()
    if rate <= 0 or duration <= 0:
        return res
    counters = counters if counters is not None else {}
    tokens = TokenPayloads() if payload == "token" else None
    per = res.per_subject
    nsub = len(subjects)
    t0 = time.monotonic()
    end = t0 + duration
    tick = min(0.005, 1.0 / rate)
    total = int(rate * duration)
    while res.sent < total:
        if stop is not None and stop.is_set():
            break
        now = time.monotonic()
        if now >= end + 1.0:  # hopelessly behind: give up, bounded in time
            break
        due = min(total, int((now - t0) * rate) + 1) - res.sent
        if due > 0:
            lag = (now - t0) - res.sent / rate
            if lag > res.max_lag_s:
                res.max_lag_s = lag
            for _ in range(min(due, max_batch)):
                subj = subjects[res.sent % nsub]
                i = counters.get(subj, 0) + 1
                counters[subj] = i
                pub.publish(subj, tokens.make(subj, time.time_ns(), i) if tokens is not None
                            else make_payload(time.time_ns(), i, size))
                per[subj] = per.get(subj, 0) + 1
                res.sent += 1
        await asyncio.sleep(max(0.0, min(tick, t0 + (res.sent + 1) / rate - time.monotonic())))
    res.elapsed = time.monotonic() - t0
    await pub.flush(10.0)
    res.errors = pub.errors
    return res
