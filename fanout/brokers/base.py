"""The ingest side: where published messages come from.

A broker feeds :class:`Message` objects, in stream order, to a :class:`Sink`
(the hub). Two implementations: :mod:`.embedded` (the node's own in-memory bus,
fed by ``POST /publish``) and :mod:`.jetstream` (NATS JetStream). The hub does
not care which one runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Message", "Sink", "Broker", "PRIORITIES", "parse_priority", "History"]

#: ``Fanout-Priority`` header values; throttled clients lose lower ones first.
PRIORITIES = {"low": 0, "medium": 1, "high": 2, "critical": 3}
DEFAULT_PRIORITY = PRIORITIES["high"]


def parse_priority(value: str | bytes | None) -> int:
    """Priority number from a header value; raises ValueError on an unknown one."""
    if value is None or value == "" or value == b"":
        return DEFAULT_PRIORITY
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return PRIORITIES[value.strip().lower()]
    except KeyError:
        raise ValueError(f"Fanout-Priority must be one of {', '.join(PRIORITIES)}; got {value!r}") from None


@dataclass(slots=True)
class Message:
    subject: str
    payload: bytes
    stream_seq: int
    ts_ms: int
    priority: int = DEFAULT_PRIORITY


@dataclass(slots=True)
class History:
    """What a broker returns for a resume: messages after ``after`` and whether that is all of them."""

    messages: list[Message]
    complete: bool


class Sink(Protocol):
    """What a broker feeds: the hub."""

    def dispatch(self, msg: Message) -> int:
        """Accept ``msg`` for fan-out; returns 1, or -1 for a duplicate.

        Synchronous: once it returns, the message is in the node's hands (it
        is queued for every subscriber before the loop's next flush), so a
        broker may ack it. Messages must come in increasing ``stream_seq``
        order; one at or below the last dispatched is a duplicate and dropped.
        """

    def set_epoch(self, epoch: str) -> None:
        """The stream incarnation changed (or is first known)."""

    @property
    def last_stream_seq(self) -> int:
        """Highest ``stream_seq`` dispatched so far (0 if none)."""


class Broker(abc.ABC):
    """One source of messages for the hub."""

    #: ``"embedded"`` or ``"jetstream"``; shown in /health and logs.
    name: str = ""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while messages can flow (NATS connected; always for embedded)."""

    @property
    @abc.abstractmethod
    def epoch(self) -> str:
        """The stream incarnation; changes when the stream is recreated."""

    @abc.abstractmethod
    async def start(self, sink: Sink) -> None:
        """Begin feeding ``sink``. Returns once started (need not be connected)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop feeding; ack what was dispatched; close connections."""

    @abc.abstractmethod
    async def publish(self, subject: str, payload: bytes, priority: int = DEFAULT_PRIORITY,
                      msg_id: str | None = None) -> int:
        """Publish one message; returns its ``stream_seq`` once stored."""

    @abc.abstractmethod
    async def history(self, patterns: list[str], after: int, upto: int) -> History:
        """Stored messages with ``after < stream_seq <= upto`` on subjects matching any
        of ``patterns``, in order. ``complete`` is False when retention no longer
        reaches back to ``after + 1``."""

    def status(self) -> dict[str, object]:
        """Extra fields for /health (connection state, stream, consumer)."""
        return {"broker": self.name, "ready": self.ready}
