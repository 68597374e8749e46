"""Every Prometheus metric the node exports, declared in one place.

Hot-path counters live in the compiled core as plain C integers and are read
at scrape time by :class:`CoreCollector`, so fan-out never touches a Python
metric object per delivery. Names are ``fanout_*``, plus the ``ws_*``
throttling names from the deployment plan.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# core.stats() key -> (metric name, help, kind)
_CORE = {
    "published": ("fanout_messages_published_total", "Messages matched and fanned out by the core", "counter"),
    "deliveries": ("fanout_deliveries_total", "Data frames queued for clients", "counter"),
    "throttled_drops": ("fanout_throttled_drops_total", "Messages not sent to throttled clients", "counter"),
    "conflated_drops": ("fanout_conflated_drops_total", "Queued messages replaced by a newer one of their subject (conflated channels)", "counter"),
    "level_raises": ("fanout_throttle_raises_total", "Throttle level raises made by the core (one step each)", "counter"),
    "bytes_queued": ("fanout_bytes_queued_total", "Bytes queued for clients", "counter"),
    "bytes_sent": ("fanout_bytes_sent_total", "Bytes written to client sockets", "counter"),
    "send_calls": ("fanout_send_syscalls_total", "send() calls made to client sockets", "counter"),
    "send_blocked": ("fanout_send_blocked_total", "send() calls that found a full socket buffer", "counter"),
    "route_misses": ("fanout_route_cache_misses_total", "Subjects whose recipient set had to be computed", "counter"),
    "slow_marked": ("fanout_slow_clients_total", "Clients closed as too slow (1008): still behind at the heaviest throttle level for WS_SLOW_CLIENT_GRACE, or past the hard queue cap", "counter"),
    "compressions": ("fanout_compressions_total", "Message bodies deflated (once per message and window size)", "counter"),
    "patterns": ("fanout_subscription_patterns", "Distinct subscribed patterns", "gauge"),
    "routes": ("fanout_route_cache_subjects", "Subjects in the recipient cache", "gauge"),
}


class CoreCollector:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        for key, (name, help_text, kind) in _CORE.items():
            if kind == "counter":
                fam: Any = CounterMetricFamily(name.removesuffix("_total"), help_text)
            else:
                fam = GaugeMetricFamily(name, help_text)
            fam.add_metric([], stats.get(key, 0))
            yield fam


PRIORITY_LABELS = ("low", "medium", "high", "critical")
QUEUED_BYTES_BOUNDS = (1024, 16384, 65536, 262144, 1048576, 4194304)
LAG_SECONDS_BOUNDS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class ClientLagCollector:
    """Drops by priority and reason, and every client's lag (queued bytes, age
    of its oldest queued frame) as gauge histograms: read from the core at
    scrape time in one C pass over the slots."""

    def __init__(self, drops: Callable[[], dict[tuple[str, int], int]],
                 lag: Callable[[Any, Any], tuple[list[int], list[int], float, float]]) -> None:
        self._drops = drops
        self._lag = lag

    def collect(self) -> Iterator[Any]:
        fam = CounterMetricFamily("fanout_dropped", "Data messages a client did not get, by priority and reason",
                                  labels=["priority", "reason"])
        for (reason, prio), n in sorted(self._drops().items()):
            fam.add_metric([PRIORITY_LABELS[prio], reason], n)
        yield fam
        qb, ab, qsum, asum = self._lag(QUEUED_BYTES_BOUNDS, LAG_SECONDS_BOUNDS)
        for name, help_text, bounds, counts, total in (
                ("fanout_client_queued_bytes", "Clients by bytes queued for them and not yet written", QUEUED_BYTES_BOUNDS, qb, qsum),
                ("fanout_client_lag_seconds", "Clients by age of their oldest queued data frame (0: nothing queued)", LAG_SECONDS_BOUNDS, ab, asum)):
            h = GaugeHistogramMetricFamily(name, help_text)
            buckets = [(str(b), counts[i]) for i, b in enumerate(bounds)] + [("+Inf", counts[-1])]
            h.add_metric([], buckets, gsum_value=total)
            yield h


class HistoryCollector:
    """The resume memory's index (fanout/memstream.py), read at scrape time;
    its messages and bytes are fanout_store_history_* (StoreCollector)."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        st = self._stats()
        for key, name, help_text in (
                ("subjects", "fanout_history_subjects", "Subjects indexed by the resume memory: with messages in it, or tombstones"),
                ("tombstones", "fanout_history_tombstones", "Subjects with no message left in the resume memory whose last loss is remembered (WS_HISTORY_SUBJECTS)")):
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], st.get(key, 0))
            yield g
        c = CounterMetricFamily("fanout_history_examined", "Memory entries and subjects examined by catch-ups "
                                "(resume, snapshot): grows with what they return, not with the memory's size")
        c.add_metric([], st.get("examined", 0))
        yield c


USER_CONNECTION_BOUNDS = (1, 2, 3, 4, 5, 10)


class UserLimitCollector:
    """Users and connections per user as the per-user limit counts them (fanout/userlimit.py):
    cluster-wide as this node sees them while the cluster count is in force, else this node's own."""

    def __init__(self, per_user: Callable[[], list[int]]) -> None:
        self._per_user = per_user

    def collect(self) -> Iterator[Any]:
        counts = self._per_user()
        users = GaugeMetricFamily("fanout_user_limit_users",
                                  "Users with an open connection, as the per-user limit counts them "
                                  "(cluster-wide while fanout_user_limit_cluster is 1)")
        users.add_metric([], len(counts))
        yield users
        h = GaugeHistogramMetricFamily("fanout_user_limit_connections_per_user",
                                       "Users by their open connections, as the per-user limit counts them "
                                       "(cluster-wide while fanout_user_limit_cluster is 1)")
        buckets = [(str(b), sum(1 for c in counts if c <= b)) for b in USER_CONNECTION_BOUNDS]
        h.add_metric([], buckets + [("+Inf", len(counts))], gsum_value=sum(counts))
        yield h


class DeltaCollector:
    """Delta messages (PROTOCOL 1.2), read from the core at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        st = self._stats()
        sent = CounterMetricFamily("fanout_sent_bytes", "Data frame bytes queued for clients, as on the wire "
                                   "(header and envelope included, after compression), by kind", labels=["kind"])
        frames = CounterMetricFamily("fanout_sent_frames", "Data frames queued for clients, by kind", labels=["kind"])
        for kind in ("full", "delta"):
            sent.add_metric([kind], st.get("bytes_" + kind, 0))
            frames.add_metric([kind], st.get("frames_" + kind, 0))
        yield sent
        yield frames
        made = CounterMetricFamily("fanout_deltas", "Fossil deltas computed and kept (once per message and subject)")
        made.add_metric([], st.get("computed", 0))
        yield made
        secs = CounterMetricFamily("fanout_delta_seconds", "Time spent computing deltas (kept or refused)")
        secs.add_metric([], st.get("seconds", 0.0))
        yield secs
        refused = CounterMetricFamily("fanout_deltas_refused", "Deltas computed but not used, by reason", labels=["reason"])
        for reason in ("not_smaller", "not_utf8"):
            refused.add_metric([reason], st.get("refused_" + reason, 0))
        yield refused
        for name, key, help_text in (
                ("fanout_delta_bases", "bases", "Subjects holding a base message for deltas (bounded by the route cache)"),
                ("fanout_delta_base_bytes", "base_bytes", "Bytes of those base messages (mostly shared with the replay rings)"),
                ("fanout_delta_seen_bytes", "seen_bytes", "Memory of the per-subject sets of who was sent the base (4 bytes per delta subscriber while sparse, a bitset of the node when dense; also in fanout_store_recipient_set_bytes)")):
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], st.get(key, 0))
            yield g


# ---------------------------------------------------------------------------
# Memory: the size of every store that grows with clients, subjects or history
# (issue 19; README "Memory" gives each one's bound and cost per entry).
# Read at scrape time from a callable (Server.store_sizes) returning a dict with
# these keys; a missing key is not exported. Other stores add their line here.
# ---------------------------------------------------------------------------
_STORES = {
    "routes": ("fanout_store_routes", "Subjects in the core's route cache (bound: WS_ROUTE_CACHE_MAX)"),
    "patterns": ("fanout_store_patterns", "Distinct subscribed patterns (bound: WS_MAX_CONNECTIONS x WS_MAX_SUBSCRIPTIONS)"),
    "set_bytes": ("fanout_store_recipient_set_bytes", "Bytes held by the recipient sets of patterns and cached routes (and their delta opt-in and sent sets)"),
    "messages_held": ("fanout_store_messages", "Messages alive in the core: replay rings and output queues (bound: WS_REPLAY_BUFFER per client + queued)"),
    "message_bytes": ("fanout_store_message_bytes", "Bytes of those messages (struct + uncompressed body)"),
    "queued_bytes": ("fanout_store_queued_bytes", "Bytes queued for clients and not yet written (bound: about WS_CLIENT_QUEUE_BYTES per client)"),
    "buffer_bytes": ("fanout_store_client_buffer_bytes", "Bytes allocated for client queues and replay rings (an idle client keeps at most 12 KiB of queue buffers, and replay_size x 8 bytes of ring)"),
    "history_messages": ("fanout_store_history_messages", "Messages kept in memory for resume (bound: WS_HISTORY_SIZE)"),
    "history_bytes": ("fanout_store_history_bytes", "Bytes of their bodies"),
    "snapshot_subjects": ("fanout_store_snapshot_subjects", "Subjects whose newest message is kept for snapshots (bound: WS_SNAPSHOT_MAX_SUBJECTS)"),
    "snapshot_bytes": ("fanout_store_snapshot_bytes", "Bytes of those messages' bodies"),
    "priority_cache": ("fanout_store_priority_cache", "Subjects whose priority rule is cached (bound: WS_ROUTE_CACHE_MAX)"),
    "catchups": ("fanout_store_catchups", "Resumes, snapshots and replays in progress (at most one per connection)"),
    "throttled": ("fanout_store_throttled_clients", "Clients with throttle state in the hub"),
    "watched": ("fanout_store_watched_clients", "Clients the hub waits on to drain"),
    "sessions": ("fanout_store_sessions", "Connections in any state, handshakes included (bound: WS_MAX_CONNECTIONS + WS_MAX_PENDING_HANDSHAKES)"),
    "users": ("fanout_store_users", "Token subs in the per-user registry"),
    "log_limiter_keys": ("fanout_store_log_limiter_keys", "Keys the log limiter remembers (bounded)"),
    "asyncio_tasks": ("fanout_asyncio_tasks", "asyncio tasks alive in the node's loop"),
    # Not stores: where the process's memory is, to tell a leak from fragmentation.
    "heap_in_use": ("fanout_heap_in_use_bytes", "C heap bytes in live blocks, Python's included (glibc mallinfo2; 0 elsewhere)"),
    "heap_free": ("fanout_heap_free_bytes", "C heap bytes held free inside malloc's arenas (fragmentation; 0 elsewhere)"),
    "python_blocks": ("fanout_python_allocated_blocks", "Python objects' memory blocks alive (sys.getallocatedblocks)"),
}


class StoreCollector:
    def __init__(self, sizes: Callable[[], dict[str, int]]) -> None:
        self._sizes = sizes

    def collect(self) -> Iterator[Any]:
        sizes = self._sizes()
        for key, (name, help_text) in _STORES.items():
            if key in sizes:
                fam = GaugeMetricFamily(name, help_text)
                fam.add_metric([], sizes[key])
                yield fam


_trace_base: Any = None


def start_tracemalloc() -> None:
    """FANOUT_TRACEMALLOC=1: trace Python allocations from now on (costly) and
    keep this moment as the baseline of :func:`tracemalloc_report`."""
    global _trace_base
    tracemalloc.start(1)
    _trace_base = tracemalloc.take_snapshot()


def tracemalloc_report(limit: int = 25, reset: bool = False) -> dict[str, Any]:
    """Top growth of the Python heap by source line since start, or since the
    last ``reset`` (GET /debug/tracemalloc[?reset=1]: the new baseline is
    taken after the report)."""
    global _trace_base
    if not tracemalloc.is_tracing() or _trace_base is None:
        return {"tracing": False}
    snap = tracemalloc.take_snapshot()
    stats = snap.compare_to(_trace_base, "lineno")
    if reset:
        _trace_base = snap
    cur, peak = tracemalloc.get_traced_memory()
    return {"tracing": True, "traced_bytes": cur, "peak_bytes": peak,
            "top": [{"where": str(st.traceback[0]), "size_diff": st.size_diff, "count_diff": st.count_diff}
                    for st in stats[:limit]]}
# --------------------------------------------------------------- end: Memory


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.connections = Gauge("fanout_connections", "Open WebSocket connections", registry=r)
        self.ws_connections = Gauge("ws_connections", "Open WebSocket connections (plan name)", registry=r)
        self.accepted = Counter("fanout_connections_accepted_total", "WebSocket handshakes accepted", registry=r)
        self.rejected = Counter("fanout_connections_rejected_total", "Handshakes refused", ["reason"], registry=r)
        self.closed = Counter("fanout_connections_closed_total", "Connections closed by the server", ["code"], registry=r)
        self.client_frames = Counter("fanout_client_frames_total", "Client requests by type", ["type"], registry=r)
        self.client_errors = Counter("fanout_client_errors_total", "Error replies sent to clients", ["code"], registry=r)
        self.log_suppressed = Counter("fanout_log_suppressed_total", "Log lines held back by the per-client/per-reason log limit (fanout.log.limited_event)", ["reason"], registry=r)
        self.subscriptions = Gauge("fanout_subscriptions", "Client subscriptions (pattern, client pairs)", registry=r)
        self.replays = Counter("fanout_replays_total", "Replay requests", ["result"], registry=r)
        self.resumes = Counter("fanout_resumes_total", "Resume requests", ["complete"], registry=r)
        self.drain_hints = Counter("fanout_drain_reconnect_hints_total", "reconnect hints sent to clients by a drain", registry=r)
        self.snapshots = Counter("fanout_snapshots_total", "subscribe requests with snapshot:true, by outcome", ["result"], registry=r)
        self.catchup_messages = Counter("fanout_catchup_messages_total",
                                        "History messages delivered by resume, by where they came from",
                                        ["source"], registry=r)
        self.publish_rejected = Counter("fanout_publish_rejected_total", "Publishes refused", ["reason"], registry=r)
        self.ingest_rejected = Counter("fanout_ingest_rejected_total", "Broker messages acked but not delivered (e.g. bad_subject)", ["reason"], registry=r)
        self.duplicates = Counter("fanout_duplicates_dropped_total", "Messages dropped as already dispatched (stream_seq)", registry=r)
        self.dispatch_seconds = Histogram("fanout_dispatch_seconds", "Time to match and enqueue one message for all its clients",
                                          buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1), registry=r)
        self.publish_to_write = Histogram("fanout_publish_to_write_seconds",
                                          "From a message's arrival at the node to the end of the flush pass that wrote it "
                                          "to every client whose socket had room (at most 64 messages sampled per pass)",
                                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                                          registry=r)
        self.flush_seconds = Histogram("fanout_flush_seconds", "Time of one flush pass over the clients with queued bytes",
                                       buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1), registry=r)
        self.broker_ready = Gauge("fanout_broker_ready", "1 while the message source is connected", registry=r)
        self.broker_events = Counter("fanout_broker_events_total", "Broker events (connect, disconnect, error...)", ["event"], registry=r)
        self.last_stream_seq = Gauge("fanout_last_stream_seq", "Highest stream_seq dispatched", registry=r)
        self.ready = Gauge("fanout_ready", "1 while /ready answers 200", registry=r)
        self.braking = Gauge("fanout_braking", "1 while the resource guard's brake refuses new connections (any reason; see fanout_guard_braking)", registry=r)
        # Resource guard (fanout/guard.py), sampled every WS_GUARD_INTERVAL.
        self.guard_braking = Gauge("fanout_guard_braking", "1 while the brake is on for this reason (cpu, loop_lag, memory)", ["reason"], registry=r)
        self.guard_throttling = Gauge("fanout_guard_throttling", "1 while load shedding drops low-priority messages for every client", registry=r)
        self.guard_cpu_percent = Gauge("fanout_guard_cpu_percent", "Process CPU time over wall time, all threads, as percent of the cores the process may use", registry=r)
        self.guard_cpu_cores = Gauge("fanout_guard_cpu_cores", "Cores the process may use (affinity and cgroup quota)", registry=r)
        self.guard_loop_lag = Gauge("fanout_guard_loop_lag_seconds", "Largest event-loop lag (timer lateness) in the last guard interval", registry=r)
        self.loop_lag = Histogram("fanout_loop_lag_seconds", "Event-loop lag per guard interval (largest timer lateness seen)",
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r)
        self.guard_memory_used = Gauge("fanout_guard_memory_used_bytes", "Memory in use as the guard counts it (cgroup working set, or process RSS)", registry=r)
        self.guard_memory_limit = Gauge("fanout_guard_memory_limit_bytes", "Memory limit the guard measures against (cgroup, WS_MEMORY_LIMIT_BYTES or RAM)", registry=r)
        self.guard_memory_percent = Gauge("fanout_guard_memory_percent", "fanout_guard_memory_used_bytes as percent of the limit", registry=r)
        self.guard_shed = Counter("fanout_guard_shed_total", "Clients closed with 1013 at the hard memory limit (most queued bytes first)", registry=r)
        self.guard_ingest_paused = Counter("fanout_guard_ingest_paused_seconds_total", "Seconds NATS consumption was paused because the event loop lagged", registry=r)
        self.handshakes_pending = Gauge("fanout_handshakes_pending", "Connections still in their handshake (token check included)", registry=r)
        self.catchup_fetches = Counter("fanout_catchup_fetches_total", "History reads from the broker for what the resume memory lacks on a catch-up's subjects", registry=r)
        self.catchup_wait_timeouts = Counter("fanout_catchup_wait_timeouts_total", "Resumes that gave up waiting for a history fetch slot (WS_MAX_CONCURRENT_CATCHUPS): complete false", registry=r)
        self.users = Gauge("fanout_users", "Distinct token subs with an open connection", registry=r)
        # Per-user limit (fanout/userlimit.py); users and connections per user: UserLimitCollector.
        self.user_limit_cluster = Gauge("fanout_user_limit_cluster", "1 while the per-user limit counts every node's connections (JetStream KV); 0 while it counts this node's own (WS_USER_LIMIT_SCOPE=node, embedded mode, or NATS away)", registry=r)
        self.user_limit_evictions = Counter("fanout_user_limit_evictions_total", "Connections closed with 4002 by the per-user limit, by policy and where the closed one was (local: this node; remote: another node) - in cluster scope counted once, by the node holding the user's newest connection", ["policy", "where"], registry=r)
        self.user_limit_kv_errors = Counter("fanout_user_limit_kv_errors_total", "Per-user limit KV writes that failed (retried)", ["op"], registry=r)
        self.cpu_percent = Gauge("fanout_cpu_percent", "Process CPU percent, one core = 100 (the guard's sample, every WS_GUARD_INTERVAL)", registry=r)
        self.memory_rss = Gauge("fanout_memory_rss_bytes", "Process resident memory (the guard's sample)", registry=r)
        # Throttling (names from the deployment plan).
        self.throttled_light = Gauge("ws_throttled_clients_light", "Clients at light throttle (75% rate)", registry=r)
        self.throttled_medium = Gauge("ws_throttled_clients_medium", "Clients at medium throttle (50% rate)", registry=r)
        self.throttled_heavy = Gauge("ws_throttled_clients_heavy", "Clients at heavy throttle (25% rate)", registry=r)
        self.throttle_transitions = Counter("ws_throttle_transitions_total", "Throttle level transitions",
                                            ["from_level", "to_level"], registry=r)

    def attach_core(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(CoreCollector(stats))

    def attach_history(self, stats: Callable[[], dict[str, int]]) -> None:
        self.registry.register(HistoryCollector(stats))

    def attach_delta(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(DeltaCollector(stats))

    def attach_client_lag(self, drops: Callable[[], dict[tuple[str, int], int]],
                          lag: Callable[[Any, Any], tuple[list[int], list[int], float, float]]) -> None:
        self.registry.register(ClientLagCollector(drops, lag))

    def attach_user_limit(self, per_user: Callable[[], list[int]]) -> None:
        self.registry.register(UserLimitCollector(per_user))

    def attach_stores(self, sizes: Callable[[], dict[str, int]]) -> None:
        self.registry.register(StoreCollector(sizes))

    def render(self) -> bytes:
        return generate_latest(self.registry)
