"""The hub: the one caller of the compiled core.

It maps core slots to sessions, collects the messages brokers dispatch
during a loop turn and hands them to the core in one ``publish_batch`` (the
core does all per-client work), then has the core write every client's
queued bytes, one ``sendmsg()`` per client per turn. It also runs the
control-path operations that change the core: (un)subscribe, replay, resume.

Backpressure: a client's socket that is full is watched for writability and
flushed from there; meanwhile its queue grows up to ``WS_CLIENT_QUEUE_BYTES``.
A client over that limit for ``WS_SLOW_CLIENT_STRIKES`` consecutive messages is
handed to :meth:`Hub._on_slow` (today: closed with 1008; graded throttling
plugs in there).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from fanout_core import Core

from .brokers.base import Broker, History, Message
from .codes import CloseCode, ErrorCode
from .config import Config
from .log import event
from .memstream import Entry, MemoryStream
from .metrics import Metrics
from .protocol import error_reply, message_tail, reply
from .subjects import matches_any, subject_error

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Hub"]

PING_FRAME = b"\x89\x00"


class Hub:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.core = Core(
            cfg.ws_max_connections,
            replay_size=cfg.ws_replay_buffer,
            queue_limit=cfg.ws_client_queue_bytes,
            slow_strikes=cfg.ws_slow_client_strikes,
            throttle_percents=cfg.throttle_percents,  # type: ignore[arg-type]  # validated: 4 values
        )
        metrics.attach_core(self.core.stats)
        self.sessions: list[Session | None] = [None] * cfg.ws_max_connections
        self.recent = MemoryStream(cfg.ws_history_size, cfg.js_stream_max_age)
        self.broker: Broker | None = None
        # Embedded mode: the epoch changes when the node restarts.
        self.epoch = "e-" + secrets.token_hex(6)
        self._last_stream_seq = 0
        self._pending_subjects: list[str] = []
        self._pending_tails: list[bytes] = []
        self._pending_priorities: list[int] = []
        self._slow_seen = 0
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: set[Session] = set()   # closing sessions waiting for their queue to drain
        self.subscription_count = 0

    # -------------------------------------------------------------- lifecycle
    def bind(self, loop: asyncio.AbstractEventLoop, broker: Broker) -> None:
        self._loop = loop
        self.broker = broker

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def full(self) -> bool:
        return self.core.clients_active >= self.cfg.ws_max_connections

    def attach(self, session: Session, wbits: int) -> int:
        slot: int = self.core.add_client(session.fd, wbits)
        self.sessions[slot] = session
        self.metrics.connections.inc()
        self.metrics.ws_connections.inc()
        return slot

    def detach(self, session: Session) -> None:
        slot = session.slot
        if slot is None or self.sessions[slot] is not session:
            return
        self.publish_pending()
        if self.core.blocked(slot):
            self.loop.remove_writer(session.fd)
        self.subscription_count -= len(self.core.subscriptions(slot))
        self.metrics.subscriptions.set(self.subscription_count)
        self.core.remove_client(slot)
        self.sessions[slot] = None
        self._draining.discard(session)
        self.metrics.connections.dec()
        self.metrics.ws_connections.dec()

    # ------------------------------------------------------------- Sink API
    @property
    def last_stream_seq(self) -> int:
        return self._last_stream_seq

    def set_epoch(self, epoch: str) -> None:
        if epoch == self.epoch:
            return
        old = self.epoch
        self.epoch = epoch
        if old.startswith("e-") and self._last_stream_seq == 0:
            return  # first real epoch from the stream: nothing to forget
        # A new stream incarnation numbers from 1 again: forget the old floor
        # and history, or every new message would look like a duplicate.
        event(logging.WARNING, "stream epoch changed", old=old, new=epoch)
        self._last_stream_seq = 0
        self.recent.reset()

    def dispatch(self, msg: Message) -> int:
        """Accept one message for fan-out (in stream order); 1, or -1 for a duplicate.

        Messages accepted during one loop turn are matched and queued together
        at the flush (:meth:`publish_pending`), client-major in the core, then
        written; anything that reads or changes a client's message stream first
        publishes what is pending, so order is as if each went out at once.
        """
        if msg.stream_seq <= self._last_stream_seq:
            self.metrics.duplicates.inc()
            return -1
        self._last_stream_seq = msg.stream_seq
        tail = message_tail(msg.subject, msg.stream_seq, msg.ts_ms, msg.payload)
        self._pending_subjects.append(msg.subject)
        self._pending_tails.append(tail)
        self._pending_priorities.append(msg.priority)
        self.recent.append(Entry(msg.stream_seq, msg.subject, tail, msg.priority, time.monotonic()))
        self.schedule_flush()
        return 1

    def publish_pending(self) -> None:
        if not self._pending_subjects:
            return
        subjects, tails, prios = self._pending_subjects, self._pending_tails, self._pending_priorities
        self._pending_subjects, self._pending_tails, self._pending_priorities = [], [], []
        t0 = time.perf_counter()
        self.core.publish_batch(subjects, tails, prios)
        self.metrics.dispatch_seconds.observe((time.perf_counter() - t0) / len(subjects))
        if self.core.slow_marked != self._slow_seen:
            self._slow_seen = self.core.slow_marked
            for slot in self.core.take_slow():
                self._on_slow(slot)

    def _on_slow(self, slot: int) -> None:
        """A client stayed over its queue limit. Graded throttling (core.set_level
        + a throttle_update message) will plug in here; today it is closed."""
        session = self.sessions[slot]
        if session is None:
            return
        dropped = self.core.truncate(slot)
        event(logging.WARNING, "slow client closed", client=session.id, peer=session.peer,
              dropped_bytes=dropped, limit=self.cfg.ws_client_queue_bytes)
        session.close(CloseCode.POLICY_VIOLATION, "client too slow")

    # ------------------------------------------------------------------ flush
    def schedule_flush(self) -> None:
        if self._flush_handle is None:
            if self.cfg.ws_flush_interval > 0:
                self._flush_handle = self.loop.call_later(self.cfg.ws_flush_interval, self.flush)
            else:
                self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        self.publish_pending()
        t0 = time.perf_counter()
        blocked, dead = self.core.flush()
        if blocked:
            for slot in blocked:
                s = self.sessions[slot]
                if s is not None:
                    self.loop.add_writer(s.fd, self._on_writable, slot)
        if dead:
            for slot in dead:
                s = self.sessions[slot]
                if s is not None:
                    s.abort("send failed")
        if self._draining:
            for s in list(self._draining):
                if s.slot is not None and self.core.queued(s.slot) == 0:
                    s.finish_close()
        self.metrics.flush_seconds.observe(time.perf_counter() - t0)

    def _on_writable(self, slot: int) -> None:
        s = self.sessions[slot]
        if s is None:
            return
        r = self.core.flush_slot(slot)
        if r == 0:
            self.loop.remove_writer(s.fd)
            if s in self._draining:
                s.finish_close()
        elif r < 0:
            self.loop.remove_writer(s.fd)
            s.abort("send failed")

    def drain_then_close(self, session: Session) -> None:
        """Close the socket once everything queued for it was written."""
        self._draining.add(session)
        self.schedule_flush()

    # ------------------------------------------------------------- sending
    def send(self, session: Session, payload: bytes) -> None:
        if session.slot is not None:
            self.publish_pending()  # replies follow the data accepted before them
            self.core.send_text(session.slot, payload)
            self.schedule_flush()

    def send_error(self, session: Session, code: ErrorCode, message: str, req_id: Any = None, **fields: Any) -> None:
        self.metrics.client_errors.labels(str(code)).inc()
        event(logging.INFO, "client error", client=session.id, peer=session.peer, code=str(code), error=message, **fields)
        self.send(session, error_reply(code, message, req_id, **fields))

    def ping_all(self) -> None:
        self.core.broadcast_raw(PING_FRAME)
        self.schedule_flush()

    # -------------------------------------------------------- subscriptions
    def _admit(self, session: Session, channels: list[str], req_id: Any) -> list[str]:
        """Validate patterns and check permission and limits; errors go out per refused pattern."""
        ok = []
        for ch in channels:
            problem = subject_error(ch, wildcards=True)
            if problem:
                self.send_error(session, ErrorCode.INVALID_CHANNEL, problem, req_id, channel=ch)
            elif session.claims is not None and not session.claims.allows(ch):
                self.send_error(session, ErrorCode.FORBIDDEN, "token does not allow this channel", req_id, channel=ch)
            else:
                ok.append(ch)
        return ok

    def subscribe(self, session: Session, channels: list[str], req_id: Any) -> list[str]:
        assert session.slot is not None
        self.publish_pending()
        accepted = []
        limit = self.cfg.ws_max_subscriptions
        for ch in self._admit(session, channels, req_id):
            have = self.core.subscriptions(session.slot)
            if ch not in have and len(have) >= limit:
                self.send_error(session, ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                                f"at most {limit} subscriptions per connection", req_id, channel=ch)
                continue
            if self.core.subscribe(session.slot, ch):
                self.subscription_count += 1
            accepted.append(ch)
        self.metrics.subscriptions.set(self.subscription_count)
        return accepted

    def unsubscribe(self, session: Session, channels: list[str], req_id: Any) -> list[str]:
        assert session.slot is not None
        self.publish_pending()
        done = []
        for ch in channels:
            problem = subject_error(ch, wildcards=True)
            if problem:
                self.send_error(session, ErrorCode.INVALID_CHANNEL, problem, req_id, channel=ch)
                continue
            if self.core.unsubscribe(session.slot, ch):
                self.subscription_count -= 1
            done.append(ch)
        self.metrics.subscriptions.set(self.subscription_count)
        return done

    def replay(self, session: Session, from_seq: int, to_seq: int, req_id: Any) -> None:
        assert session.slot is not None
        self.publish_pending()
        sent, missing = self.core.replay(session.slot, from_seq, to_seq)
        self.metrics.replays.labels("partial" if missing else "full").inc()
        self.send(session, reply("replay_done", req_id, from_seq=from_seq, to_seq=to_seq,
                                 missing=list(missing) if missing else None))

    async def resume(self, session: Session, channels: list[str], after: int, epoch: str | None, req_id: Any) -> None:
        """Deliver retained messages after ``after`` on ``channels``, then subscribe.

        The last step (catch-up from memory, subscribe, ``resumed``) runs
        without yielding to the loop, so no live message can fall between
        history and subscription, and none is sent twice.
        """
        assert session.slot is not None
        patterns = self._admit(session, channels, req_id)
        complete = True
        history: list[Entry] = []
        same_stream = epoch is None or epoch == self.epoch
        if not same_stream:
            complete = False  # seqs of another stream incarnation mean nothing here
        elif not self.recent.covers(after):
            # Not all in memory: ask the broker for what came before, up to
            # what this node has dispatched, then catch up from memory.
            upto = self._last_stream_seq
            hist: History
            if self.broker is not None:
                hist = await self.broker.history(patterns, after, upto)
            else:
                hist = History([], False)
            if session.slot is None:
                return  # it went away while we waited
            complete = hist.complete
            history = [Entry(m.stream_seq, m.subject, message_tail(m.subject, m.stream_seq, m.ts_ms, m.payload),
                             m.priority, 0.0) for m in hist.messages]
            after = max(after, upto)
            if not self.recent.covers(after):
                complete = False  # traffic outran memory while we waited
        self.publish_pending()  # what memory holds must not reach this client twice
        if same_stream:
            history.extend(self.recent.since(after, patterns))
        slot = session.slot
        have = self.core.subscriptions(slot)
        limit = self.cfg.ws_max_subscriptions
        accepted: list[str] = []
        for ch in patterns:
            if ch not in have and len(have) + len(accepted) >= limit:
                self.send_error(session, ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                                f"at most {limit} subscriptions per connection", req_id, channel=ch)
            else:
                accepted.append(ch)
        already = list(have)
        for e in history:
            # Skip what a live subscription of this connection already sent.
            if matches_any(accepted, e.subject) and not (already and matches_any(already, e.subject)):
                self.core.deliver(slot, e.tail, e.priority)
        for ch in accepted:
            if self.core.subscribe(slot, ch):
                self.subscription_count += 1
        self.metrics.subscriptions.set(self.subscription_count)
        self.metrics.resumes.labels(str(complete).lower()).inc()
        self.send(session, reply("resumed", req_id, channels=accepted, epoch=self.epoch, complete=complete,
                                 stream_seq=self._last_stream_seq))

    # --------------------------------------------------------------- sweeps
    def sweep_idle(self, now: float) -> int:
        """Close clients silent for longer than WS_IDLE_TIMEOUT; returns how many."""
        limit = now - self.cfg.ws_idle_timeout
        n = 0
        for s in self.sessions:
            if s is not None and s.last_seen < limit and not s.closing:
                s.close(CloseCode.GOING_AWAY, "idle timeout")
                n += 1
        return n

    def live_sessions(self) -> list[Session]:
        return [s for s in self.sessions if s is not None]
