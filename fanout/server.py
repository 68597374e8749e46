"""The node: WebSocket listener, admission, ops routes, periodic work, shutdown.

The server owns the listening sockets and the one registry of sessions (every
connection, from accept to close); each :class:`~fanout.session.Session` owns
its own socket, the hub routes messages to them, the brokers own their NATS
connection, and :mod:`fanout.ops_http` serves the ops port for the routes
defined here. Admission (:meth:`Server.admission`) refuses new handshakes while
draining, full or braking.

Start-up order: hub, broker, ops port, WebSocket listener; ``/ready`` turns
200 once the broker is ready. On SIGTERM/SIGINT: ``/ready`` turns 503, the
listener closes, the broker stops, queued bytes are flushed, clients get 1001,
and the process exits 0 within ``WS_SHUTDOWN_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import signal
import socket
import sys
import time
from typing import Any

from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

from fanout_core import heap_stats

from .auth import Authenticator, Claims
from .brokers.base import UNSET_PRIORITY, Broker, parse_priority
from .brokers.embedded import EmbeddedBroker
from .codes import CloseCode
from .config import Config
from .guard import Guard
from .hub import Hub
from .log import bind_counter, event, limiter_keys
from .metrics import CONTENT_TYPE, Metrics, start_tracemalloc, tracemalloc_report
from .ops_http import HttpRequest, HttpResponse
from .ops_http import serve as serve_http
from .origins import exposure_warning
from .protocol import reply
from .ratelimit import TokenBucket
from .session import Refusal, Session, State
from .subjects import matches_any, subject_error
from .userlimit import make_user_limiter

#: Linux's TCP_NOTSENT_LOWAT (the socket module names it only where the platform has it).
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

__all__ = ["Server", "run"]

SHED_MIN_BYTES = 65536     # a client with less queued is not worth closing for memory
ACCEPT_BATCH = 512          # sockets accepted per readiness event, so accept storms don't starve I/O
MAX_PUBLISH_BYTES = 1 << 20


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse(status, json.dumps(obj, separators=(",", ":")).encode(), headers=headers or {})


def make_broker(cfg: Config, metrics: Metrics) -> Broker:
    if cfg.embedded:
        return EmbeddedBroker(cfg)
    from .brokers.jetstream import JetStreamBroker

    def hook(evt: str, **fields: Any) -> None:
        n = fields.get("n", 1)
        metrics.broker_events.labels(evt).inc(n if isinstance(n, int) and n > 0 else 1)
        if evt == "ingest_rejected":
            metrics.ingest_rejected.labels(fields.get("reason", "")).inc(n if isinstance(n, int) and n > 0 else 1)
        # No logging here: the broker logs its state changes and errors (once, rate-limited).

    return JetStreamBroker(cfg, metrics_hook=hook)


class Server:
    """Implements :class:`~fanout.session.SessionHost` for its sessions."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.clock = time.monotonic
        self.metrics = Metrics()
        bind_counter(self.metrics.log_suppressed)
        if cfg.fanout_tracemalloc:
            start_tracemalloc()
        self.hub = Hub(cfg, self.metrics, self.clock)
        self.metrics.attach_stores(self.store_sizes)
        self.broker = make_broker(cfg, self.metrics)
        auth = Authenticator(cfg)
        self.auth: Authenticator | None = auth if auth.enabled else None
        self.extensions = ([ServerPerMessageDeflateFactory(server_no_context_takeover=True,
                                                           client_no_context_takeover=True)]
                           if cfg.ws_compression else None)
        #: The one registry: every connection from accept to close, in any state.
        self.sessions: set[Session] = set()
        self.open_count = 0          # of them, past the handshake
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = False
        self._stopping = False
        self._publishing = True          # until the drain window ends
        self._drained = asyncio.Event()
        #: CPU, loop lag and memory: the brake, load shedding, memory shedding (fanout/guard.py).
        self.guard = Guard(cfg, self.metrics)
        self._next_guard = 0.0
        #: WS_MAX_CONNECTIONS_PER_USER, per node or cluster-wide (fanout/userlimit.py); ``users`` is
        #: its registry of this node's sessions (token sub -> open sessions, oldest first).
        self.user_limit = make_user_limiter(cfg, self.metrics, self.broker, users=self.auth is not None)
        self.users: dict[str, list[Session]] = self.user_limit.local
        self.started = time.time()
        self._listener: socket.socket | None = None
        self._ops: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._publish_bucket = (TokenBucket(cfg.ws_max_broadcast_rate, max(1.0, cfg.ws_max_broadcast_rate))
                                if cfg.ws_max_broadcast_rate > 0 else None)
        self._stopped = asyncio.Event()
        self.ws_port = cfg.ws_port
        self.health_port = cfg.health_port
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()

    # ------------------------------------------------------------- lifecycle
    def _check_fd_limit(self) -> None:
        """One descriptor per connection plus headroom: raise the soft limit as far
        as the hard one allows, and refuse to start when that is not enough (else
        accept() would fail under load and starve the ops port)."""
        import resource

        need = self.cfg.ws_max_connections + 128
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            target = need if hard == resource.RLIM_INFINITY else min(need, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft != resource.RLIM_INFINITY and soft < need:
            raise RuntimeError(f"WS_MAX_CONNECTIONS={self.cfg.ws_max_connections} needs {need} open files; "
                               f"this process may hold {soft} (ulimit -n): lower WS_MAX_CONNECTIONS or raise the limit")

    async def start(self) -> None:
        self._check_fd_limit()
        self.hub.bind(self.loop, self.broker)
        if self.auth is not None:
            await self.auth.start()
        await self.broker.start(self.hub)
        await self.user_limit.start(self.loop)
        self._ops = await serve_http(self.cfg.health_host, self.cfg.health_port, self._ops_request)
        self.health_port = self._ops.sockets[0].getsockname()[1]
        lsock = socket.create_server((self.cfg.ws_host, self.cfg.ws_port), backlog=4096, reuse_port=False)
        lsock.setblocking(False)
        self._listener = lsock
        self.ws_port = lsock.getsockname()[1]
        self.loop.add_reader(lsock.fileno(), self._accept)
        self.guard.start(self.loop)
        self._tasks.append(self.loop.create_task(self._periodic()))
        # Right now, not at the first periodic tick: /metrics must agree with /ready.
        self.metrics.broker_ready.set(1 if self.broker.ready else 0)
        self.metrics.ready.set(1 if self.ready else 0)
        # Before the listening line, so whoever waits for that has seen this too.
        exposed = exposure_warning(self.cfg.ws_host, self.cfg.ws_allowed_origins, self.auth is not None)
        if exposed:
            event(logging.WARNING, "WebSocket port open to every origin", message=exposed)
        event(logging.INFO, "fanout listening", ws_port=self.ws_port, health_port=self.health_port,
              mode=self.broker.name, max_connections=self.cfg.ws_max_connections, epoch=self.hub.epoch)

    @property
    def braking(self) -> bool:
        return self.guard.braking

    @property
    def ready(self) -> bool:
        return self.broker.ready and not self.draining and not self.braking

    # ------------------------------------------------- SessionHost (registry)
    def admission(self) -> Refusal | None:
        if self.draining:
            return (503, "draining", "Service Unavailable: node is shutting down\n", 5)
        if self.hub.full:
            return (503, "connection_limit", "Service Unavailable: connection limit reached\n", 5)
        brake = self.guard.refusal()
        if brake is not None:
            return brake
        # The session asking is itself one of them.
        if len(self.sessions) - self.open_count > self.cfg.ws_max_pending_handshakes:
            return (503, "handshake_limit", "Service Unavailable: too many handshakes in progress\n",
                    random.randint(1, 3))
        return None

    def admit_user(self, claims: Claims) -> Refusal | None:
        """After the token check, before 101: WS_USER_LIMIT_POLICY=refuse_new refuses a user
        already at WS_MAX_CONNECTIONS_PER_USER (HTTP 429), counted cluster-wide or on this
        node (fanout/userlimit.py; a local lookup, never a wait on NATS)."""
        return self.user_limit.admit(claims.sub)

    def opened(self, session: Session) -> None:
        self.open_count += 1
        self.metrics.connections.set(self.open_count)
        self.metrics.ws_connections.set(self.open_count)
        if session.claims is not None:
            self._user_opened(session, session.claims.sub)

    def _user_opened(self, session: Session, sub: str) -> None:
        """Register the session under its user; close_oldest closes the oldest over the limit (4002)."""
        self.user_limit.opened(session, sub)

    def _user_closed(self, session: Session, sub: str) -> None:
        self.user_limit.closed(session, sub)

    def closed(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        if session.was_open:
            self.open_count -= 1
            if session.claims is not None:
                self._user_closed(session, session.claims.sub)
            self.metrics.connections.set(self.open_count)
            self.metrics.ws_connections.set(self.open_count)
        if not self.sessions:
            self._empty.set()

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    self.metrics.rejected.labels("fd_limit").inc()
                    event(logging.ERROR, "accept failed: out of file descriptors", error=str(exc))
                    self.loop.remove_reader(self._listener.fileno())
                    self.loop.call_later(0.1, self._resume_accept)
                    return
                raise
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.cfg.ws_socket_sndbuf:
                # Bounded kernel buffering: a stalled reader shows up in our
                # queue (and its throttle level) instead of in kernel memory.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.cfg.ws_socket_sndbuf)
            if self.cfg.ws_socket_notsent_lowat:
                # Little unsent data in the kernel: the reader's real rate shows
                # in our queue within a window (fine-grained writable events,
                # not a third of SO_SNDBUF at a time), which throttling judges.
                conn.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, self.cfg.ws_socket_notsent_lowat)
            self.sessions.add(Session(self, conn, addr))
            self._empty.clear()

    def _resume_accept(self) -> None:
        if self._listener is not None and not self.draining:
            self.loop.add_reader(self._listener.fileno(), self._accept)

    async def _periodic(self) -> None:
        cfg = self.cfg
        next_ping = time.monotonic() + cfg.ws_ping_interval
        tick = min(1.0, cfg.ws_ping_interval, cfg.ws_idle_timeout / 2, cfg.ws_guard_interval)
        while True:
            await asyncio.sleep(tick)
            try:
                next_ping = self._tick(next_ping)
            except Exception:   # one bad tick must not end the periodic work for good
                event(logging.ERROR, "periodic work failed", exc_info=True)

    def _tick(self, next_ping: float) -> float:
        """One round of periodic work; returns when the next ping is due."""
        cfg = self.cfg
        now = time.monotonic()
        if now >= next_ping:
            next_ping = now + cfg.ws_ping_interval
            self.hub.ping_all()
        self._sweep_idle(now)
        self.hub.throttle_tick(now)
        self.hub.recent.expire(now)
        self.hub.trim_tick(now)
        self._guard_tick(now)            # samples CPU and memory (fanout/guard.py owns that)
        self.metrics.broker_ready.set(1 if self.broker.ready else 0)
        self.metrics.ready.set(1 if self.ready else 0)
        self.metrics.last_stream_seq.set(self.hub.last_stream_seq)
        return next_ping

    def _sweep_idle(self, now: float) -> int:
        """Close clients silent for longer than WS_IDLE_TIMEOUT (1001); returns how many."""
        limit = now - self.cfg.ws_idle_timeout
        idle = [s for s in self.sessions if s.state is State.OPEN and s.last_seen < limit]
        for s in idle:
            s.close(CloseCode.GOING_AWAY, "idle timeout")
        return len(idle)

    def _guard_tick(self, now: float) -> None:
        """Every WS_GUARD_INTERVAL: sample, then apply what the guard decided (fanout/guard.py)."""
        self.metrics.handshakes_pending.set(len(self.sessions) - self.open_count)
        if now < self._next_guard:
            return
        self._next_guard = now + self.cfg.ws_guard_interval
        actions = self.guard.tick()
        if actions.throttle is not None:
            set_load_shed = getattr(self.hub, "set_load_shed", None)
            if set_load_shed is not None:
                set_load_shed(actions.throttle)
        if actions.shed_bytes:
            self.guard.note_shed(self._shed(actions.shed_bytes))
        if actions.pause:
            pause_for = getattr(self.broker, "pause_for", None)
            if pause_for is not None:
                pause_for(actions.pause)

    def _shed(self, need: int) -> int:
        """Close the open clients with the most queued bytes (1013) until their queues add up
        to ``need``; their unsent frames are dropped first, so the memory goes now, not when
        (if ever) they read. Clients with under SHED_MIN_BYTES queued are never shed."""
        queued = sorted(((self.hub.queued(s.slot), s) for s in self.sessions
                         if s.state is State.OPEN and s.slot is not None),
                        key=lambda qs: qs[0], reverse=True)
        freed = n = 0
        for q, s in queued:
            if freed >= need or q < SHED_MIN_BYTES or s.slot is None:
                break
            self.hub.discard_queued(s.slot)
            event(logging.WARNING, "client shed at the memory limit", client=s.id, peer=s.peer, queued_bytes=q)
            s.close(CloseCode.TRY_AGAIN_LATER, "server memory pressure")
            freed += q
            n += 1
        return n

    async def drain(self) -> None:
        """Rolling drain (SIGTERM or ``POST /drain``): refuse new work at once, then
        hand every client a ``reconnect`` hint and close it (1001) at its turn.

        ``/ready`` turns 503 and the listener closes immediately, so the load
        balancer stops sending new clients. Client ``i`` of ``n`` (in random
        order) is told ``after_ms`` = its turn and closed then; turns are spread
        from ``min(3 s, 30 %)`` of ``WS_DRAIN_SECONDS`` (time for the balancer's
        health check to take the node out) to its end, so reconnects reach the
        other nodes as a trickle, not a burst. Publishing continues to the
        clients still connected. Returns at the end of the window (at once
        when nobody is connected, or with a window of 0)."""
        if self.draining:
            await self._drained.wait()
            return
        self.draining = True
        self.metrics.ready.set(0)
        window = self.cfg.ws_drain_seconds
        event(logging.INFO, "shutting down" if self._stopping else "draining",
              connections=len(self.sessions), drain_seconds=window, timeout=self.cfg.ws_shutdown_timeout)
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        clients = [s for s in self.sessions if s.state is State.OPEN]
        random.shuffle(clients)
        first = min(3.0, 0.3 * window)
        n = len(clients)
        for i, s in enumerate(clients):
            at = first + (window - first) * i / n if window > 0 else 0.0
            s.send(reply("reconnect", None, reason="drain", after_ms=int(at * 1000)))
            if at <= 0:
                s.close(CloseCode.GOING_AWAY, "server draining")
            else:
                self.loop.call_later(at, s.close, CloseCode.GOING_AWAY, "server draining")
        self.metrics.drain_hints.inc(n)
        if window > 0 and n:
            try:
                await asyncio.wait_for(self._empty.wait(), window + 0.05)
            except TimeoutError:
                pass
        self._drained.set()

    async def shutdown(self) -> None:
        """Drain (see :meth:`drain`), stop the broker, flush, close what is left
        with 1001, and stop within WS_DRAIN_SECONDS + WS_SHUTDOWN_TIMEOUT."""
        if self._stopping:
            return
        self._stopping = True
        await self.drain()
        self._publishing = False
        deadline = time.monotonic() + self.cfg.ws_shutdown_timeout
        try:
            await asyncio.wait_for(self.user_limit.stop(), max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            event(logging.WARNING, "per-user limit stop failed", error=str(exc))
        try:
            await asyncio.wait_for(self.broker.stop(), max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            event(logging.WARNING, "broker stop failed", error=str(exc))
        for s in list(self.sessions):
            s.close(CloseCode.GOING_AWAY, "server shutting down")
        self.hub.flush()
        try:
            await asyncio.wait_for(self._empty.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        left = len(self.sessions)
        for s in list(self.sessions):
            s.abort("shutdown timeout")
        for t in self._tasks:
            t.cancel()
        self.guard.stop()
        if self._ops is not None:
            self._ops.close()
        if self.auth is not None:
            await self.auth.close()
        event(logging.INFO, "stopped", unclean_closes=left, dispatched=self.hub.last_stream_seq)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def store_sizes(self) -> dict[str, int]:
        """Every store's size (the fanout_store_* gauges): the hub's and core's,
        and this server's registries."""
        in_use, free = heap_stats()
        return {**self.hub.store_sizes(), "sessions": len(self.sessions), "users": len(self.users),
                "log_limiter_keys": limiter_keys(), "asyncio_tasks": len(asyncio.all_tasks(self.loop)),
                "heap_in_use": in_use, "heap_free": free, "python_blocks": sys.getallocatedblocks()}

    # ------------------------------------------------------------- ops port
    async def _ops_request(self, req: HttpRequest) -> HttpResponse:
        path = req.path.split("?", 1)[0]
        if path == "/health":
            return _json(200, {"status": "ok", "node": self.cfg.node_name, "uptime_s": round(time.time() - self.started, 1),
                               "connections": self.open_count,
                               "handshaking": len(self.sessions) - self.open_count, "epoch": self.hub.epoch,
                               "last_stream_seq": self.hub.last_stream_seq, **self.broker.status(),
                               "user_limit": self.user_limit.status(),
                               "guard": {**self.guard.status(),
                                         "handshakes_pending": len(self.sessions) - self.open_count,
                                         "max_pending_handshakes": self.cfg.ws_max_pending_handshakes,
                                         "history_fetches": getattr(self.hub, "history_fetches", 0),
                                         "max_concurrent_catchups": self.cfg.ws_max_concurrent_catchups,
                                         "users": len(self.users)}})
        if path == "/ready":
            if self.ready:
                return _json(200, {"ready": True})
            why = "draining" if self.draining else ("braking" if self.braking else f"{self.broker.name} not ready")
            body: dict[str, Any] = {"ready": False, "reason": why}
            if self.braking and not self.draining:
                body["braking"] = self.guard.reasons
            return _json(503, body, {"Retry-After": "5"})
        if path == "/metrics":
            return HttpResponse(200, self.metrics.render(), CONTENT_TYPE)
        if path == "/debug/tracemalloc" and self.cfg.fanout_tracemalloc:
            return _json(200, tracemalloc_report(reset="reset=1" in req.path.partition("?")[2]))
        if path == "/drain":
            if req.method != "POST":
                return _json(405, {"error": "use POST"}, {"Allow": "POST"})
            if not self.draining:
                self._tasks.append(self.loop.create_task(self.drain()))
            return _json(202, {"draining": True, "drain_seconds": self.cfg.ws_drain_seconds})
        if path.startswith("/publish/"):
            if req.method != "POST":
                return _json(405, {"error": "use POST"}, {"Allow": "POST"})
            return await self._publish(path[len("/publish/"):], req)
        return _json(404, {"error": "not found"})

    def _publish_refused(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> HttpResponse:
        self.metrics.publish_rejected.labels(reason).inc()
        event(logging.INFO, "publish refused", reason=reason, detail=message)
        return _json(status, {"error": reason, "message": message}, headers)

    async def _publish(self, subject: str, req: HttpRequest) -> HttpResponse:
        problem = subject_error(subject, wildcards=False)
        if problem:
            return self._publish_refused(400, "invalid_subject", f"{subject!r}: {problem}")
        if not matches_any(self.cfg.stream_subjects, subject):
            return self._publish_refused(400, "invalid_subject",
                                         f"{subject!r} is outside the stream subjects {self.cfg.js_stream_subjects}")
        try:
            header = req.headers.get("fanout-priority")
            priority = parse_priority(header) if header else UNSET_PRIORITY
        except ValueError as exc:
            return self._publish_refused(400, "bad_priority", str(exc))
        if len(req.body) > MAX_PUBLISH_BYTES:
            return self._publish_refused(413, "too_large", f"payload over {MAX_PUBLISH_BYTES} bytes")
        if not self._publishing or not self.broker.ready:
            return self._publish_refused(503, "not_ready", "node is not accepting publishes", {"Retry-After": "5"})
        if self._publish_bucket is not None and not self._publish_bucket.take():
            return self._publish_refused(429, "rate_limited", f"over WS_MAX_BROADCAST_RATE={self.cfg.ws_max_broadcast_rate:g}/s",
                                         {"Retry-After": "1"})
        try:
            seq = await self.broker.publish(subject, req.body, priority, req.headers.get("nats-msg-id"))
        except Exception as exc:
            return self._publish_refused(503, "publish_failed", str(exc), {"Retry-After": "1"})
        return _json(202, {"stream_seq": seq, "subject": subject})


async def run(cfg: Config) -> int:
    """Run a node until SIGTERM/SIGINT; returns the exit status."""
    server = Server(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(server.shutdown()))
    try:
        await server.start()
    except Exception as exc:
        event(logging.ERROR, "start failed", error=str(exc))
        return 1
    await server.wait_stopped()
    return 0
