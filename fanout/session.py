"""One client connection: its socket, its WebSocket protocol state, its requests.

Reading uses websockets' Sans-I/O :class:`~websockets.server.ServerProtocol`
(handshake, permessage-deflate negotiation, unmasking, inflating, ping/pong,
close handshake, the 1009 size limit). It does not check that text frames
are UTF-8; a frame that is not gets ``bad_request`` like any frame that is not
JSON, and the connection stays open (PROTOCOL.md). Writing never goes
through it: after the handshake, every byte for this client (data frames,
control replies, and the pongs/close frames websockets produces) is queued in
the compiled core, in order, and leaves in one ``sendmsg()`` per loop turn.

The socket is a plain non-blocking socket watched with ``loop.add_reader``
(no asyncio transport): one object per connection, and the core can write to
the fd directly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from .auth import AuthError, Claims, verify
from .codes import CloseCode, ErrorCode
from .log import event
from .protocol import Heartbeat, Replay, RequestError, Resume, Subscribe, Unsubscribe, parse_request, reply
from .protocol import Request as ClientRequest

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Session"]

_ids = itertools.count(1)
WS_PATHS = ("/", "/ws")
CLOSE_TIMEOUT = 5.0      # seconds to wait for the client's close frame after ours
RECV_SIZE = 65536


class Session:
    __slots__ = (
        "server", "hub", "cfg", "loop", "sock", "fd", "peer", "id", "protocol", "slot", "claims",
        "closing", "closed", "last_seen", "tokens", "tokens_at", "strikes", "_frag", "_timer", "_task", "_held",
    )

    def __init__(self, server: Server, sock: socket.socket, peer: Any) -> None:
        self.server = server
        self.hub = server.hub
        self.cfg = server.cfg
        self.loop = server.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.id = next(_ids)
        self.protocol = ServerProtocol(extensions=server.extensions, max_size=self.cfg.ws_max_frame_bytes)
        self.slot: int | None = None
        self.claims: Claims | None = None
        self.closing = False
        self.closed = False
        now = time.monotonic()
        self.last_seen = now
        self.tokens = float(self.cfg.ws_control_burst)
        self.tokens_at = now
        self.strikes = 0
        self._frag: list[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._held: list[ClientRequest] = []   # requests waiting for a running resume
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.cfg.ws_handshake_timeout, self.abort, "handshake timeout")
        self.loop.add_reader(self.fd, self._on_readable)

    # ------------------------------------------------------------------ input
    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(f"recv failed: {exc}")
            return
        protocol = self.protocol
        if data:
            self.last_seen = time.monotonic()
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        request = False
        try:
            for ev in protocol.events_received():
                if isinstance(ev, Frame):
                    self._on_frame(ev)
                elif isinstance(ev, Request):
                    request = True
                    self._on_handshake(ev)
        except Exception:  # a bug here must not take the node down
            event(logging.ERROR, "client handler failed", client=self.id, exc_info=True)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        if data and not request and self.slot is None and protocol.handshake_exc is not None:
            # Not an HTTP request at all: websockets drops it without a response.
            self.server.metrics.rejected.labels("bad_handshake").inc()
            event(logging.INFO, "handshake refused", client=self.id, peer=self.peer,
                  reason=f"{protocol.handshake_exc}: {protocol.handshake_exc.__cause__}")
        elif protocol.close_sent is not None and protocol.close_rcvd is None and not self.closing:
            # websockets failed the connection itself (frame over the size
            # limit: 1009; protocol error: 1002).
            code = protocol.close_sent.code
            self.server.metrics.closed.labels(str(code)).inc()
            event(logging.INFO, "client closed", client=self.id, peer=self.peer, code=code,
                  reason=protocol.close_sent.reason)
        self._pump()
        if not data and not self.closed:
            self.abort("eof")

    def _pump(self) -> None:
        """Move what websockets wants to send into the core queue (or the socket,
        before the handshake completes)."""
        if self.closed:
            return
        eof = False
        for chunk in self.protocol.data_to_send():
            if not chunk:
                eof = True
            elif self.slot is not None:
                self.hub.core.enqueue_raw(self.slot, chunk)
                self.hub.schedule_flush()
            else:
                self._send_direct(chunk)
        if self.protocol.state is not State.OPEN and self.slot is not None:
            self.hub.core.set_nodata(self.slot)
            self.closing = True
        if eof:
            if self.slot is None:
                self.abort("handshake refused")
            else:
                self.hub.drain_then_close(self)

    def _send_direct(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError:
            pass  # best effort: a refused handshake on a dead socket

    # -------------------------------------------------------------- handshake
    def _on_handshake(self, request: Request) -> None:
        server, metrics = self.server, self.server.metrics
        url = urlsplit(request.path)
        response: Response
        if url.path not in WS_PATHS:
            response = self._refuse(404, "not_found", "Not Found: WebSocket paths are /ws and /\n")
        elif server.draining:
            response = self._refuse(503, "draining", "Service Unavailable: node is shutting down\n", retry_after=5)
        elif self.hub.full:
            response = self._refuse(503, "connection_limit", "Service Unavailable: connection limit reached\n", retry_after=5)
        elif server.braking:
            response = self._refuse(503, "overload", "Service Unavailable: node is overloaded\n", retry_after=10)
        else:
            response = self._authenticate(request, url.query) or self.protocol.accept(request)
        self.protocol.send_response(response)
        if response.status_code != 101:
            if self.protocol.handshake_exc is not None and response.status_code not in (401, 404, 503):
                metrics.rejected.labels("bad_handshake").inc()
                event(logging.INFO, "handshake refused", client=self.id, peer=self.peer,
                      status=response.status_code, reason=str(self.protocol.handshake_exc))
            self._pump()
            return
        wbits = 0
        for ext in self.protocol.extensions:
            if isinstance(ext, PerMessageDeflate):
                wbits = ext.local_max_window_bits or 15
        self.slot = self.hub.attach(self, wbits)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for chunk in self.protocol.data_to_send():
            self.hub.core.enqueue_raw(self.slot, chunk, False)
        self.hub.schedule_flush()
        metrics.accepted.inc()
        event(logging.DEBUG, "client connected", client=self.id, peer=self.peer, slot=self.slot,
              deflate=bool(wbits), user=self.claims.sub if self.claims else None)

    def _refuse(self, status: int, reason: str, text: str, retry_after: int | None = None) -> Response:
        self.server.metrics.rejected.labels(reason).inc()
        response = self.protocol.reject(status, text)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    def _authenticate(self, request: Request, query: str) -> Response | None:
        secret = self.cfg.ws_auth_secret
        if not secret:
            return None
        tokens = parse_qs(query).get("auth")
        token: str | None = tokens[0] if tokens else None
        header = request.headers.get("Authorization", "")
        if token is None and header.lower().startswith("bearer "):
            token = header[7:].strip()
        try:
            self.claims = verify(token, secret)
        except AuthError as exc:
            event(logging.INFO, "handshake refused", client=self.id, peer=self.peer, reason=str(exc))
            response = self._refuse(401, "unauthorized", f"Unauthorized: {exc}\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="fanout"'
            return response
        return None

    # ----------------------------------------------------------------- frames
    def _on_frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if not self._allow():
                return
            if not frame.fin:
                self._frag = [bytes(frame.data)] if op is Opcode.TEXT else []
                return
            if op is Opcode.BINARY:
                self._bad_request("binary frames are not supported: send JSON text frames")
                return
            self._on_text(bytes(frame.data))
        elif op is Opcode.CONT:
            if self._frag is None:
                return
            self._frag.append(bytes(frame.data))
            if frame.fin:
                parts, self._frag = self._frag, None
                if parts:
                    self._on_text(b"".join(parts))
                else:
                    self._bad_request("binary frames are not supported: send JSON text frames")
        elif op is Opcode.PING:
            self._allow()
        # PONG and CLOSE: websockets already did what they need (last_seen is updated).

    def _allow(self) -> bool:
        """Token bucket over client frames: rate_limited errors, then 1008."""
        now = time.monotonic()
        cfg = self.cfg
        self.tokens = min(float(cfg.ws_control_burst), self.tokens + (now - self.tokens_at) * cfg.ws_control_rate)
        self.tokens_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.strikes += 1
        if self.strikes >= cfg.ws_control_strikes:
            event(logging.WARNING, "client flooding: closed", client=self.id, peer=self.peer)
            self.close(CloseCode.POLICY_VIOLATION, "too many messages")
        else:
            self.hub.send_error(self, ErrorCode.RATE_LIMITED,
                                f"over {cfg.ws_control_rate:g} messages/s: slow down or be disconnected")
        return False

    def _bad_request(self, message: str, req_id: Any = None) -> None:
        self.server.metrics.client_frames.labels("invalid").inc()
        self.hub.send_error(self, ErrorCode.BAD_REQUEST, message, req_id)

    def _on_text(self, data: bytes) -> None:
        if self.closing or self.slot is None:
            return
        try:
            req = parse_request(data)
        except RequestError as exc:
            self._bad_request(exc.message, exc.req_id)
            return
        self.server.metrics.client_frames.labels(type(req).__name__.lower()).inc()
        if self._task is not None and not self._task.done():
            # A resume is fetching history: later requests wait for it, so
            # this connection's messages stay in stream order.
            self._held.append(req)
            return
        self._handle(req)

    def _handle(self, req: ClientRequest) -> None:
        hub = self.hub
        if isinstance(req, Subscribe):
            accepted = hub.subscribe(self, req.channels, req.id)
            # stream_seq: the position the subscription starts after, so a
            # client that got nothing yet can still resume from here.
            hub.send(self, reply("subscribed", req.id, channels=accepted, epoch=hub.epoch,
                                 stream_seq=hub.last_stream_seq))
        elif isinstance(req, Unsubscribe):
            done = hub.unsubscribe(self, req.channels, req.id)
            hub.send(self, reply("unsubscribed", req.id, channels=done))
        elif isinstance(req, Replay):
            hub.replay(self, req.from_seq, req.to_seq, req.id)
        elif isinstance(req, Resume):
            self._task = self.loop.create_task(self._resume(req))
        elif isinstance(req, Heartbeat):
            hub.send(self, reply("heartbeat_ack", req.id, ts=int(time.time() * 1000)))

    async def _resume(self, req: Resume) -> None:
        try:
            await self.hub.resume(self, req.channels, req.after, req.epoch, req.id)
        except Exception as exc:
            event(logging.ERROR, "resume failed", client=self.id, error=str(exc), exc_info=True)
            if not self.closing and self.slot is not None:
                self.hub.send(self, reply("resumed", req.id, channels=[], epoch=self.hub.epoch, complete=False,
                                          stream_seq=self.hub.last_stream_seq))
        # Requests that came in meanwhile, in order (one may be another resume).
        while self._held and not self.closing and self.slot is not None:
            held = self._held.pop(0)
            if isinstance(held, Resume):
                self._task = self.loop.create_task(self._resume(held))
                return
            self._handle(held)
        self._held.clear()

    # ---------------------------------------------------------------- closing
    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake: queued data first, then our close frame."""
        if self.closing or self.closed:
            return
        self.closing = True
        self.server.metrics.closed.labels(str(int(code))).inc()
        if self.slot is None:
            self.abort(reason)
            return
        self.hub.publish_pending()  # messages accepted before the close go out before it
        self.hub.core.set_nodata(self.slot)
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(int(code), reason)
        self._pump()
        if self._timer is None:
            self._timer = self.loop.call_later(CLOSE_TIMEOUT, self.abort, "close timeout")

    def finish_close(self) -> None:
        """Everything queued was written and the close handshake is done."""
        if self.closed:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.abort(None)

    def abort(self, why: str | None) -> None:
        """Drop the connection now."""
        if self.closed:
            return
        self.closed = True
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.loop.remove_reader(self.fd)
        self.hub.detach(self)
        self.slot = None
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.forget(self)
        if why:
            event(logging.DEBUG, "client dropped", client=self.id, peer=self.peer, reason=why)
