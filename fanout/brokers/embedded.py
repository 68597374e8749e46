"""The embedded bus: no NATS; ``POST /publish/<subject>`` feeds the hub directly.

``stream_seq`` is a node-local counter and the epoch changes at every start
(PROTOCOL.md). Retention for ``resume`` is the hub's memory stream (bounded by
``WS_HISTORY_SIZE`` and ``JS_STREAM_MAX_AGE``), so this broker keeps no
history of its own: whatever the hub's memory no longer covers is gone.
"""

from __future__ import annotations

import time

from ..config import Config
from .base import UNSET_PRIORITY, Broker, History, Message, Sink

__all__ = ["EmbeddedBroker", "NotRunning"]


class NotRunning(RuntimeError):
    """Publish while the node is starting or draining."""


class EmbeddedBroker(Broker):
    name = "embedded"
    keeps_history = False      # the hub's memory is the whole retained stream

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._sink: Sink | None = None
        self._seq = 0

    @property
    def ready(self) -> bool:
        return self._sink is not None

    async def start(self, sink: Sink) -> None:
        self._sink = sink

    async def stop(self) -> None:
        self._sink = None

    async def publish(self, subject: str, payload: bytes, priority: int = UNSET_PRIORITY,
                      msg_id: str | None = None) -> int:
        return self.publish_now(subject, payload, priority)

    def publish_now(self, subject: str, payload: bytes, priority: int = UNSET_PRIORITY) -> int:
        if self._sink is None:
            raise NotRunning("node is not accepting publishes")
        self._seq += 1
        self._sink.dispatch(Message(subject, payload, self._seq, int(time.time() * 1000), priority))
        return self._seq

    async def history(self, patterns: list[str], after: int, upto: int) -> History:
        return History([], complete=False)
