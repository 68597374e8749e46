"""The pull consumer: the ingest hot path from JetStream into the hub.

nats-py 2.x lacks a continuous pull (nats.go's ``Consume``): its ``fetch()``
costs a task and a timer per message (about 17k msgs/s on a small box) and,
once the first message of a lingering request arrived, waits out the whole
timeout for the rest of the batch. So :class:`PullConsumer` keeps pull
requests outstanding on the consumer's ``$JS.API.CONSUMER.MSG.NEXT`` subject
(``js_fetch_batch`` each, about two batches ahead) and takes the messages in
a plain nats-py subscription callback, which runs without a loop turn per
message. Requests carry an idle heartbeat, so a request lost with a
connection is noticed (by the broker's watchdog) and replaced.

Order and loss. JetStream redelivers an unacked message only after its ack
wait, after newer ones; the hub drops anything at or below the last
``stream_seq`` it saw. A delivery lost on the wire (NATS killed, a
reconnect, a restarted node with unacked messages) would therefore be lost
for good. The consumer tracks the stream and consumer sequences of what it
dispatched; when the next delivery skips stream sequences *and* deliveries
(consumer sequence), it reads the skipped range from the stream itself
(:meth:`HistoryReader.read_range`), dispatches it, then goes on. Later
redeliveries of those are acked and dropped. A skip in stream sequences
alone is a deleted or expired message. A read that fails (after a failover
the stream may be electing its leader for seconds) is tried again with
backoff for up to ``GAP_RETRY_FOR`` seconds while the deliveries behind it
wait, in order, in the subscription's queue; only then is the consumer set
up again, and what it had been sent comes back after the ack wait.

Input boundary. NATS allows subjects that PROTOCOL.md's channel syntax does
not (``"``, ``\\``, non-ASCII, long tokens), and the hub pastes the subject
into every subscriber's JSON frame. Such a message is acked, never
dispatched, counted (hook event ``ingest_rejected``, reason ``bad_subject``)
and logged at most once per ``LOG_REPEAT`` seconds with the count since.

Backpressure: at most about two batches are requested ahead; messages wait
in the subscription's queue while the hub dispatches. ``WS_MAX_NATS_RATE``
is a token bucket in front of dispatch: consumption waits, nothing is
dropped (:class:`fanout.ratelimit.TokenBucket`, burst a tenth of a second).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from time import monotonic, time_ns
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ...ratelimit import TokenBucket
from ...subjects import subject_error
from ..base import Message, Sink, header_priority

__all__ = ["PullConsumer", "parse_ack", "status_of", "SubjectGuard", "PULL_EXPIRES", "PULL_HEARTBEAT"]

log = logging.getLogger("fanout.jetstream")

PULL_EXPIRES = 30.0        # seconds a pull request lingers on the server
PULL_HEARTBEAT = 2.0       # idle heartbeat the server sends on a waiting request
LOG_REPEAT = 30.0          # seconds between log lines about rejected messages
GAP_RETRY_FOR = 20.0       # seconds a failing gap fill is tried again (a stream electing its leader)
GAP_RETRY_MIN = 0.1        # first backoff between those tries; doubles up to GAP_RETRY_MAX
GAP_RETRY_MAX = 2.0
GOOD_SUBJECTS_MAX = 65536  # valid subjects remembered, so the hot path validates each one once

#: ``emit(event, **fields)``: the broker's metrics hook, made safe.
Emit = Callable[..., None]
ReadRange = Callable[[list[str] | None, int, int], Awaitable[list[Message]]]


def parse_ack(reply: str) -> tuple[int, int, int, int, int] | None:
    """(num_delivered, stream_seq, consumer_seq, timestamp_ns, num_pending) from a JetStream ack subject.

    The one parser of ack subjects (the pull consumer and history reads).
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` or
    the v2 form with ``<domain>.<account hash>`` after ``ACK`` (and maybe a
    trailing token). None for anything else. Cheaper than nats-py's
    ``Msg.metadata``, which builds a datetime.
    """
    t = reply.split(".")
    n = len(t)
    try:
        if n >= 11:
            return int(t[6]), int(t[7]), int(t[8]), int(t[9]), int(t[10])
        if n == 9:
            return int(t[4]), int(t[5]), int(t[6]), int(t[7]), int(t[8])
    except ValueError:
        return None
    return None


def status_of(msg: Msg) -> tuple[str, str]:
    """(status code, first line of the description) of a JetStream status message."""
    h = msg.headers or {}
    return h.get("Status", ""), h.get("Description", "").split("\r\n")[0].split("\n")[0].strip()


class SubjectGuard:
    """Ingest check of subjects against PROTOCOL.md's channel syntax, with a rate-limited log.

    Valid subjects are remembered (bounded), so the hot path costs one set
    lookup per message; a bad one costs a validation, a counter and, at most
    every ``LOG_REPEAT`` seconds, a log line carrying the count since the last.
    """

    def __init__(self, emit: Emit, stream: str) -> None:
        self._emit = emit
        self._stream = stream
        self._good: set[str] = set()
        self._suppressed = 0
        self._logged_at = -LOG_REPEAT
        self.rejected = 0

    def ok(self, subject: str, stream_seq: int) -> bool:
        if subject in self._good:
            return True
        problem = subject_error(subject, wildcards=False)
        if problem is None:
            if len(self._good) >= GOOD_SUBJECTS_MAX:
                self._good.clear()
            self._good.add(subject)
            return True
        self.rejected += 1
        self._emit("ingest_rejected", reason="bad_subject", n=1)
        now = monotonic()
        if now - self._logged_at >= LOG_REPEAT:
            log.warning("message with an invalid subject dropped (acked, not delivered)", extra={"fields": {
                "subject": subject, "stream_seq": stream_seq, "problem": problem, "stream": self._stream,
                "suppressed": self._suppressed}})
            self._logged_at = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        return False


class PullConsumer:
    """Outstanding pull requests on one durable and the callback that dispatches what they bring.

    State the broker reads and resets: :attr:`last` (stream sequence of the
    last message dispatched or skipped), :attr:`last_cseq` (its consumer
    sequence), :attr:`pending` (messages the outstanding requests may still
    bring), :attr:`activity` (monotonic time anything last arrived) and
    :attr:`resync` (set when the consumer must be set up again).
    """

    def __init__(self, stream: str, next_subject: str, batch: int, *, rate: float, emit: Emit,
                 set_error: Callable[[str, str], None], read_range: ReadRange) -> None:
        self.stream = stream
        self.next_subject = next_subject
        self.batch = batch
        self._emit = emit
        self._set_error = set_error
        self._read_range = read_range
        self.guard = SubjectGuard(emit, stream)
        self.last = 0
        self.last_cseq = 0
        self.pending = 0
        self.activity = 0.0
        self.resync = asyncio.Event()
        self._nc: NATS | None = None
        self._sink: Sink | None = None
        self._sub: Subscription | None = None
        self._inbox = ""
        self._fetched = 0
        self._acked = 0
        self._dupes = 0
        self._dispatch: Callable[[Message], int] = lambda m: -1
        self._ack: Callable[..., Any] = self._no_ack
        # WS_MAX_NATS_RATE (0 = unlimited: no bucket at all on the hot path).
        self._bucket = TokenBucket(rate, max(1.0, rate / 10)) if rate > 0 else None
        self._paused_until = 0.0   # monotonic; see pause_for

    # ------------------------------------------------------------ lifecycle
    async def subscribe(self, nc: NATS, sink: Sink) -> None:
        """Take deliveries on a new inbox of ``nc`` and request the first batches."""
        await self.unsubscribe()
        self._nc = nc
        self._sink = sink
        self._dispatch = sink.dispatch
        self._ack = nc.publish
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self.on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        self.pending = 0
        self.activity = time.monotonic()
        self.resync.clear()
        await self.top_up()

    async def unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def requests_lost(self) -> None:
        """The outstanding requests died (a reconnect, silence): request again."""
        self.pending = 0
        self.activity = monotonic()
        await self.top_up()

    # ------------------------------------------------------------- hot path
    async def top_up(self) -> None:
        """Keep about two batches requested ahead."""
        want = 2 * self.batch - self.pending
        if want < self.batch:
            return
        nc = self._nc
        if nc is None or self._sub is None:
            return
        req = json.dumps({"batch": want, "expires": int(PULL_EXPIRES * 1e9),
                          "idle_heartbeat": int(PULL_HEARTBEAT * 1e9)}).encode()
        self.pending += want
        await nc.publish(self.next_subject, req, reply=self._inbox)

    def pause_for(self, seconds: float) -> None:
        """Dispatch nothing more for ``seconds`` (the resource guard: the event loop lags).

        Messages wait in this subscription's queue (at most the ~two batches
        requested ahead) and in JetStream; nothing is dropped. While they wait
        the queue is not empty, so the broker's watchdog leaves the requests be.
        """
        self._paused_until = max(self._paused_until, monotonic() + seconds)

    async def _wait_paused(self) -> None:
        while (left := self._paused_until - monotonic()) > 0:
            await asyncio.sleep(left)
        self._paused_until = 0.0

    async def on_msg(self, msg: Msg) -> None:
        # One call per message, no loop turn unless a gap, the rate limit, a
        # guard pause or a full output buffer makes it wait.
        if self._paused_until:
            await self._wait_paused()
        reply = msg.reply
        if not reply.startswith("$JS.ACK."):
            self.activity = monotonic()
            await self._on_status(msg)
            return
        fields = parse_ack(reply)
        if fields is None:
            return
        delivered, seq, cseq = fields[0], fields[1], fields[2]
        if self.pending > 0:
            self.pending -= 1
        self._fetched += 1
        last = self.last
        if seq <= last:
            # A redelivery of something already dispatched (its ack was lost,
            # or it came through a gap fill): ack it again, send nothing.
            self._dupes += 1
        else:
            if seq != last + 1 and not (delivered == 1 and cseq == self.last_cseq + 1):
                if not await self._fill_gap_retrying(seq):
                    # Neither dispatch nor ack this one: it comes again (the
                    # next delivery finds the same gap, or the redelivery).
                    self.resync.set()
                    return
            subject = msg.subject
            if self.guard.ok(subject, seq):
                if self._bucket is not None:
                    await self._take_token()
                try:
                    if self._dispatch(Message(subject, msg.data, seq, time_ns() // 1_000_000,
                                              header_priority(msg.headers))) < 0:
                        self._dupes += 1
                except Exception:
                    log.exception("dispatch failed", extra={"fields": {"stream_seq": seq, "subject": subject}})
                    self._emit("error", error="dispatch failed", kind="dispatch")
            self.last = seq
        if cseq > self.last_cseq:
            self.last_cseq = cseq
        try:
            await self._ack(reply)  # explicit ack: an empty message to the ack subject
            self._acked += 1
        except Exception as exc:  # disconnected with a full buffer: it is redelivered and dropped then
            log.debug("ack failed: %s", exc)
        if self.pending <= self.batch:
            await self.top_up()
        if self._fetched >= 4096 or self.queue_empty():
            self.activity = monotonic()
            self.flush_counts()

    @staticmethod
    async def _no_ack(subject: str) -> None:
        raise ConnectionError("not connected")

    def queue_empty(self) -> bool:
        sub = self._sub
        return sub is None or sub.pending_msgs == 0

    def flush_counts(self) -> None:
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
        code, desc = status_of(msg)
        if code == "100":
            return  # idle heartbeat (or flow control, unused on pull)
        left = (msg.headers or {}).get("Nats-Pending-Messages")
        if code in ("404", "408", "409"):
            if left is not None and left.isdigit():
                self.pending = max(0, self.pending - int(left))
            elif code != "409":
                self.pending = 0
            if code == "409":
                log.warning("JetStream pull ended: %s", desc)
                if "Deleted" in desc:
                    self.resync.set()
                    return
                if "Leadership" in desc or "Shutdown" in desc:
                    self.pending = 0
                else:
                    # A limit (max waiting, batch size): don't hammer the server.
                    await asyncio.sleep(0.5)
            await self.top_up()
            return
        # 503 no responders: the consumer (or the stream's leader) is gone.
        self._set_error("consumer", f"JetStream pull refused: {code} {desc}".strip())
        self.resync.set()

    async def _take_token(self) -> None:
        bucket = self._bucket
        assert bucket is not None
        while not bucket.take():
            wait = bucket.wait_time()
            self._emit("rate_wait", seconds=wait)
            await asyncio.sleep(wait)

    async def _fill_gap_retrying(self, seq: int) -> bool:
        """:meth:`_fill_gap`, tried again with backoff for up to ``GAP_RETRY_FOR`` seconds.

        A gap comes from a failover, and then the stream may still be electing
        a leader: its reads time out for a few seconds. Giving up at once would
        drop the deliveries queued behind this one, and JetStream would send
        them again only after the consumer's ack wait (30 s). Waiting here holds
        them in order in this subscription's queue instead. False: still failing.
        """
        deadline = monotonic() + GAP_RETRY_FOR
        delay = GAP_RETRY_MIN
        tries = 0
        sub = self._sub
        while True:
            tries += 1
            try:
                await self._fill_gap(seq)
            except Exception as exc:
                self._set_error("gap", f"JetStream gap fill failed: {type(exc).__name__}: {exc}")
                if monotonic() + delay > deadline or self._sub is not sub or sub is None:
                    return False
                await asyncio.sleep(delay)     # backoff between tries
                delay = min(2 * delay, GAP_RETRY_MAX)
                continue
            if tries > 1:
                log.info("JetStream gap fill succeeded on a retry", extra={"fields": {"tries": tries, "upto": seq - 1}})
            return True

    async def _fill_gap(self, seq: int) -> None:
        """Dispatch what the stream holds between the last dispatched message and ``seq``."""
        after = self.last
        got = await self._read_range(None, after, seq - 1)
        sink = self._sink
        assert sink is not None
        n = 0
        for m in got:
            if m.stream_seq <= self.last:
                continue
            if self._bucket is not None:
                await self._take_token()
            sink.dispatch(m)
            self.last = m.stream_seq
            n += 1
        if n:
            log.info("JetStream gap filled from the stream",
                     extra={"fields": {"after": after, "upto": seq - 1, "messages": n}})
            self._emit("gap_filled", n=n)
