"""Stream and consumer administration: the JetStream API calls the node makes at set-up.

- :meth:`Admin.ensure_stream` creates the stream (``JS_STREAM_MANAGE=true``,
  the default) or reconciles it with the config, naming the field and env
  var NATS refuses; with ``JS_STREAM_MANAGE=false`` it only reads it.
- :meth:`Admin.ensure_consumer` creates or adjusts this node's durable pull
  consumer, and :func:`check_not_in_use` refuses one another live node is
  pulling from (two nodes with one id would split the stream between them).

Every call goes through nats-py's ``JetStreamContext`` (``JS_DOMAIN`` is its
``domain``). A permission a managed account lacks shows as a timed-out API
request plus a "Permissions Violation" error on the connection;
:class:`Denials` keeps those so the failure can say which subject (and
which setting) is at stake.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from ...config import Config

__all__ = ["Admin", "StreamConfigConflict", "ConsumerInUse", "PermissionDenied", "LimitExceeded", "Denials",
           "consumer_name", "format_epoch", "api_prefix", "val", "check_not_in_use"]

log = logging.getLogger("fanout.jetstream")

_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")
_DENIED = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"'\s]+)", re.I)

# JetStream API error codes (nats-server's errors.json) that mean an account limit.
LIMIT_CODES = {
    10023: "insufficient resources",
    10026: "maximum consumers limit reached (account max_consumers)",
    10027: "maximum streams limit reached (account max_streams)",
    10028: "maximum bytes required exceeds the account limit (account max_bytes / storage)",
    10047: "insufficient storage resources (account storage limit)",
    10113: "stream/consumer replicas exceed the account limit",
}


class StreamConfigConflict(Exception):
    """The existing stream disagrees with the config on a field NATS cannot change.

    The message names the field and its env var. The node refuses to start
    on it (unless ``JS_STREAM_MANAGE=false``, where the stream is used as is).
    """


class ConsumerInUse(Exception):
    """This node's durable consumer is being pulled from by another live node."""


class PermissionDenied(Exception):
    """The NATS user may not do what the node needs; the message names the subject and the setting."""


class LimitExceeded(Exception):
    """The account's JetStream limits (storage, streams, consumers) refuse what the node needs."""


def consumer_name(cfg: Config) -> str:
    """This node's durable: ``JS_CONSUMER_NAME-<node id>``, with characters NATS refuses replaced by ``_``."""
    return _NAME_BAD.sub("_", f"{cfg.js_consumer_name}-{cfg.node_name}")


def api_prefix(domain: str) -> str:
    """The JetStream API subject prefix, as nats-py builds it for ``nc.jetstream(domain=...)``."""
    return f"$JS.{domain}.API" if domain else api.DEFAULT_PREFIX


def format_epoch(created: datetime | None) -> str:
    """The stream incarnation id: its creation time (UTC, microseconds)."""
    if created is None:
        return ""
    return created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def val(x: Any) -> Any:
    """An enum's value; nats-py leaves config fields read from the server as plain strings."""
    return getattr(x, "value", x)


def check_not_in_use(ci: api.ConsumerInfo, stream: str) -> None:
    """Raise :class:`ConsumerInUse` when another live client is attached to the durable ``ci``.

    The signal: the server's count of waiting pull requests (``num_waiting``)
    or a bound push subscriber (``push_bound``). Every live node keeps pull
    requests outstanding all the time, and the server drops the requests of
    a connection that closed, so a crashed or stopped node's consumer reads
    0 here. Call it before this node sends its own first pull request.
    Limit: a peer whose TCP connection died without a close still counts
    until the server's ping timeout notices (about 2 minutes by default).
    """
    waiting = ci.num_waiting or 0
    if waiting > 0 or ci.push_bound:
        how = f"{waiting} pull request(s) waiting" if waiting else "a push subscriber bound"
        raise ConsumerInUse(
            f"durable consumer {ci.name} on stream {stream} is in use by another live node ({how}): "
            "two nodes with one id would split the stream between them; "
            "set FANOUT_NODE_ID to a unique id for each node (the default, hostname-WS_PORT, "
            "differs per process on one host)")


class Denials:
    """Permission violations NATS reported on the connection, by subject, with when they came."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}

    def note(self, text: str) -> str | None:
        """Record a "Permissions Violation" error text; returns the subject, or None if it is not one."""
        m = _DENIED.search(text)
        if m is None:
            return None
        self._seen[m.group(2)] = (m.group(1).lower(), time.monotonic())
        return m.group(2)

    def since(self, t0: float, prefix: str = "") -> list[str]:
        """Subjects denied since ``t0`` (monotonic) that start with ``prefix``, lower-cased.

        Lower-cased because nats-py lower-cases the server's error text
        (and with it the subject); compare against ``.lower()`` forms.
        """
        prefix = prefix.lower()
        return [s.lower() for s, (_, t) in self._seen.items() if t >= t0 and s.lower().startswith(prefix)]

    def clear(self) -> None:
        self._seen.clear()


class Admin:
    """Stream and consumer set-up for one node; ``js`` is the current connection's JetStream context."""

    def __init__(self, cfg: Config, stream: str, consumer: str, batch: int) -> None:
        self.cfg = cfg
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        #: The stream's subjects as NATS has them (the config's until the stream is read).
        self.subjects: list[str] = cfg.stream_subjects

    # ---------------------------------------------------------------- stream
    def wanted_stream(self) -> api.StreamConfig:
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

    async def ensure_stream(self, js: JetStreamContext) -> api.StreamInfo:
        want = self.wanted_stream()
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            if not self.cfg.js_stream_manage:
                raise LookupError(f"stream {self.stream} does not exist and JS_STREAM_MANAGE=false: "
                                  "create it, or let the node manage it") from None
            try:
                info = await js.add_stream(want)
                log.info("JetStream stream created", extra={"fields": {"stream": self.stream}})
                self.subjects = list(want.subjects or [])
                return info
            except APIError as exc:
                if exc.err_code != 10058:  # 10058: name already in use (another node was first)
                    raise self._create_conflict(exc) from None
                info = await js.stream_info(self.stream)
        if self.cfg.js_stream_manage:
            info = await self._reconcile_stream(js, info, want)
        self.subjects = list(info.config.subjects or [])
        return info

    def _create_conflict(self, exc: APIError) -> Exception:
        code = exc.err_code or 0
        if code in LIMIT_CODES:
            return LimitExceeded(
                f"cannot create stream {self.stream}: the account's JetStream limits refuse it "
                f"({LIMIT_CODES[code]}: {exc.description}); lower JS_STREAM_MAX_BYTES/JS_STREAM_REPLICAS, "
                "raise the account limits, or create the stream outside the node (JS_STREAM_MANAGE=false)")
        field = {10074: ("num_replicas", "JS_STREAM_REPLICAS"), 10065: ("subjects", "JS_STREAM_SUBJECTS"),
                 10052: ("subjects", "JS_STREAM_SUBJECTS")}.get(code)
        if field is None:
            return exc  # e.g. a cluster not ready: may pass, retried
        return StreamConfigConflict(
            f"cannot create stream {self.stream}: {field[0]} ({field[1]}) is refused by NATS: {exc.description}")

    async def _reconcile_stream(self, js: JetStreamContext, info: api.StreamInfo,
                                want: api.StreamConfig) -> api.StreamInfo:
        have = info.config
        name = self.stream
        if val(have.storage) != val(want.storage):
            raise StreamConfigConflict(
                f"stream {name} has storage={val(have.storage)} but "
                f"JS_STREAM_STORAGE={self.cfg.js_stream_storage}: NATS cannot change a stream's storage "
                "(delete the stream, change JS_STREAM_STORAGE, or set JS_STREAM_MANAGE=false)")
        if val(have.retention) not in (None, "limits"):
            raise StreamConfigConflict(
                f"stream {name} has retention={val(have.retention)} but fan-out needs retention=limits "
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

    # -------------------------------------------------------------- consumer
    def wanted_consumer(self, start_after: int) -> api.ConsumerConfig:
        cfg = api.ConsumerConfig(
            name=self.consumer,
            durable_name=self.consumer,
            description=f"fanout node {self.cfg.node_name}",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=self.cfg.js_consumer_inactive,
            # Deliveries lost on the wire stay pending until their ack wait;
            # a small limit would stall the consumer meanwhile.
            max_ack_pending=max(20000, 16 * self.batch),
        )
        if start_after > 0:
            # Recreated while running (deleted, or removed as inactive): go on
            # from what was dispatched rather than from the stream's start.
            cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = start_after + 1
        return cfg

    async def ensure_consumer(self, js: JetStreamContext, start_after: int, *,
                              exclusive: bool = False) -> tuple[api.ConsumerInfo, bool]:
        """This node's durable (created when absent); returns (info, created).

        ``exclusive``: first refuse a durable that another live node pulls
        from (:func:`check_not_in_use`).
        """
        try:
            ci = await js.consumer_info(self.stream, self.consumer)
        except NotFoundError:
            ci = None
        if ci is not None:
            if exclusive:
                check_not_in_use(ci, self.stream)
            c = ci.config
            if val(c.ack_policy) != "explicit" or c.filter_subject or c.filter_subjects:
                log.warning("durable consumer has another config: recreating it",
                            extra={"fields": {"consumer": self.consumer}})
                await js.delete_consumer(self.stream, self.consumer)
                ci = None
            elif abs((c.inactive_threshold or 0.0) - self.cfg.js_consumer_inactive) > 1e-3:
                try:
                    ci = await js.add_consumer(self.stream,
                                               c.evolve(inactive_threshold=self.cfg.js_consumer_inactive))
                except nats.errors.TimeoutError:
                    # A user that may not create/update consumers (the durable
                    # was made outside the node, docs/managed-nats.md): use it
                    # as it is rather than refuse to start over a cleanup timer.
                    log.warning("cannot update the durable's inactive_threshold (JS_CONSUMER_INACTIVE): "
                                "using it as it is", extra={"fields": {"consumer": self.consumer}})
        if ci is None:
            try:
                ci = await js.add_consumer(self.stream, self.wanted_consumer(start_after))
            except APIError as exc:
                if (exc.err_code or 0) in LIMIT_CODES:
                    raise LimitExceeded(
                        f"cannot create consumer {self.consumer} on stream {self.stream}: the account's JetStream "
                        f"limits refuse it ({LIMIT_CODES[exc.err_code or 0]}: {exc.description})") from None
                raise
            log.info("JetStream consumer created", extra={"fields": {
                "consumer": self.consumer, "start_after": start_after}})
            return ci, True
        return ci, False
