"""The ops port's HTTP/1.1 server (/health, /ready, /metrics, POST /publish).

Parsing and framing are h11's (Sans-I/O, RFC 7230 rules); this module adds the
asyncio I/O, the limits and the timeouts. What a client gets:

- Keep-alive and pipelining as h11 decides: HTTP/1.0 requests and
  ``Connection: close`` close after the response.
- Malformed requests (conflicting or non-digit Content-Length, whitespace
  before a header colon, a bad request line, ...) get h11's status hint (400,
  431 for an oversize head, 501 for an unknown Transfer-Encoding) with a JSON
  body, then the connection closes. So do two checks h11 leaves to its user:
  a request with both Content-Length and Transfer-Encoding gets 400 before
  any of its body is read (RFC 9112 6.3: a smuggling attempt; what a proxy
  took for its body never runs as a request), and an HTTP version other
  than 1.0 and 1.1 (``HTTP/2.0``, ``HTTP/1.2``) gets 505. Bare-LF line endings and obs-fold
  continuation lines are read the way h11 reads them (folded into the previous
  header's value, never a header of their own).
- ``Expect: 100-continue`` gets ``100 Continue`` as soon as the head is read,
  or the final answer at once when the body would be refused (413).
- ``HEAD`` gets the GET headers (Content-Length included) and no body.
- Request bodies: Content-Length or chunked, up to ``max_body`` (1 MiB, the
  node's publish limit). A larger declared length is refused with 413 before
  any body is read; a chunked body is refused with 413 as soon as it passes
  the limit, and the connection closes.

Limits, so that nobody can hold the port or delay ``/health`` for others:

- ``HEADER_TIMEOUT`` (10 s): a request head must be complete within this of
  the connection's accept (first request) or of its first byte (keep-alive
  follow-ups), however slowly it trickles; then 408 and close.
- ``IDLE_TIMEOUT`` (30 s): a keep-alive connection with no request starts is
  closed.
- ``BODY_TIMEOUT`` (30 s): the whole body must arrive within this (1 MiB needs
  about 35 KB/s); then 408 and close.
- ``WRITE_TIMEOUT`` (10 s): a client that does not read its response is cut.
- ``MAX_CONNECTIONS`` (256): concurrent ops connections. At the limit a new
  connection evicts the one that has waited longest for a request head
  (idle keep-alive or trickling slowloris); only when every connection is
  busy in a handler does the new one get 503. Every connection is one task
  on the node's event loop; waiting connections cost a wake-up per packet.
- ``MAX_HEAD_BYTES`` (16 KiB, h11's default): request line plus headers.

The timeouts and the connection bound are read when :func:`serve` is called,
so tests may shorten them. h11 0.16 or later: earlier ones accepted malformed
chunk ends (CVE-2025-43859, request smuggling behind a proxy). Refusals are logged as ``ops request refused`` lines, rate-limited
per reason and peer by :func:`fanout.log.limited_event`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

from .log import event, limited_event

__all__ = ["HttpRequest", "HttpResponse", "serve"]

HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
BODY_TIMEOUT = 30.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY = 1 << 20
LINGER_TIMEOUT = 2.0        # after refusing a body: read and drop what the client still sends, for so long ...
LINGER_BYTES = 1 << 20      # ... or so many bytes, so the client reads our answer instead of a reset
READ_CHUNK = 64 * 1024

_WAIT_ORDER = itertools.count()   # a sequence, not a clock: connections accepted in one tick still have an order


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]   # lower-case names; repeated headers joined with ", "
    body: bytes
    peer: str


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def _error(status: int, error: str, message: str) -> HttpResponse:
    return HttpResponse(status, json.dumps({"error": error, "message": message}, separators=(",", ":")).encode())


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _log_refusal(status: int, reason: str, peer: str) -> None:
    # Bad input from one peer must not flood the log: fanout.log limits the lines per (reason, peer).
    limited_event(("ops_" + reason, peer), logging.INFO, "ops request refused", status=status, reason=reason, peer=peer)


class _Closed(Exception):
    """The connection is over (EOF, timeout while idle, eviction): nothing more to send."""


@dataclass(slots=True)
class _Settings:
    header_timeout: float
    idle_timeout: float
    body_timeout: float
    write_timeout: float
    max_connections: int
    max_body: int


class _Conn:
    """One ops connection: reads with deadlines, h11 parses, the handler answers."""

    def __init__(self, pool: _Pool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.pool = pool
        self.s = pool.settings
        self.reader = reader
        self.writer = writer
        peername = writer.get_extra_info("peername")
        self.peer = peername[0] if isinstance(peername, tuple) else str(peername)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.loop = asyncio.get_running_loop()
        # Set while waiting for a request (idle or trickling): such connections
        # may be evicted, lowest number (longest waiting) first.
        self.waiting: int | None = next(_WAIT_ORDER)
        self.evicted = False
        self.method = b""   # of the request being answered: HEAD answers carry no body, refusals included

    def evict(self) -> None:
        self.evicted = True
        self.writer.transport.abort()

    async def run(self) -> None:
        try:
            first = True
            while True:
                got = await self._read_request(first)
                first = False
                if isinstance(got, HttpResponse):
                    # Refused (bad head, timeout, body too large): the rest of
                    # the request may still be coming, so answer and close.
                    await self._send(got, close=True)
                    await self._linger()
                    return
                self.waiting = None
                try:
                    resp = await self.pool.handler(got)
                except Exception:
                    event(logging.ERROR, "ops handler failed", path=got.path, exc_info=True)
                    resp = _error(500, "internal_error", "the handler failed; see the node log")
                await self._send(resp, close=False)
                if self.h11.our_state is not h11.DONE:
                    return   # MUST_CLOSE: HTTP/1.0 or Connection: close, as h11 decided
                self.h11.start_next_cycle()
                self.method = b""
                self.waiting = next(_WAIT_ORDER)
        except (_Closed, ConnectionError, TimeoutError, OSError):
            pass
        except h11.LocalProtocolError:
            # We were about to send something h11 calls invalid (a handler's bad header): our bug, not the client's.
            event(logging.ERROR, "ops response invalid", peer=self.peer, exc_info=True)
        finally:
            self.pool.forget(self)
            self.writer.close()

    # ----------------------------------------------------------------- reading
    async def _fill(self, deadline: float) -> bool:
        """Feed h11 the next bytes; False when the deadline passed first."""
        try:
            async with asyncio.timeout_at(deadline):
                data = await self.reader.read(READ_CHUNK)
        except TimeoutError:
            return False
        if self.evicted:
            raise _Closed
        self.h11.receive_data(data)   # b"" tells h11 the peer closed
        return True

    def _refuse(self, status: int, reason: str, message: str) -> HttpResponse:
        _log_refusal(status, reason, self.peer)
        return _error(status, reason, message)

    async def _read_request(self, first: bool) -> HttpRequest | HttpResponse:
        """The next request, body read in full, or the refusal to send before closing."""
        now = self.loop.time()
        # A new connection must send its head within the header timeout; a
        # keep-alive one may first sit idle, and its head clock starts with its first byte.
        idle = not first and not self.h11.trailing_data[0]
        deadline = now + (self.s.idle_timeout if idle else self.s.header_timeout)
        try:
            while True:
                ev = self.h11.next_event()
                if ev is h11.NEED_DATA:
                    if not await self._fill(deadline):
                        if idle:
                            raise _Closed
                        return self._refuse(408, "timeout", f"request head not complete within {self.s.header_timeout:g} s")
                    if idle and self.h11.trailing_data[0]:
                        idle = False
                        deadline = self.loop.time() + self.s.header_timeout
                    continue
                if isinstance(ev, h11.ConnectionClosed):
                    raise _Closed
                if isinstance(ev, h11.Request):
                    return await self._read_body(ev)
                raise _Closed   # PAUSED or anything else: not a state a server waiting for a request is in
        except h11.RemoteProtocolError as exc:
            if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                raise _Closed from exc
            status = exc.error_status_hint
            return self._refuse(status, "bad_request" if status == 400 else _reason(status).lower().replace(" ", "_"),
                                str(exc))

    async def _read_body(self, req: h11.Request) -> HttpRequest | HttpResponse:
        self.method = req.method
        if req.http_version not in (b"1.0", b"1.1"):
            # h11 parses any HTTP/d.d request line; only 1.0 and 1.1 are spoken here.
            return self._refuse(505, "http_version_not_supported",
                                f"HTTP/{req.http_version.decode('ascii')} is not supported; use HTTP/1.1")
        headers: dict[str, str] = {}
        for name, value in req.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        request = HttpRequest(req.method.decode("ascii"), req.target.decode("ascii"), headers, b"", self.peer)
        if "content-length" in headers and "transfer-encoding" in headers:
            # RFC 9112 6.3: h11 would frame the body by Transfer-Encoding and keep
            # the connection, so bytes a Content-Length-framing proxy counted as
            # body would run here as a second request (smuggling). Refused
            # unread; the close after the answer drops whatever follows.
            return self._refuse(400, "bad_request", "both Content-Length and Transfer-Encoding")
        too_large = f"body over {self.s.max_body} bytes"
        declared = headers.get("content-length")
        # h11 has checked it is one run of digits.
        if declared is not None and int(declared) > self.s.max_body:
            # Refused before any of the body is read, and without 100 Continue,
            # so an Expect-ing client never sends it.
            return self._refuse(413, "too_large", too_large)
        if self.h11.they_are_waiting_for_100_continue:
            await self._write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                      reason=b"Continue")))
        deadline = self.loop.time() + self.s.body_timeout
        body = bytearray()
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA:
                if not await self._fill(deadline):
                    return self._refuse(408, "timeout", f"request body not complete within {self.s.body_timeout:g} s")
                continue
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > self.s.max_body:
                    return self._refuse(413, "too_large", too_large)
                continue
            if isinstance(ev, h11.EndOfMessage):
                request.body = bytes(body)
                return request
            raise _Closed   # ConnectionClosed mid-body

    # ----------------------------------------------------------------- writing
    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.s.write_timeout):
            await self.writer.drain()

    async def _send(self, resp: HttpResponse, close: bool) -> None:
        headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body)))]
        headers += [(k, v) for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-type")]
        if close:
            headers.append(("Connection", "close"))
        out = self.h11.send(h11.Response(status_code=resp.status, headers=headers, reason=_reason(resp.status)))
        if resp.body and self.method != b"HEAD":
            out += self.h11.send(h11.Data(data=resp.body))
        out += self.h11.send(h11.EndOfMessage())
        await self._write(out)

    async def _linger(self) -> None:
        """Half-close, then drop what the client still sends for a bounded
        time: closing with unread data would reset the connection and the
        client might lose the answer we just sent."""
        if self.writer.can_write_eof():
            self.writer.write_eof()
        left = LINGER_BYTES
        try:
            async with asyncio.timeout(LINGER_TIMEOUT):
                while left > 0 and (data := await self.reader.read(READ_CHUNK)):
                    left -= len(data)
        except TimeoutError:
            pass


class _Pool:
    """The open connections, for the connection limit."""

    def __init__(self, handler: Handler, settings: _Settings) -> None:
        self.handler = handler
        self.settings = settings
        self.conns: set[_Conn] = set()

    def forget(self, conn: _Conn) -> None:
        self.conns.discard(conn)

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(self, reader, writer)
        if len(self.conns) >= self.settings.max_connections:
            waiting = [c for c in self.conns if c.waiting is not None]
            if not waiting:
                _log_refusal(503, "too_many_connections", conn.peer)
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 32\r\n\r\n"
                             b'{"error":"too_many_connections"}')
                writer.close()
                return
            oldest = min(waiting, key=lambda c: c.waiting or 0)
            self.conns.discard(oldest)
            oldest.evict()
        self.conns.add(conn)
        try:
            await conn.run()
        except asyncio.CancelledError:
            # The loop is ending (shutdown cancels every task). End quietly:
            # this task is asyncio.start_server's own and nobody awaits it,
            # and on Python 3.11 its done-callback calls task.exception() on
            # a cancelled task, which logs the CancelledError as an error.
            self.conns.discard(conn)
            writer.close()


async def serve(host: str, port: int, handler: Handler, max_body: int | None = None) -> asyncio.Server:
    """Listen on ``host:port`` and answer each request with ``handler``.

    The returned server's ``close()`` stops listening; open connections end
    with the event loop (or their timeouts).
    """
    settings = _Settings(HEADER_TIMEOUT, IDLE_TIMEOUT, BODY_TIMEOUT, WRITE_TIMEOUT, MAX_CONNECTIONS,
                         MAX_BODY if max_body is None else max_body)
    pool = _Pool(handler, settings)
    return await asyncio.start_server(pool.on_client, host, port, limit=READ_CHUNK, reuse_address=True)
