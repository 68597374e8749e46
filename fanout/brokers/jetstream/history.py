"""Range reads from the stream: ``resume`` history and the consumer's gap fills.

Each read is a short-lived ephemeral consumer (no acks, memory storage, one
replica) starting at ``after + 1``, drained with ``no_wait`` pull requests
of up to ``HISTORY_CHUNK`` messages, then deleted (or left to its
``inactive_threshold``). At most ``HISTORY_CONCURRENCY`` run at once, each
bounded by ``HISTORY_TIMEOUT``.

Filters: the client's patterns, restricted to those that can match the
stream's subjects and without ones another covers, go to the server as
``filter_subjects`` when NATS can take them (no two overlap); otherwise, or
when NATS refuses them, everything in the range is read and filtered here.
Messages whose subject is not a valid channel are left out (the same
:class:`SubjectGuard` as the live path counts them).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import APIError

from ...subjects import covers, matches_any, valid_pattern
from ..base import History, Message, header_priority
from .consumer import SubjectGuard, parse_ack, status_of

__all__ = ["HistoryReader", "collide", "HISTORY_TIMEOUT"]

HISTORY_CHUNK = 5000       # messages per history pull request
HISTORY_CONCURRENCY = 8    # history reads at once (each is an ephemeral consumer)
HISTORY_TIMEOUT = 10.0     # seconds one history read may take


def collide(a: str, b: str) -> bool:
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


class HistoryReader:
    """Reads stored messages of one stream; the broker binds it to each new connection.

    ``subjects`` returns the stream's subjects as NATS has them (they decide
    which patterns can match at all).
    """

    def __init__(self, stream: str, prefix: str, subjects: Callable[[], list[str]], guard: SubjectGuard,
                 set_error: Callable[[str, str], None]) -> None:
        self.stream = stream
        self.prefix = prefix
        self._subjects = subjects
        self._guard = guard
        self._set_error = set_error
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._sem = asyncio.Semaphore(HISTORY_CONCURRENCY)

    def bind(self, nc: NATS | None, js: JetStreamContext | None) -> None:
        self._nc, self._js = nc, js

    def filters(self, patterns: list[str]) -> tuple[list[str], bool]:
        """Server-side filter subjects for ``patterns`` and whether NATS can take them as they are."""
        subjects = self._subjects()
        pats = sorted({p for p in patterns if valid_pattern(p)})
        pats = [p for p in pats if any(collide(p, s) for s in subjects)]
        pats = [p for p in pats if not any(q != p and covers(q, p) for q in pats)]
        for i, a in enumerate(pats):
            for b in pats[i + 1:]:
                if collide(a, b):
                    return pats, False
        return pats, True

    async def history(self, patterns: list[str], after: int, upto: int) -> History:
        """Stored messages with ``after < stream_seq <= upto`` on subjects matching ``patterns``.

        ``complete`` is False when the stream's first sequence is above
        ``after + 1`` (retention dropped messages the caller has not seen;
        with ``after == 0`` that means anything was ever dropped), and when
        the stream cannot be read now (NATS unreachable, a leader election
        outlasting ``HISTORY_TIMEOUT``, a user that may not create consumers):
        then ``messages`` is empty and the client reloads its state, as for
        expired retention. ``ts_ms`` of these messages is the time JetStream
        stored them.
        """
        try:
            js = self._js
            if js is None or self._nc is None or not self._nc.is_connected:
                raise ConnectionError("NATS not connected")
            pats, _ = self.filters(patterns)
            messages: list[Message] = []
            if pats and upto > after:
                messages = await self.read_range(pats, after, upto)
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

    async def read_range(self, patterns: list[str] | None, after: int, upto: int) -> list[Message]:
        """Messages ``after < seq <= upto`` (matching ``patterns``; None = all) through an ephemeral consumer."""
        if upto <= after:
            return []
        async with self._sem:
            return await asyncio.wait_for(self._read_range_now(patterns, after, upto), HISTORY_TIMEOUT)

    async def _read_range_now(self, patterns: list[str] | None, after: int, upto: int) -> list[Message]:
        filters: list[str] = []
        server_side = True
        if patterns is not None:
            filters, server_side = self.filters(patterns)
            if not filters:
                return []
        out: list[Message] = []
        ccfg = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
        await self._drain(ccfg, filters if server_side else [], upto,
                          None if patterns is None or server_side else filters, out, span=upto - after)
        return out

    async def last_per_subject(self, upto: int, limit: int, timeout: float) -> tuple[list[Message], bool]:
        """The newest stored message of each subject, if it is at or below ``upto``, oldest first.

        JetStream's own ``DeliverPolicy.LAST_PER_SUBJECT`` delivery over the
        stream's subjects (the server picks the messages and sends them in
        stream order), read until nothing is pending or ``upto`` is reached.
        Only the newest ``limit`` are kept (memory stays bounded whatever the
        stream holds); the read stops after ``timeout`` seconds and returns
        what it has. Returns (messages, complete): complete is False when the
        time ran out. A subject whose newest message is above ``upto`` is
        left out (the caller's consumer delivers that one).
        """
        out: deque[Message] = deque(maxlen=max(1, limit))
        if upto <= 0 or limit <= 0:
            return [], True
        ccfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
        complete = True
        async with self._sem:
            try:
                await asyncio.wait_for(self._drain(ccfg, list(self._subjects()), upto, None, out, span=upto),
                                       timeout)
            except TimeoutError:
                complete = False
        return list(out), complete

    async def _drain(self, ccfg: api.ConsumerConfig, filters: list[str], upto: int, local: list[str] | None,
                     out: list[Message] | deque[Message], *, span: int) -> None:
        """Read an ephemeral consumer (``ccfg`` plus the common settings) into ``out`` up to ``upto``.

        ``filters`` go to the server (retried without them if NATS refuses
        them, then ``local`` is applied here instead, or ``filters`` when
        ``local`` is None); ``local`` are patterns applied here in any case.
        ``span`` caps one pull request (no more can be wanted).
        """
        nc, js = self._nc, self._js
        if nc is None or js is None:
            raise ConnectionError("NATS not connected")
        done = asyncio.Event()
        state = {"want": 0}
        guard = self._guard
        keep: list[str] | None = local

        async def on_msg(msg: Msg) -> None:
            if not msg.reply.startswith("$JS.ACK."):
                code, _ = status_of(msg)
                if code != "100":
                    state["want"] = -1
                    done.set()
                return
            fields = parse_ack(msg.reply)
            if fields is None:
                return
            _, seq, _, ts, left = fields
            state["want"] -= 1
            if seq <= upto and guard.ok(msg.subject, seq):
                if keep is None or matches_any(keep, msg.subject):
                    out.append(Message(msg.subject, msg.data, seq, ts // 1_000_000, header_priority(msg.headers)))
            if seq >= upto or left == 0:
                state["want"] = -1
                done.set()
            elif state["want"] == 0:
                done.set()

        name = f"fanout-read-{uuid.uuid4().hex[:16]}"
        ccfg.name = name
        ccfg.ack_policy = api.AckPolicy.NONE
        ccfg.inactive_threshold = HISTORY_TIMEOUT
        ccfg.mem_storage = True
        ccfg.num_replicas = 1
        ccfg.max_deliver = 1
        if len(filters) == 1:
            ccfg.filter_subject = filters[0]
        elif filters:
            ccfg.filter_subjects = filters
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        created = False
        try:
            try:
                ci = await js.add_consumer(self.stream, ccfg)
            except APIError:
                if not filters:
                    raise
                # NATS refused the filters (e.g. not within the stream's
                # subjects): read everything and filter here.
                ccfg.filter_subject = None
                ccfg.filter_subjects = None
                if keep is None:
                    keep = filters
                ci = await js.add_consumer(self.stream, ccfg)
            created = True
            left = ci.num_pending or 0
            subject = f"{self.prefix}.CONSUMER.MSG.NEXT.{self.stream}.{name}"
            while left > 0 and state["want"] >= 0:
                n = min(left, HISTORY_CHUNK, max(1, span))
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
