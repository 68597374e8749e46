"""NATS JetStream as the node's source of messages.

Every node of a service reads the whole stream through its own durable pull
consumer (``JS_CONSUMER_NAME-<node id>``): one durable shared by all nodes
would split the messages between them. Messages reach the hub in stream order
and each is acked (explicitly) once :meth:`Sink.dispatch` has enqueued it for
the node's clients.

What nats-py does, it does here: connecting (and retrying a first connect
that fails, forever), reconnecting with ``reconnect_time_wait`` between
tries, re-subscribing after a reconnect, server discovery in a cluster, the
JetStream admin API (streams, consumers), acks and publish acks.

What nats-py 2.x lacks is a continuous pull (nats.go's ``Consume``): its
``fetch()`` costs a task and a timer per message (about 17k msgs/s on a
small box) and, once the first message of a lingering request arrived, waits
out the whole timeout for the rest of the batch. So this module keeps pull
requests outstanding on the consumer's ``$JS.API.CONSUMER.MSG.NEXT`` subject
(``js_fetch_batch`` each, about two batches ahead) and takes the messages in
a plain nats-py subscription callback, which runs without a loop turn per
message. Requests carry an idle heartbeat, so a request lost with a
connection is noticed and replaced.

Order and loss. JetStream redelivers an unacked message only after its ack
wait, after newer ones; the hub drops anything at or below the last
``stream_seq`` it saw. A delivery lost on the wire (NATS killed, a
reconnect, a restarted node with unacked messages) would therefore be lost
for good. The broker tracks the stream and consumer sequences of what it
dispatched; when the next delivery skips stream sequences *and* deliveries
(consumer sequence), it reads the skipped range from the stream itself,
dispatches it, then goes on. Later redeliveries of those are acked and
dropped. A skip in stream sequences alone is a deleted or expired message.

Backpressure: at most about two batches are requested ahead; messages wait
in the subscription's queue while the hub dispatches. ``WS_MAX_NATS_RATE``
is a token bucket in front of dispatch: consumption waits, nothing is
dropped.

Limits: ``history()`` reads through a short-lived ephemeral consumer per call
(8 at a time); filters that NATS cannot combine (overlapping patterns) are
applied on this side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from time import monotonic, time_ns
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from ..config import Config
from ..publisher import build_headers, publish_acked, split_servers, tls_context
from ..subjects import covers, matches_any, subject_error, valid_pattern
from .base import DEFAULT_PRIORITY, PRIORITIES, Broker, History, Message, Sink, parse_priority

__all__ = ["JetStreamBroker", "StreamConfigConflict", "MetricsHook", "consumer_name"]

log = logging.getLogger("fanout.jetstream")

#: ``hook(event, **fields)``: connected(server), disconnected, reconnected(server),
#: error(error, kind), acked(n), fetched(n), duplicate(n), rate_wait(seconds),
#: epoch(epoch, previous), gap_filled(n), ready(ready).
MetricsHook = Callable[..., None]

PULL_EXPIRES = 30.0        # seconds a pull request lingers on the server
PULL_HEARTBEAT = 2.0       # idle heartbeat the server sends on a waiting request
WATCHDOG = 3 * PULL_HEARTBEAT   # silence after which outstanding requests count as lost
EPOCH_CHECK = 10.0         # seconds between stream_info checks while all is well
START_WAIT = 5.0           # start() waits this long for a first outcome (ready, fatal, or a connect error)
HISTORY_CHUNK = 5000       # messages per history pull request
HISTORY_CONCURRENCY = 8    # history reads at once (each is an ephemeral consumer)
HISTORY_TIMEOUT = 10.0     # seconds one history read may take
JS_API_TIMEOUT = 2.0       # seconds for a JetStream API call (they answer in ms; a
                           # leader election makes them time out, then setup retries)
PUBLISH_TIMEOUT = 10.0     # seconds publish() waits for the ack, retries included (an election takes 4-9 s)
LOG_REPEAT = 30.0          # seconds before the same connection error is logged again

_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")


class StreamConfigConflict(Exception):
    """The existing stream disagrees with the config on a field NATS cannot change.

    The message names the field and its env var. The node refuses to start
    on it (unless ``JS_STREAM_MANAGE=false``, where the stream is used as is).
    """


def _redact(url: str) -> str:
    """A server URL without the user and password it may carry."""
    return re.sub(r"//[^/@]*@", "//", url)


def consumer_name(cfg: Config) -> str:
    """This node's durable: ``JS_CONSUMER_NAME-<node id>``, with characters NATS refuses replaced by ``_``."""
    return _NAME_BAD.sub("_", f"{cfg.js_consumer_name}-{cfg.node_name}")


def format_epoch(created: datetime | None) -> str:
    """The stream incarnation id: its creation time (UTC, microseconds)."""
    if created is None:
        return ""
    return created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ack_fields(reply: str) -> tuple[int, int, int, int, int] | None:
    """(num_delivered, stream_seq, consumer_seq, timestamp_ns, num_pending) from a JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` or
    the v2 form with ``<domain>.<account hash>`` after ``ACK`` (and a trailing
    token). Cheaper than nats-py's ``Msg.metadata``, which builds a datetime.
    """
    t = reply.split(".")
    n = len(t)
    if n >= 11:
        return int(t[6]), int(t[7]), int(t[8]), int(t[9]), int(t[10])
    if n == 9:
        return int(t[4]), int(t[5]), int(t[6]), int(t[7]), int(t[8])
    return None


# Header values as publishers send them, to skip parsing on the hot path.
_PRIO: dict[str | None, int] = {None: DEFAULT_PRIORITY, "": DEFAULT_PRIORITY}
for _name, _num in PRIORITIES.items():
    _PRIO[_name] = _PRIO[_name.upper()] = _PRIO[_name.capitalize()] = _num


def _priority(headers: dict[str, str] | None) -> int:
    if not headers:
        return DEFAULT_PRIORITY
    try:
        return parse_priority(headers.get("Fanout-Priority"))
    except ValueError:
        return DEFAULT_PRIORITY


def _collide(a: str, b: str) -> bool:
    """Whether some subject matches both patterns."""
    at, bt = a.split("."), b.split(".")
    for i in range(max(len(at), len(bt))):
        x = at[i] if i < len(at) else None
        y = bt[i] if i < len(bt) else None
        if x is None or y is None:
            return False
        if x == ">" or y == ">":
            return True
        if x != "*" and y != "*" and x != y:
            return False
    return True


def _val(x: Any) -> Any:
    """An enum's value; nats-py leaves config fields read from the server as plain strings."""
    return getattr(x, "value", x)


def _status(msg: Msg) -> tuple[str, str]:
    h = msg.headers or {}
    return h.get("Status", ""), h.get("Description", "").split("\r\n")[0].split("\n")[0].strip()


class JetStreamBroker(Broker):
    """Feeds the hub from a JetStream stream; see the module docstring.

    ``metrics_hook(event, **fields)`` is called for connection changes and
    counts (see :data:`MetricsHook`); it must not block or raise.
    ``reconnect_time_wait`` is nats-py's pause between tries of one server.
    """

    name = "jetstream"

    def __init__(self, cfg: Config, metrics_hook: MetricsHook | None = None, *,
                 reconnect_time_wait: float = 2.0, connect_timeout: float = 2.0) -> None:
        self.cfg = cfg
        self._hook = metrics_hook
        self.stream = cfg.js_stream_name
        self.consumer = consumer_name(cfg)
        self._reconnect_time_wait = reconnect_time_wait
        self._connect_timeout = connect_timeout
        self._batch = cfg.js_fetch_batch
        self._next_subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        self._sink: Sink | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._sub: Subscription | None = None
        self._inbox = ""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._consuming = False
        self._epoch = ""
        self._stream_subjects: list[str] = cfg.stream_subjects
        self._fatal: str | None = None
        self._auth_refused = False
        self._connect_errors = 0
        self._fatal_exc: BaseException | None = None
        self._last_error: str | None = None
        self._error_logged: tuple[str, float] = ("", 0.0)
        self._server = ""
        # Consumption state: what was dispatched (stream and consumer sequence)
        # and how many messages the outstanding pull requests may still bring.
        self._last = 0
        self._last_cseq = 0
        self._consumer_created: datetime | None = None
        self._pending = 0
        self._activity = 0.0
        self._fetched = 0
        self._acked = 0
        self._dupes = 0
        self._dispatch: Callable[[Message], int] = lambda m: -1
        self._ack: Callable[..., Any] = self._no_ack
        self._resync = asyncio.Event()
        self._closed = asyncio.Event()
        self._first_outcome = asyncio.Event()
        self._ready_evt = asyncio.Event()
        self._history_sem = asyncio.Semaphore(HISTORY_CONCURRENCY)
        # Token bucket for WS_MAX_NATS_RATE.
        self._rate = cfg.ws_max_nats_rate
        self._burst = max(1.0, self._rate / 10)
        self._tokens = self._burst
        self._refill_at = time.monotonic()

    # ------------------------------------------------------------ properties
    @property
    def ready(self) -> bool:
        return self._consuming and self._nc is not None and self._nc.is_connected and self._fatal is None

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def fatal(self) -> str | None:
        """Why the broker gave up (a stream conflict found after start), else None."""
        return self._fatal

    @property
    def last_stream_seq(self) -> int:
        """The last stream sequence this broker dispatched (or skipped as deleted)."""
        return self._last

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
            "epoch": self._epoch,
            "last_stream_seq": self._last,
            "reconnects": nc.stats["reconnects"] if nc is not None else 0,
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

        Raises :class:`StreamConfigConflict` when NATS is reachable and the
        stream conflicts. When NATS is unreachable (or refuses the
        credentials) it returns after the first failed try, not ready, and
        keeps trying forever.
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
        await self._drop_sub()
        nc, self._nc = self._nc, None
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
        self._flush_counts()

    # ------------------------------------------------------------ connection
    def _connect_options(self) -> dict[str, Any]:
        cfg = self.cfg
        opts: dict[str, Any] = {
            "servers": split_servers(cfg.nats_url),
            "name": f"fanout-{cfg.node_name}",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": self._reconnect_time_wait,
            "connect_timeout": self._connect_timeout,
            "ping_interval": 10,
            "max_outstanding_pings": 3,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            # Subjects here come from the stream and validated patterns; nats-py
            # checking each ack's reply subject again costs ~20% of ingest.
            "skip_subject_validation": True,
        }
        if cfg.nats_user:
            opts["user"] = cfg.nats_user
            opts["password"] = cfg.nats_password
        if cfg.nats_token:
            opts["token"] = cfg.nats_token
        if cfg.nats_creds_file:
            opts["user_credentials"] = cfg.nats_creds_file
        tls = tls_context(cfg.nats_tls_ca, cfg.nats_tls_cert, cfg.nats_tls_key)
        if tls is not None:
            opts["tls"] = tls
        return opts

    def _server_url(self) -> str:
        nc = self._nc
        url = nc.connected_url if nc is not None else None
        if url is None:
            return ""
        return f"{url.scheme}://{url.hostname}:{url.port}"

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if "authorization violation" in text.lower() or isinstance(exc, nats.errors.AuthorizationError):
            self._auth_refused = True
            self._set_error("auth", "NATS refused the credentials (authorization violation): check NATS_USER/"
                            "NATS_PASSWORD, NATS_TOKEN or NATS_CREDS_FILE", level=logging.ERROR)
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
            self._pending = 0
            self._activity = monotonic()
            try:
                await self._top_up()
            except Exception:
                self._resync.set()
            self._ready_evt.set()
            self._emit("ready", ready=True)

    async def _on_closed(self) -> None:
        if not self._stopping:
            # nats-py closes for good on e.g. an authorization error after a
            # reconnect; start over with a new connection.
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
            except StreamConfigConflict as exc:
                self._fatal = str(exc)
                self._fatal_exc = exc
                self._consuming = False
                self._set_error("stream_conflict", str(exc), level=logging.ERROR)
                self._first_outcome.set()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._consuming = False
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
        self._sub = None
        self._closed.clear()
        nc = NATS()
        self._nc = nc
        await nc.connect(**self._connect_options())
        self._js = nc.jetstream(timeout=JS_API_TIMEOUT)
        self._server = self._server_url()
        self._last_error = None
        self._auth_refused = False
        log.info("NATS connected", extra={"fields": {"server": self._server}})
        self._emit("connected", server=self._server)

    async def _watch(self) -> None:
        """While consuming: replace lost pull requests, check the epoch, return on resync or close."""
        last_check = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._resync.wait(), 1.0)
            except TimeoutError:
                pass
            if self._closed.is_set():
                raise ConnectionError("NATS connection closed")
            if self._resync.is_set():
                self._resync.clear()
                self._consuming = False
                return
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            now = time.monotonic()
            if now - self._activity > WATCHDOG and self._queue_empty():
                # Nothing to work on and not even a heartbeat: the requests
                # are gone (e.g. a server restarted behind a reconnect that
                # nats-py did not see). While messages wait in the queue (a
                # slow sink, the rate limit) the requests are not the problem.
                log.info("JetStream pull requests silent for %.1fs: requesting again", now - self._activity)
                self._activity = now
                self._pending = 0
                await self._top_up()
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
        await self._drop_sub()
        info = await self._ensure_stream()
        epoch = format_epoch(info.created)
        if epoch != self._epoch:
            previous = self._epoch
            self._epoch = epoch
            if previous:
                log.warning("JetStream stream recreated: new epoch",
                            extra={"fields": {"stream": self.stream, "old": previous, "new": epoch}})
                self._last = 0
                self._last_cseq = 0
            self._emit("epoch", epoch=epoch, previous=previous)
            assert self._sink is not None
            self._sink.set_epoch(epoch)
        ci, created = await self._ensure_consumer()
        floor = ci.ack_floor
        if created or ci.created != self._consumer_created:
            # Another consumer than the one whose deliveries we counted.
            self._last_cseq = floor.consumer_seq if floor is not None and not created else 0
        self._consumer_created = ci.created
        if floor is not None and floor.stream_seq > self._last:
            # Everything up to the ack floor was dispatched (by this process
            # or the one before it): resume after it.
            self._last = floor.stream_seq
            self._last_cseq = max(self._last_cseq, floor.consumer_seq)
        assert self._nc is not None and self._sink is not None
        self._dispatch = self._sink.dispatch
        self._ack = self._nc.publish
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=-1,
                                             pending_bytes_limit=-1)
        self._pending = 0
        self._activity = time.monotonic()
        self._resync.clear()
        await self._top_up()
        self._consuming = True
        self._last_error = None
        self._ready_evt.set()
        self._emit("ready", ready=True)
        log.info("JetStream consuming", extra={"fields": {
            "stream": self.stream, "consumer": self.consumer, "epoch": self._epoch, "after": self._last}})

    async def _drop_sub(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    def _wanted_stream(self) -> api.StreamConfig:
        cfg = self.cfg
        return api.StreamConfig(
            name=self.stream,
            subjects=cfg.stream_subjects,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            max_age=cfg.js_stream_max_age,
            max_msgs=cfg.js_stream_max_msgs,
            max_bytes=cfg.js_stream_max_bytes,
            storage=api.StorageType(cfg.js_stream_storage),
            num_replicas=cfg.js_stream_replicas,
        )

    async def _ensure_stream(self) -> api.StreamInfo:
        js = self._js_ctx()
        want = self._wanted_stream()
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            if not self.cfg.js_stream_manage:
                raise LookupError(f"stream {self.stream} does not exist and JS_STREAM_MANAGE=false: "
                                  "create it, or let the node manage it") from None
            try:
                info = await js.add_stream(want)
                log.info("JetStream stream created", extra={"fields": {"stream": self.stream}})
                self._stream_subjects = list(want.subjects or [])
                return info
            except APIError as exc:
                if exc.err_code != 10058:  # 10058: name already in use (another node was first)
                    raise self._create_conflict(exc) from None
                info = await js.stream_info(self.stream)
        if self.cfg.js_stream_manage:
            info = await self._reconcile_stream(info, want)
        self._stream_subjects = list(info.config.subjects or [])
        return info

    def _create_conflict(self, exc: APIError) -> Exception:
        field = {10074: ("num_replicas", "JS_STREAM_REPLICAS"), 10065: ("subjects", "JS_STREAM_SUBJECTS"),
                 10052: ("subjects", "JS_STREAM_SUBJECTS")}.get(exc.err_code or 0)
        if field is None:
            return exc  # e.g. insufficient resources: may pass, retried
        return StreamConfigConflict(
            f"cannot create stream {self.stream}: {field[0]} ({field[1]}) is refused by NATS: {exc.description}")

    async def _reconcile_stream(self, info: api.StreamInfo, want: api.StreamConfig) -> api.StreamInfo:
        have = info.config
        name = self.stream
        if _val(have.storage) != _val(want.storage):
            raise StreamConfigConflict(
                f"stream {name} has storage={_val(have.storage)} but "
                f"JS_STREAM_STORAGE={self.cfg.js_stream_storage}: NATS cannot change a stream's storage "
                "(delete the stream, change JS_STREAM_STORAGE, or set JS_STREAM_MANAGE=false)")
        if _val(have.retention) not in (None, "limits"):
            raise StreamConfigConflict(
                f"stream {name} has retention={_val(have.retention)} but fan-out needs retention=limits "
                "(every node reads every message); NATS cannot change it (set JS_STREAM_MANAGE=false to use it anyway)")
        changes: dict[str, Any] = {}
        env: dict[str, str] = {}
        if set(have.subjects or []) != set(want.subjects or []):
            changes["subjects"], env["subjects"] = want.subjects, "JS_STREAM_SUBJECTS"
        if abs((have.max_age or 0.0) - (want.max_age or 0.0)) > 1e-6:
            changes["max_age"], env["max_age"] = want.max_age, "JS_STREAM_MAX_AGE"
        if have.max_msgs != want.max_msgs:
            changes["max_msgs"], env["max_msgs"] = want.max_msgs, "JS_STREAM_MAX_MSGS"
        if have.max_bytes != want.max_bytes:
            changes["max_bytes"], env["max_bytes"] = want.max_bytes, "JS_STREAM_MAX_BYTES"
        if (have.num_replicas or 1) != want.num_replicas:
            changes["num_replicas"], env["num_replicas"] = want.num_replicas, "JS_STREAM_REPLICAS"
        if not changes:
            return info
        # A shorter max_age than the current duplicate window is refused: keep it within.
        if "max_age" in changes and have.duplicate_window and want.max_age and have.duplicate_window > want.max_age:
            changes["duplicate_window"] = want.max_age
        js = self._js_ctx()
        try:
            new = await js.update_stream(have.evolve(**changes))
        except APIError as exc:
            refused = {k: (exc.description or "") for k in env}
            if len(env) > 1:
                # Find the field NATS refuses: apply the others one by one
                # (they would be applied anyway once the refused one is fixed).
                for k in list(env):
                    one = {k: changes[k]}
                    if k == "max_age" and "duplicate_window" in changes:
                        one["duplicate_window"] = changes["duplicate_window"]
                    try:
                        have = (await js.update_stream(have.evolve(**one))).config
                        del refused[k]
                    except APIError as e:
                        refused[k] = e.description or ""
                if not refused:
                    return await js.stream_info(name)
            fields = "; ".join(f"{k} {getattr(have, k)!r} -> {changes[k]!r} ({env[k]}): {why}"
                               for k, why in refused.items())
            raise StreamConfigConflict(
                f"stream {name} differs from the config and NATS refuses to change {fields} "
                "(change the setting, delete the stream, or set JS_STREAM_MANAGE=false)") from exc
        log.info("JetStream stream updated", extra={"fields": {"stream": name, "changed": sorted(changes)}})
        return new

    def _wanted_consumer(self, start_after: int) -> api.ConsumerConfig:
        cfg = api.ConsumerConfig(
            name=self.consumer,
            durable_name=self.consumer,
            description=f"fanout node {self.cfg.node_name}",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=self.cfg.js_consumer_inactive,
            # Deliveries lost on the wire stay pending until their ack wait;
            # a small limit would stall the consumer meanwhile.
            max_ack_pending=max(20000, 16 * self._batch),
        )
        if start_after > 0:
            # Recreated while running (deleted, or removed as inactive): go on
            # from what was dispatched rather than from the stream's start.
            cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = start_after + 1
        return cfg

    async def _ensure_consumer(self) -> tuple[api.ConsumerInfo, bool]:
        """This node's durable (created when absent); returns (info, created)."""
        js = self._js_ctx()
        try:
            ci = await js.consumer_info(self.stream, self.consumer)
        except NotFoundError:
            ci = None
        if ci is not None:
            c = ci.config
            if _val(c.ack_policy) != "explicit" or c.filter_subject or c.filter_subjects:
                log.warning("durable consumer has another config: recreating it",
                            extra={"fields": {"consumer": self.consumer}})
                await js.delete_consumer(self.stream, self.consumer)
                ci = None
            elif abs((c.inactive_threshold or 0.0) - self.cfg.js_consumer_inactive) > 1e-3:
                ci = await js.add_consumer(self.stream, c.evolve(inactive_threshold=self.cfg.js_consumer_inactive))
        if ci is None:
            ci = await js.add_consumer(self.stream, self._wanted_consumer(self._last))
            log.info("JetStream consumer created", extra={"fields": {
                "consumer": self.consumer, "start_after": self._last}})
            return ci, True
        return ci, False

    # ----------------------------------------------------------- consumption
    async def _top_up(self) -> None:
        """Keep about two batches requested ahead."""
        want = 2 * self._batch - self._pending
        if want < self._batch:
            return
        nc = self._nc
        if nc is None or self._sub is None:
            return
        req = json.dumps({"batch": want, "expires": int(PULL_EXPIRES * 1e9),
                          "idle_heartbeat": int(PULL_HEARTBEAT * 1e9)}).encode()
        self._pending += want
        await nc.publish(self._next_subject, req, reply=self._inbox)

    async def _on_msg(self, msg: Msg) -> None:
        # The hot path: one call per message, no loop turn unless a gap, the
        # rate limit or a full output buffer makes it wait.
        reply = msg.reply
        if not reply.startswith("$JS.ACK."):
            self._activity = monotonic()
            await self._on_status(msg)
            return
        t = reply.split(".")
        if len(t) >= 11:  # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>...
            seq, cseq, first = int(t[7]), int(t[8]), t[6] == "1"
        elif len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            seq, cseq, first = int(t[5]), int(t[6]), t[4] == "1"
        else:
            return
        if self._pending > 0:
            self._pending -= 1
        self._fetched += 1
        last = self._last
        if seq <= last:
            # A redelivery of something already dispatched (its ack was lost,
            # or it came through a gap fill): ack it again, send nothing.
            self._dupes += 1
        else:
            if seq != last + 1 and not (first and cseq == self._last_cseq + 1):
                try:
                    await self._fill_gap(seq)
                except Exception as exc:
                    # Neither dispatch nor ack this one: it comes again (the
                    # next delivery finds the same gap, or the redelivery).
                    self._set_error("gap", f"JetStream gap fill failed: {type(exc).__name__}: {exc}")
                    self._resync.set()
                    return
            if self._rate > 0:
                await self._take_token()
            headers = msg.headers
            prio = DEFAULT_PRIORITY if headers is None else _PRIO.get(headers.get("Fanout-Priority"), -1)
            if prio < 0:
                prio = _priority(headers)
            try:
                if self._dispatch(Message(msg.subject, msg.data, seq, time_ns() // 1_000_000, prio)) < 0:
                    self._dupes += 1
            except Exception:
                log.exception("dispatch failed", extra={"fields": {"stream_seq": seq, "subject": msg.subject}})
                self._emit("error", error="dispatch failed", kind="dispatch")
            self._last = seq
        if cseq > self._last_cseq:
            self._last_cseq = cseq
        try:
            await self._ack(reply)  # explicit ack: an empty message to the ack subject
            self._acked += 1
        except Exception as exc:  # disconnected with a full buffer: it is redelivered and dropped then
            log.debug("ack failed: %s", exc)
        if self._pending <= self._batch:
            await self._top_up()
        if self._fetched >= 4096 or self._queue_empty():
            self._activity = monotonic()
            self._flush_counts()

    @staticmethod
    async def _no_ack(subject: str) -> None:
        raise ConnectionError("not connected")

    def _queue_empty(self) -> bool:
        sub = self._sub
        return sub is None or sub.pending_msgs == 0

    def _flush_counts(self) -> None:
        if self._fetched:
            self._emit("fetched", n=self._fetched)
            self._fetched = 0
        if self._acked:
            self._emit("acked", n=self._acked)
            self._acked = 0
        if self._dupes:
            self._emit("duplicate", n=self._dupes)
            self._dupes = 0

    async def _on_status(self, msg: Msg) -> None:
        code, desc = _status(msg)
        if code == "100":
            return  # idle heartbeat (or flow control, unused on pull)
        left = (msg.headers or {}).get("Nats-Pending-Messages")
        if code in ("404", "408", "409"):
            if left is not None and left.isdigit():
                self._pending = max(0, self._pending - int(left))
            elif code != "409":
                self._pending = 0
            if code == "409":
                log.warning("JetStream pull ended: %s", desc)
                if "Deleted" in desc:
                    self._resync.set()
                    return
                if "Leadership" in desc or "Shutdown" in desc:
                    self._pending = 0
                else:
                    # A limit (max waiting, batch size): don't hammer the server.
                    await asyncio.sleep(0.5)
            await self._top_up()
            return
        # 503 no responders: the consumer (or the stream's leader) is gone.
        self._set_error("consumer", f"JetStream pull refused: {code} {desc}".strip())
        self._resync.set()

    async def _take_token(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refill_at) * self._rate)
        self._refill_at = now
        if self._tokens < 1.0:
            wait = (1.0 - self._tokens) / self._rate
            self._emit("rate_wait", seconds=wait)
            await asyncio.sleep(wait)
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._refill_at) * self._rate)
            self._refill_at = now
        self._tokens -= 1.0

    async def _fill_gap(self, seq: int) -> None:
        """Dispatch what the stream holds between the last dispatched message and ``seq``."""
        after = self._last
        got = await self._read_range(None, after, seq - 1)
        sink = self._sink
        assert sink is not None
        n = 0
        for m in got:
            if m.stream_seq <= self._last:
                continue
            if self._rate > 0:
                await self._take_token()
            sink.dispatch(m)
            self._last = m.stream_seq
            n += 1
        if n:
            log.info("JetStream gap filled from the stream",
                     extra={"fields": {"after": after, "upto": seq - 1, "messages": n}})
            self._emit("gap_filled", n=n)

    # ------------------------------------------------------- history / reads
    def _filters(self, patterns: list[str]) -> tuple[list[str], bool]:
        """Server-side filter subjects for ``patterns`` and whether NATS can take them as they are."""
        pats = sorted({p for p in patterns if valid_pattern(p)})
        pats = [p for p in pats if any(_collide(p, s) for s in self._stream_subjects)]
        pats = [p for p in pats if not any(q != p and covers(q, p) for q in pats)]
        for i, a in enumerate(pats):
            for b in pats[i + 1:]:
                if _collide(a, b):
                    return pats, False
        return pats, True

    async def history(self, patterns: list[str], after: int, upto: int) -> History:
        """Stored messages with ``after < stream_seq <= upto`` on subjects matching ``patterns``.

        ``complete`` is False when the stream's first sequence is above
        ``after + 1`` (retention dropped messages the caller has not seen;
        with ``after == 0`` that means anything was ever dropped), and when
        the stream cannot be read now (NATS unreachable, a leader election
        outlasting ``HISTORY_TIMEOUT``): then ``messages`` is empty and the
        client reloads its state, as for expired retention. ``ts_ms`` of these
        messages is the time JetStream stored them.
        """
        try:
            js = self._js_ctx()
            if self._nc is None or not self._nc.is_connected:
                raise ConnectionError("NATS not connected")
            pats, _ = self._filters(patterns)
            messages: list[Message] = []
            if pats and upto > after:
                messages = await self._read_range(pats, after, upto)
            # Checked after the read: a message that expired meanwhile shows.
            info = await js.stream_info(self.stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._set_error("history", f"JetStream history read failed: {type(exc).__name__}: {exc}")
            return History([], False)
        first = info.state.first_seq
        complete = first <= after + 1 or (info.state.messages == 0 and info.state.last_seq <= after)
        return History(messages, complete)

    async def _read_range(self, patterns: list[str] | None, after: int, upto: int) -> list[Message]:
        """Messages ``after < seq <= upto`` (matching ``patterns``; None = all) through an ephemeral consumer."""
        if upto <= after:
            return []
        async with self._history_sem:
            return await asyncio.wait_for(self._read_range_now(patterns, after, upto), HISTORY_TIMEOUT)

    async def _read_range_now(self, patterns: list[str] | None, after: int, upto: int) -> list[Message]:
        nc = self._nc
        js = self._js_ctx()
        assert nc is not None
        filters: list[str] = []
        server_side = True
        if patterns is not None:
            filters, server_side = self._filters(patterns)
            if not filters:
                return []
        out: list[Message] = []
        done = asyncio.Event()
        state = {"want": 0}

        async def on_msg(msg: Msg) -> None:
            if not msg.reply.startswith("$JS.ACK."):
                code, _ = _status(msg)
                if code != "100":
                    state["want"] = -1
                    done.set()
                return
            fields = _ack_fields(msg.reply)
            if fields is None:
                return
            _, seq, _, ts, left = fields
            state["want"] -= 1
            if seq <= upto:
                if patterns is None or server_side or matches_any(filters, msg.subject):
                    out.append(Message(msg.subject, msg.data, seq, ts // 1_000_000, _priority(msg.headers)))
            if seq >= upto or left == 0:
                state["want"] = -1
                done.set()
            elif state["want"] == 0:
                done.set()

        name = f"fanout-read-{uuid.uuid4().hex[:16]}"
        ccfg = api.ConsumerConfig(
            name=name, ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1, inactive_threshold=HISTORY_TIMEOUT, mem_storage=True, num_replicas=1,
            max_deliver=1,
        )
        if filters and server_side:
            if len(filters) == 1:
                ccfg.filter_subject = filters[0]
            else:
                ccfg.filter_subjects = filters
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        created = False
        try:
            try:
                ci = await js.add_consumer(self.stream, ccfg)
            except APIError:
                if not (filters and server_side):
                    raise
                # NATS refused the filters (e.g. not within the stream's
                # subjects): read everything and filter here.
                ccfg.filter_subject = None
                ccfg.filter_subjects = None
                server_side = False
                ci = await js.add_consumer(self.stream, ccfg)
            created = True
            left = ci.num_pending or 0
            subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{name}"
            while left > 0 and state["want"] >= 0:
                n = min(left, HISTORY_CHUNK, max(1, upto - after))
                state["want"] = n
                done.clear()
                await nc.publish(subject, json.dumps({"batch": n, "no_wait": True}).encode(), reply=inbox)
                await done.wait()
                left -= n
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
            if created:
                try:
                    await js.delete_consumer(self.stream, name)
                except Exception:  # it goes by itself after inactive_threshold
                    pass
        return out

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
