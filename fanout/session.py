"""One client connection: its socket, its WebSocket protocol state, its requests.

A session owns its socket, both directions of its fd registration with the
event loop, and its state machine::

    HANDSHAKE --101--> OPEN --close sent or received--> DRAINING --queue written--> CLOSED
        |                                                                            ^
        +------------- refused / timeout / error / abort at any time ----------------+

Reading uses websockets' Sans-I/O :class:`~websockets.server.ServerProtocol`
(handshake, permessage-deflate negotiation, unmasking, inflating, ping/pong,
close handshake, the 1009 size limit). websockets does not check that text
frames are UTF-8; this module does, and closes with 1007 on invalid UTF-8
(RFC 6455 8.1). Writing never goes through it: after the handshake, every
byte for this client (data frames, control replies, the pongs and close
frames websockets produces) is queued in the compiled core through the hub,
in order, and leaves in one ``sendmsg()`` per loop turn.

The socket is a plain non-blocking socket watched with ``loop.add_reader``
(no asyncio transport): one object per connection, and the core writes to
the fd directly. When the core reports the socket full (:meth:`on_blocked`),
the session watches it for writability until its queue is written.

Every client frame but CLOSE costs a token of the ``WS_CONTROL_RATE`` bucket
(data, ping, pong and continuation frames alike): a client over it gets
``rate_limited`` errors, then 1008 after ``WS_CONTROL_STRIKES``; from then on
nothing it sends is read. Log lines a client can cause are rate-limited per
client and reason (:func:`fanout.log.limited_event`).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import InvalidHandshake, InvalidHeader, InvalidOrigin
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from .auth import AuthError, AuthUnavailable, Claims
from .codes import CloseCode, ErrorCode
from .config import Config
from .log import event, limited_event
from .metrics import Metrics
from .origins import allowed_origins
from .protocol import (
    Heartbeat,
    Refresh,
    Replay,
    RequestError,
    Resume,
    Subscribe,
    Unsubscribe,
    error_reply,
    parse_request,
    reply,
)
from .protocol import Request as ClientRequest
from .ratelimit import TokenBucket
from .subjects import subject_error

if TYPE_CHECKING:
    from .auth import Authenticator
    from .hub import Resumed

__all__ = ["Session", "SessionHost", "Router", "State", "Refusal"]

_ids = itertools.count(1)
WS_PATHS = ("/", "/ws")
CLOSE_TIMEOUT = 5.0      # seconds to wait for the client's close frame after ours
RECV_SIZE = 65536
LINGER_TIMEOUT = 2.0     # after our last byte: read and drop what the client still sends, for so long ...
LINGER_BYTES = 1 << 20   # ... or so many bytes, so the client reads our close frame instead of a reset


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"


#: An admission refusal: HTTP status, metric reason, body text, Retry-After seconds (or None).
Refusal = tuple[int, str, str, "int | None"]


class Router(Protocol):
    """What a session needs from the hub (the one caller of the core): its slot's
    stream in and out. The hub calls back through :class:`fanout.hub.Peer`."""

    epoch: str

    @property
    def last_stream_seq(self) -> int: ...

    def attach(self, peer: Session, wbits: int) -> int: ...

    def detach(self, slot: int) -> None: ...

    def send_raw(self, slot: int, data: bytes) -> None: ...

    def reply(self, slot: int, payload: bytes) -> None: ...

    def stop_data(self, slot: int) -> None: ...

    def watch_drain(self, slot: int) -> None: ...

    def flush_one(self, slot: int) -> int: ...

    def discard_queued(self, slot: int) -> int: ...

    def subscribe(self, slot: int, patterns: list[str], delta: bool = False) -> tuple[list[str], list[str]]: ...

    def delta_reply(self, patterns: list[str], asked: str | None) -> str | None: ...

    def unsubscribe(self, slot: int, patterns: list[str]) -> None: ...

    def replay(self, slot: int, from_seq: int, to_seq: int,
               on_done: Callable[[tuple[int, int] | None], None]) -> None: ...

    def resume(self, slot: int, patterns: list[str], after: int, epoch: str | None,
               on_done: Callable[[Resumed], None], delta: bool = False) -> None: ...

    def snapshot(self, slot: int, patterns: list[str],
                 on_done: Callable[[list[str], list[str], int], None], delta: bool = False) -> None: ...


class SessionHost(Protocol):
    """What a session needs from the node that accepted it (the server)."""

    cfg: Config
    metrics: Metrics
    loop: asyncio.AbstractEventLoop
    auth: Authenticator | None
    clock: Callable[[], float]

    @property
    def hub(self) -> Router: ...

    @property
    def extensions(self) -> Sequence[ServerExtensionFactory] | None: ...

    def admission(self) -> Refusal | None:
        """Why a new connection must be refused now (draining, full, overloaded), or None."""

    def admit_user(self, claims: Claims) -> Refusal | None:
        """After the token check, before 101: why this user may not connect now (the
        per-user limit with refuse_new), or None."""

    def opened(self, session: Session) -> None:
        """The handshake succeeded."""

    def closed(self, session: Session) -> None:
        """The session is gone (any state): forget it."""


class Session:
    __slots__ = (
        "host", "hub", "cfg", "loop", "clock", "sock", "fd", "peer", "id", "protocol", "slot", "claims",
        "state", "last_seen", "bucket", "strikes", "_frag", "_frag_text", "_timer", "_expiry", "_busy", "_linger_left",
        "_held", "_writing", "_reading", "_auth_task", "closed_code", "was_open",
    )

    def __init__(self, host: SessionHost, sock: socket.socket, peer: Any) -> None:
        self.host = host
        self.hub = host.hub
        self.cfg = host.cfg
        self.loop = host.loop
        self.clock = host.clock
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.id = next(_ids)
        self.protocol = ServerProtocol(origins=allowed_origins(self.cfg.ws_allowed_origins),
                                       extensions=host.extensions, max_size=self.cfg.ws_max_frame_bytes)
        self.slot: int | None = None
        self.claims: Claims | None = None
        self.state = State.HANDSHAKE
        self.last_seen = self.clock()
        self.bucket = TokenBucket(self.cfg.ws_control_rate, self.cfg.ws_control_burst, self.clock)
        self.strikes = 0
        self.closed_code: int | None = None
        self.was_open = False
        self._frag: list[bytes] | None = None
        self._frag_text = False
        self._busy = False                      # a resume or replay is running
        self._held: list[ClientRequest] = []    # requests waiting for it, in order
        self._writing = False
        self._reading = True
        self._linger_left = 0                   # bytes still to drop after the close (see finish_close)
        self._auth_task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.cfg.ws_handshake_timeout, self.abort, "handshake timeout")
        self.loop.add_reader(self.fd, self._on_readable)

    @property
    def closing(self) -> bool:
        return self.state is State.DRAINING or self.state is State.CLOSED

    def _log(self, key: str, level: int, msg: str, **fields: Any) -> None:
        limited_event((key, self.id), level, msg, client=self.id, peer=self.peer, **fields)

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
            self.last_seen = self.clock()
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        request = False
        try:
            for ev in protocol.events_received():
                if isinstance(ev, Frame):
                    if self._reading:
                        self._on_frame(ev)
                elif isinstance(ev, Request):
                    request = True
                    self._on_handshake(ev)
        except Exception:  # a bug here must not take the node down
            event(logging.ERROR, "client handler failed", client=self.id, exc_info=True)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        if data and not request and self.state is State.HANDSHAKE and protocol.handshake_exc is not None:
            # Not an HTTP request at all: websockets drops it without a response.
            self.host.metrics.rejected.labels("bad_handshake").inc()
            self._log("bad_handshake", logging.INFO, "handshake refused",
                      reason=f"{protocol.handshake_exc}: {protocol.handshake_exc.__cause__}")
        elif (protocol.close_sent is not None and protocol.close_rcvd is None
              and self.state is State.OPEN):
            # websockets failed the connection itself (frame over the size
            # limit: 1009; protocol error: 1002).
            code = protocol.close_sent.code
            self.closed_code = code
            self.host.metrics.closed.labels(str(code)).inc()
            self._log("protocol_close", logging.INFO, "client closed", code=code, reason=protocol.close_sent.reason)
        self._pump()
        if not data and self.state is not State.CLOSED:
            self.abort("eof")

    def _pump(self) -> None:
        """Move what websockets wants to send into the core queue (or the socket,
        before the handshake completes), and follow its state."""
        if self.state is State.CLOSED:
            return
        eof = False
        for chunk in self.protocol.data_to_send():
            if not chunk:
                eof = True
            elif self.slot is not None:
                self.hub.send_raw(self.slot, chunk)
            else:
                self._send_direct(chunk)
        if self.slot is not None and self.state is State.OPEN and self.protocol.state is not WsState.OPEN:
            self._enter_draining()
        if eof:
            if self.slot is None:
                self.abort("handshake refused")
            else:
                self.hub.watch_drain(self.slot)

    def _send_direct(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError:
            pass  # best effort: a refused handshake on a dead socket

    # -------------------------------------------------------------- handshake
    def _on_handshake(self, request: Request) -> None:
        url = urlsplit(request.path)
        refusal: Refusal | None
        if url.path not in WS_PATHS:
            refusal = (404, "not_found", "Not Found: WebSocket paths are /ws and /\n", None)
        else:
            refusal = self._origin_refusal(request) or self.host.admission()
        if refusal is not None:
            self._respond(self._refuse(*refusal))
            return
        auth = self.host.auth
        if auth is None or not auth.enabled:
            self._respond(self._accept(request))
            return
        # Verifying may wait for a JWKS download: read nothing more meanwhile.
        self.loop.remove_reader(self.fd)
        self._auth_task = self.loop.create_task(self._authenticate(auth, request, url.query))

    def _origin_refusal(self, request: Request) -> Refusal | None:
        """403 for a page whose origin is not in ``WS_ALLOWED_ORIGINS`` (websockets
        matches; see fanout/origins.py), before admission or a token check costs anything."""
        if self.protocol.origins is None:
            return None
        try:
            self.protocol.process_origin(request.headers)
        except InvalidOrigin:
            origin = (request.headers.get("Origin") or "")[:200]
            # Keyed by origin: one hostile page makes one line per interval, however many visitors it has.
            limited_event(("origin", origin), logging.INFO, "handshake refused", reason="origin", origin=origin,
                          client=self.id, peer=self.peer)
            return (403, "origin", "Forbidden: this origin may not open WebSockets here\n", None)
        except InvalidHandshake:
            pass   # several Origin headers: accept() refuses the request (400, bad_handshake)
        return None

    async def _authenticate(self, auth: Authenticator, request: Request, query: str) -> None:
        tokens = parse_qs(query).get("auth")
        token: str | None = tokens[0] if tokens else None
        header = request.headers.get("Authorization", "")
        if token is None and header.lower().startswith("bearer "):
            token = header[7:].strip()
        response: Response
        try:
            self.claims = await auth.verify(token)
        except AuthUnavailable as exc:
            response = self._refuse(503, "auth_unavailable", f"Service Unavailable: {exc}\n", 5)
        except AuthError as exc:
            self._log("unauthorized", logging.INFO, "handshake refused", reason=str(exc))
            response = self._refuse(401, "unauthorized", f"Unauthorized: {exc}\n", None)
            response.headers["WWW-Authenticate"] = 'Bearer realm="fanout"'
        else:
            # No await between this and _respond: the per-user count cannot change in between.
            refusal = self.host.admit_user(self.claims)
            response = self._refuse(*refusal) if refusal is not None else self._accept(request)
        if self.state is not State.HANDSHAKE:
            return
        self._respond(response)
        if self.state is not State.CLOSED:
            self.loop.add_reader(self.fd, self._on_readable)
            self._on_readable()   # what arrived meanwhile

    def _accept(self, request: Request) -> Response:
        response = self.protocol.accept(request)
        exc = self.protocol.handshake_exc
        if (response.status_code == 400 and isinstance(exc, InvalidHeader)
                and exc.name.lower() == "sec-websocket-version"):
            # RFC 6455 4.2.2: say which version we speak.
            response = self.protocol.reject(426, "Upgrade Required: this server speaks WebSocket version 13\n")
            response.headers["Sec-WebSocket-Version"] = "13"
        return response

    def _respond(self, response: Response) -> None:
        metrics = self.host.metrics
        self.protocol.send_response(response)
        if response.status_code != 101:
            if self.protocol.handshake_exc is not None and response.status_code not in (401, 404, 429, 503):
                metrics.rejected.labels("bad_handshake").inc()
                self._log("bad_handshake", logging.INFO, "handshake refused",
                          status=response.status_code, reason=str(self.protocol.handshake_exc))
            self._pump()
            return
        wbits = 0
        for ext in self.protocol.extensions:
            if isinstance(ext, PerMessageDeflate):
                wbits = ext.local_max_window_bits or 15
        self.slot = self.hub.attach(self, wbits)
        self.state = State.OPEN
        self.was_open = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for chunk in self.protocol.data_to_send():
            self.hub.send_raw(self.slot, chunk)
        self._arm_expiry()
        metrics.accepted.inc()
        self.host.opened(self)
        event(logging.DEBUG, "client connected", client=self.id, peer=self.peer, slot=self.slot,
              deflate=bool(wbits), user=self.claims.sub if self.claims else None)

    def _refuse(self, status: int, reason: str, text: str, retry_after: int | None) -> Response:
        self.host.metrics.rejected.labels(reason).inc()
        response = self.protocol.reject(status, text)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    def _arm_expiry(self) -> None:
        """Close with 4001 when the token expires (exp + leeway), unless refreshed."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        auth = self.host.auth
        if self.claims is None or auth is None:
            return
        delay = max(0.0, auth.expires_at(self.claims) - time.time())
        self._expiry = self.loop.call_later(delay, self.close, CloseCode.TOKEN_EXPIRED, "token expired")

    # ----------------------------------------------------------------- frames
    def _on_frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.CLOSE:
            return   # websockets answers it; _pump follows the state
        if not self._allow():
            return
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if self._frag is not None:
                return   # websockets already failed a new message inside a fragmented one (1002)
            if not frame.fin:
                self._frag = [bytes(frame.data)]
                self._frag_text = op is Opcode.TEXT
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
                if self._frag_text:
                    self._on_text(b"".join(parts))
                else:
                    self._bad_request("binary frames are not supported: send JSON text frames")
        # PING: websockets queued the pong; PONG: last_seen is updated.

    def _allow(self) -> bool:
        """Token bucket over client frames: rate_limited errors, then 1008."""
        if self.bucket.take():
            return True
        if self.closing:
            return False
        self.strikes += 1
        cfg = self.cfg
        if self.strikes >= cfg.ws_control_strikes:
            self._log("flooding", logging.WARNING, "client flooding: closed")
            self.close(CloseCode.POLICY_VIOLATION, "too many messages", stop_reading=True)
        else:
            self.send_error(ErrorCode.RATE_LIMITED,
                            f"over {cfg.ws_control_rate:g} messages/s: slow down or be disconnected")
        return False

    def _bad_request(self, message: str, req_id: Any = None) -> None:
        self.host.metrics.client_frames.labels("invalid").inc()
        self.send_error(ErrorCode.BAD_REQUEST, message, req_id)

    def _on_text(self, data: bytes) -> None:
        if self.state is not State.OPEN:
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.host.metrics.client_frames.labels("invalid").inc()
            self._log("invalid_utf8", logging.INFO, "client sent invalid UTF-8: closed")
            self.close(CloseCode.INVALID_DATA, "invalid UTF-8 in a text frame")
            return
        try:
            req = parse_request(text)
        except RequestError as exc:
            self._bad_request(exc.message, exc.req_id)
            return
        self.host.metrics.client_frames.labels(type(req).__name__.lower()).inc()
        if self._busy:
            # A resume or replay is catching up: later requests wait for it, so
            # this connection's messages stay in stream order.
            self._held.append(req)
            return
        self._handle(req)

    # ---------------------------------------------------------------- requests
    def send(self, payload: bytes) -> None:
        """Queue a control reply (nothing after our close frame)."""
        if self.state is State.OPEN and self.slot is not None:
            self.hub.reply(self.slot, payload)

    def send_error(self, code: ErrorCode, message: str, req_id: Any = None, **fields: Any) -> None:
        self.host.metrics.client_errors.labels(str(code)).inc()
        self._log(str(code), logging.INFO, "client error", code=str(code), error=message, **fields)
        self.send(error_reply(code, message, req_id, **fields))

    def _admit(self, channels: list[str], req_id: Any) -> list[str]:
        """Valid and permitted patterns; an error goes out for each refused one."""
        ok = []
        for ch in channels:
            problem = subject_error(ch, wildcards=True)
            if problem:
                self.send_error(ErrorCode.INVALID_CHANNEL, problem, req_id, channel=ch)
            elif self.claims is not None and not self.claims.allows(ch):
                self.send_error(ErrorCode.FORBIDDEN, "token does not allow this channel", req_id, channel=ch)
            else:
                ok.append(ch)
        return ok

    def _over_limit(self, patterns: list[str], req_id: Any) -> None:
        limit = self.cfg.ws_max_subscriptions
        for ch in patterns:
            self.send_error(ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {limit} subscriptions per connection",
                            req_id, channel=ch)

    def _handle(self, req: ClientRequest) -> None:
        hub, slot = self.hub, self.slot
        if slot is None or self.state is not State.OPEN:
            return
        if isinstance(req, Subscribe) and req.snapshot:
            self._busy = True

            def snapshotted(accepted: list[str], over: list[str], n: int, r: Subscribe = req) -> None:
                self._over_limit(over, r.id)
                self.send(reply("subscribed", r.id, channels=accepted, epoch=self.hub.epoch,
                                stream_seq=self.hub.last_stream_seq, snapshot=n,
                                **_delta_field(self.hub.delta_reply(accepted, r.delta))))
                self._next_request()

            hub.snapshot(slot, self._admit(req.channels, req.id), snapshotted, req.delta == "fossil")
        elif isinstance(req, Subscribe):
            accepted, over = hub.subscribe(slot, self._admit(req.channels, req.id), req.delta == "fossil")
            self._over_limit(over, req.id)
            # stream_seq: the position the subscription starts after, so a
            # client that got nothing yet can still resume from here.
            self.send(reply("subscribed", req.id, channels=accepted, epoch=hub.epoch,
                            stream_seq=hub.last_stream_seq, **_delta_field(hub.delta_reply(accepted, req.delta))))
        elif isinstance(req, Unsubscribe):
            valid = []
            for ch in req.channels:
                problem = subject_error(ch, wildcards=True)
                if problem:
                    self.send_error(ErrorCode.INVALID_CHANNEL, problem, req.id, channel=ch)
                else:
                    valid.append(ch)
            hub.unsubscribe(slot, valid)
            self.send(reply("unsubscribed", req.id, channels=valid))
        elif isinstance(req, Replay):
            self._busy = True

            def replayed(missing: tuple[int, int] | None, r: Replay = req) -> None:
                self.send(reply("replay_done", r.id, from_seq=r.from_seq, to_seq=r.to_seq,
                                missing=list(missing) if missing else None))
                self._next_request()

            hub.replay(slot, req.from_seq, req.to_seq, replayed)
        elif isinstance(req, Resume):
            self._busy = True

            def resumed(res: Resumed, r: Resume = req) -> None:
                self._over_limit(res.over_limit, r.id)
                self.send(reply("resumed", r.id, channels=res.accepted, epoch=self.hub.epoch,
                                complete=res.complete, stream_seq=self.hub.last_stream_seq,
                                **_delta_field(self.hub.delta_reply(res.accepted, r.delta))))
                self._next_request()

            hub.resume(slot, self._admit(req.channels, req.id), req.after, req.epoch, resumed,
                       req.delta == "fossil")
        elif isinstance(req, Heartbeat):
            self.send(reply("heartbeat_ack", req.id, ts=int(time.time() * 1000)))
        elif isinstance(req, Refresh):
            self._busy = True
            task = self.loop.create_task(self._refresh(req))
            task.add_done_callback(lambda t: self._next_request())

    def _next_request(self) -> None:
        """A catch-up finished: run the requests that waited for it, in order."""
        self._busy = False
        while self._held and not self._busy and self.state is State.OPEN:
            self._handle(self._held.pop(0))
        if self.state is not State.OPEN:
            self._held.clear()

    async def _refresh(self, req: Refresh) -> None:
        auth = self.host.auth
        if auth is None or not auth.enabled:
            self.send_error(ErrorCode.UNAUTHORIZED, "this node does not use tokens", req.id)
            return
        try:
            claims = await auth.verify(req.token)
        except AuthError as exc:
            self.send_error(ErrorCode.UNAUTHORIZED, f"refresh refused: {exc}", req.id)
            return
        if self.claims is not None and claims.sub != self.claims.sub:
            self.send_error(ErrorCode.UNAUTHORIZED, "refresh refused: token is for another user", req.id)
            return
        if self.state is not State.OPEN:
            return
        self.claims = claims
        self._arm_expiry()
        self.send(reply("refreshed", req.id, exp=int(claims.exp)))

    # -------------------------------------------------------- hub callbacks
    def on_blocked(self) -> None:
        if not self._writing and self.state is not State.CLOSED:
            self._writing = True
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        if self.slot is None:
            return
        r = self.hub.flush_one(self.slot)
        if self.state is State.CLOSED:
            return
        if r == 0:
            self._writing = False
            self.loop.remove_writer(self.fd)
        elif r < 0:
            self.abort("send failed")

    def on_dead(self, why: str) -> None:
        self.abort(why)

    def on_slow(self) -> None:
        """Still behind at the heaviest throttle level (or past the hard queue cap):
        drop the data frames not begun (control frames, the last throttle_update
        among them, are kept so the client learns why), close with 1008."""
        if self.slot is None or self.closing:
            return
        dropped = self.hub.discard_queued(self.slot)
        self._log("slow", logging.WARNING, "slow client closed", dropped_bytes=dropped,
                  limit=self.cfg.ws_client_queue_bytes)
        self.close(CloseCode.POLICY_VIOLATION, "client too slow")

    def on_drained(self) -> None:
        if self.state is State.DRAINING:
            self.finish_close()

    # ---------------------------------------------------------------- closing
    def _enter_draining(self) -> None:
        self.state = State.DRAINING
        if self.slot is not None:
            self.hub.stop_data(self.slot)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._timer is None:
            self._timer = self.loop.call_later(CLOSE_TIMEOUT, self.abort, "close timeout")

    def close(self, code: int, reason: str = "", *, stop_reading: bool = False) -> None:
        """Start the closing handshake: queued data first, then our close frame.

        ``stop_reading``: ignore anything more the client sends (a flooder) and
        drop the connection once our close frame is written."""
        if self.state is State.DRAINING or self.state is State.CLOSED:
            return
        self.closed_code = int(code)
        self.host.metrics.closed.labels(str(int(code))).inc()
        if self.slot is None:
            self.abort(reason)
            return
        self._enter_draining()
        if self.protocol.state is WsState.OPEN:
            self.protocol.send_close(int(code), reason)
        self._pump()
        if stop_reading and self.state is not State.CLOSED:
            self._reading = False
            self.loop.remove_reader(self.fd)
            self.hub.watch_drain(self.slot)

    def finish_close(self) -> None:
        """Everything queued was written: end the TCP connection.

        A client that has not sent its close frame (a flooder we stopped
        reading, say) may still be sending. Closing the socket with its bytes
        unread would answer with a reset, and the reset throws away whatever
        the kernel has not sent yet, our close frame included. So half-close
        and linger: read and drop until the client's FIN, for a bounded time."""
        if self.state is State.CLOSED:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
            linger = self.protocol.close_rcvd is None
        except OSError:
            linger = False      # the socket is gone already
        self.abort(None, linger=linger)

    def abort(self, why: str | None, *, linger: bool = False) -> None:
        """Drop the connection now (``linger``: the socket itself only once the
        client has stopped sending; see :meth:`finish_close`)."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        for handle in (self._timer, self._expiry):
            if handle is not None:
                handle.cancel()
        self._timer = self._expiry = None
        if self._auth_task is not None and not self._auth_task.done():
            self._auth_task.cancel()
        self.loop.remove_reader(self.fd)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.fd)
        if self.slot is not None:
            self.hub.detach(self.slot)
            self.slot = None
        self._held.clear()
        if linger:
            self._linger_left = LINGER_BYTES
            self.loop.add_reader(self.fd, self._linger)
            self._timer = self.loop.call_later(LINGER_TIMEOUT, self._close_socket)
        else:
            self._close_socket()
        self.host.closed(self)
        if why:
            event(logging.DEBUG, "client dropped", client=self.id, peer=self.peer, reason=why)

    def _linger(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._linger_left -= len(data)
        if not data or self._linger_left <= 0:
            self._close_socket()

    def _close_socket(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.loop.remove_reader(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass


def _delta_field(fmt: str | None) -> dict[str, str]:
    """``delta`` of a subscribed/resumed reply: present only when deltas may come."""
    return {"delta": fmt} if fmt else {}
