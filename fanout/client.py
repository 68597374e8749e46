"""An asyncio client for a fanout node (PROTOCOL.md, version 1.2), on ``websockets``.

::

    async with Client("ws://127.0.0.1:3004/ws", token=jwt, on_resumed=reload_if_incomplete) as client:
        await client.subscribe(["odin.token.*.update", "odin.global.trending"])
        async for msg in client:          # data messages, as dicts, exactly once, in order
            handle(msg["channel"], msg["data"])

What it does for you
--------------------
* **Gaps.** Every data message carries a per-connection ``seq``. A jump in
  ``seq`` makes the client send ``replay`` for the missing range; messages
  after the gap are held back until the replay is answered, so the
  application sees them in order. Whatever the node could no longer replay
  (its per-client replay buffer, ``WS_REPLAY_BUFFER``, default 100 messages)
  is reported through ``on_missing(first, last)`` and :attr:`Client.missing`
  and then skipped.
* **Reconnects.** When the connection breaks (any close code, a reset, a
  failed heartbeat) the client reconnects with exponential backoff and full
  jitter (``reconnect_min`` doubling up to ``reconnect_max``; a 503's
  ``Retry-After`` is a floor) and sends ``resume`` with its channels,
  ``after`` = the last ``stream_seq`` it delivered and the stream ``epoch``.
  Messages are deduplicated by ``stream_seq``, so nothing is delivered twice
  across the boundary. ``on_resumed(info)`` reports how it went; when
  ``info["complete"]`` is false (the node no longer retains everything since
  ``after``, or the stream was recreated / the embedded node restarted) the
  application must reload its state from the source of truth.
* **Quiet channels.** A position is only known once a message arrived after
  the channel's ``subscribed`` reply. A channel that had no traffic since it
  was subscribed cannot be resumed without receiving messages from before the
  subscription, so it is plainly re-subscribed and reported with
  ``complete: False, reason: "no_position"`` (protocol v1's ``subscribed``
  carries no stream position; if a node adds ``stream_seq`` to it, it is used).
* **Heartbeats.** A ``heartbeat`` goes out every ``heartbeat_interval``
  seconds; a connection that delivers nothing at all for ``heartbeat_timeout``
  after one is considered dead and replaced (unless the client itself is the
  slow side: see backpressure).
* ``throttle_update`` notices (``level``, ``rate_percent``, ``dropped``,
  ``message``) go to ``on_throttle(info)`` and :attr:`Client.throttle`; server
  ``error`` frames not tied to a request go to ``on_error(info)``.
* **Reference counts.** Each :meth:`Client.subscribe` of a channel counts;
  only the first one is sent to the node and :meth:`Client.unsubscribe` only
  tells the node when the last holder lets go (same as the JS client).
* **Snapshots** (1.1). ``subscribe(channels, snapshot=True)`` asks the node for
  the newest message of each matching subject before live ones; they are
  delivered with ``"snapshot": True`` (exempt from the ``stream_seq`` dedupe:
  they are older state by design). A node before 1.1 ignores it and the reply
  carries no ``snapshot`` count.
* **Deltas** (1.2), on by default: every ``subscribe`` and ``resume`` asks for
  ``delta: "fossil"``, and the client turns each delta message back into the
  full payload (``msg["data"]``, as for a full message), checking Fossil's
  checksum; ``Client(url, delta=False)`` asks for full messages only. It keeps
  the last payload per subject on the connection (forgotten on
  ``unsubscribe`` and on reconnect) and the last ``stream_seq`` per subject.
  A delta that cannot be applied (bad checksum, no base) is never shown: the
  client asks ``replay`` for its ``seq`` (a replayed message is full) and
  holds what follows until it arrives; if the node can no longer replay it,
  the client unsubscribes the patterns that cover the subject and resumes
  them from the oldest last ``stream_seq`` of their subjects, dropping per
  subject what it already delivered. ``keep_raw=True`` adds ``msg["raw"]``:
  the payload bytes as rebuilt (the text of ``data``). Counters:
  :attr:`Tracker.deltas`, :attr:`Tracker.delta_failures`.
* **Tokens.** ``token`` may be a callable (sync or async): it is called at
  every connect, and, when the token is a JWT with ``exp``, again
  ``refresh_before`` seconds before it expires to send ``refresh`` on the
  open connection (``on_refreshed(exp)``), so the node does not close it with
  4001. A 4001 close with a callable token reconnects at once with a fresh one;
  with a fixed token it is fatal (:class:`AuthError`).
* **Drain hint.** A ``reconnect`` frame (``after_ms``) during a node's drain
  makes the next reconnect happen ``after_ms`` after the hint arrived, instead
  of the backoff (``on_drain(info)``). The node closes the connection (1001) at
  about that time, so the reconnect follows the close at once: counted from
  the close it would come ``after_ms`` late, i.e. spread over twice the drain
  window, partly after the node is gone. If the node has not closed by
  ``after_ms + heartbeat_timeout`` the client drops the connection itself.

Callbacks run in the task that iterates the client, in order with the data
messages: ``on_resumed`` with ``complete: False`` runs after the last message
of the old state was returned and before the first message after the resume.
A callback may be a plain function or a coroutine function; an exception in it
is logged, not raised. ``on_connect()`` and ``on_disconnect(exc)`` follow the
same rule.

Limits
------
* Backpressure: at most ``max_queue`` (default 1024) delivered messages and
  events wait for the application. When the queue is full the client stops
  reading the socket, so TCP pushes back to the node, which throttles this
  connection (``throttle_update``) or, at the heaviest level, closes it with
  1008 (then the client reconnects and resumes). Iterate the client
  concurrently with awaiting :meth:`Client.subscribe` and friends: their
  replies are read by the same reader.
* At most ``max_held`` (default 10000) messages are held back behind an
  unanswered gap; beyond that the connection is dropped and resumed instead.
* ``request_timeout`` (default 10 s) bounds every request/reply.
* ``seq`` numbers (and so :attr:`Client.missing`) are per connection and
  restart at 1 after a reconnect.
* A 401 at the handshake is fatal with a fixed token (:class:`AuthError`,
  raised from ``__aenter__`` or from the iteration); pass ``token`` as a
  callable to fetch a fresh token at every connect instead.
* The first connect is not retried: a wrong URL fails fast from ``__aenter__``.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .fossil import DeltaError, apply_delta

__all__ = [
    "Client", "Tracker", "token_exp", "covers", "FanoutError", "AuthError", "ServerError", "SubscribeError", "ConnectionLost",
    "ClientClosed",
]

log = logging.getLogger("fanout.client")

CLOSE_TIMEOUT = 2.0     # seconds aclose() waits for the closing handshake
DEFAULT_MAX_SIZE = 8 * 2**20    # a data message can exceed the node's 1 MiB publish limit (escaping, base64)

_PAYLOAD = "\x00payload"     # a data message's payload bytes, between the reader and _on_data

Token = str | Callable[[], str | Awaitable[str]] | None
Callback = Callable[..., Any]


# ----------------------------------------------------------------- errors
class FanoutError(Exception):
    """Base of the client's errors.

    * :exc:`AuthError`: the handshake was refused with 401 (fatal with a fixed token)
    * :exc:`ServerError`: the node answered a request with an ``error`` frame
        * :exc:`SubscribeError`: some channels of a subscribe were refused
    * :exc:`ConnectionLost`: the connection broke before the reply came
    * :exc:`ClientClosed`: the client was closed
    """


class AuthError(FanoutError):
    """The node refused the token (HTTP 401 at the handshake)."""


class ServerError(FanoutError):
    """An ``error`` frame answered a request: ``code``, ``message``, the raw ``frame``."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code: str | None = frame.get("code")
        self.frame = frame


class SubscribeError(ServerError):
    """Some channels were refused; ``accepted`` ones are subscribed, ``errors`` has one frame per refused channel."""

    def __init__(self, errors: list[dict[str, Any]], accepted: list[str]) -> None:
        super().__init__(errors[0])
        self.errors = errors
        self.accepted = accepted
        self.refused = [e.get("channel") for e in errors]


class ConnectionLost(FanoutError):
    """The connection broke while a request waited for its reply."""


class ClientClosed(FanoutError):
    """The client was closed."""


def token_exp(token: str | None) -> float | None:
    """The ``exp`` of a JWT, read without verifying it (the node verifies); None when absent."""
    try:
        part = (token or "").split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) else None


def covers(pattern: str, subject: str) -> bool:
    """True when NATS ``subject`` matches ``pattern`` (``*`` one token, ``>`` one or more at the end)."""
    if pattern == subject:
        return True
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return i == len(p) - 1 and len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


# --------------------------------------------------- ordering (Sans-I/O)
class Tracker:
    """Per-client ordering state, with no I/O: seq gaps, hold-back, dedupe, stream position.

    Feed it every data message (:meth:`on_message`) and every ``replay_done``
    (:meth:`on_replay_done`); it returns the messages that may now be
    delivered, in order, and the ranges to ask ``replay`` for.
    """

    def __init__(self, keep_raw: bool = False) -> None:
        #: Highest ``stream_seq`` delivered (or known to be covered) in :attr:`epoch`; ``after`` of a resume.
        self.position = 0
        self.epoch: str | None = None
        #: Messages dropped because their ``stream_seq`` was already delivered.
        self.duplicates = 0
        #: Delta messages that could not be applied (no base, bad checksum): each was asked for again.
        self.delta_failures = 0
        #: Delta messages applied.
        self.deltas = 0
        #: ``stream_seq`` of the last message delivered per subject (PROTOCOL 1.2 recovery).
        self.last_ss: dict[str, int] = {}
        self.keep_raw = keep_raw
        self.new_connection()

    def new_connection(self) -> None:
        """Forget per-connection state; held messages are dropped (the resume brings them again)."""
        self.expected = 1           # the next seq to deliver
        self.seen_hi = 0            # the highest seq received on this connection
        self.held: dict[int, dict[str, Any]] = {}
        self.lost: list[tuple[int, int]] = []
        #: Delta bases: the payload bytes of the last data message per subject on this connection.
        self.bases: dict[str, bytes] = {}
        self._raw: dict[int, bytes] = {}                # a held full message's payload bytes, by seq
        #: Seqs of delta messages that could not be applied, to ask ``replay`` for (the caller takes them).
        self.refetch: list[int] = []
        self._failed: dict[int, str] = {}              # such a seq -> its subject, until it is replayed
        #: Subjects whose failed delta could not be replayed: the caller re-subscribes them with resume.
        self.recover: list[str] = []
        #: Subjects whose messages are skipped up to a seq (None: until told) while they are recovered.
        self.dropping: dict[str, int | None] = {}

    def forget(self, patterns: list[str], *, positions: bool = True) -> None:
        """After ``unsubscribed``: drop the bases (and, unless told not to, the
        per-subject positions) of the subjects these patterns cover."""
        for ch in [c for c in self.bases if any(covers(p, c) for p in patterns)]:
            del self.bases[ch]
        if positions:
            for ch in [c for c in self.last_ss if any(covers(p, c) for p in patterns)]:
                del self.last_ss[ch]

    def set_epoch(self, epoch: str) -> bool:
        """Adopt the stream's epoch; True when it changed (positions of the old one are void)."""
        if epoch == self.epoch:
            return False
        changed = self.epoch is not None
        self.epoch = epoch
        if changed:
            self.position = 0
        return changed

    def on_message(self, msg: dict[str, Any], raw: bytes | None = None) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
        """A data message arrived: (messages to deliver now, seq range to replay or None).

        ``raw``: the payload bytes of a full message (the text of its ``data``),
        the base of the next delta of its subject. A delta message is applied
        in seq order; one that cannot be (no base, bad checksum) is put in
        :attr:`refetch` and everything after it waits for its replay.
        """
        seq = msg.get("seq")
        if not isinstance(seq, int):
            return ([msg] if self._decode(msg, raw) and self._fresh(msg) else []), None
        gap = (self.seen_hi + 1, seq - 1) if seq > self.seen_hi + 1 else None
        self.seen_hi = max(self.seen_hi, seq)
        if seq < self.expected or seq in self.held:
            return [], gap   # a replayed copy of something we have
        self.held[seq] = msg
        if raw is not None:
            self._raw[seq] = raw
        return self._drain(), gap

    def on_replay_done(self, from_seq: int, to_seq: int) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
        """A replay finished: (messages to deliver now, seq ranges now known lost).

        Everything the node sent before ``replay_done`` arrived before it, so a
        seq in the range, at or below :attr:`seen_hi`, that is still not here
        never will be.
        """
        lost: list[tuple[int, int]] = []
        start = None
        for s in range(max(from_seq, self.expected), min(to_seq, self.seen_hi) + 1):
            if s not in self.held and not self._is_lost(s):
                if start is None:
                    start = s
            elif start is not None:
                lost.append((start, s - 1))
                start = None
        if start is not None:
            lost.append((start, min(to_seq, self.seen_hi)))
        self.lost.extend(lost)
        for seq, ch in list(self._failed.items()):
            if any(a <= seq <= b for a, b in lost):
                # Its replay is gone too: skip the subject until it is resumed.
                del self._failed[seq]
                self.dropping[ch] = None
                self.recover.append(ch)
        return self._drain(), lost

    def _is_lost(self, seq: int) -> bool:
        return any(a <= seq <= b for a, b in self.lost)

    def _drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            msg = self.held.pop(self.expected, None)
            if msg is not None:
                if not self._decode(msg, self._raw.pop(self.expected, None)):
                    # Wait for the replayed (full) copy; hold everything after it.
                    self.refetch.append(self.expected)
                    return out
                self.expected += 1
                if self._fresh(msg):
                    out.append(msg)
                continue
            skip = next((b for a, b in self.lost if a <= self.expected <= b), None)
            if skip is None:
                return out
            self.expected = skip + 1

    def _decode(self, msg: dict[str, Any], raw: bytes | None) -> bool:
        """Apply a delta message (PROTOCOL 1.2) or take a full one's payload as
        its subject's base; False when a delta cannot be applied."""
        ch = msg.get("channel")
        if not isinstance(ch, str):
            return True
        mark = self.dropping.get(ch, 0)
        if ch in self.dropping:
            seq = msg.get("seq")
            if mark is None or (isinstance(seq, int) and seq <= mark):
                msg["_skip"] = True          # being recovered: the resume brings it again
                return True
            del self.dropping[ch]
        if "delta" not in msg:
            if raw is not None:
                self.bases[ch] = raw
                if self.keep_raw:
                    msg["raw"] = raw
            else:
                self.bases.pop(ch, None)
            return True
        base = self.bases.get(ch)
        delta = msg.get("delta")
        try:
            if base is None or not isinstance(delta, str):
                raise DeltaError("no base for this delta")
            body = apply_delta(base, delta.encode("utf-8"))
            data = json.loads(body.decode("utf-8"))
        except (DeltaError, ValueError) as exc:     # UnicodeError and JSON errors are ValueErrors
            self.bases.pop(ch, None)
            self.delta_failures += 1
            seq = msg.get("seq")
            if isinstance(seq, int):
                self._failed[seq] = ch
            log.warning("fanout client: delta on %s (seq %s) not applied (%s): asking for it again", ch, seq, exc)
            return False
        del msg["delta"]
        msg["data"] = data
        if self.keep_raw:
            msg["raw"] = body
        self.bases[ch] = body
        self.deltas += 1
        seq = msg.get("seq")
        if isinstance(seq, int):
            self._failed.pop(seq, None)
        return True

    def _fresh(self, msg: dict[str, Any]) -> bool:
        if msg.pop("_skip", False):
            return False
        ss = msg.get("stream_seq")
        if not isinstance(ss, int):
            return True
        ch = msg.get("channel")
        if msg.pop("_per_subject", False):
            # A recovery resume's catch-up: only what this subject has not had yet.
            if isinstance(ch, str) and ss <= self.last_ss.get(ch, 0):
                self.duplicates += 1
                return False
            self.position = max(self.position, ss)
            if isinstance(ch, str):
                self.last_ss[ch] = ss
            return True
        if msg.get("snapshot"):     # older state by design: not a duplicate
            self.position = max(self.position, ss)
            if isinstance(ch, str):
                self.last_ss[ch] = max(ss, self.last_ss.get(ch, 0))
            return True
        if ss <= self.position:
            self.duplicates += 1
            return False
        self.position = ss
        if isinstance(ch, str):
            self.last_ss[ch] = ss
        return True


# ------------------------------------------------------------------ client
@dataclass(slots=True)
class _Pending:
    reply: str                      # the reply type that completes the request
    future: asyncio.Future[dict[str, Any]]
    errors: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)    # a manual replay's copies
    span: tuple[int, int] | None = None                             # a replay's seq range
    auto: bool = False                                              # a gap replay the client sent itself
    internal: bool = False                                          # the client's own resume/re-subscribe
    snapshot: list[str] | None = None                               # a subscribe's channels, when it asked for one
    recover: list[str] | None = None                                # a delta recovery's subjects / patterns


@dataclass(slots=True)
class _Event:
    name: str       # "resumed", "throttle", "missing", "error", "connect", "disconnect"
    args: tuple[Any, ...]


@dataclass(slots=True)
class _End:
    exc: BaseException | None


_Item = dict[str, Any] | _Event | _End


class Client:
    """A fanout client with ordered, exactly-once delivery across gaps and reconnects.

    See the module docstring for the guarantees and limits. Use it as an async
    context manager (or call :meth:`start` / :meth:`aclose`) and iterate it
    for data messages.
    """

    def __init__(
        self,
        url: str,
        token: Token = None,
        *,
        on_resumed: Callback | None = None,
        on_throttle: Callback | None = None,
        on_missing: Callback | None = None,
        on_error: Callback | None = None,
        on_connect: Callback | None = None,
        on_disconnect: Callback | None = None,
        on_refreshed: Callback | None = None,
        on_drain: Callback | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        heartbeat_interval: float = 20.0,
        heartbeat_timeout: float = 10.0,
        request_timeout: float = 10.0,
        max_queue: int = 1024,
        max_held: int = 10000,
        open_timeout: float = 10.0,
        refresh_before: float = 30.0,
        delta: bool = True,
        keep_raw: bool = False,
        **connect_kwargs: Any,
    ) -> None:
        self.url = url
        self.token = token
        self.on_resumed = on_resumed
        self.on_throttle = on_throttle
        self.on_missing = on_missing
        self.on_error = on_error
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_refreshed = on_refreshed
        self.on_drain = on_drain
        self.refresh_before = refresh_before
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.request_timeout = request_timeout
        self.max_held = max_held
        self.open_timeout = open_timeout
        self.connect_kwargs = connect_kwargs
        self.delta = delta
        self.tracker = Tracker(keep_raw)
        #: Seq ranges (first, last) the node could not replay, over the client's life; seqs are per connection.
        self.missing: list[tuple[int, int]] = []
        #: The last ``throttle_update`` (None: never throttled).
        self.throttle: dict[str, Any] | None = None
        #: Completed reconnects.
        self.reconnects = 0
        self._channels: dict[str, None] = {}        # confirmed subscriptions, in order
        self._refs: dict[str, int] = {}             # subscribe() calls holding each channel
        self._current_token: str | None = None
        self._hint_at: float | None = None          # monotonic time a drain hint asked to reconnect at
        self._hint_timer: asyncio.TimerHandle | None = None    # drops the connection if the node never closes it
        self._unpositioned: dict[str, int] = {}     # channel -> seen_hi when its subscribe was confirmed
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max_queue)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._closing = False
        self._ended = False
        self._eof = False       # the iterator has seen the end
        self._fatal: BaseException | None = None
        self._last_rx = time.monotonic()
        self._paused = False         # the reader waits for the application (queue full)
        self._retry_after = 0.0

    # ---------------------------------------------------------- properties
    @property
    def channels(self) -> list[str]:
        """Subscribed channels (patterns), as confirmed by the node."""
        return list(self._channels)

    @property
    def last_stream_seq(self) -> int:
        """The ``stream_seq`` of the last message delivered (the next resume's ``after``)."""
        return self.tracker.position

    @property
    def epoch(self) -> str | None:
        return self.tracker.epoch

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def connection(self) -> ClientConnection | None:
        """The current websockets connection (for diagnostics and tests), or None."""
        return self._ws

    # ----------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the first connection (raising if that fails) and start the connection manager."""
        if self._run_task is not None:
            raise RuntimeError("client already started")
        ws = await self._open()
        self._run_task = asyncio.get_running_loop().create_task(self._run(ws), name="fanout-client")

    async def aclose(self) -> None:
        """Close the connection and stop; iteration ends. Undelivered messages are discarded."""
        if self._closing:
            return
        self._closing = True
        self._end(None)     # first: it unblocks a reader waiting on a full queue
        ws = self._ws
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT)
            except (TimeoutError, OSError):
                pass
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)

    def _end(self, exc: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._fatal = exc
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_End(exc))   # the queue was just emptied: room for one
        self._fail_pending(ClientClosed("client closed") if exc is None else exc)

    # ------------------------------------------------------------ iteration
    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._eof:
                if self._fatal is not None:
                    raise self._fatal
                raise StopAsyncIteration
            item = await self._queue.get()
            if isinstance(item, _End):
                self._eof = True
                continue
            if isinstance(item, _Event):
                await self._fire(item)
                continue
            return item

    async def _fire(self, ev: _Event) -> None:
        fn = getattr(self, "on_" + ev.name)
        if fn is None:
            return
        try:
            result = fn(*ev.args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("fanout client: on_%s callback failed", ev.name)

    # -------------------------------------------------------------- requests
    async def subscribe(self, channels: Iterable[str], *, snapshot: bool = False) -> list[str]:
        """Subscribe to channels (patterns); returns the accepted ones.

        Reference-counted: a channel already held is not sent again (and gets
        no node snapshot: its messages already flow). Raises
        :exc:`SubscribeError` when some were refused (the accepted ones stay
        subscribed). Waits for a connection while reconnecting; a request cut
        off by a reconnect is sent again on the next connection (3 tries).
        """
        chans = list(dict.fromkeys(channels))
        if not chans:
            return []
        held = [c for c in chans if c in self._channels]
        new = [c for c in chans if c not in self._channels]
        for c in held:
            self._refs[c] = self._refs.get(c, 0) + 1
        if not new:
            return held
        obj: dict[str, Any] = {"type": "subscribe", "channels": new}
        if snapshot:
            obj["snapshot"] = True
        if self.delta:
            obj["delta"] = "fossil"
        reply, errors = await self._retrying(obj, "subscribed")
        accepted = list(reply.get("channels") or [])
        for c in accepted:
            self._refs[c] = self._refs.get(c, 0) + 1
        if errors:
            raise SubscribeError(errors, held + accepted)
        return held + accepted

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Release channels: the node is told only for those no other subscribe() holds.

        Messages already in flight may still arrive.
        """
        chans = []
        for ch in dict.fromkeys(channels):
            n = self._refs.get(ch, 0) - 1
            if n > 0:
                self._refs[ch] = n
                continue
            self._refs.pop(ch, None)
            chans.append(ch)
        for ch in chans:
            self._channels.pop(ch, None)
            self._unpositioned.pop(ch, None)
        if chans and self._ready.is_set() and self._ws is not None:
            try:
                await self._request(self._ws, {"type": "unsubscribe", "channels": chans}, "unsubscribed")
            except ConnectionLost:
                pass    # the next connection does not resume them anyway

    async def heartbeat(self) -> int:
        """Round-trip a ``heartbeat``; returns the node's clock (ms since epoch)."""
        reply, _ = await self._retrying({"type": "heartbeat"}, "heartbeat_ack")
        return int(reply.get("ts", 0))

    async def replay(self, from_seq: int, to_seq: int) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
        """Ask the node for this connection's messages ``from_seq..to_seq`` again.

        Returns (the copies of already-delivered messages, the ``missing``
        range or None). Gaps are replayed automatically; this is for an
        application that wants to see messages again. Seqs are per connection.
        """
        ws = await self._wait_ready()
        p = await self._request(ws, {"type": "replay", "from_seq": from_seq, "to_seq": to_seq},
                                "replay_done", span=(from_seq, to_seq))
        missing = p.future.result().get("missing")
        return p.messages, ((int(missing[0]), int(missing[1])) if missing else None)

    async def _retrying(self, obj: dict[str, Any], reply: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        for attempt in range(3):
            ws = await self._wait_ready()
            try:
                p = await self._request(ws, obj, reply)
                return p.future.result(), p.errors
            except ConnectionLost:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _wait_ready(self) -> ClientConnection:
        if self._ended:
            raise self._fatal or ClientClosed("client closed")
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.request_timeout)
            except TimeoutError:
                raise TimeoutError("no connection to the node within request_timeout") from None
        if self._ended or self._ws is None:
            raise self._fatal or ClientClosed("client closed")
        return self._ws

    async def _request(self, ws: ClientConnection, obj: dict[str, Any], reply: str, *,
                       span: tuple[int, int] | None = None, internal: bool = False,
                       timeout: float | None = None, recover: list[str] | None = None) -> _Pending:
        """Send one request and wait for its reply; the returned record holds the reply and errors."""
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending = _Pending(reply, fut, span=span, internal=internal,
                           snapshot=list(obj["channels"]) if obj.get("snapshot") else None, recover=recover)
        self._pending[rid] = pending
        try:
            try:
                await ws.send(json.dumps({**obj, "id": rid}, separators=(",", ":")))
            except ConnectionClosed as exc:
                raise ConnectionLost(str(exc)) from exc
            await asyncio.wait_for(fut, self.request_timeout if timeout is None else timeout)
        finally:
            self._pending.pop(rid, None)
        return pending

    def _fail_pending(self, exc: BaseException) -> None:
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
                p.future.exception()    # retrieved: nobody may be waiting any more
        self._pending.clear()

    # ------------------------------------------------------------ connection
    async def _token(self) -> str | None:
        tok = self.token
        if tok is None or isinstance(tok, str):
            return tok
        value = tok()
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _open(self) -> ClientConnection:
        """One connection attempt. The token goes in ``Authorization: Bearer`` (kept out of URLs and logs)."""
        # The node pings us; our liveness check is the protocol heartbeat.
        kwargs: dict[str, Any] = {"open_timeout": self.open_timeout, "ping_interval": None,
                                  "max_size": DEFAULT_MAX_SIZE, **self.connect_kwargs}
        token = await self._token()
        self._current_token = token
        if token:
            kwargs["additional_headers"] = {**dict(kwargs.get("additional_headers") or {}),
                                            "Authorization": f"Bearer {token}"}
        try:
            return await connect(self.url, **kwargs)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise AuthError(f"the node refused the token: {exc}") from exc
            retry = exc.response.headers.get("Retry-After", "")
            self._retry_after = float(retry) if retry.isdigit() else 0.0
            raise

    def _delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(reconnect_max, reconnect_min * 2**attempt)], so a node restart's
        clients come back spread out; a 503's Retry-After is a floor; a drain's hint replaces it."""
        hint, self._hint_at = self._hint_at, None
        if hint is not None:
            self._retry_after = 0.0
            return max(0.0, hint - time.monotonic())
        cap = min(self.reconnect_max, self.reconnect_min * (2 ** min(attempt, 30)))
        delay = random.uniform(0, cap)
        floor, self._retry_after = self._retry_after, 0.0
        return max(delay, floor + random.uniform(0, self.reconnect_min)) if floor else delay

    async def _run(self, ws: ClientConnection | None) -> None:
        """Connection manager: serve a connection, then reconnect with backoff, until closed or fatal."""
        attempt = 0
        first = True
        while not self._closing:
            if ws is None:
                try:
                    ws = await self._open()
                except AuthError as exc:
                    if isinstance(self.token, str) or self.token is None:
                        self._end(exc)
                        return
                    log.warning("fanout client: %s; retrying with a fresh token", exc)
                except (OSError, InvalidHandshake, TimeoutError) as exc:
                    log.info("fanout client: connect failed (%s)", exc)
                if ws is None:
                    await asyncio.sleep(self._delay(attempt))
                    attempt += 1
                    continue
            try:
                if await self._serve(ws, first):
                    attempt = 0
            except Exception as exc:    # a bug must not kill the manager silently
                log.exception("fanout client: connection handler failed")
                await self._put(_Event("disconnect", (exc,)))
            first = False
            expired = ws.close_code == 4001
            ws = None
            if expired:
                if self.token is None or isinstance(self.token, str):
                    self._end(AuthError("closed with 4001: the token expired (give a callable token to refresh it)"))
                    return
                attempt = 0
                continue        # reconnect at once: _open() fetches a fresh token
            if not self._closing:
                await asyncio.sleep(self._delay(attempt))
                attempt += 1

    async def _serve(self, ws: ClientConnection, first: bool) -> bool:
        """Run one connection until it ends; True when it got as far as resuming."""
        self._ws = ws
        self.tracker.new_connection()
        self._last_rx = time.monotonic()
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(ws))
        heart = loop.create_task(self._heartbeat(ws))
        refresher = loop.create_task(self._refresh_loop(ws))
        restored = False
        exc: BaseException | None = None
        try:
            if not first:
                restore = loop.create_task(self._restore(ws))
                await asyncio.wait([reader, restore], return_when=asyncio.FIRST_COMPLETED)
                if not restore.done():
                    restore.cancel()
                    await asyncio.gather(restore, return_exceptions=True)
                elif restore.exception() is None:
                    restored = True
                else:
                    log.info("fanout client: resume failed (%s)", restore.exception())
            else:
                restored = True
            if restored and not reader.done():
                if not first:
                    self.reconnects += 1
                self._ready.set()
                await self._put(_Event("connect", ()))
            if not restored:
                ws.transport.abort()
            await asyncio.wait([reader])
            exc = reader.exception()
        finally:
            self._ready.clear()
            self._ws = None
            if self._hint_timer is not None:
                self._hint_timer.cancel()
                self._hint_timer = None
            heart.cancel()
            reader.cancel()
            refresher.cancel()
            await asyncio.gather(heart, reader, refresher, return_exceptions=True)
            self._fail_pending(ConnectionLost("connection lost"))
            if ws.transport is not None:
                ws.transport.abort()
        if exc is None:
            exc = ws.close_exc if ws.close_code is not None else None
        log.info("fanout client: disconnected (%s)", exc)
        if not self._closing:
            await self._put(_Event("disconnect", (exc,)))
        return restored

    async def _restore(self, ws: ClientConnection) -> None:
        """After a reconnect: resume what has a position, then plainly re-subscribe the rest.

        The resume goes first and alone, so its catch-up is not interleaved
        with live messages of another request.
        """
        chans = list(self._channels)
        if not chans:
            return
        positioned = [c for c in chans if c not in self._unpositioned]
        quiet = [c for c in chans if c in self._unpositioned]
        tr = self.tracker
        if positioned and tr.epoch is not None:
            req: dict[str, Any] = {"type": "resume", "channels": positioned, "after": tr.position, "epoch": tr.epoch}
            if self.delta:
                req["delta"] = "fossil"
            await self._request(ws, req, "resumed", internal=True)
        elif positioned:
            quiet = chans
        if quiet:
            sub: dict[str, Any] = {"type": "subscribe", "channels": quiet}
            if self.delta:
                sub["delta"] = "fossil"
            p = await self._request(ws, sub, "subscribed", internal=True)
            got = list(p.future.result().get("channels") or [])
            await self._put(_Event("resumed", ({"type": "resumed", "channels": got, "epoch": tr.epoch,
                                                "complete": False, "reason": "no_position"},)))
        stale = [c for c in chans if c not in self._channels]   # unsubscribed while we resumed
        if stale:
            await self._request(ws, {"type": "unsubscribe", "channels": stale}, "unsubscribed", internal=True)

    async def _refresh_loop(self, ws: ClientConnection) -> None:
        """With a callable token: send ``refresh`` ``refresh_before`` s before each token's ``exp``."""
        if not callable(self.token):
            return
        exp = token_exp(self._current_token)
        while exp is not None:
            await asyncio.sleep(max(1.0, exp - time.time() - self.refresh_before))
            await self._ready.wait()
            try:
                new = await self._token()
                if not new:
                    return
                p = await self._request(ws, {"type": "refresh", "token": new}, "refreshed")
            except ServerError as exc:
                log.warning("fanout client: refresh refused (%s)", exc)
                await self._put(_Event("error", (exc.frame,)))
                left = exp - time.time()
                if left < 4:
                    return
                exp = time.time() + left / 2 + self.refresh_before    # try again halfway to the expiry
                continue
            except (FanoutError, TimeoutError):
                return
            self._current_token = new
            got = p.future.result().get("exp")
            exp = float(got) if isinstance(got, (int, float)) else token_exp(new)
            await self._put(_Event("refreshed", (got,)))

    async def _heartbeat(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            sent = time.monotonic()
            try:
                await self._request(ws, {"type": "heartbeat"}, "heartbeat_ack", timeout=self.heartbeat_timeout)
            except TimeoutError:
                if self._paused or self._last_rx > sent:
                    continue    # we are the slow side, or frames still flow (the ack waits behind data)
                log.warning("fanout client: no heartbeat_ack within %.1fs: reconnecting", self.heartbeat_timeout)
                ws.transport.abort()
                return
            except FanoutError:
                return

    # ------------------------------------------------------------------ input
    async def _put(self, item: _Item) -> None:
        if self._ended:
            return
        if self._queue.full():
            self._paused = True
            try:
                await self._queue.put(item)
            finally:
                self._paused = False
        else:
            self._queue.put_nowait(item)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self._last_rx = time.monotonic()
                try:
                    msg = json.loads(raw)
                except ValueError:
                    log.warning("fanout client: frame is not JSON: %.200r", raw)
                    continue
                if isinstance(msg, dict):
                    if (self.delta or self.tracker.keep_raw) and msg.get("type") == "message":
                        msg[_PAYLOAD] = _payload_bytes(raw, msg)     # taken off again by _on_data
                    if not await self._on_frame(ws, msg):
                        return
        except ConnectionClosed:
            pass

    async def _on_frame(self, ws: ClientConnection, msg: dict[str, Any]) -> bool:
        """Handle one server frame; False to drop the connection (and resume)."""
        kind = msg.get("type")
        rid = msg.get("id")
        pending = self._pending.get(rid) if isinstance(rid, int) else None
        if kind == "message":
            return await self._on_data(ws, msg)
        if kind == "error":
            if pending is not None and msg.get("channel") is not None:
                pending.errors.append(msg)      # one refused channel; the reply follows
                self._channels.pop(msg["channel"], None)
                self._unpositioned.pop(msg["channel"], None)
                if pending.internal:            # refused on a resume (e.g. a new token): nobody else hears it
                    await self._put(_Event("error", (msg,)))
            elif pending is not None:
                pending.future.set_exception(ServerError(msg))
            else:
                await self._put(_Event("error", (msg,)))
            return True
        if kind == "subscribed" or kind == "resumed":
            epoch_changed = self._on_subscribed(msg, pending)
            if kind == "resumed":
                if msg.get("complete") is False:
                    msg["reason"] = "epoch_changed" if epoch_changed else "retention"
                if not (pending is not None and pending.recover and msg.get("complete") is not False):
                    await self._put(_Event("resumed", (msg,)))
        elif kind == "unsubscribed":
            chans = [c for c in (msg.get("channels") or []) if isinstance(c, str)]
            recovering = pending is not None and pending.recover is not None
            if recovering and pending is not None and pending.recover:
                # What this subject got before the unsubscribe took effect is
                # skipped: the resume that follows brings it again, full.
                for subject in pending.recover:
                    if subject in self.tracker.dropping:
                        self.tracker.dropping[subject] = self.tracker.seen_hi
            self.tracker.forget(chans, positions=not recovering)
        elif kind == "replay_done":
            await self._on_replay_done(msg, pending)
        elif kind == "throttle_update":
            self.throttle = msg
            await self._put(_Event("throttle", (msg,)))
        elif kind == "reconnect":
            after = msg.get("after_ms")
            delay = max(0.0, float(after) / 1000) if isinstance(after, (int, float)) else 0.0
            # A deadline, not a delay: the wait counts from the hint, not from the close that follows it.
            self._hint_at = time.monotonic() + delay
            if self._hint_timer is not None:
                self._hint_timer.cancel()
            self._hint_timer = asyncio.get_running_loop().call_later(delay + self.heartbeat_timeout,
                                                                     ws.transport.abort)
            log.info("fanout client: node drains, reconnecting in %.3fs", delay)
            await self._put(_Event("drain", (msg,)))
        if pending is not None and kind == pending.reply and not pending.future.done():
            pending.future.set_result(msg)
        return True

    def _on_subscribed(self, msg: dict[str, Any], pending: _Pending | None) -> bool:
        """Adopt epoch, position and channels of a ``subscribed``/``resumed``; True when the epoch changed.

        Runs before the next frame is read, so the epoch and position are
        right for the messages that follow.
        """
        epoch = msg.get("epoch")
        changed = False
        if isinstance(epoch, str) and epoch:
            changed = self.tracker.set_epoch(epoch)
            if changed:
                log.warning("fanout client: stream epoch changed to %s: positions reset", epoch)
        pos = msg.get("stream_seq")     # not in protocol v1; used if a node sends it
        chans = [c for c in (msg.get("channels") or []) if isinstance(c, str)]
        if isinstance(pos, int) and pos >= 0:
            self.tracker.position = max(self.tracker.position, pos)
        if pending is None:
            return changed      # a reply to a request that timed out: not ours any more
        for ch in chans:
            if pending.internal and ch not in self._channels:
                continue        # unsubscribed while the resume was on its way
            self._channels[ch] = None
            if msg.get("type") == "subscribed" and not isinstance(pos, int) and ch not in self._unpositioned:
                self._unpositioned[ch] = self.tracker.seen_hi
            elif msg.get("type") == "resumed" or isinstance(pos, int):
                self._unpositioned.pop(ch, None)
        return changed

    async def _on_data(self, ws: ClientConnection, msg: dict[str, Any]) -> bool:
        raw = msg.pop(_PAYLOAD, None)
        seq = msg.get("seq")
        tr = self.tracker
        if isinstance(seq, int) and seq < tr.expected:
            for p in self._pending.values():      # a copy asked for with replay()
                if p.span is not None and not p.auto and p.span[0] <= seq <= p.span[1]:
                    p.messages.append(msg)
        if self._snapshot_pending(msg):
            msg["snapshot"] = True
        if self._recovery_pending(msg):
            msg["_per_subject"] = True
        deliver, gap = tr.on_message(msg, raw)
        if gap is not None:
            log.info("fanout client: seq gap %d..%d: replaying", *gap)
            await self._send_replay(ws, gap)
        await self._delta_repairs(ws)
        await self._deliver(deliver)
        if len(tr.held) > self.max_held:
            log.warning("fanout client: %d messages held behind a gap: reconnecting to resume", len(tr.held))
            return False
        return True

    def _recovery_pending(self, msg: dict[str, Any]) -> bool:
        """A data message while a delta recovery's resume of a matching pattern is answered."""
        ch = msg.get("channel")
        if not isinstance(ch, str):
            return False
        return any(p.recover and p.reply == "resumed" and any(covers(c, ch) for c in p.recover)
                   for p in self._pending.values())

    async def _delta_repairs(self, ws: ClientConnection) -> None:
        """PROTOCOL 1.2 recovery: ask ``replay`` for each delta that could not be
        applied; re-subscribe (with resume) the subjects whose replay failed."""
        tr = self.tracker
        while tr.refetch:
            seq = tr.refetch.pop(0)
            await self._send_replay(ws, (seq, seq))
        while tr.recover:
            subject = tr.recover.pop(0)
            task = asyncio.get_running_loop().create_task(self._resubscribe(ws, subject))
            task.add_done_callback(_quiet)

    async def _resubscribe(self, ws: ClientConnection, subject: str) -> None:
        """Unsubscribe the patterns covering ``subject``, then resume them from
        the oldest last ``stream_seq`` delivered on their subjects; the catch-up
        is deduplicated per subject."""
        tr = self.tracker
        pats = [c for c in self._channels if covers(c, subject)]
        if not pats:
            tr.dropping.pop(subject, None)
            return
        known = [ss for ch, ss in tr.last_ss.items() if any(covers(p, ch) for p in pats)]
        after = min(known) if known else 0
        log.warning("fanout client: re-subscribing %s from stream_seq %d to recover %s", pats, after, subject)
        try:
            await self._request(ws, {"type": "unsubscribe", "channels": pats}, "unsubscribed",
                                internal=True, recover=[subject])
            req: dict[str, Any] = {"type": "resume", "channels": pats, "after": after}
            if tr.epoch is not None:
                req["epoch"] = tr.epoch
            if self.delta:
                req["delta"] = "fossil"
            await self._request(ws, req, "resumed", internal=True, recover=pats)
        except (FanoutError, TimeoutError) as exc:
            log.info("fanout client: delta recovery of %s cut short (%s): the reconnect resumes it", subject, exc)

    def _snapshot_pending(self, msg: dict[str, Any]) -> bool:
        """A data message before the reply of a ``subscribe`` with ``snapshot`` on a matching channel."""
        ch = msg.get("channel")
        if not isinstance(ch, str):
            return False
        for p in self._pending.values():
            if p.snapshot and any(covers(c, ch) for c in p.snapshot):
                live = any(covers(c, ch) for c in self._channels)
                ss = msg.get("stream_seq")
                if not (live and isinstance(ss, int) and ss > self.tracker.position):
                    return True
        return False

    async def _send_replay(self, ws: ClientConnection, gap: tuple[int, int]) -> None:
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending("replay_done", fut, span=gap, auto=True)
        try:
            await ws.send(json.dumps({"type": "replay", "from_seq": gap[0], "to_seq": gap[1], "id": rid}))
        except ConnectionClosed:
            pass    # the reader sees the close next

    async def _on_replay_done(self, msg: dict[str, Any], pending: _Pending | None) -> None:
        a, b = msg.get("from_seq"), msg.get("to_seq")
        if not (isinstance(a, int) and isinstance(b, int)):
            return
        if pending is not None and pending.auto:
            self._pending.pop(msg["id"], None)
        deliver, lost = self.tracker.on_replay_done(a, b)
        ws = self._ws
        if ws is not None:
            await self._delta_repairs(ws)
        for first, last in lost:
            log.warning("fanout client: seqs %d..%d could not be replayed", first, last)
            self.missing.append((first, last))
        await self._deliver(deliver, lost)

    async def _deliver(self, msgs: list[dict[str, Any]], lost: list[tuple[int, int]] | None = None) -> None:
        lost = list(lost or ())
        for m in msgs:
            seq = m.get("seq")
            while lost and isinstance(seq, int) and lost[0][1] < seq:
                await self._put(_Event("missing", lost.pop(0)))
            if self._unpositioned and isinstance(seq, int):
                for ch in [c for c, mark in self._unpositioned.items() if mark < seq]:
                    del self._unpositioned[ch]
            await self._put(m)
        for rng in lost:
            await self._put(_Event("missing", rng))


def _payload_bytes(frame: str | bytes, msg: dict[str, Any]) -> bytes | None:
    """The payload bytes of a full data message: the text of its ``data``, the
    last field of the frame (the base of the next delta of its subject)."""
    if "data" not in msg:
        return None
    text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
    i = text.find(',"data":')
    if i < 0 or not text.endswith("}"):
        return None
    return text[i + 8:-1].encode("utf-8")


def _quiet(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("fanout client: delta recovery failed: %s", task.exception())
