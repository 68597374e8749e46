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

__all__ = ["Message", "Sink", "Broker", "PRIORITIES", "PRIORITY_NAMES", "DEFAULT_PRIORITY", "parse_priority",
           "header_priority", "History", "UNSET_PRIORITY"]

#: ``Fanout-Priority`` header values; throttled clients lose lower ones first.
PRIORITIES = {"low": 0, "medium": 1, "high": 2, "critical": 3}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
DEFAULT_PRIORITY = PRIORITIES["high"]
#: A message whose publisher set no priority: the hub's WS_PRIORITY_RULES decide (else high).
UNSET_PRIORITY = -1
PRIORITY_HEADER = "Fanout-Priority"

# Header values as publishers send them, so the ingest hot path is one dict
# lookup. Only str/None keys: an int key would also answer True (hash(True) == 1).
_KNOWN: dict[str | None, int] = {None: DEFAULT_PRIORITY, "": DEFAULT_PRIORITY}
for _name, _num in PRIORITIES.items():
    _KNOWN[_name] = _KNOWN[_name.upper()] = _KNOWN[_name.capitalize()] = _num


def parse_priority(value: str | bytes | int | None) -> int:
    """The one priority parser: a number from a header value, a name or a number.

    ``None`` and ``""`` mean the default (``high``); names are case- and
    space-insensitive; ints 0..3 pass (bool does not). Raises ValueError on
    anything else, with a message that starts with "priority".
    """
    if isinstance(value, str) or value is None:
        known = _KNOWN.get(value)
        if known is not None:
            return known
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
        if not value:
            return DEFAULT_PRIORITY
    if isinstance(value, str):
        num = PRIORITIES.get(value.strip().lower())
        if num is not None:
            return num
    elif isinstance(value, int) and not isinstance(value, bool) and value in PRIORITY_NAMES:
        return value
    raise ValueError(f"priority ({PRIORITY_HEADER}) must be one of {', '.join(PRIORITIES)}; got {value!r}")


def header_priority(headers: dict[str, str] | None) -> int:
    """Priority of a received message from its headers; an unknown value counts as the default,
    no header at all as :data:`UNSET_PRIORITY` (the subject rules decide).

    Lenient on purpose: a message already stored in the stream is delivered
    rather than dropped for a header its publisher got wrong.
    """
    if not headers:
        return UNSET_PRIORITY
    value = headers.get(PRIORITY_HEADER)
    if not value:
        return UNSET_PRIORITY
    known = _KNOWN.get(value)
    if known is not None:
        return known
    try:
        return parse_priority(value)
    except ValueError:
        return DEFAULT_PRIORITY


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

    def seed_latest(self, messages: list[Message]) -> int:
        """Seed the snapshot store (newest message per subject) with stored messages, in stream order.

        For a broker that can read the stream's last message per subject at
        start (JetStream). Nothing is fanned out and the dispatch order
        (``stream_seq`` floor) is untouched; a message never replaces a newer
        one of its subject. Returns how many were stored.
        """


    def seed_history(self, messages: list[Message], after: int) -> int:
        """Put stored messages ``after < stream_seq``, older than anything dispatched, into the
        resume memory, in stream order (a broker at start, JetStream). Returns how many were kept."""


class Broker(abc.ABC):
    """One source of messages for the hub."""

    #: ``"embedded"`` or ``"jetstream"``; shown in /health and logs.
    name: str = ""
    #: Whether :meth:`history` can return what the hub's memory no longer holds.
    keeps_history: bool = True

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while messages can flow (NATS connected; always for embedded)."""

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
