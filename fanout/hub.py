"""The hub: the one caller of the compiled core, a router keyed by core slot.

It collects the messages brokers dispatch during a loop turn and hands them to
the core in one ``publish_batch`` (the core does all per-client work), then has
the core write every client's queued bytes, one ``sendmsg()`` per client per
flush (on ``WS_FLUSH_THREADS`` threads; a flush waits up to
``WS_FLUSH_LATENCY_MS`` while clients get frames faster than that, see
:meth:`Hub.schedule_flush`). It runs the control-path operations that change a client's stream in
the core: (un)subscribe, replay, resume, and control replies.

What the hub knows of a connection is the small :class:`Peer` protocol: its fd
and four callbacks. The core reports slots whose socket is full, failed, or
stayed over its queue limit; the hub passes each on to the slot's peer, plus
"drained" for a peer that asked (:meth:`Hub.watch_drain`). The peer (a
:class:`~fanout.session.Session`) owns its socket, its fd registrations and its
close; the hub never touches either.

Backpressure: a client's queue may grow up to ``WS_CLIENT_QUEUE_BYTES``; over
it, the core judges it over windows of time (``WS_THROTTLE_RAISE_SECONDS``):
up one throttle level while its queue does not shrink, and a client still
falling behind at the heaviest level for ``WS_SLOW_CLIENT_GRACE`` (or whose
queue passes the hard cap, ``WS_CLIENT_QUEUE_HARD_FACTOR`` limits) is
reported with :meth:`Peer.on_slow`. Control replies count like data: a
client that does not read them is judged by the same rule (the periodic
:meth:`Hub.throttle_tick` judges queues that get no more messages).

Catch-up (``resume`` and ``replay``) is paced by the client's socket: history
goes into the queue only while it holds less than half the queue limit, the
next chunk once the socket took the last, so a catch-up of any size is
delivered whole and never counts as slowness. A resume subscribes at the very
end, in the same loop step as its last history message, so live messages
follow with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from sys import intern
from typing import Protocol

from fanout_core import Core

from .brokers.base import DEFAULT_PRIORITY, Broker, History, Message
from .config import Config
from .log import event
from .memstream import Entry, LatestStore, MemoryStream, View
from .metrics import Metrics
from .protocol import message_tail, reply
from .subjects import matches, matches_any, overlaps

__all__ = ["Hub", "Peer", "Resumed"]

#: throttle_update texts when load shedding starts (True) and ends (False).
LOAD_MESSAGES = {
    True: "The server is under heavy load: low-priority updates are paused.",
    False: "Server load is back to normal: all updates resumed.",
}

PING_FRAME = b"\x89\x00"

#: Seconds over which the frame rate per client is measured for the
#: WS_FLUSH_LATENCY_MS decision (long against any budget, short against a
#: change in traffic).
FLUSH_WINDOW = 0.5

#: throttle_update texts per level (the deployment plan's).
THROTTLE_MESSAGES = (
    "Connection quality restored. Receiving all updates.",
    "Your connection is slightly slow. Receiving {pct}% of updates.",
    "Your connection is slow. Receiving {pct}% of updates. Consider refreshing.",
    "Your connection is very slow. Receiving {pct}% of updates. Please reconnect.",
)
# Seconds between heap trims after clients left (Hub.trim_tick): glibc keeps
# freed blocks otherwise, and RSS would stay at its peak after a crowd leaves.
TRIM_INTERVAL = 5.0
FETCH_ROUNDS = 8         # history fetches one resume may make before it gives up chasing the stream


class Peer(Protocol):
    """What the hub needs from a connection it routes to."""

    @property
    def fd(self) -> int: ...

    def on_blocked(self) -> None:
        """The socket is full: watch it for writability, then call :meth:`Hub.flush_one`."""

    def on_dead(self, why: str) -> None:
        """A write failed: the connection is gone."""

    def on_slow(self) -> None:
        """The client is still behind at the heaviest throttle level after the grace
        time (or past the hard queue cap); it gets no more data frames."""

    def on_drained(self) -> None:
        """Everything queued was written (only after :meth:`Hub.watch_drain`)."""


@dataclass(slots=True)
class Resumed:
    """The outcome of :meth:`Hub.resume`."""

    accepted: list[str]          # patterns now subscribed
    over_limit: list[str]        # patterns refused by WS_MAX_SUBSCRIPTIONS
    complete: bool               # every retained message after ``after`` was delivered


@dataclass(slots=True, eq=False)
class _CatchUp:
    """One paced catch-up of one slot (control path: at most one per connection)."""

    slot: int
    on_done: Callable[[_CatchUp], None]
    finished: bool = False
    kind: str = "resume"             # "resume", "snapshot" or "replay"
    delivered: int = 0               # pending (broker or snapshot) entries delivered
    # resume
    patterns: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    cursor: int = 0                  # stream position delivered up to
    pending: deque[Entry] = field(default_factory=deque)   # from the broker, or the snapshot
    view: View | None = None         # the subjects of ``patterns`` in memory (resume, snapshot)
    batch: deque[Entry] = field(default_factory=deque)     # from memory, taken after ``cursor``
    pending_upto: int = 0            # the broker answered for everything up to here
    complete: bool = True
    fetching: bool = False
    fetches: int = 0
    # replay
    replay_next: int = 0
    replay_to: int = -1
    missing: tuple[int, int] | None = None
    delta: bool = False              # the subscription asked for deltas (PROTOCOL 1.2)


class Hub:
    def __init__(self, cfg: Config, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        # The core's throttle windows run on CLOCK_MONOTONIC (time.monotonic); any other
        # clock (a test's fake one) is handed to the core before each use.
        self._core_clock = clock is not time.monotonic
        self.core = Core(
            cfg.ws_max_connections,
            replay_size=cfg.ws_replay_buffer,
            queue_limit=cfg.ws_client_queue_bytes,
            slow_strikes=cfg.ws_slow_client_strikes,
            raise_seconds=cfg.ws_throttle_raise_seconds,
            grace_seconds=cfg.ws_slow_client_grace,
            hard_limit=cfg.ws_client_queue_bytes * cfg.ws_client_queue_hard_factor,
            throttle_percents=cfg.throttle_percents,
            throttle=cfg.ws_throttle_enabled,
            max_level=cfg.ws_throttle_max_level,
            conflate=cfg.conflate_patterns,
            flush_threads=cfg.flush_threads,
            delta=cfg.delta_patterns,
            delta_min_bytes=cfg.ws_delta_min_bytes,
            max_routes=cfg.ws_route_cache_max,
        )
        metrics.attach_core(self.core.stats)
        metrics.attach_delta(self.core.delta_stats)
        metrics.attach_client_lag(self.core.drops, self.core.lag_histogram)
        self._peers: list[Peer | None] = [None] * cfg.ws_max_connections
        self.recent = MemoryStream(cfg.ws_history_size, cfg.js_stream_max_age, clock, cfg.ws_history_subjects)
        self.broker: Broker | None = None
        # Embedded mode: the epoch changes when the node restarts.
        self.epoch = "e-" + secrets.token_hex(6)
        self._last_stream_seq = 0
        self._pending_subjects: list[str] = []
        self._pending_tails: list[bytes] = []
        self._pending_priorities: list[int] = []
        self._slow_seen = 0
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        # WS_FLUSH_LATENCY_MS coalescing (see schedule_flush).
        self._budget = cfg.ws_flush_latency_ms / 1000.0
        self._hold = False                      # clients get frames faster than one per budget
        self._last_flush = float("-inf")        # loop time the last flush started
        self._window_start: float | None = None
        self._window_deliveries = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: set[int] = set()               # slots to report when drained
        self._catchups: dict[int, _CatchUp] = {}
        self._high = max(1, cfg.ws_client_queue_bytes // 2)   # catch-up fills the queue up to here
        self.subscription_count = 0
        self._rules = cfg.priority_rules
        self._rule_cache: dict[str, int] = {}
        self._raises_seen = 0
        # Throttled slots: (level its client was last told, when it last fell behind or changed level).
        self._throttled: dict[int, tuple[int, float]] = {}
        self.latest = LatestStore(cfg.ws_snapshot_max_subjects)
        metrics.attach_history(self.history_stats)
        self._unwritten: list[float] = []         # arrival times of messages not yet through a flush
        self._publish_to_write = metrics.publish_to_write
        self._from_memory = metrics.catchup_messages.labels("memory")
        self._from_snapshot = metrics.catchup_messages.labels("snapshot")
        self._from_stream = metrics.catchup_messages.labels("stream")
        # WS_MAX_CONCURRENT_CATCHUPS: history fetches from the broker at once (the plan's task limits).
        self._fetch_slots = asyncio.Semaphore(cfg.ws_max_concurrent_catchups)
        self.history_fetches = 0
        self._left_since_trim = 0
        self._next_trim = 0.0

    # -------------------------------------------------------------- lifecycle
    def bind(self, loop: asyncio.AbstractEventLoop, broker: Broker | None) -> None:
        self._loop = loop
        self.broker = broker

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def open_count(self) -> int:
        return int(self.core.clients_active)

    @property
    def full(self) -> bool:
        return self.core.clients_active >= self.cfg.ws_max_connections

    def trim_tick(self, now: float) -> bool:
        """Periodic: after clients left, give freed heap pages back to the OS
        (Core.trim_memory), at most every TRIM_INTERVAL seconds. Returns
        whether it trimmed."""
        if not self._left_since_trim or now < self._next_trim:
            return False
        self._left_since_trim = 0
        self._next_trim = now + TRIM_INTERVAL
        self.core.trim_memory()
        return True

    def store_sizes(self) -> dict[str, int]:
        """Sizes of the hub's and the core's stores that grow with clients,
        subjects or history (the fanout_store_* gauges; see README "Memory")."""
        st = self.core.stats()
        return {
            "routes": st["routes"], "patterns": st["patterns"], "set_bytes": st["set_bytes"],
            "messages_held": st["messages_held"], "message_bytes": st["message_bytes"],
            "queued_bytes": st["queued_bytes"], "buffer_bytes": st["buffer_bytes"],
            "history_messages": len(self.recent), "history_bytes": self.recent.nbytes(),
            "snapshot_subjects": len(self.latest), "snapshot_bytes": self.latest.nbytes(),
            "priority_cache": len(self._rule_cache),
            "catchups": len(self._catchups), "throttled": len(self._throttled), "watched": len(self._watch),
        }

    def attach(self, peer: Peer, wbits: int) -> int:
        """Give a connection that finished its handshake a slot."""
        slot: int = self.core.add_client(peer.fd, wbits)
        self._peers[slot] = peer
        return slot

    def detach(self, slot: int) -> None:
        """Forget a slot: its subscriptions, queue and any running catch-up."""
        if self._peers[slot] is None:
            return
        self.publish_pending()
        self.subscription_count -= len(self.core.subscriptions(slot))
        self.metrics.subscriptions.set(self.subscription_count)
        self._leave_throttling(slot)
        self.core.remove_client(slot)
        self._left_since_trim += 1
        self._peers[slot] = None
        self._watch.discard(slot)
        cu = self._catchups.pop(slot, None)
        if cu is not None:
            cu.finished = True        # gone: nobody to tell

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
        self.latest.clear()

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
        entry = self._entry(msg, self.clock())
        self._pending_subjects.append(entry.subject)
        self._pending_tails.append(entry.tail)
        self._pending_priorities.append(entry.priority)
        self._unwritten.append(entry.at)
        self.recent.append(entry)
        self.latest.put(entry)
        self.schedule_flush()
        return 1

    def _entry(self, m: Message, at: float) -> Entry:
        """``m`` as the stores keep it: its body after the per-client prefix, its priority
        (the publisher's, or WS_PRIORITY_RULES'), and one string per subject however often
        it is published: the snapshot store, the resume memory's index and its trie, the
        route and priority caches keep the first copy as their key, and a message's own (a
        new object per message from every broker) would otherwise stay alive beside it in
        each entry that outlives the message."""
        subject = intern(m.subject)
        prio = m.priority if m.priority >= 0 else self._rule_priority(subject)
        return Entry(m.stream_seq, subject, message_tail(subject, m.stream_seq, m.ts_ms, m.payload), prio, at)

    def seed_latest(self, messages: list[Message]) -> int:
        """Seed :attr:`latest` (snapshots) with stored messages in stream order (a broker at start);
        not fanned out, the dispatch floor untouched; never over a newer entry of the subject."""
        now = self.clock()
        return sum(self.latest.put(self._entry(m, now)) for m in messages)

    def seed_history(self, messages: list[Message], after: int) -> int:
        """Messages ``after < stream_seq``, older than anything dispatched, into the resume
        memory (a JetStream broker at start: what the stream holds up to where this process
        starts consuming), so resumes from before the start need no stream read. Their
        age comes from the stream's timestamps. Returns how many were kept."""
        now, wall = self.clock(), time.time()
        entries = [self._entry(m, now - max(0.0, wall - m.ts_ms / 1000.0)) for m in messages]
        return self.recent.prepend(entries, after)

    def _rule_priority(self, subject: str) -> int:
        """WS_PRIORITY_RULES for a message its publisher gave no priority (cached per subject)."""
        p = self._rule_cache.get(subject)
        if p is None:
            p = DEFAULT_PRIORITY
            for pattern, prio in self._rules:
                if matches(pattern, subject):
                    p = prio
                    break
            if len(self._rule_cache) >= self.cfg.ws_route_cache_max:
                self._rule_cache.clear()
            self._rule_cache[subject] = p
        return p

    def publish_pending(self) -> None:
        if not self._pending_subjects:
            return
        subjects, tails, prios = self._pending_subjects, self._pending_tails, self._pending_priorities
        self._pending_subjects, self._pending_tails, self._pending_priorities = [], [], []
        if self._core_clock:
            self.core.set_clock(self.clock())
        t0 = time.perf_counter()
        self.core.publish_batch(subjects, tails, prios)
        self.metrics.dispatch_seconds.observe((time.perf_counter() - t0) / len(subjects))
        self._take_reports()

    def _take_reports(self) -> None:
        """Tell the peers what the core decided: level raises (a notice each), slow clients."""
        if self.core.level_raises != self._raises_seen:
            self._raises_seen = self.core.level_raises
            for slot in self.core.take_raised():       # one entry per one-step raise, in order
                old = self.throttle_level(slot)
                self._throttle_changed(slot, old, old + 1)
        if self.core.slow_marked != self._slow_seen:
            self._slow_seen = self.core.slow_marked
            for slot in self.core.take_slow():
                peer = self._peers[slot]
                if peer is not None:
                    peer.on_slow()

    # ------------------------------------------------------------- throttling
    def _throttle_changed(self, slot: int, old: int, new: int) -> None:
        """The slot's level moved one step, ``old`` -> ``new``: tell the client, in
        order with its data and whatever its queue holds, and count it."""
        if self._peers[slot] is None:
            return
        if new:
            self._throttled[slot] = (new, self.clock())
        else:
            self._throttled.pop(slot, None)
        self.metrics.throttle_transitions.labels(str(old), str(new)).inc()
        self._set_level_gauges()
        pct = self.cfg.throttle_percents[new]
        self._notify(slot, new, THROTTLE_MESSAGES[new].format(pct=pct))
        self.schedule_flush()
        event(logging.INFO if new < old else logging.WARNING, "client throttle level", slot=slot,
              from_level=old, to_level=new, rate_percent=pct)

    def _notify(self, slot: int, level: int, message: str, **extra: str) -> None:
        """Queue a ``throttle_update`` past the queue limit on purpose: the client
        must learn it, in order with its data (a 1008 close keeps it: the core's
        truncate drops data frames only)."""
        self.core.send_text(slot, reply("throttle_update", None, level=level,
                                        rate_percent=self.cfg.throttle_percents[level],
                                        dropped=int(self.core.take_dropped(slot)), message=message, **extra))

    def _leave_throttling(self, slot: int) -> None:
        """A closing or gone client is no longer throttled: no recovery, not in the gauges."""
        if self._throttled.pop(slot, None) is not None:
            self._set_level_gauges()

    def _set_level_gauges(self) -> None:
        counts = [0, 0, 0, 0]
        for level, _ in self._throttled.values():
            counts[level] += 1
        self.metrics.throttled_light.set(counts[1])
        self.metrics.throttled_medium.set(counts[2])
        self.metrics.throttled_heavy.set(counts[3])

    def throttle_tick(self, now: float) -> None:
        """Periodic: the core judges the queues over their limit as they are now
        (a reader whose stream went quiet is still raised or closed in time);
        a throttled client that kept up (queue under its limit) for
        WS_THROTTLE_RECOVERY_SECONDS goes down one level; one over it restarts the wait."""
        self.publish_pending()
        if self._core_clock:
            self.core.set_clock(now)
        self.core.throttle_tick()
        self._take_reports()
        limit = self.cfg.ws_client_queue_bytes
        recovery = self.cfg.ws_throttle_recovery_seconds
        for slot, (level, since) in list(self._throttled.items()):
            if self.core.queued(slot) > limit:
                self._throttled[slot] = (level, now)
            elif now - since >= recovery:
                self.publish_pending()        # what was throttled at the old level stays so
                self.core.set_level(slot, level - 1)
                self._throttle_changed(slot, level, level - 1)

    def set_load_shed(self, on: bool) -> None:
        """Load shedding (the resource guard, WS_CPU_THROTTLE_THRESHOLD): ``low``
        priority goes to nobody while on; every client is told with a
        ``throttle_update`` (its own level, ``reason: "load"``)."""
        if bool(self.core.shed_low) == on:
            return
        self.publish_pending()
        self.core.shed_low = on
        for slot, peer in enumerate(self._peers):
            if peer is not None:
                self._notify(slot, self.throttle_level(slot), LOAD_MESSAGES[on], reason="load")
        self.schedule_flush()
        event(logging.WARNING if on else logging.INFO, "load shedding " + ("on" if on else "off"),
              clients=self.open_count)

    def throttle_level(self, slot: int) -> int:
        """The level this slot's client was last told (0: not throttled)."""
        entry = self._throttled.get(slot)
        return entry[0] if entry is not None else 0

    # ------------------------------------------------------------------ flush
    def schedule_flush(self) -> None:
        """Flush on the next loop turn; or, while clients get frames faster
        than one per ``WS_FLUSH_LATENCY_MS`` (``_hold``), at the earliest one
        budget after the last flush began, so the frames that arrive
        meanwhile share one ``sendmsg()`` per client. A frame thus waits at
        most one budget more than it would have: the last flush started
        before it came. Light traffic (or a quiet spell of a budget) flushes
        at once, as with a budget of 0."""
        if self._flush_handle is None:
            if self._hold:
                at = self._last_flush + self._budget
                if at > self.loop.time():
                    self._flush_handle = self.loop.call_at(at, self.flush)
                    return
            self._flush_handle = self.loop.call_soon(self.flush)

    def _retune(self, now: float) -> None:
        """Every FLUSH_WINDOW seconds: hold flushes while the frames per
        receiving client per second reach 1 / budget, i.e. holding would put
        two or more frames in a typical sendmsg(). Deliveries over distinct
        clients sent to (core.take_reach) do not depend on how often flushes
        run, so the decision does not feed back on itself."""
        reached = int(self.core.take_reach())
        deliveries = int(self.core.deliveries)
        if self._window_start is not None and reached:
            rate = (deliveries - self._window_deliveries) / reached / (now - self._window_start)
            self._hold = rate * self._budget >= 1.0
        else:
            self._hold = False
        self._window_start = now
        self._window_deliveries = deliveries

    @property
    def coalescing(self) -> bool:
        """True while flushes are held up to the latency budget."""
        return self._hold

    def flush(self) -> None:
        """Publish what is pending, write every client's queue, report back."""
        self._flush_handle = None
        if self._budget > 0:
            now = self.loop.time() if self._loop is not None else 0.0
            self._last_flush = now
            if self._window_start is None or now - self._window_start >= FLUSH_WINDOW:
                self._retune(now)
        self.publish_pending()
        t0 = time.perf_counter()
        blocked, dead = self.core.flush()
        peers = self._peers
        if blocked:
            for slot in blocked:
                peer = peers[slot]
                if peer is not None:
                    peer.on_blocked()
        if dead:
            for slot in dead:
                peer = peers[slot]
                if peer is not None:
                    peer.on_dead("send failed")
        if self._catchups:
            for cu in list(self._catchups.values()):
                self._pump(cu)
        if self._watch:
            for slot in list(self._watch):
                self._check_drained(slot)
        self.metrics.flush_seconds.observe(time.perf_counter() - t0)
        if self._unwritten:
            done, self._unwritten = self._unwritten, []
            now = self.clock()
            step = max(1, len(done) // 64)     # a sample keeps this per pass, not per message
            for at in done[::step]:
                self._publish_to_write.observe(now - at)

    def flush_one(self, slot: int) -> int:
        """After the slot's socket turned writable: write its queue.
        0 drained, 1 blocked again, -1 dead (the caller closes)."""
        r: int = self.core.flush_slot(slot)
        if r >= 0:
            cu = self._catchups.get(slot)
            if cu is not None:
                self._pump(cu)
            if r == 0 and slot in self._watch:
                self._check_drained(slot)
        return r

    def _check_drained(self, slot: int) -> None:
        if self.core.queued(slot) == 0:
            self._watch.discard(slot)
            peer = self._peers[slot]
            if peer is not None:
                peer.on_drained()

    def watch_drain(self, slot: int) -> None:
        """Report :meth:`Peer.on_drained` once everything queued for the slot was written."""
        self._watch.add(slot)
        self.schedule_flush()

    # ------------------------------------------------------------- sending
    def send_raw(self, slot: int, data: bytes) -> None:
        """Queue bytes websockets produced (handshake response, pong, close), in order."""
        self.core.enqueue_raw(slot, data)
        self.schedule_flush()

    def reply(self, slot: int, payload: bytes) -> None:
        """Queue a control reply after the data accepted before it."""
        self.publish_pending()
        self.core.send_text(slot, payload)
        self.schedule_flush()
        # Over the queue limit a reply counts like data: the throttle windows (and
        # throttle_tick) judge it; only past the hard cap is it closed at once.
        if self.core.queued(slot) > self.core.hard_limit:
            peer = self._peers[slot]
            if peer is not None:
                peer.on_slow()

    def stop_data(self, slot: int) -> None:
        """No more data frames or replies for this slot (it is closing); it leaves throttling."""
        self.publish_pending()  # messages accepted before the close go out before it
        self.core.set_nodata(slot)
        self._leave_throttling(slot)

    def discard_queued(self, slot: int) -> int:
        """Drop the frames not yet begun (a slow client about to be closed); bytes dropped."""
        dropped: int = self.core.truncate(slot)
        return dropped

    def queued(self, slot: int) -> int:
        return int(self.core.queued(slot))

    def ping_all(self) -> None:
        self.core.broadcast_raw(PING_FRAME)
        self.schedule_flush()

    # -------------------------------------------------------- subscriptions
    def _split_limit(self, slot: int, patterns: list[str]) -> tuple[list[str], list[str]]:
        have = self.core.subscriptions(slot)
        room = self.cfg.ws_max_subscriptions - len(have)
        ok, over = [], []
        for ch in patterns:
            if ch in have:
                ok.append(ch)
            elif room > 0:
                ok.append(ch)
                room -= 1
            else:
                over.append(ch)
        return ok, over

    def delta_reply(self, patterns: list[str], asked: str | None) -> str | None:
        """The ``delta`` field of a subscribed/resumed reply: "fossil" when asked
        for and WS_DELTA_CHANNELS lets some subject of these patterns carry
        deltas, else None (the field is left out; the client gets full messages)."""
        if asked != "fossil":
            return None
        allowed = self.cfg.delta_patterns
        return "fossil" if any(overlaps(p, d) for p in patterns for d in allowed) else None

    def subscribe(self, slot: int, patterns: list[str], delta: bool = False) -> tuple[list[str], list[str]]:
        """Subscribe valid, permitted patterns; returns (accepted, over the subscription limit).
        ``delta``: the client takes Fossil deltas on them (where allowed)."""
        self.publish_pending()
        ok, over = self._split_limit(slot, patterns)
        for ch in ok:
            if self.core.subscribe(slot, ch, delta):
                self.subscription_count += 1
        self.metrics.subscriptions.set(self.subscription_count)
        return ok, over

    def unsubscribe(self, slot: int, patterns: list[str]) -> None:
        self.publish_pending()
        for ch in patterns:
            if self.core.unsubscribe(slot, ch):
                self.subscription_count -= 1
        self.metrics.subscriptions.set(self.subscription_count)

    def seq(self, slot: int) -> int:
        return int(self.core.seq(slot))

    # -------------------------------------------------------------- catch-up
    def _start(self, cu: _CatchUp) -> None:
        if cu.slot in self._catchups:
            raise RuntimeError("one catch-up at a time per connection")
        self._catchups[cu.slot] = cu
        self._pump(cu)

    def _finish(self, cu: _CatchUp) -> None:
        if self._catchups.get(cu.slot) is cu:
            del self._catchups[cu.slot]
        if not cu.finished:
            cu.finished = True
            cu.on_done(cu)

    def replay(self, slot: int, from_seq: int, to_seq: int,
               on_done: Callable[[tuple[int, int] | None], None]) -> None:
        """Queue the slot's buffered messages from_seq..to_seq again, paced by its
        socket; then ``on_done(missing)``: the (first, last) span of requested
        seqs no longer held, or None. Seqs above the last one sent are ignored."""
        self.publish_pending()

        def done(cu: _CatchUp) -> None:
            self.metrics.replays.labels("partial" if cu.missing else "full").inc()
            on_done(cu.missing)

        cu = _CatchUp(slot, done, kind="replay", replay_next=from_seq, replay_to=min(to_seq, self.seq(slot)))
        if cu.replay_to < from_seq:
            cu.replay_to = from_seq - 1   # nothing sent yet in that range: nothing to do
        self._start(cu)

    def resume(self, slot: int, patterns: list[str], after: int, epoch: str | None,
               on_done: Callable[[Resumed], None], delta: bool = False) -> None:
        """Deliver retained messages after ``after`` on ``patterns``, paced, then
        subscribe and call ``on_done`` in the same loop step (so its reply
        precedes every live message of the new subscriptions).

        History comes from memory (:attr:`recent`) and, for what memory no
        longer holds, from the broker. The last step (the last history
        message, subscribe, ``on_done``) runs without yielding to the loop, so
        no live message falls between history and subscription, and none is
        sent twice. ``on_done`` is not called if the slot is detached first.
        """
        ok, over = self._split_limit(slot, patterns)
        if not ok:
            after = self._stream_position()   # nothing to catch up on

        def done(cu: _CatchUp) -> None:
            self.metrics.resumes.labels(str(cu.complete).lower()).inc()
            on_done(Resumed(ok, over, cu.complete))

        cu = _CatchUp(slot, done, patterns=ok, already=list(self.core.subscriptions(slot)), cursor=after,
                      delta=delta)
        if epoch is not None and epoch != self.epoch:
            # seqs of another stream incarnation mean nothing here
            cu.complete = False
            cu.cursor = self._stream_position()
        self._start(cu)

    def snapshot(self, slot: int, patterns: list[str],
                 on_done: Callable[[list[str], list[str], int], None], delta: bool = False) -> None:
        """``subscribe`` with ``snapshot: true``: the newest retained message of
        every subject matching ``patterns`` (oldest update first, each a data
        message with its own seq), paced like any catch-up, then what was
        dispatched meanwhile on them, then the subscription; then
        ``on_done(accepted, over_limit, delivered)`` in that same step.
        Subjects a live subscription of this connection already covers get no
        snapshot (they are up to date)."""
        self.publish_pending()
        ok, over = self._split_limit(slot, patterns)

        def done(cu: _CatchUp) -> None:
            self.metrics.snapshots.labels("empty" if cu.delivered == 0 else "delivered").inc()
            on_done(ok, over, cu.delivered)

        cu = _CatchUp(slot, done, kind="snapshot", patterns=ok, already=list(self.core.subscriptions(slot)),
                      cursor=self._stream_position(), delta=delta)
        cu.pending.extend(self.latest.matching(ok) if ok else [])
        self._start(cu)

    def _pump(self, cu: _CatchUp) -> None:
        """Put the next history into the slot's queue while it has room."""
        core, slot = self.core, cu.slot
        if self._peers[slot] is None or cu.finished:
            return
        if cu.kind == "replay":
            while cu.replay_next <= cu.replay_to and core.queued(slot) < self._high:
                # One ring entry per step: a step never overshoots by more than one frame.
                _, missing = core.replay(slot, cu.replay_next, cu.replay_next)
                if missing is not None:
                    cu.missing = missing if cu.missing is None else (cu.missing[0], missing[1])
                cu.replay_next += 1
            self.schedule_flush()
            if cu.replay_next > cu.replay_to:
                self._finish(cu)
            return
        while core.queued(slot) < self._high:
            if cu.pending:
                if self._deliver(cu, cu.pending.popleft()):
                    cu.delivered += 1
                    (self._from_snapshot if cu.kind == "snapshot" else self._from_stream).inc()
                continue
            if cu.fetching:
                return
            if cu.pending_upto:
                cu.cursor = max(cu.cursor, cu.pending_upto)
                cu.pending_upto = 0
            if cu.batch:
                batch, n = cu.batch, 0
                while batch and core.queued(slot) < self._high:
                    e = batch.popleft()
                    if e.stream_seq > cu.cursor:     # (a fetch may have delivered it)
                        self._deliver(cu, e)
                        n += 1
                self._from_memory.inc(n)
                continue
            # Memory's turn: what it holds after the cursor on these subjects,
            # once it is known to hold all of it (per subject, see MemoryStream.lost).
            recent = self.recent
            recent.expire()
            view = cu.view = recent.view(cu.patterns) if cu.view is None else recent.fresh(cu.view)
            lost = recent.lost(view, cu.cursor)
            if recent.floor is None:
                lost = max(lost, self._stream_position())    # nothing dispatched here yet
            if lost > cu.cursor:
                if self.broker is not None and getattr(self.broker, "keeps_history", True) \
                        and cu.fetches < FETCH_ROUNDS:
                    cu.fetching = True
                    cu.fetches += 1
                    task = self.loop.create_task(self._fetch(cu, lost))
                    task.add_done_callback(_log_failure)
                    return
                # Lost: deliver what memory still holds. Memory evicts oldest first,
                # so it holds nothing at or below ``lost`` on any subject: no skip.
                cu.complete = False
                cu.cursor = lost
            cu.batch.extend(recent.take(view, cu.cursor))
            if cu.batch:
                continue
            # Caught up with everything dispatched (memory holds all of it and
            # nothing is dispatched within this step): messages accepted this
            # turn go out through the core first (to those already subscribed),
            # then the subscription takes over.
            self.publish_pending()
            for ch in cu.patterns:
                if core.subscribe(slot, ch, cu.delta):
                    self.subscription_count += 1
            self.metrics.subscriptions.set(self.subscription_count)
            self.schedule_flush()
            self._finish(cu)
            return
        self.schedule_flush()

    def _deliver(self, cu: _CatchUp, e: Entry) -> bool:
        # Skip what a live subscription of this connection already sent.
        sent = False
        if not (cu.already and matches_any(cu.already, e.subject)):
            sent = bool(self.core.deliver(cu.slot, e.tail, e.priority, True))
        if e.stream_seq > cu.cursor:
            cu.cursor = e.stream_seq
        return sent

    def _stream_position(self) -> int:
        """The stream position dispatch has reached (or the broker starts after, before any dispatch)."""
        return max(self._last_stream_seq, int(getattr(self.broker, "last_stream_seq", 0) or 0))

    async def _fetch(self, cu: _CatchUp, upto: int) -> None:
        """History the memory no longer holds on the catch-up's subjects, from the broker:
        ``cursor < stream_seq <= upto`` (memory holds everything of these subjects after ``upto``)."""
        assert self.broker is not None
        slots = self._fetch_slots
        hist: History
        try:
            if slots.locked():
                await asyncio.wait_for(slots.acquire(), self.cfg.ws_catchup_wait)
            else:
                await slots.acquire()
        except TimeoutError:
            # WS_MAX_CONCURRENT_CATCHUPS fetches are running: give this one up; the
            # resume delivers what memory holds and completes with complete:false.
            self.metrics.catchup_wait_timeouts.inc()
            hist = History([], False)
        else:
            self.history_fetches += 1
            self.metrics.catchup_fetches.inc()
            try:
                hist = await self.broker.history(cu.patterns, cu.cursor, upto)
            except Exception as exc:
                event(logging.WARNING, "history fetch failed", error=str(exc))
                hist = History([], False)
            finally:
                self.history_fetches -= 1
                slots.release()
        cu.fetching = False
        if self._peers[cu.slot] is None or cu.finished:
            return
        if not hist.complete:
            cu.complete = False
        for m in hist.messages:
            if m.stream_seq > cu.cursor:
                cu.pending.append(Entry(m.stream_seq, m.subject,
                                        message_tail(m.subject, m.stream_seq, m.ts_ms, m.payload), m.priority, 0.0))
        if hist.messages or hist.complete:
            cu.pending_upto = upto       # the broker answered for everything up to here
        else:
            cu.cursor = max(cu.cursor, upto)     # nothing there either: skip what is lost
        self._pump(cu)

    def history_stats(self) -> dict[str, int]:
        """The memory stream's sizes and the entries/subjects catch-ups examined (scraped)."""
        st = self.recent.stats()
        st["examined"] += self.latest.examined
        st["snapshot_subjects"] = len(self.latest)
        return st

    def catching_up(self, slot: int) -> bool:
        return slot in self._catchups


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        event(logging.ERROR, "catch-up failed", error=str(task.exception()))
