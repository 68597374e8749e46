"""The per-user connection limit: ``WS_MAX_CONNECTIONS_PER_USER`` under ``WS_USER_LIMIT_POLICY``.

The user is the token's ``sub``; without token auth there is no user and no
limit. Two implementations behind one interface (:class:`UserLimiter`):

* :class:`UserLimiter` counts this node's own connections (``WS_USER_LIMIT_SCOPE=node``,
  embedded mode, and the fallback of the cluster limiter while NATS is away).
* :class:`ClusterUserLimiter` counts every node's connections through a
  JetStream key-value bucket (``WS_USER_LIMIT_BUCKET``), on the broker's own
  NATS connection (the broker owns it; this module only borrows it).

The cluster count
-----------------
One key per open connection: ``<user>.<instance>.<connection>``, where
``<user>`` is ``b`` + base64url(sub) (no padding) for a sub of up to 96 bytes,
else ``h`` + sha256(sub) in hex (a KV key allows only ``[-/_=.a-zA-Z0-9]``;
a sub may hold anything), ``<instance>`` is random per node process and
``<connection>`` the session id. The node writes the key when the handshake
succeeds (after the 101: the handshake never waits on NATS), writes it again
every third of the bucket's TTL while the connection lives (spread over that
third), and deletes it on close. Writes leave in batches every
:data:`WRITE_DELAY` s and are confirmed by the watch, not by JetStream's acks
(see :meth:`ClusterUserLimiter._write`). The value is ``{"node": <node name>, "c": <creation revision>}``; the
first write carries no ``c``: its own revision is the creation revision.

Every node watches the whole bucket (nats-py's ``watchall``, an ordered
consumer) into a local view ``user -> {key: creation revision}``, so the check
at a handshake is a dictionary lookup. A key not written again for a TTL
(its node died) leaves the view, and the bucket (``max_age`` = TTL) drops it.

The order: a user's live connections sorted by creation revision, which the
stream assigns and every node sees the same. Whenever the watch adds a key to
a user over the limit, every node computes the same set to close from the same
stream position, and each closes (4002) those it holds:

* ``close_oldest``: all but the newest N;
* ``refuse_new``: all but the oldest N (the handshake refused what it could
  see with 429; this settles a race between nodes it could not see).

So two handshakes on two nodes at one moment close the same connection, not
two, and a user is over the limit only for the watch delay. An eviction is
counted (``fanout_user_limit_evictions_total{policy,where}``) once in the
cluster: by the node that holds the user's newest connection (the one that
caused it), ``where`` saying whether the closed one was on that node.

NATS away (not connected, the watch broken, the bucket unusable, the view full
at :data:`MAX_VIEW_KEYS`): the node falls back to its own count at once,
says so in ``/health`` (``user_limit``), ``fanout_user_limit_cluster`` 0 and
one log line, and tries again every :data:`RETRY` s. Back: a fresh watch
(the bucket's current keys), this node's keys written again, then the limit
is applied from the cluster view (connections opened meanwhile may then be
over it and are closed by the policy).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nats.js.kv import KV_DEL, KV_OP

from .codes import CloseCode
from .config import Config
from .log import event, limited_event
from .metrics import Metrics
from .session import State

if TYPE_CHECKING:
    from .session import Refusal, Session

__all__ = ["UserLimiter", "ClusterUserLimiter", "make_user_limiter", "user_token", "MAX_VIEW_KEYS"]

MAX_RAW_SUB = 96          # bytes of sub kept readable (base64url) in a key; longer ones are hashed
MAX_VIEW_KEYS = 1_000_000  # connections in the cluster view; over it the node falls back to its own count
KV_TIMEOUT = 2.0           # seconds for one KV API call (they answer in ms)
WRITE_DELAY = 0.005        # seconds the writer gathers writes before sending them
CONFIRM = 2.0              # seconds for a write to come back through the watch; else it is sent again
SETUP_TIMEOUT = 5.0        # seconds for bucket + watch + first snapshot when (re)activating
RETRY = 1.0                # seconds between tries to (re)activate the cluster count
CHECK = 0.25               # seconds between health checks of the connection and the watch


def user_token(sub: str) -> str:
    """The KV key token of a user: ``b`` + base64url(sub), or ``h`` + sha256 for a long sub."""
    raw = sub.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_RAW_SUB:
        return "b" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return "h" + hashlib.sha256(raw).hexdigest()


def _refusal(limit: int) -> Refusal:
    return (429, "user_limit", f"Too Many Requests: at most {limit} connections per user\n", random.randint(5, 15))


class UserLimiter:
    """This node's own count: the user's open connections here (oldest first)."""

    scope = "node"

    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.limit = cfg.ws_max_connections_per_user
        self.policy = cfg.ws_user_limit_policy
        #: token sub -> this node's open sessions of that user, oldest first.
        self.local: dict[str, list[Session]] = {}
        metrics.attach_user_limit(self._distribution)
        metrics.user_limit_cluster.set(0)

    @property
    def cluster(self) -> bool:
        """True while the limit counts the connections of every node."""
        return False

    # ------------------------------------------------------------ interface
    def admit(self, sub: str) -> Refusal | None:
        """At the handshake, after the token check: 429 for refuse_new at the limit, else None."""
        if self.limit <= 0 or self.policy != "refuse_new":
            return None
        if self.count(sub) >= self.limit:
            return _refusal(self.limit)
        return None

    def count(self, sub: str) -> int:
        """The user's open connections as this limiter counts them now."""
        return sum(1 for s in self.local.get(sub, ()) if s.state is State.OPEN)

    def opened(self, session: Session, sub: str) -> None:
        self.local.setdefault(sub, []).append(session)
        self.metrics.users.set(len(self.local))
        if not self.cluster:
            self._enforce_local(session, sub)

    def closed(self, session: Session, sub: str) -> bool:
        """Forget the session; False if it was not registered."""
        mine = self.local.get(sub)
        if mine is None:
            return False
        try:
            mine.remove(session)
        except ValueError:
            return False
        if not mine:
            del self.local[sub]
        self.metrics.users.set(len(self.local))
        return True

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"scope": self.scope, "cluster": self.cluster, "limit": self.limit, "policy": self.policy,
                "users": len(self.local)}

    # ------------------------------------------------------------- internals
    def _enforce_local(self, session: Session, sub: str) -> None:
        """close_oldest: close this node's oldest over the limit (4002)."""
        if self.limit <= 0 or self.policy != "close_oldest":
            return
        live = [s for s in self.local.get(sub, ()) if s.state is State.OPEN]
        for old in live[:max(0, len(live) - self.limit)]:
            limited_event(("user_limit", sub), logging.INFO, "per-user limit: oldest connection replaced",
                          user=sub, client=old.id, new_client=session.id, limit=self.limit, scope="node")
            self.metrics.user_limit_evictions.labels(self.policy, "local").inc()
            old.close(CloseCode.REPLACED, "replaced by a newer connection of this user")

    def _distribution(self) -> list[int]:
        """Connections per user, one entry per user (for the metrics at scrape time)."""
        return [sum(1 for s in v if s.state is State.OPEN) for v in self.local.values()]


class ClusterUserLimiter(UserLimiter):
    """The count of every node, through a JetStream KV bucket (see the module docstring).

    ``connection()`` returns the broker's NATS connection while it is
    connected, else None.
    """

    scope = "cluster"

    def __init__(self, cfg: Config, metrics: Metrics, connection: Callable[[], Any]) -> None:
        super().__init__(cfg, metrics)
        self._connection = connection
        self.bucket = cfg.ws_user_limit_bucket
        self.ttl = cfg.ws_user_limit_ttl
        self.instance = os.urandom(6).hex()
        node = json.dumps(cfg.node_name)
        self._first_value = f'{{"node":{node}}}'.encode()   # a first write: its revision is the creation
        self._value_head = f'{{"node":{node},"c":'.encode()
        self.active = False
        self.reason = "starting"
        #: user token -> {key: [creation revision, monotonic time last written]}
        self.view: dict[str, dict[str, list[float]]] = {}
        self.view_keys = 0
        self._key_of: dict[Session, str] = {}      # this node's sessions with a user -> their key
        self._mine: dict[str, Session] = {}        # and back
        self._created: dict[str, int] = {}         # key -> creation revision, once known
        self._ops: dict[str, bool] = {}            # pending writes: key -> True put / False delete
        self._sent: set[str] = set()               # keys written at least once (need a delete on close)
        self._unconfirmed: dict[str, float] = {}   # key -> loop time by which its write must come back
        self._prefix = f"$KV.{self.bucket}."
        self._evicted: set[str] = set()            # keys whose eviction was decided (counted once)
        self._wake = asyncio.Event()
        self._watcher: Any = None
        self._nc: Any = None
        self._reconnects = -1
        self._incarnation: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._write_errors = 0
        self._watch_error: str | None = None
        self._next_refresh = 0.0
        self._round: list[str] = []               # keys still to write again in this refresh round
        self._per_tick = 1
        self._next_sweep = 0.0

    @property
    def cluster(self) -> bool:
        return self.active

    # ------------------------------------------------------------ interface
    def count(self, sub: str) -> int:
        if not self.active:
            return super().count(sub)
        conns = self.view.get(user_token(sub), {})
        n = len(conns)
        for s in self.local.get(sub, ()):   # this node's, not yet back through the watch
            key = self._key_of.get(s)
            if key is not None and key not in conns and s.state is State.OPEN:
                n += 1
        return n

    def opened(self, session: Session, sub: str) -> None:
        key = f"{user_token(sub)}.{self.instance}.{session.id}"
        self._key_of[session] = key
        self._mine[key] = session
        if self.active:
            self._queue(key, True)
        super().opened(session, sub)

    def closed(self, session: Session, sub: str) -> bool:
        key = self._key_of.pop(session, None)
        if key is not None:
            self._mine.pop(key, None)
            self._created.pop(key, None)
            self._unconfirmed.pop(key, None)
            if key in self._sent:
                self._sent.discard(key)
                self._queue(key, False)
            else:
                self._ops.pop(key, None)   # never written: nothing to delete
        return super().closed(session, sub)

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tasks = [loop.create_task(self._supervise(), name="user-limit"),
                       loop.create_task(self._writer(), name="user-limit-writer")]

    async def stop(self) -> None:
        """Delete this node's keys (bounded by KV_TIMEOUT), then stop watching."""
        self._stopping = True
        nc = self._nc
        if self.active and nc is not None:
            self._ops = {key: False for key in self._mine if key in self._sent}
            try:
                await asyncio.wait_for(self._flush(), KV_TIMEOUT)
                await nc.flush(KV_TIMEOUT)
            except (TimeoutError, Exception):
                pass
        for t in self._tasks:
            t.cancel()
        await self._stop_watch()

    def status(self) -> dict[str, Any]:
        return {**super().status(), "reason": None if self.active else self.reason, "bucket": self.bucket,
                "ttl_s": self.ttl, "cluster_users": len(self.view) if self.active else None,
                "cluster_connections": self.view_keys if self.active else None}

    # ------------------------------------------------------------ the view
    def _on_entry(self, entry: Any, now: float, snapshot: bool = False) -> None:
        key: str = entry.key
        token, dot, _ = key.partition(".")
        if not dot:
            return
        conns = self.view.get(token)
        if entry.operation is not None:    # DEL or PURGE: the connection is gone
            if conns is not None and conns.pop(key, None) is not None:
                self.view_keys -= 1
                self._evicted.discard(key)
                if not conns:
                    del self.view[token]
            return
        created = entry.revision
        value = entry.value
        if value and b'"c"' in value:    # written again: the creation revision is in the value
            try:
                c = json.loads(value).get("c")
                if isinstance(c, int) and c > 0:
                    created = c
            except (ValueError, AttributeError):
                pass
        seen = now
        if snapshot and isinstance(entry.created, datetime):   # a snapshot entry may be older than now
            age = time.time() - entry.created.replace(tzinfo=entry.created.tzinfo or UTC).timestamp()
            seen = now - min(max(0.0, age), self.ttl)
        have = conns.get(key) if conns is not None else None
        if have is not None:
            have[1] = max(have[1], seen)
            self._unconfirmed.pop(key, None)
            return
        if self.view_keys >= MAX_VIEW_KEYS:
            raise OverflowError(f"view full: {MAX_VIEW_KEYS} connections")
        if conns is None:
            conns = self.view[token] = {}
        conns[key] = [created, seen]
        self.view_keys += 1
        if key in self._mine:
            self._created.setdefault(key, created)
            self._unconfirmed.pop(key, None)
        if not snapshot and len(conns) > self.limit:
            self._enforce(conns)

    def _enforce(self, conns: dict[str, list[float]]) -> None:
        """Close (4002) what the policy says must go, of the connections this node holds."""
        order = sorted(conns, key=lambda k: conns[k][0])
        over = len(order) - self.limit
        if over <= 0:
            return
        victims = order[:over] if self.policy == "close_oldest" else order[self.limit:]
        caused_here = order[-1] in self._mine
        for key in victims:
            if key in self._evicted:
                continue
            self._evicted.add(key)
            session = self._mine.get(key)
            if caused_here:
                self.metrics.user_limit_evictions.labels(self.policy, "local" if session is not None else "remote").inc()
            if session is None or session.state is not State.OPEN:
                continue
            sub = session.claims.sub if session.claims is not None else None
            if self.policy == "close_oldest":
                limited_event(("user_limit", sub), logging.INFO, "per-user limit: oldest connection replaced",
                              user=sub, client=session.id, limit=self.limit, scope="cluster", newest_here=caused_here)
                session.close(CloseCode.REPLACED, "replaced by a newer connection of this user")
            else:
                limited_event(("user_limit", sub), logging.INFO,
                              "per-user limit: newest connection closed (opened on two nodes at once)",
                              user=sub, client=session.id, limit=self.limit, scope="cluster")
                session.close(CloseCode.REPLACED, "over the per-user connection limit")

    def _sweep(self, now: float) -> None:
        """Drop keys not written for a TTL (their node died; the bucket drops them too)."""
        cutoff = now - self.ttl
        for token in list(self.view):
            conns = self.view[token]
            for key in [k for k, v in conns.items() if v[1] < cutoff and k not in self._mine]:
                del conns[key]
                self.view_keys -= 1
                self._evicted.discard(key)
            if not conns:
                del self.view[token]

    def _distribution(self) -> list[int]:
        if not self.active:
            return super()._distribution()
        return [len(v) for v in self.view.values()]

    # ------------------------------------------------------------- writing
    def _queue(self, key: str, put: bool) -> None:
        self._ops[key] = put
        self._wake.set()

    async def _write(self, nc: Any, key: str, put: bool, now: float) -> None:
        """One KV write as nats-py's ``KeyValue.put``/``delete`` sends it (a publish on
        ``$KV.<bucket>.<key>``; a delete carries ``KV-Operation: DEL``), without waiting for
        the JetStream ack: the watch brings every write back with its revision, and a put not
        back within CONFIRM s is sent again (a lost delete ends with the TTL). The acks cost
        more than the rest of the limit together (see benchmarks/handshake_bench.py)."""
        try:
            if not put:
                await nc.publish(self._prefix + key, b"", headers={KV_OP: KV_DEL})
                return
            if key not in self._mine:
                return   # closed meanwhile
            created = self._created.get(key)
            value = self._value_head + b"%d}" % created if created else self._first_value
            await nc.publish(self._prefix + key, value)
            self._sent.add(key)
            self._unconfirmed[key] = now + CONFIRM
        except Exception:
            self._write_errors += 1
            self.metrics.user_limit_kv_errors.labels("put" if put else "delete").inc()
            if put and key in self._mine and key not in self._ops:
                self._ops[key] = True   # again next round (or after a reconnect)

    async def _flush(self) -> None:
        while self._ops and self._nc is not None and self.active:
            nc = self._nc
            batch, self._ops = self._ops, {}
            now = asyncio.get_running_loop().time()
            for i, (key, put) in enumerate(batch.items()):
                await self._write(nc, key, put, now)
                if i % 256 == 255:
                    await asyncio.sleep(0)   # a big batch (back from an outage) must not hold the loop

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(WRITE_DELAY)   # one round for the handshakes of a burst, not one each
            self._wake.clear()
            if not self.active:
                continue
            before = self._write_errors
            await self._flush()
            if self._write_errors > before:
                await asyncio.sleep(0.2)     # failing writes: do not spin

    def _refresh(self, now: float) -> None:
        """Write this node's keys again, each once per TTL/3, spread over the round in slices
        (10,000 writes at once would hold the event loop for a fraction of a second)."""
        if now >= self._next_refresh:
            self._next_refresh = now + self.ttl / 3
            self._round = list(self._mine)
            self._round.reverse()     # taken from the end: oldest first, each key at the same point
            ticks = max(1.0, 0.8 * (self.ttl / 3) / CHECK)
            self._per_tick = max(1, math.ceil(len(self._round) / ticks))
        if self._round:
            take = self._round[-self._per_tick:]
            del self._round[-self._per_tick:]
            for key in take:
                # A key whose write is not back yet is left to _resend_unconfirmed: written
                # again now, before its revision is known, it would carry no creation revision.
                if key in self._mine and key not in self._unconfirmed:
                    self._ops.setdefault(key, True)
            self._wake.set()

    def _resend_unconfirmed(self, now: float) -> None:
        late = [k for k, t in self._unconfirmed.items() if t < now]
        for key in late:
            del self._unconfirmed[key]
            if key in self._mine and key not in self._ops:
                self.metrics.user_limit_kv_errors.labels("unconfirmed").inc()
                self._queue(key, True)

    # --------------------------------------------------------- supervision
    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if self.active:
                    problem = self._problem()
                    if problem is not None:
                        await self._fall_back(problem)
                        continue
                    now = loop.time()
                    self._refresh(now)
                    if self._unconfirmed:
                        self._resend_unconfirmed(now)
                    if now >= self._next_sweep:
                        self._next_sweep = now + max(0.1, self.ttl / 10)
                        self._sweep(time.monotonic())
                    await asyncio.sleep(CHECK)
                else:
                    try:
                        await asyncio.wait_for(self._activate(), SETUP_TIMEOUT)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self._set_reason(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                        await self._stop_watch()
                        await asyncio.sleep(RETRY)
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # a bug here must not end the supervision
                event(logging.ERROR, "per-user limit supervision failed", exc_info=True, error=str(exc))
                await asyncio.sleep(RETRY)

    def _problem(self) -> str | None:
        nc = self._connection()
        if nc is None or nc is not self._nc:
            return "NATS not connected"
        if nc.stats.get("reconnects", 0) != self._reconnects:
            return "NATS reconnected: watching again"
        if self._watch_task is None or self._watch_task.done():
            return self._watch_error or "KV watch ended"
        return None

    def _set_reason(self, reason: str) -> None:
        if reason != self.reason:
            event(logging.WARNING, "per-user limit: cluster-wide count unavailable, this node's own count applies",
                  reason=reason, bucket=self.bucket, limit=self.limit, policy=self.policy)
        self.reason = reason

    async def _fall_back(self, reason: str) -> None:
        self.active = False
        self.metrics.user_limit_cluster.set(0)
        self._set_reason(reason)
        await self._stop_watch()
        self.view.clear()
        self.view_keys = 0
        self._evicted.clear()
        self._ops.clear()

    async def _stop_watch(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None and not task.done():
            task.cancel()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                await asyncio.wait_for(watcher.stop(), 1.0)
            except (TimeoutError, Exception):
                pass
        self._unconfirmed.clear()

    async def _bucket(self, js: Any) -> Any:
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BucketNotFoundError

        try:
            kv = await js.key_value(self.bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=self.bucket, description="fanout: open connections per user (WS_MAX_CONNECTIONS_PER_USER)",
                history=1, ttl=self.ttl, storage=StorageType.MEMORY, replicas=self.cfg.js_stream_replicas))
        status = await kv.status()
        ttl = status.ttl
        if ttl and abs(ttl - self.ttl) > 0.001:
            event(logging.WARNING, "per-user limit: the KV bucket has another TTL than WS_USER_LIMIT_TTL; using the bucket's",
                  bucket=self.bucket, bucket_ttl_s=ttl, configured_ttl_s=self.ttl)
            self.ttl = ttl
        if status.stream_info.created != self._incarnation:
            # A new bucket (or NATS lost it): revisions start again, so do creation revisions.
            self._incarnation = status.stream_info.created
            self._created.clear()
        return kv

    async def _activate(self) -> None:
        nc = self._connection()
        if nc is None:
            raise ConnectionError("NATS not connected")
        reconnects = nc.stats.get("reconnects", 0)
        js = nc.jetstream(timeout=KV_TIMEOUT, domain=self.cfg.js_domain or None)
        kv = await self._bucket(js)
        watcher = await kv.watchall()
        self._watcher = watcher
        self.view.clear()
        self.view_keys = 0
        self._evicted.clear()
        now = time.monotonic()
        while True:   # the bucket as it is now; None marks its end
            entry = await watcher.updates(timeout=SETUP_TIMEOUT)
            if entry is None:
                break
            self._on_entry(entry, now, snapshot=True)
        self._nc, self._reconnects = nc, reconnects
        self._watch_error = None
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(watcher), name="user-limit-watch")
        self.active = True
        self.metrics.user_limit_cluster.set(1)
        self._sent.clear()
        for key in self._mine:   # this node's connections, written again (or for the first time)
            self._ops[key] = True
        self._next_refresh = asyncio.get_running_loop().time() + self.ttl / 3
        self._wake.set()
        for conns in list(self.view.values()):
            if len(conns) > self.limit:
                self._enforce(conns)
        event(logging.INFO, "per-user limit: cluster-wide count in force", bucket=self.bucket, limit=self.limit,
              policy=self.policy, ttl_s=self.ttl, users=len(self.view), connections=self.view_keys,
              previous=self.reason)
        self.reason = ""

    async def _watch(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                self._on_entry(entry, time.monotonic())
        except OverflowError as exc:
            self._watch_error = str(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._watch_error = f"KV watch failed: {type(exc).__name__}: {exc}"
            event(logging.ERROR, "per-user limit: KV watch failed", exc_info=True)


def make_user_limiter(cfg: Config, metrics: Metrics, broker: Any, *, users: bool = True) -> UserLimiter:
    """The cluster-wide limiter in JetStream mode with WS_USER_LIMIT_SCOPE=cluster, a limit and
    users (token auth on), else the node's own (which, without users, has nothing to count)."""
    connection = getattr(broker, "connection", None)
    if cfg.embedded or cfg.ws_user_limit_scope != "cluster" or cfg.ws_max_connections_per_user <= 0 \
            or connection is None or not users:
        return UserLimiter(cfg, metrics)
    return ClusterUserLimiter(cfg, metrics, connection)
