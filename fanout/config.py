"""The node's configuration: one typed object built from env vars.

Every setting has an env var (the names come from the deployment plan) and a
CLI flag that mirrors it (``WS_PORT`` <-> ``--ws-port``). :func:`load` reads
the environment, applies flag overrides, validates every value and raises
:class:`ConfigError` naming the variable when one is bad, so a node never
starts half-configured.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Config", "ConfigError", "FIELDS", "auth_problem", "load", "parse_duration"]


class ConfigError(ValueError):
    """A setting has a value the node cannot use; the message names it."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from ``"30s"``, ``"250ms"``, ``"5m"``, ``"1h"`` or a bare number of seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration like 30s, 250ms, 5m; got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _setting(env: str, default: Any, help: str, *, lo: float | None = None,
             hi: float | None = None, choices: tuple[str, ...] | None = None,
             kind: str | None = None) -> Any:
    return field(default=default, metadata={
        "env": env, "help": help, "lo": lo, "hi": hi, "choices": choices, "kind": kind,
    })


@dataclass(frozen=True, slots=True)
class Config:
    # --- listeners -----------------------------------------------------------
    ws_host: str = _setting("WS_HOST", "0.0.0.0", "WebSocket listen address")
    ws_port: int = _setting("WS_PORT", 3004, "WebSocket port (paths /ws and /)", lo=0, hi=65535)
    health_host: str = _setting("HEALTH_HOST", "0.0.0.0", "ops HTTP listen address")
    health_port: int = _setting("HEALTH_PORT", 3002, "ops HTTP port: /health /ready /metrics /publish", lo=0, hi=65535)
    # --- connections ---------------------------------------------------------
    ws_max_connections: int = _setting("WS_MAX_CONNECTIONS", 10000, "connection limit; over it the handshake gets 503 + Retry-After", lo=1, hi=1_000_000)
    ws_max_frame_bytes: int = _setting("WS_MAX_FRAME_BYTES", 65536, "largest client frame; bigger closes with 1009", lo=128, hi=16 * 2**20)
    ws_client_queue_bytes: int = _setting("WS_CLIENT_QUEUE_BYTES", 262144, "per-client unsent byte limit before it counts as slow", lo=1024, hi=2**31)
    ws_slow_client_strikes: int = _setting("WS_SLOW_CLIENT_STRIKES", 3, "the least messages over the queue limit a throttle window must see besides its time, WS_THROTTLE_RAISE_SECONDS (the old name of the slow-client rule, still read: it used to be the whole rule, consecutive messages before a raise or a 1008)", lo=1, hi=1000)
    ws_slow_client_grace: float = _setting("WS_SLOW_CLIENT_GRACE", 2.0, "seconds a client may still fall behind (queue over its limit and not shrinking) at the heaviest throttle level, or with throttling off, before it is closed with 1008", lo=0.05, hi=3600, kind="duration")
    ws_client_queue_hard_factor: int = _setting("WS_CLIENT_QUEUE_HARD_FACTOR", 8, "hard cap on a client's queue, in multiples of WS_CLIENT_QUEUE_BYTES: from half of it on, that client's non-critical messages are dropped (critical ones still queued); a message past it closes the client (1008) at once", lo=2, hi=1000)
    ws_replay_buffer: int = _setting("WS_REPLAY_BUFFER", 100, "data messages kept per client for replay", lo=1, hi=100000)
    ws_max_subscriptions: int = _setting("WS_MAX_SUBSCRIPTIONS", 256, "patterns one client may hold", lo=1, hi=100000)
    ws_control_rate: float = _setting("WS_CONTROL_RATE", 20.0, "client frames per second allowed (token bucket)", lo=0.1, hi=1e6)
    ws_control_burst: int = _setting("WS_CONTROL_BURST", 40, "client frame burst allowance", lo=1, hi=1e6)
    ws_control_strikes: int = _setting("WS_CONTROL_STRIKES", 10, "rate_limited errors before the client is closed with 1008", lo=1, hi=1e6)
    ws_ping_interval: float = _setting("WS_PING_INTERVAL", 20.0, "seconds between server pings", lo=0.05, hi=3600, kind="duration")
    ws_idle_timeout: float = _setting("WS_IDLE_TIMEOUT", 60.0, "close a client that sent nothing (not even a pong) for this long", lo=0.1, hi=86400, kind="duration")
    ws_handshake_timeout: float = _setting("WS_HANDSHAKE_TIMEOUT", 10.0, "seconds a socket may take to finish the handshake", lo=0.1, hi=600, kind="duration")
    ws_compression: bool = _setting("WS_COMPRESSION", True, "offer permessage-deflate (compressed once per message for all clients)")
    ws_allowed_origins: str = _setting("WS_ALLOWED_ORIGINS", "", "web page origins that may open WebSockets, comma-separated (https://app.example.com, https://*.example.com for its subdomains); others get 403, handshakes without Origin pass; empty = any origin")
    ws_auth_secret: str = _setting("WS_AUTH_SECRET", "", "HMAC secret for HS256/384/512 tokens; when any WS_AUTH key is set, clients need a JWT (?auth= or Bearer)")
    ws_auth_public_key_file: str = _setting("WS_AUTH_PUBLIC_KEY_FILE", "", "PEM public key or certificate; its type pins the algorithms (RSA: RS256/384/512, EC: ES256/384/512, Ed25519: EdDSA)")
    ws_auth_jwks_url: str = _setting("WS_AUTH_JWKS_URL", "", "http(s) URL of a JWKS; tokens name their key by kid (not with WS_AUTH_PUBLIC_KEY_FILE)")
    ws_auth_jwks_max_age: float = _setting("WS_AUTH_JWKS_MAX_AGE", 300.0, "refetch the JWKS when it is older than this (removed keys stop working)", lo=1, hi=7 * 86400, kind="duration")
    ws_auth_jwks_min_interval: float = _setting("WS_AUTH_JWKS_MIN_INTERVAL", 30.0, "least time between JWKS fetches, also when tokens name unknown kids", lo=1, hi=86400, kind="duration")
    ws_auth_audience: str = _setting("WS_AUTH_AUDIENCE", "", "accepted token aud value(s), comma-separated; empty = tokens must carry no aud")
    ws_auth_issuer: str = _setting("WS_AUTH_ISSUER", "", "required token iss value(s), comma-separated; empty = iss not checked")
    ws_auth_leeway_seconds: float = _setting("WS_AUTH_LEEWAY_SECONDS", 5.0, "clock skew allowed on exp, nbf and iat", lo=0, hi=300)
    # --- fan-out -------------------------------------------------------------
    ws_max_broadcast_rate: float = _setting("WS_MAX_BROADCAST_RATE", 0.0, "messages/s fanned out (0 = unlimited); excess publishes wait or get 429", lo=0, hi=1e9)
    ws_flush_latency_ms: float = _setting("WS_FLUSH_LATENCY_MS", 5.0, "latency budget for coalescing: while clients get frames faster than one per budget, a flush may wait up to this long after the last one so several frames share a sendmsg(); light traffic is flushed at once (0 = always at once)", lo=0, hi=1000)
    ws_flush_threads: int = _setting("WS_FLUSH_THREADS", 0, "threads writing client sockets in each flush, GIL released (0 = auto: usable cores - 1, at least 1, at most 8)", lo=0, hi=64)
    ws_history_size: int = _setting("WS_HISTORY_SIZE", 10000, "recent messages kept in memory for resume", lo=0, hi=10_000_000)
    ws_history_subjects: int = _setting("WS_HISTORY_SUBJECTS", 100000, "subjects whose last message left the resume memory and whose loss is still remembered, so a resume judges completeness per subject (oldest loss forgotten first; a forgotten subject counts as lost up to the newest forgotten loss)", lo=0, hi=10_000_000)
    # --- resource guard (fanout/guard.py) and admission ---------------------
    ws_guard_interval: float = _setting("WS_GUARD_INTERVAL", 1.0, "seconds between resource guard samples (CPU, loop lag, memory)", lo=0.05, hi=60, kind="duration")
    ws_cpu_reject_threshold: float = _setting("WS_CPU_REJECT_THRESHOLD", 75.0, "emergency brake: new handshakes get 503 and /ready 503 while process CPU (percent of the cores it may use) stays at or above this (0 = off)", lo=0, hi=100)
    ws_cpu_resume_threshold: float = _setting("WS_CPU_RESUME_THRESHOLD", 65.0, "the CPU brake releases below this percent (hysteresis; below WS_CPU_REJECT_THRESHOLD)", lo=0, hi=100)
    ws_cpu_throttle_threshold: float = _setting("WS_CPU_THROTTLE_THRESHOLD", 60.0, "at or above this CPU percent the node drops low-priority messages for everyone (throttle_update) (0 = off)", lo=0, hi=100)
    ws_max_loop_lag_ms: float = _setting("WS_MAX_LOOP_LAG_MS", 250.0, "brake while the event loop runs timers this late (ms); NATS consumption slows from half of it (0 = off)", lo=0, hi=60000)
    ws_memory_reject_percent: float = _setting("WS_MEMORY_REJECT_PERCENT", 75.0, "brake while memory use is at or above this percent of the limit (cgroup, WS_MEMORY_LIMIT_BYTES or RAM) (0 = off)", lo=0, hi=100)
    ws_memory_shed_percent: float = _setting("WS_MEMORY_SHED_PERCENT", 90.0, "at or above this percent of the memory limit the clients with the most queued bytes are closed with 1013 (0 = off)", lo=0, hi=100)
    ws_memory_limit_bytes: int = _setting("WS_MEMORY_LIMIT_BYTES", 0, "memory budget of this process (its RSS is measured against it); 0 = the cgroup limit, or RAM where there is none", lo=0, hi=2**50)
    ws_max_pending_handshakes: int = _setting("WS_MAX_PENDING_HANDSHAKES", 1000, "connections still in their handshake (token checks included) beyond which new handshakes get 503", lo=1, hi=1_000_000)
    ws_max_concurrent_catchups: int = _setting("WS_MAX_CONCURRENT_CATCHUPS", 32, "history fetches from the broker (resume) running at once; more wait", lo=1, hi=100000)
    ws_catchup_wait: float = _setting("WS_CATCHUP_WAIT", 5.0, "seconds a resume waits for a history fetch slot; then it completes with complete:false", lo=0, hi=600, kind="duration")
    ws_max_connections_per_user: int = _setting("WS_MAX_CONNECTIONS_PER_USER", 3, "connections one token sub may hold (0 = no limit; without auth there is no user); across all nodes or per node: WS_USER_LIMIT_SCOPE", lo=0, hi=1_000_000)
    ws_user_limit_policy: str = _setting("WS_USER_LIMIT_POLICY", "close_oldest", "over WS_MAX_CONNECTIONS_PER_USER: close_oldest (close 4002) or refuse_new (HTTP 429 + Retry-After)", choices=("close_oldest", "refuse_new"))
    ws_user_limit_scope: str = _setting("WS_USER_LIMIT_SCOPE", "cluster", "where WS_MAX_CONNECTIONS_PER_USER counts: cluster = every node's connections through a JetStream KV bucket (JetStream mode; this node's own while NATS is away), node = this node's only (embedded mode is always node)", choices=("cluster", "node"))
    ws_user_limit_bucket: str = _setting("WS_USER_LIMIT_BUCKET", "fanout_users", "JetStream KV bucket of the cluster-wide per-user count (one key per open connection; created in memory storage with WS_USER_LIMIT_TTL when missing)")
    ws_user_limit_ttl: float = _setting("WS_USER_LIMIT_TTL", 30.0, "the bucket's TTL: a node writes its keys again every third of it; a dead node's connections stop counting within it", lo=3, hi=3600, kind="duration")
    ws_drain_seconds: float = _setting("WS_DRAIN_SECONDS", 10.0, "rolling drain window on SIGTERM or POST /drain: clients get a reconnect hint and 1001 spread over it (0 = all at once)", lo=0, hi=3600, kind="duration")
    ws_shutdown_timeout: float = _setting("WS_SHUTDOWN_TIMEOUT", 10.0, "seconds to flush and close clients on SIGTERM", lo=0, hi=3600, kind="duration")
    ws_throttle_enabled: bool = _setting("WS_THROTTLE_ENABLED", True, "degrade slow clients step by step (throttle_update) before closing them; false = close with 1008 once over the queue limit and not shrinking for WS_SLOW_CLIENT_GRACE")
    ws_throttle_light_percent: int = _setting("WS_THROTTLE_LIGHT_PERCENT", 75, "percent of non-critical messages a client at level 1 (light) gets", lo=1, hi=100)
    ws_throttle_medium_percent: int = _setting("WS_THROTTLE_MEDIUM_PERCENT", 50, "percent at level 2 (medium)", lo=1, hi=100)
    ws_throttle_heavy_percent: int = _setting("WS_THROTTLE_HEAVY_PERCENT", 25, "percent at level 3 (heavy)", lo=1, hi=100)
    ws_throttle_raise_seconds: float = _setting("WS_THROTTLE_RAISE_SECONDS", 1.0, "a client over its queue limit goes up one throttle level when its queue did not shrink over this long (and WS_SLOW_CLIENT_STRIKES messages); each level holds at least this long", lo=0.05, hi=3600, kind="duration")
    ws_throttle_recovery_seconds: float = _setting("WS_THROTTLE_RECOVERY_SECONDS", 30.0, "seconds a throttled client must keep up before it goes down one level", lo=0.1, hi=3600, kind="duration")
    ws_throttle_max_level: int = _setting("WS_THROTTLE_MAX_LEVEL", 3, "heaviest level; a client still falling behind there for WS_SLOW_CLIENT_GRACE is closed with 1008", lo=1, hi=3)
    ws_priority_rules: str = _setting("WS_PRIORITY_RULES", "odin.token.*.metadata=low,odin.token.*.comment=medium,odin.token.*.update=high,odin.token.*.trade=critical", "subject pattern=priority rules for messages without a Fanout-Priority header (first match wins; default high)")
    ws_conflate_channels: str = _setting("WS_CONFLATE_CHANNELS", "", "subject patterns whose messages are latest-value state: for a throttled client a newer one replaces the older still queued (comma-separated)")
    ws_delta_enabled: bool = _setting("WS_DELTA_ENABLED", True, "send Fossil delta messages (PROTOCOL 1.2) to subscriptions that ask with delta: \"fossil\" (clients opt in per subscription)")
    ws_delta_channels: str = _setting("WS_DELTA_CHANNELS", ">", "subject patterns where deltas are allowed (comma-separated; > = all)")
    ws_delta_min_bytes: int = _setting("WS_DELTA_MIN_BYTES", 128, "payloads shorter than this always go full (a delta would save little)", lo=0, hi=64 * 2**20)
    ws_route_cache_max: int = _setting("WS_ROUTE_CACHE_MAX", 65536, "subjects whose recipients (and priority) are cached; when full the cache is dropped whole and rebuilt on demand (about 200 bytes per entry, plus 4 per recipient)", lo=64, hi=16_777_216)
    ws_snapshot_max_subjects: int = _setting("WS_SNAPSHOT_MAX_SUBJECTS", 100000, "subjects whose newest message is kept for subscribe with snapshot:true (least recently updated evicted; 0 = off)", lo=0, hi=10_000_000)
    ws_socket_notsent_lowat: int = _setting("WS_SOCKET_NOTSENT_LOWAT", 16384, "TCP_NOTSENT_LOWAT per client socket: unsent bytes the kernel holds beyond those in flight, so a slow reader's backlog stays in the node's queue, where throttling sees its real rate (0 = kernel default)", lo=0, hi=64 * 2**20)
    ws_socket_sndbuf: int = _setting("WS_SOCKET_SNDBUF", 262144, "SO_SNDBUF per client socket, so a stalled reader cannot hide megabytes in the kernel (0 = kernel autotuning)", lo=0, hi=64 * 2**20)
    # --- NATS / JetStream (set NATS_URL to use it; embedded bus otherwise) -----
    nats_url: str = _setting("NATS_URL", "", "NATS server URL(s), comma-separated (nats://, tls://, ws://, wss://); empty = embedded mode")
    nats_creds_file: str = _setting("NATS_CREDS_FILE", "", "NATS credentials file (.creds: user JWT + nkey seed; read again on every reconnect)")
    nats_user: str = _setting("NATS_USER", "", "NATS user")
    nats_password: str = _setting("NATS_PASSWORD", "", "NATS password")
    nats_token: str = _setting("NATS_TOKEN", "", "NATS token")
    nats_tls_ca: str = _setting("NATS_TLS_CA", "", "CA file for TLS to NATS")
    nats_tls_cert: str = _setting("NATS_TLS_CERT", "", "client certificate for TLS to NATS")
    nats_tls_key: str = _setting("NATS_TLS_KEY", "", "client key for TLS to NATS")
    nats_reconnect_wait: float = _setting("NATS_RECONNECT_WAIT", 0.25, "pause between reconnect tries to one NATS server (the first try after a disconnect is at once); with the jitter it bounds what a NATS restart costs", lo=0.01, hi=60, kind="duration")
    nats_reconnect_jitter: float = _setting("NATS_RECONNECT_JITTER", 0.25, "random extra pause, 0 up to this, drawn per node at each connect, so many nodes do not retry in step", lo=0, hi=60, kind="duration")
    js_domain: str = _setting("JS_DOMAIN", "", "JetStream domain (leafnode/hub set-ups); empty = the account's own")
    js_stream_name: str = _setting("JS_STREAM_NAME", "ODIN_TOKENS", "JetStream stream")
    js_stream_subjects: str = _setting("JS_STREAM_SUBJECTS", "odin.token.>,odin.global.>", "subjects the stream (and the embedded bus) accept")
    js_stream_max_age: float = _setting("JS_STREAM_MAX_AGE", 30.0, "stream retention", lo=0.001, hi=10 * 365 * 86400, kind="duration")
    js_stream_max_msgs: int = _setting("JS_STREAM_MAX_MSGS", 100000, "stream message limit", lo=1, hi=2**62)
    js_stream_max_bytes: int = _setting("JS_STREAM_MAX_BYTES", 52428800, "stream byte limit", lo=1, hi=2**62)
    js_stream_storage: str = _setting("JS_STREAM_STORAGE", "file", "stream storage", choices=("file", "memory"))
    js_stream_replicas: int = _setting("JS_STREAM_REPLICAS", 1, "stream replicas", lo=1, hi=5)
    js_stream_manage: bool = _setting("JS_STREAM_MANAGE", True, "create/update the stream; false = use it as it is")
    js_consumer_name: str = _setting("JS_CONSUMER_NAME", "ws-server", "durable consumer prefix (the node id is appended)")
    js_consumer_inactive: float = _setting("JS_CONSUMER_INACTIVE", 300.0, "NATS removes a gone node's consumer after this", lo=1, hi=30 * 86400, kind="duration")
    js_fetch_batch: int = _setting("JS_FETCH_BATCH", 256, "messages per pull", lo=1, hi=10000)
    ws_max_nats_rate: float = _setting("WS_MAX_NATS_RATE", 0.0, "messages/s consumed from NATS (0 = unlimited)", lo=0, hi=1e9)
    node_id: str = _setting("FANOUT_NODE_ID", "", "this node's id, naming its durable consumer (default: hostname-WS_PORT; with WS_PORT=0 hostname-p<pid>)")
    # --- logging -------------------------------------------------------------
    fanout_tracemalloc: bool = _setting("FANOUT_TRACEMALLOC", False, "trace Python allocations from start (slow; for leak hunts): GET /debug/tracemalloc on the ops port lists the top growth by line (?reset=1: measure from now on)")
    log_level: str = _setting("LOG_LEVEL", "info", "log level", choices=("debug", "info", "warning", "error"))

    @property
    def embedded(self) -> bool:
        return not self.nats_url

    @property
    def stream_subjects(self) -> list[str]:
        return [s.strip() for s in self.js_stream_subjects.split(",") if s.strip()]

    @property
    def throttle_percents(self) -> tuple[int, int, int, int]:
        return (100, self.ws_throttle_light_percent, self.ws_throttle_medium_percent, self.ws_throttle_heavy_percent)

    @property
    def priority_rules(self) -> list[tuple[str, int]]:
        """``(pattern, priority)`` in order; validated at load."""
        from .brokers.base import parse_priority

        out = []
        for item in self.ws_priority_rules.split(","):
            if item.strip():
                pattern, _, prio = item.partition("=")
                out.append((pattern.strip(), parse_priority(prio.strip())))
        return out

    @property
    def flush_threads(self) -> int:
        """``WS_FLUSH_THREADS``, with 0 (auto) resolved: the cores this
        process may run on (its affinity mask, e.g. a container's cpuset)
        minus one, for the load the event loop and the kernel's receive work
        put on the rest; at least 1, at most 8 (past that the loopback/NIC
        send path, not the threads, is the limit)."""
        if self.ws_flush_threads:
            return self.ws_flush_threads
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, min(8, cores - 1))

    @property
    def delta_patterns(self) -> list[str]:
        """WS_DELTA_CHANNELS, or none when WS_DELTA_ENABLED is off."""
        if not self.ws_delta_enabled:
            return []
        return [s.strip() for s in self.ws_delta_channels.split(",") if s.strip()]

    @property
    def conflate_patterns(self) -> list[str]:
        return [s.strip() for s in self.ws_conflate_channels.split(",") if s.strip()]

    @property
    def node_name(self) -> str:
        """``FANOUT_NODE_ID``, else ``<hostname>-<WS_PORT>``: unique per process on one host.

        Two nodes on one host cannot listen on one WebSocket port, so the
        port tells them apart (a shared durable consumer would split the
        stream between them). With ``WS_PORT=0`` the port is not known when
        the consumer is named, so the pid stands in: ``<hostname>-p<pid>``.
        That id changes at every restart, so the old durable lingers until
        ``JS_CONSUMER_INACTIVE``; set ``FANOUT_NODE_ID`` for a stable one.
        """
        if self.node_id:
            return self.node_id
        host = socket.gethostname()
        return f"{host}-{self.ws_port}" if self.ws_port else f"{host}-p{os.getpid()}"

    def as_env(self) -> dict[str, str]:
        """The effective settings by env var name (secrets masked)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value and any(s in f.metadata["env"] for s in ("PASSWORD", "TOKEN", "SECRET")):
                value = "***"
            out[f.metadata["env"]] = value
        return out


FIELDS = {f.metadata["env"]: f for f in dataclasses.fields(Config)}


def _convert(f: dataclasses.Field, raw: str) -> Any:
    meta = f.metadata
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    if typ == "bool":
        value: Any = _bool(raw)
    elif meta["kind"] == "duration":
        value = parse_duration(raw)
    elif typ == "int":
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    elif typ == "float":
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    else:
        value = raw.strip()
    if meta["lo"] is not None and value < meta["lo"]:
        raise ValueError(f"must be >= {meta['lo']:g}, got {raw!r}")
    if meta["hi"] is not None and value > meta["hi"]:
        raise ValueError(f"must be <= {meta['hi']:g}, got {raw!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"must be one of {', '.join(meta['choices'])}, got {raw!r}")
    return value


_CROSS_CHECKS: list[tuple[str, Callable[[Config], str | None]]] = []


def _check(env: str) -> Callable[[Callable[[Config], str | None]], Callable[[Config], str | None]]:
    def deco(fn: Callable[[Config], str | None]) -> Callable[[Config], str | None]:
        _CROSS_CHECKS.append((env, fn))
        return fn
    return deco


@_check("WS_THROTTLE_LIGHT_PERCENT")
def _check_throttle(cfg: Config) -> str | None:
    p = cfg.throttle_percents
    if list(p) != sorted(p, reverse=True):
        return ("must be >= WS_THROTTLE_MEDIUM_PERCENT >= WS_THROTTLE_HEAVY_PERCENT (lighter levels deliver more), "
                f"got {p[1]}, {p[2]}, {p[3]}")
    return None


@_check("WS_PRIORITY_RULES")
def _check_priority_rules(cfg: Config) -> str | None:
    from .subjects import valid_pattern

    for item in cfg.ws_priority_rules.split(","):
        if not item.strip():
            continue
        pattern, eq, prio = item.partition("=")
        if not eq or not valid_pattern(pattern.strip()):
            return f"expected pattern=priority items like odin.token.*.update=high, got {item.strip()!r}"
    try:
        cfg.priority_rules  # noqa: B018 - parsing is the check
    except ValueError as exc:
        return str(exc)
    return None


@_check("WS_CONFLATE_CHANNELS")
def _check_conflate(cfg: Config) -> str | None:
    from .subjects import valid_pattern

    bad = [p for p in cfg.conflate_patterns if not valid_pattern(p)]
    return f"invalid subject pattern(s): {', '.join(bad)}" if bad else None


@_check("WS_DELTA_CHANNELS")
def _check_delta_channels(cfg: Config) -> str | None:
    from .subjects import valid_pattern

    bad = [p for p in (s.strip() for s in cfg.ws_delta_channels.split(",")) if p and not valid_pattern(p)]
    return f"invalid subject pattern(s): {', '.join(bad)}" if bad else None


@_check("WS_CPU_RESUME_THRESHOLD")
def _check_guard(cfg: Config) -> str | None:
    reject = cfg.ws_cpu_reject_threshold
    if reject > 0 and cfg.ws_cpu_resume_threshold >= reject:
        return (f"must be below WS_CPU_REJECT_THRESHOLD={reject:g} (hysteresis), "
                f"got {cfg.ws_cpu_resume_threshold:g}")
    if reject > 0 and cfg.ws_cpu_throttle_threshold > reject:
        return (f"WS_CPU_THROTTLE_THRESHOLD: must not exceed WS_CPU_REJECT_THRESHOLD={reject:g} "
                f"(throttling comes before the brake), got {cfg.ws_cpu_throttle_threshold:g}")
    shed = cfg.ws_memory_shed_percent
    if shed > 0 and cfg.ws_memory_reject_percent > shed:
        return (f"WS_MEMORY_REJECT_PERCENT: must not exceed WS_MEMORY_SHED_PERCENT={shed:g} "
                f"(refusing comes before shedding), got {cfg.ws_memory_reject_percent:g}")
    return None


@_check("JS_STREAM_SUBJECTS")
def _check_subjects(cfg: Config) -> str | None:
    from .subjects import valid_pattern

    subs = cfg.stream_subjects
    if not subs:
        return "needs at least one subject pattern"
    bad = [s for s in subs if not valid_pattern(s)]
    return f"invalid subject pattern(s): {', '.join(bad)}" if bad else None


_NATS_SCHEMES = ("nats", "tls", "ws", "wss")


@_check("NATS_URL")
def _check_nats_url(cfg: Config) -> str | None:
    from urllib.parse import urlsplit

    if not cfg.nats_url:
        return None
    urls = [u.strip() for u in cfg.nats_url.split(",")]
    if not all(urls):
        return f"empty URL in the comma-separated list {cfg.nats_url!r}"
    for url in urls:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            return f"bad URL {url!r}: {exc}"
        if parts.scheme not in _NATS_SCHEMES:
            return f"bad URL {url!r}: scheme must be one of {', '.join(s + '://' for s in _NATS_SCHEMES)}"
        if not parts.hostname:
            return f"bad URL {url!r}: no host"
    return None


@_check("WS_USER_LIMIT_BUCKET")
def _check_user_bucket(cfg: Config) -> str | None:
    # nats-py's bucket name rule (it becomes the stream KV_<bucket>).
    if not re.fullmatch(r"[a-zA-Z0-9_-]+", cfg.ws_user_limit_bucket):
        return f"invalid bucket name {cfg.ws_user_limit_bucket!r}: letters, digits, _ and - only"
    return None


@_check("JS_DOMAIN")
def _check_domain(cfg: Config) -> str | None:
    from .subjects import valid_subject

    # The domain becomes a subject token ($JS.<domain>.API...).
    if cfg.js_domain and ("." in cfg.js_domain or not valid_subject(cfg.js_domain)):
        return f"invalid domain {cfg.js_domain!r}: letters, digits, _ and - only"
    return None


@_check("WS_AUTH_SECRET")
def auth_problem(cfg: Config) -> str | None:
    """The first auth setting that cannot work, as ``"ENV_VAR: reason"``, or None.

    Checked at load and again by :class:`fanout.auth.Authenticator` (which a
    test may build from a hand-made Config).
    """
    from urllib.parse import urlsplit

    from .keys import load_public_key

    secret = cfg.ws_auth_secret
    if secret and (secret.lstrip().startswith(("-----BEGIN", "{", "ssh-")) or "PRIVATE KEY" in secret):
        return "WS_AUTH_SECRET: looks like a key (PEM, JWK or SSH), not an HMAC secret; use WS_AUTH_PUBLIC_KEY_FILE for a public key"
    if cfg.ws_auth_public_key_file and cfg.ws_auth_jwks_url:
        return "WS_AUTH_JWKS_URL: set together with WS_AUTH_PUBLIC_KEY_FILE; configure one asymmetric key source"
    if cfg.ws_auth_public_key_file:
        try:
            load_public_key(cfg.ws_auth_public_key_file)
        except ValueError as exc:
            return f"WS_AUTH_PUBLIC_KEY_FILE: {exc}"
    if cfg.ws_auth_jwks_url:
        try:
            parts = urlsplit(cfg.ws_auth_jwks_url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            return f"WS_AUTH_JWKS_URL: bad URL ({exc})"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"WS_AUTH_JWKS_URL: must be an http:// or https:// URL with a host, got {cfg.ws_auth_jwks_url!r}"
    if cfg.ws_auth_jwks_min_interval > cfg.ws_auth_jwks_max_age:
        return "WS_AUTH_JWKS_MIN_INTERVAL: must not exceed WS_AUTH_JWKS_MAX_AGE"
    if not (secret or cfg.ws_auth_public_key_file or cfg.ws_auth_jwks_url):
        for env, value in (("WS_AUTH_AUDIENCE", cfg.ws_auth_audience), ("WS_AUTH_ISSUER", cfg.ws_auth_issuer)):
            if value:
                return (f"{env}: set, but no key is configured (WS_AUTH_SECRET, WS_AUTH_PUBLIC_KEY_FILE "
                        "or WS_AUTH_JWKS_URL), so auth is off")
    return None


@_check("WS_ALLOWED_ORIGINS")
def _check_origins(cfg: Config) -> str | None:
    from .origins import parse_allowed_origins

    try:
        parse_allowed_origins(cfg.ws_allowed_origins)
    except ValueError as exc:
        return str(exc)
    return None


@_check("NATS_TLS_KEY")
def _check_tls_pair(cfg: Config) -> str | None:
    if bool(cfg.nats_tls_cert) != bool(cfg.nats_tls_key):
        return "NATS_TLS_CERT and NATS_TLS_KEY must be set together"
    return None


@_check("NATS_CREDS_FILE")
def _check_files(cfg: Config) -> str | None:
    for env in ("NATS_CREDS_FILE", "NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY"):
        path = getattr(cfg, FIELDS[env].name)
        if path and not os.path.isfile(path):
            return f"{env}: no such file {path!r}"
    return None


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the config from ``environ`` (default ``os.environ``) and CLI ``overrides``.

    ``overrides`` maps env var names to values given on the command line;
    ``None`` values are ignored. Raises :class:`ConfigError` on the first bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for env, f in FIELDS.items():
        raw = None
        if overrides and overrides.get(env) is not None:
            raw = str(overrides[env])
        elif environ.get(env) not in (None, ""):
            raw = environ[env]
        if raw is None:
            continue
        try:
            values[f.name] = _convert(f, raw)
        except ValueError as exc:
            raise ConfigError(f"{env}: {exc}") from None
    cfg = Config(**values)
    for env, fn in _CROSS_CHECKS:
        problem = fn(cfg)
        if problem:
            raise ConfigError(problem if problem.startswith(("NATS_", "JS_", "WS_")) and ":" in problem else f"{env}: {problem}")
    return cfg
