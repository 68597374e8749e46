"""Structured logs: one JSON object per line on stderr.

Call sites pass fields with ``log.info("event", extra={"fields": {...}})`` or
the :func:`event` shortcut; the formatter merges them into the line.

Lines a client can cause (its errors, its flooding) go through
:func:`limited_event` instead, so one hostile client cannot turn the log into
its amplifier: at most one line per ``(reason, who)`` key per 10 s and at most
:data:`GLOBAL_LINES` such lines per 10 s in all. What is held back is counted;
the next line of that key that gets out carries ``suppressed=N``, and every
held-back line counts in ``fanout_log_suppressed_total{reason}`` once a
counter is bound with :func:`bind_counter` (the server binds its own).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

__all__ = ["setup", "event", "logger", "limited_event", "bind_counter", "LogLimiter"]

logger = logging.getLogger("fanout")

PER_KEY_LINES = 1        # lines per key per interval
INTERVAL = 10.0          # seconds
GLOBAL_LINES = 100       # limited lines per interval, all keys together
MAX_KEYS = 100_000       # keys remembered; past it new keys share the global cap only


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every connection at INFO; ours are enough.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


def event(level: int, msg: str, *, exc_info: bool = False, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        # exc_info belongs to the record (the formatter writes "exc"), not to the fields.
        logger.log(level, msg, exc_info=exc_info, extra={"fields": fields})


class _Counter(Protocol):
    """What the limiter needs of a prometheus_client labelled Counter."""

    def labels(self, *values: str) -> Any: ...


class _Window:
    __slots__ = ("start", "lines", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.lines = 0
        self.suppressed = 0


class LogLimiter:
    """Fixed-window rate limit on log lines, per key and overall.

    A key is a tuple whose first element is the reason (a constant string: it
    becomes the metric's ``reason`` label, so it must not carry ids) and whose
    other elements say who (client id, peer, subject...). Within ``interval``
    seconds a key gets ``per_key`` lines and all keys together ``global_lines``;
    the rest are counted, not written. Memory: one small record per key seen in
    the last few intervals, at most ``max_keys`` (beyond that, new keys are
    limited by the global cap alone, and their held-back counts go only to the
    metric). Not thread-safe: call it from the event loop.
    """

    def __init__(self, *, per_key: int = PER_KEY_LINES, interval: float = INTERVAL,
                 global_lines: int = GLOBAL_LINES, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic, counter: _Counter | None = None) -> None:
        self.per_key = per_key
        self.interval = interval
        self.global_lines = global_lines
        self.max_keys = max_keys
        self.counter = counter
        self._clock = clock
        self._keys: dict[Hashable, _Window] = {}
        self._global = _Window(clock())
        self._swept = self._global.start
        self.suppressed_total = 0   # all lines held back since start (tests, /health)

    def allow(self, key: tuple[Hashable, ...]) -> int | None:
        """None when this line must be held back (and counts it); else the number of
        lines of this key held back since its last written line (0 when none)."""
        if not key or not isinstance(key[0], str):
            raise TypeError("log limiter key must be a tuple starting with a reason string")
        now = self._clock()
        if now - self._swept >= self.interval:
            self._sweep(now)
        g = self._global
        if now - g.start >= self.interval:
            g.start, g.lines = now, 0
        w = self._keys.get(key)
        if w is None and len(self._keys) < self.max_keys:
            w = self._keys[key] = _Window(now)
        if w is not None and now - w.start >= self.interval:
            w.start, w.lines = now, 0
        if g.lines >= self.global_lines or (w is not None and w.lines >= self.per_key):
            if w is not None:
                w.suppressed += 1
            self.suppressed_total += 1
            if self.counter is not None:
                self.counter.labels(key[0]).inc()
            return None
        g.lines += 1
        if w is None:
            return 0
        w.lines += 1
        held, w.suppressed = w.suppressed, 0
        return held

    def _sweep(self, now: float) -> None:
        # A key idle for a whole interval with nothing held back is forgotten; one
        # with a held-back count is kept a few intervals more so its next line can
        # still report it, then forgotten too (the metric has the count).
        self._swept = now
        keep_quiet, keep_held = self.interval, 6 * self.interval
        self._keys = {k: w for k, w in self._keys.items()
                      if now - w.start < (keep_held if w.suppressed else keep_quiet)}

    def event(self, key: tuple[Hashable, ...], level: int, msg: str, **fields: Any) -> bool:
        """:func:`event` under the limit; True when the line was written."""
        if not logger.isEnabledFor(level):
            return False   # a line nobody would see is neither written nor counted
        held = self.allow(key)
        if held is None:
            return False
        if held:
            fields["suppressed"] = held
        event(level, msg, **fields)
        return True


_limiter = LogLimiter()


def limiter_keys() -> int:
    """Keys the shared limiter remembers now (a gauge: at most MAX_KEYS)."""
    return len(_limiter._keys)


def bind_counter(counter: _Counter | None) -> None:
    """Count held-back lines of :func:`limited_event` in ``counter`` (labelled by reason)."""
    _limiter.counter = counter


def limited_event(key: tuple[Hashable, ...], level: int, msg: str, **fields: Any) -> bool:
    """A log line a client can cause: rate-limited per ``key`` = ``(reason, who...)``.

    At most one line per key per 10 s and :data:`GLOBAL_LINES` per 10 s in all;
    the next line of a key that gets out carries ``suppressed=N``. Returns True
    when the line was written.
    """
    return _limiter.event(key, level, msg, **fields)
