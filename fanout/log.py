"""Structured logs: one JSON object per line on stderr.

Call sites pass fields with ``log.info("event", extra={"fields": {...}})`` or
the :func:`event` shortcut; the formatter merges them into the line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["setup", "event", "logger"]

logger = logging.getLogger("fanout")


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
