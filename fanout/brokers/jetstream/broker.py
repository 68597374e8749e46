"""The JetStream broker's lifecycle: connection, supervision, set-up, status, publish.

What nats-py does, it does here: connecting (and retrying a first connect
that fails, forever), reconnecting with ``reconnect_time_wait``
(``NATS_RECONNECT_WAIT`` + jitter) between tries, re-subscribing after a
reconnect, server discovery in a cluster, the JetStream admin API (:mod:`.admin`), acks and publish acks. The consumption
hot path is :mod:`.consumer`; range reads are :mod:`.history`.

This module is the one place NATS state changes are logged (connected,
disconnected, reconnected, closed, a new stream epoch) and errors are
logged rate-limited (the same text at most once per ``LOG_REPEAT`` s); the
metrics hook only counts.

Fatal at start (the node refuses to start, exit status 1): a stream that
conflicts with the config, this node's durable in use by another live node,
a permission the NATS user lacks, an account limit that refuses the stream
or the consumer. The same found after start keeps the node unready with the
reason in ``/health`` and retries (an operator may fix the account).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable
from datetime import datetime
from time import monotonic
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from ...config import Config
from ...publisher import build_headers, config_connect_options, publish_acked, split_servers
from ...subjects import subject_error
from ..base import DEFAULT_PRIORITY, Broker, History, Sink
from .admin import (
    Admin,
    ConsumerInUse,
    Denials,
    LimitExceeded,
    PermissionDenied,
    StreamConfigConflict,
    api_prefix,
    consumer_name,
    format_epoch,
)
from .consumer import PULL_HEARTBEAT, PullConsumer
from .history import HistoryReader

__all__ = ["JetStreamBroker", "MetricsHook"]

log = logging.getLogger("fanout.jetstream")

#: ``hook(event, **fields)``: connected(server), disconnected, reconnected(server),
#: error(error, kind), auth_refused, acked(n), fetched(n), duplicate(n), rate_wait(seconds),
#: epoch(epoch, previous), gap_filled(n), ready(ready), ingest_rejected(reason, n), snapshot_seeded(n).
MetricsHook = Callable[..., None]

WATCHDOG = 3 * PULL_HEARTBEAT   # silence after which outstanding requests count as lost
EPOCH_CHECK = 10.0         # seconds between stream_info checks while all is well
START_WAIT = 5.0           # start() waits this long for a first outcome (ready, fatal, or a connect error)
JS_API_TIMEOUT = 2.0       # seconds for a JetStream API call (they answer in ms; a
                           # leader election makes them time out, then setup retries)
PUBLISH_TIMEOUT = 10.0     # seconds publish() waits for the ack, retries included (an election takes 4-9 s)
LOG_REPEAT = 30.0          # seconds before the same connection error is logged again
SEED_TIMEOUT = 10.0        # seconds the snapshot store's seeding may read (it runs beside consumption)

#: Failures that are about configuration or the account, not the network.
_CONFIG_FAILURES = (StreamConfigConflict, ConsumerInUse, PermissionDenied, LimitExceeded)


def _redact(url: str) -> str:
    """A server URL without the user and password it may carry."""
    return re.sub(r"//[^/@]*@", "//", url)


WARM_CHUNK = 1000          # messages put into the resume memory per loop step when warming it at start


class JetStreamBroker(Broker):
    """Feeds the hub from a JetStream stream through this node's own durable pull consumer.

    Every node of a service reads the whole stream through its own durable
    (``JS_CONSUMER_NAME-<node id>``): one durable shared by all nodes would
    split the messages between them. Messages reach the hub in stream order
    and each is acked (explicitly) once :meth:`Sink.dispatch` has enqueued
    it. ``history()`` reads through short-lived ephemeral consumers.

    ``metrics_hook(event, **fields)`` is called for connection changes and
    counts (see :data:`MetricsHook`); it must not block or raise, and it
    should not log (this class does).
    ``reconnect_time_wait`` is nats-py's pause between tries of one server;
    by default ``NATS_RECONNECT_WAIT`` plus a random part of
    ``NATS_RECONNECT_JITTER``, drawn at each connect (nats-py 2.x has no
    jitter of its own: nats-io/nats.py#370), so nodes that lose the same
    server do not all retry in step. A value given here is used as it is.
    """

    name = "jetstream"

    def __init__(self, cfg: Config, metrics_hook: MetricsHook | None = None, *,
                 reconnect_time_wait: float | None = None, connect_timeout: float = 2.0) -> None:
        self.cfg = cfg
        self._hook = metrics_hook
        self.stream = cfg.js_stream_name
        self.consumer = consumer_name(cfg)
        self.domain = cfg.js_domain
        self._prefix = api_prefix(self.domain)
        self._reconnect_time_wait = reconnect_time_wait
        self._connect_timeout = connect_timeout
        self._admin = Admin(cfg, self.stream, self.consumer, cfg.js_fetch_batch)
        self._pull = PullConsumer(
            self.stream, f"{self._prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}", cfg.js_fetch_batch,
            rate=cfg.ws_max_nats_rate, emit=self._emit, set_error=self._set_error, read_range=self._read_range)
        self._reader = HistoryReader(self.stream, self._prefix, lambda: self._admin.subjects, self._pull.guard,
                                     self._set_error)
        self._sink: Sink | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._consuming = False
        self._claimed = False
        self._epoch = ""
        self._fatal: str | None = None
        self._auth_refused = False
        self._connect_errors = 0
        self._fatal_exc: BaseException | None = None
        self._last_error: str | None = None
        self._error_logged: tuple[str, float] = ("", 0.0)
        self._server = ""
        self._denials = Denials()
        self._consumer_created: datetime | None = None
        self._closed = asyncio.Event()
        self._first_outcome = asyncio.Event()
        self._ready_evt = asyncio.Event()
        self._seed_task: asyncio.Task[None] | None = None
        self._seeded_epoch = ""
        self._warm_task: asyncio.Task[None] | None = None
        self._warmed_epoch = ""

    # ------------------------------------------------------------ properties
    @property
    def ready(self) -> bool:
        return self._consuming and self._nc is not None and self._nc.is_connected and self._fatal is None

    @property
    def epoch(self) -> str:
        """The stream incarnation (its creation time); changes when the stream is recreated."""
        return self._epoch

    @property
    def fatal(self) -> str | None:
        """Why the broker gave up (a stream conflict found after start), else None."""
        return self._fatal

    @property
    def last_stream_seq(self) -> int:
        """The last stream sequence this broker dispatched (or skipped as deleted or invalid)."""
        return self._pull.last

    def connection(self) -> NATS | None:
        """The NATS connection while it is connected, else None. The broker alone
        opens, replaces and closes it; the cluster-wide per-user limit
        (fanout/userlimit.py) borrows it for its KV bucket."""
        nc = self._nc
        return nc if nc is not None and nc.is_connected else None

    def pause_for(self, seconds: float) -> None:
        """Pause consumption (the resource guard, while the event loop lags); see PullConsumer.pause_for."""
        self._pull.pause_for(seconds)

    def status(self) -> dict[str, object]:
        nc = self._nc
        return {
            "broker": self.name,
            "ready": self.ready,
            "connected": bool(nc is not None and nc.is_connected),
            "server": self._server if nc is not None and nc.is_connected else "",
            "servers": [_redact(u) for u in split_servers(self.cfg.nats_url)] if self.cfg.nats_url else [],
            "stream": self.stream,
            "consumer": self.consumer,
            "domain": self.domain,
            "epoch": self._epoch,
            "last_stream_seq": self._pull.last,
            "reconnects": nc.stats["reconnects"] if nc is not None else 0,
            "ingest_rejected": self._pull.guard.rejected,
            "last_error": self._last_error,
            "fatal": self._fatal,
        }

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until :attr:`ready` (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready:
            if self._fatal:
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._ready_evt.clear()
            try:
                await asyncio.wait_for(self._ready_evt.wait(), None if left is None else min(left, 1.0))
            except TimeoutError:
                pass
        return True

    def _emit(self, event: str, **fields: Any) -> None:
        if self._hook is not None:
            try:
                self._hook(event, **fields)
            except Exception:
                log.exception("metrics hook failed on %s", event)

    def _set_error(self, kind: str, text: str, *, level: int = logging.WARNING) -> None:
        self._last_error = text
        self._emit("error", error=text, kind=kind)
        now = time.monotonic()
        if self._error_logged[0] != text or now - self._error_logged[1] > LOG_REPEAT:
            self._error_logged = (text, now)
            log.log(level, "%s", text, extra={"fields": {"kind": kind, "stream": self.stream}})

    # ------------------------------------------------------------- lifecycle
    async def start(self, sink: Sink) -> None:
        """Start consuming in the background; returns once the first outcome is known.

        Raises :class:`StreamConfigConflict`, :class:`ConsumerInUse`,
        :class:`PermissionDenied` or :class:`LimitExceeded` when NATS is
        reachable and the set-up cannot work. When NATS is unreachable (or
        refuses the credentials) it returns after the first failed try, not
        ready, and keeps trying forever.
        """
        if self._task is not None:
            raise RuntimeError("broker already started")
        if self.cfg.nats_creds_file:
            try:
                import nkeys  # noqa: F401
            except ImportError:
                self._set_error("config", "NATS_CREDS_FILE needs the nkeys package (pip install nkeys)",
                                level=logging.ERROR)
        self._sink = sink
        self._stopping = False
        self._task = asyncio.create_task(self._supervise(), name="jetstream-broker")
        outcome = asyncio.ensure_future(self._first_outcome.wait())
        try:
            await asyncio.wait({outcome, self._task}, timeout=START_WAIT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            outcome.cancel()
        if self._fatal_exc is not None:
            await self.stop()
            raise self._fatal_exc

    async def stop(self) -> None:
        """Stop consuming, flush the acks of what was dispatched, close the connection."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._consuming = False
        seed, self._seed_task = self._seed_task, None
        if seed is not None and not seed.done():
            seed.cancel()
        warm, self._warm_task = self._warm_task, None
        if warm is not None and not warm.done():
            warm.cancel()
        await self._pull.unsubscribe()
        nc, self._nc = self._nc, None
        self._reader.bind(None, None)
        if nc is not None:
            try:
                if nc.is_connected:
                    await nc.flush(2)
            except Exception:
                pass
            try:
                await nc.close()
            except Exception:
                pass
        self._pull.flush_counts()

    # ------------------------------------------------------------ connection
    def _reconnect_wait(self) -> float:
        """nats-py waits this long before it tries a server again that it just
        failed to reach (its first try after a disconnect is at once)."""
        if self._reconnect_time_wait is not None:
            return self._reconnect_time_wait
        return self.cfg.nats_reconnect_wait + random.uniform(0.0, self.cfg.nats_reconnect_jitter)

    def _connect_options(self) -> dict[str, Any]:
        return config_connect_options(
            self.cfg, name=f"fanout-{self.cfg.node_name}",
            servers=split_servers(self.cfg.nats_url),
            reconnect_time_wait=self._reconnect_wait(),
            connect_timeout=self._connect_timeout,
            ping_interval=10,
            max_outstanding_pings=3,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
            # Subjects here come from the stream and validated patterns; nats-py
            # checking each ack's reply subject again costs ~20% of ingest.
            skip_subject_validation=True,
        )

    def _server_url(self) -> str:
        nc = self._nc
        url = nc.connected_url if nc is not None else None
        if url is None:
            return ""
        return f"{url.scheme}://{url.hostname}:{url.port}"

    def _auth_error(self, text: str) -> bool:
        """Report a refusal of the credentials (bad, expired, revoked); False if ``text`` is none."""
        low = text.lower()
        if "authorization violation" in low:
            why = "NATS refused the credentials (authorization violation): check NATS_USER/NATS_PASSWORD, " \
                  "NATS_TOKEN or NATS_CREDS_FILE (a revoked or expired user JWT is refused this way too)"
        elif "authentication expired" in low:
            why = "NATS user authentication expired: the user JWT in NATS_CREDS_FILE is past its expiry; put " \
                  "a new creds file in place (it is read again on every reconnect)"
        elif "authentication revoked" in low:
            why = "NATS user authentication revoked: the account revoked this user; put a new creds file in " \
                  "NATS_CREDS_FILE (it is read again on every reconnect)"
        else:
            return False
        self._auth_refused = True
        self._emit("auth_refused")
        self._set_error("auth", why, level=logging.ERROR)
        return True

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, nats.errors.AuthorizationError) or self._auth_error(text):
            if isinstance(exc, nats.errors.AuthorizationError):
                self._auth_error("authorization violation")
        elif "permissions violation" in text.lower():
            subject = self._denials.note(text)
            self._emit("permission_denied")
            self._set_error("permission", f"NATS denied a permission: {text} (subject {subject})",
                            level=logging.ERROR)
        elif self._auth_refused and not (self._nc is not None and self._nc.is_connected):
            # The server drops the socket right after refusing the
            # credentials: that reset is not the news.
            self._emit("error", error=text, kind="connection")
        elif isinstance(exc, nats.errors.SlowConsumerError):
            self._set_error("slow_consumer", f"NATS slow consumer: {text}")
        else:
            self._set_error("connection", f"NATS connection error ({_redact(self.cfg.nats_url)}): "
                                          f"{type(exc).__name__}: {text}")
        if self._nc is not None and not self._nc.is_connected:
            # start() returns (not ready) once every configured server failed
            # a try, not on the first one of a cluster list.
            self._connect_errors += 1
            if self._connect_errors >= len(split_servers(self.cfg.nats_url)):
                self._first_outcome.set()

    async def _on_disconnected(self) -> None:
        if self._stopping:
            return
        self._ready_evt.clear()
        log.warning("NATS disconnected", extra={"fields": {"server": self._server}})
        self._emit("disconnected", server=self._server)
        self._emit("ready", ready=False)

    async def _on_reconnected(self) -> None:
        self._auth_refused = False
        self._server = self._server_url()
        log.info("NATS reconnected", extra={"fields": {"server": self._server}})
        self._emit("reconnected", server=self._server)
        # Outstanding pull requests may have died with the old connection.
        if self._consuming:
            try:
                await self._pull.requests_lost()
            except Exception:
                self._pull.resync.set()
            self._ready_evt.set()
            self._emit("ready", ready=True)

    async def _on_closed(self) -> None:
        if self._stopping:
            return
        # nats-py closes for good on e.g. an expired or revoked user; start
        # over with a new connection (which reads the creds file again).
        nc = self._nc
        err = nc.last_error if nc is not None else None
        text = str(err) if err is not None else ""
        if not self._auth_error(text):
            log.warning("NATS connection closed", extra={"fields": {"server": self._server, "error": text}})
        self._emit("closed")
        self._emit("ready", ready=False)
        self._closed.set()

    # ------------------------------------------------------------ supervisor
    async def _supervise(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                if self._nc is None or self._nc.is_closed:
                    await self._connect()
                await self._setup()
                backoff = 0.1
                self._first_outcome.set()
                await self._watch()
            except _CONFIG_FAILURES as exc:
                self._consuming = False
                self._set_error(type(exc).__name__, str(exc), level=logging.ERROR)
                if not self._claimed or isinstance(exc, StreamConfigConflict):
                    # Found at start (or a stream conflict, which only an
                    # operator can resolve): refuse to run.
                    self._fatal = str(exc)
                    self._fatal_exc = exc
                    self._first_outcome.set()
                    return
                await asyncio.sleep(5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._consuming = False
                if not self._closed.is_set():
                    self._set_error("setup", f"JetStream setup failed: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _connect(self) -> None:
        """Connect (nats-py retries a failing first connect forever by itself)."""
        old, self._nc = self._nc, None
        if old is not None:
            try:
                await old.close()
            except Exception:
                pass
        await self._pull.unsubscribe()
        self._closed.clear()
        nc = NATS()
        self._nc = nc
        await nc.connect(**self._connect_options())
        self._js = nc.jetstream(timeout=JS_API_TIMEOUT, domain=self.domain or None)
        self._reader.bind(nc, self._js)
        self._server = self._server_url()
        self._last_error = None
        self._auth_refused = False
        log.info("NATS connected", extra={"fields": {"server": self._server}})
        self._emit("connected", server=self._server)

    async def _watch(self) -> None:
        """While consuming: replace lost pull requests, check the epoch, return on resync or close."""
        last_check = time.monotonic()
        pull = self._pull
        while True:
            try:
                await asyncio.wait_for(pull.resync.wait(), 1.0)
            except TimeoutError:
                pass
            if self._closed.is_set():
                raise ConnectionError("NATS connection closed")
            if pull.resync.is_set():
                pull.resync.clear()
                self._consuming = False
                return
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            now = time.monotonic()
            if now - pull.activity > WATCHDOG and pull.queue_empty():
                # Nothing to work on and not even a heartbeat: the requests
                # are gone (e.g. a server restarted behind a reconnect that
                # nats-py did not see). While messages wait in the queue (a
                # slow sink, the rate limit) the requests are not the problem.
                log.info("JetStream pull requests silent for %.1fs: requesting again", now - pull.activity)
                await pull.requests_lost()
            if now - last_check > EPOCH_CHECK:
                last_check = now
                info = await self._js_ctx().stream_info(self.stream)
                if format_epoch(info.created) != self._epoch:
                    self._consuming = False
                    return

    def _js_ctx(self) -> JetStreamContext:
        if self._js is None:
            raise ConnectionError("NATS not connected")
        return self._js

    # ----------------------------------------------------------------- setup
    async def _setup(self) -> None:
        """Ensure stream and consumer, (re)subscribe and request the first batches."""
        self._consuming = False
        pull = self._pull
        await pull.unsubscribe()
        js = self._js_ctx()
        t0 = monotonic()
        try:
            info = await self._admin.ensure_stream(js)
        except nats.errors.TimeoutError:
            raise self._denied(t0, "STREAM.") from None
        epoch = format_epoch(info.created)
        if epoch != self._epoch:
            previous = self._epoch
            self._epoch = epoch
            if previous:
                log.warning("JetStream stream recreated: new epoch",
                            extra={"fields": {"stream": self.stream, "old": previous, "new": epoch}})
                pull.last = 0
                pull.last_cseq = 0
            self._emit("epoch", epoch=epoch, previous=previous)
            assert self._sink is not None
            self._sink.set_epoch(epoch)
        t0 = monotonic()
        try:
            ci, created = await self._admin.ensure_consumer(js, pull.last, exclusive=not self._claimed)
        except nats.errors.TimeoutError:
            raise self._denied(t0, "CONSUMER.") from None
        floor = ci.ack_floor
        if created or ci.created != self._consumer_created:
            # Another consumer than the one whose deliveries we counted.
            pull.last_cseq = floor.consumer_seq if floor is not None and not created else 0
        self._consumer_created = ci.created
        if floor is not None and floor.stream_seq > pull.last:
            # Everything up to the ack floor was dispatched (by this process
            # or the one before it): resume after it.
            pull.last = floor.stream_seq
            pull.last_cseq = max(pull.last_cseq, floor.consumer_seq)
        assert self._nc is not None and self._sink is not None
        start_after = pull.last
        await pull.subscribe(self._nc, self._sink)
        self._claimed = True
        self._consuming = True
        self._last_error = None
        self._ready_evt.set()
        self._emit("ready", ready=True)
        log.info("JetStream consuming", extra={"fields": {
            "stream": self.stream, "consumer": self.consumer, "epoch": self._epoch, "after": start_after}})
        if self._warmed_epoch != self._epoch and self.cfg.ws_history_size > 0 and start_after > 0:
            # Once per stream incarnation: the resume memory from the stream's recent past.
            self._warmed_epoch = self._epoch
            self._warm_task = asyncio.create_task(self._warm(self._sink, start_after), name="jetstream-warm")
        if self._seeded_epoch != self._epoch and self.cfg.ws_snapshot_max_subjects > 0:
            # Once per stream incarnation, beside consumption (readiness does not wait for it).
            self._seeded_epoch = self._epoch
            self._seed_task = asyncio.create_task(self._seed(self._sink, start_after), name="jetstream-seed")

    async def _seed(self, sink: Sink, upto: int) -> None:
        """Seed the hub's snapshot store with the stream's newest message per subject up to ``upto``.

        ``upto`` is where this consumer starts: everything after it reaches
        the hub through :meth:`Sink.dispatch` anyway, so only older messages
        are seeded (a seeded message newer than one the consumer has yet to
        dispatch would make a snapshot go backwards). A new durable starts
        at the stream's beginning (``upto`` 0): its own consumption fills the
        store, nothing is seeded. Bounded by ``WS_SNAPSHOT_MAX_SUBJECTS``
        (the newest subjects are kept) and ``SEED_TIMEOUT``; a failure is
        logged and leaves the store to fill from live traffic.
        """
        seed_latest = getattr(sink, "seed_latest", None)
        if seed_latest is None or upto <= 0:
            return
        t0 = monotonic()
        try:
            msgs, complete = await self._reader.last_per_subject(upto, self.cfg.ws_snapshot_max_subjects,
                                                                 SEED_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._set_error("seed", f"JetStream snapshot seeding failed (snapshots fill from live traffic): "
                                    f"{type(exc).__name__}: {exc}")
            return
        put = int(seed_latest(msgs))
        if put:
            self._emit("snapshot_seeded", n=put)   # fanout_broker_events_total{event="snapshot_seeded"}
        log.log(logging.INFO if complete else logging.WARNING,
                "JetStream snapshot store seeded" if complete else
                f"JetStream snapshot store seeding stopped after {SEED_TIMEOUT:g}s: seeded what was read",
                extra={"fields": {"stream": self.stream, "seeded": put, "read": len(msgs), "upto": upto,
                                  "max_subjects": self.cfg.ws_snapshot_max_subjects, "complete": complete,
                                  "seconds": round(monotonic() - t0, 3)}})

    async def _warm(self, sink: Sink, upto: int) -> None:
        """Fill the hub's resume memory with the stream's last ``WS_HISTORY_SIZE`` positions up to ``upto``.

        ``upto`` is where this consumer starts: after a restart, clients resume
        from before it, and without this every such resume reads the stream
        itself (one ephemeral consumer each, the restart storm). One range read
        instead, beside consumption (resumes meanwhile read the stream as
        usual). Memory then answers from the first message read on (the
        stream's retention may have dropped older ones: not claimed). A failure
        is logged and leaves resumes to read the stream.
        """
        seed_history = getattr(sink, "seed_history", None)
        if seed_history is None or upto <= 0:
            return
        lo = max(0, upto - self.cfg.ws_history_size)
        t0 = monotonic()
        try:
            msgs = await self._reader.read_range(None, lo, upto)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._set_error("warm", f"JetStream resume memory not warmed (resumes read the stream): "
                                    f"{type(exc).__name__}: {exc}")
            return
        # Newest first, a chunk per loop step (live delivery goes on between them): each
        # chunk extends memory one step further back, so memory is whole after every one.
        kept = 0
        for end in range(len(msgs), 0, -WARM_CHUNK):
            chunk = msgs[max(0, end - WARM_CHUNK):end]
            n = int(seed_history(chunk, chunk[0].stream_seq - 1))
            kept += n
            if n < len(chunk):
                break            # memory full, or these too old: older ones would be too
            await asyncio.sleep(0)
        log.info("JetStream resume memory warmed", extra={"fields": {
            "stream": self.stream, "read": len(msgs), "kept": kept, "upto": upto,
            "seconds": round(monotonic() - t0, 3)}})

    def _denied(self, t0: float, what: str) -> Exception:
        """The error for a JetStream API call that timed out: a named permission if NATS denied one."""
        denied = self._denials.since(t0 - 0.05, f"{self._prefix}.{what}")
        if not denied:
            return TimeoutError(f"JetStream API ({self._prefix}.{what}*) did not answer within {JS_API_TIMEOUT}s")
        # The error text comes lower-cased: name the subject as this node sent it.
        rest = denied[0][len(self._prefix) + 1:]
        p, st, co = self._prefix, self.stream, self.consumer
        if rest.startswith(("stream.create.", "stream.update.")):
            subject = f"{p}.STREAM.{rest.split('.')[1].upper()}.{st}"
            msg = (f"the node manages the stream (JS_STREAM_MANAGE=true, the default) but the NATS user may not "
                   f"publish to {subject}: set JS_STREAM_MANAGE=false to use the stream as it is "
                   f"(created outside the node), or allow publish to {subject}")
        elif rest.startswith(("consumer.create.", "consumer.durable.create.")):
            subject = (f"{p}.CONSUMER.DURABLE.CREATE.{st}.{co}" if rest.startswith("consumer.durable")
                       else f"{p}.CONSUMER.CREATE.{st}.{co}")
            msg = (f"the NATS user may not create the durable consumer {co} (publish to {subject} "
                   f"denied): allow it, or create that durable outside the node (see docs/managed-nats.md); "
                   "its name is JS_CONSUMER_NAME-FANOUT_NODE_ID")
        else:
            subject = denied[0].upper() if denied[0].startswith("$js.") else denied[0]
            msg = (f"the NATS user may not call the JetStream API: publish to {subject} (as NATS reports it, "
                   f"upper-cased) denied; allow it (see docs/managed-nats.md)")
        return PermissionDenied(msg)

    # ------------------------------------------------------- history / reads
    async def _read_range(self, patterns: list[str] | None, after: int, upto: int) -> list[Any]:
        return await self._reader.read_range(patterns, after, upto)

    async def history(self, patterns: list[str], after: int, upto: int) -> History:
        """Stored messages with ``after < stream_seq <= upto`` on subjects matching ``patterns``
        (see :meth:`HistoryReader.history`)."""
        return await self._reader.history(patterns, after, upto)

    # --------------------------------------------------------------- publish
    async def publish(self, subject: str, payload: bytes, priority: int = DEFAULT_PRIORITY,
                      msg_id: str | None = None) -> int:
        """JetStream publish with ack; sets ``Fanout-Priority`` and ``Nats-Msg-Id``; returns the stream seq.

        Waits up to ``PUBLISH_TIMEOUT`` through a leader election
        (:func:`fanout.publisher.publish_acked`).
        """
        problem = subject_error(subject, wildcards=False)
        if problem:
            raise ValueError(f"invalid subject {subject!r}: {problem}")
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise ConnectionError("NATS not connected")
        ack = await publish_acked(self._js_ctx(), subject, payload, headers=build_headers(priority, msg_id),
                                  stream=self.stream, timeout=PUBLISH_TIMEOUT)
        if ack.duplicate:
            self._emit("duplicate", n=1, subject=subject, publish=True)
        return ack.seq
