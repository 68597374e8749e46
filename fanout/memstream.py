"""Bounded history of recently dispatched messages, for ``resume``.

Like centrifuge's memstream: a deque bounded by count and age. In embedded
mode it is the whole retained stream; with JetStream it covers the recent
past, so most resumes (a reconnect seconds later) never wait on NATS, and a
resume that does fetch from JetStream catches up from here without a gap.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from .subjects import matches, matches_any

__all__ = ["Entry", "MemoryStream", "LatestStore"]


@dataclass(slots=True)
class Entry:
    stream_seq: int
    subject: str
    tail: bytes      # the data message body after the per-client prefix
    priority: int
    at: float        # monotonic time of dispatch


class MemoryStream:
    def __init__(self, max_msgs: int, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_msgs = max_msgs
        self.max_age = max_age
        self.clock = clock
        self._q: deque[Entry] = deque()
        #: Highest stream_seq that has left the window (0: nothing lost yet).
        self.dropped_upto = 0

    def __len__(self) -> int:
        return len(self._q)

    def nbytes(self) -> int:
        """Bytes of the retained message bodies (a gauge; one pass, at scrape time)."""
        return sum(len(e.tail) for e in self._q)

    def append(self, entry: Entry) -> None:
        if self.max_msgs <= 0:
            self.dropped_upto = entry.stream_seq
            return
        self._q.append(entry)
        if len(self._q) > self.max_msgs:
            self.dropped_upto = self._q.popleft().stream_seq
        self.expire(entry.at)

    def expire(self, now: float | None = None) -> None:
        limit = (self.clock() if now is None else now) - self.max_age
        q = self._q
        while q and q[0].at < limit:
            self.dropped_upto = q.popleft().stream_seq

    def reset(self) -> None:
        """Forget everything (the stream was recreated)."""
        self._q.clear()
        self.dropped_upto = 0

    def covers(self, after: int) -> bool:
        """True when every message with stream_seq > after that was dispatched is still here."""
        self.expire()
        return after >= self.dropped_upto

    def since(self, after: int, patterns: list[str], upto: int | None = None) -> list[Entry]:
        """Entries with after < stream_seq (<= upto) on subjects matching any pattern, in order."""
        # Walk back from the newest: a reconnecting client is usually only a
        # few messages behind, so this costs what it returns, not the window.
        out = []
        for e in reversed(self._q):
            if e.stream_seq <= after:
                break
            if upto is not None and e.stream_seq > upto:
                continue
            if matches_any(patterns, e.subject):
                out.append(e)
        out.reverse()
        return out

    def scan(self, after: int, patterns: list[str], limit: int | None) -> tuple[list[Entry], int]:
        """Up to ``limit`` entries after ``after`` matching any pattern, oldest
        first, and the stream_seq scanned up to (``after`` when nothing is
        newer): the next call continues from there. A paced catch-up reads
        memory this way, a chunk at a time, whatever the window holds."""
        q = self._q
        i = bisect.bisect_right(q, after, key=lambda e: e.stream_seq)
        out: list[Entry] = []
        scanned = after
        n = len(q)
        while i < n:
            e = q[i]
            scanned = e.stream_seq
            if matches_any(patterns, e.subject):
                out.append(e)
                if limit is not None and len(out) >= limit:
                    break
            i += 1
        return out, scanned


class LatestStore:
    """The newest dispatched message of each subject, for ``subscribe`` with
    ``snapshot: true`` (PROTOCOL.md 1.1).

    Bounded by ``max_subjects`` (``WS_SNAPSHOT_MAX_SUBJECTS``): the subject
    updated least recently is evicted first, so iteration order is oldest
    update first, the order a snapshot is delivered in. A lookup by exact
    subject is a dict hit; a wildcard pattern scans the subjects that start
    with its literal prefix (``odin.token.`` for ``odin.token.*.update``).
    """

    def __init__(self, max_subjects: int) -> None:
        self.max_subjects = max_subjects
        self._d: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def nbytes(self) -> int:
        """Bytes of the kept message bodies (a gauge; one pass, at scrape time)."""
        return sum(len(e.tail) for e in self._d.values())

    def put(self, e: Entry) -> bool:
        """Keep ``e`` as its subject's newest; False (and nothing changes) when the
        store is off or already holds that subject at this or a later stream_seq."""
        if self.max_subjects <= 0:
            return False
        d = self._d
        have = d.get(e.subject)
        if have is not None:
            if have.stream_seq >= e.stream_seq:
                return False
            d.move_to_end(e.subject)
        d[e.subject] = e
        if len(d) > self.max_subjects:
            d.popitem(last=False)
        return True

    def clear(self) -> None:
        self._d.clear()

    def matching(self, patterns: list[str]) -> list[Entry]:
        """The newest entry of every subject matching any pattern, oldest update first."""
        d = self._d
        found: dict[str, Entry] = {}
        for p in patterns:
            if "*" not in p and ">" not in p:
                e = d.get(p)
                if e is not None:
                    found[p] = e
                continue
            literal = p.split("*", 1)[0].split(">", 1)[0]
            for subject, e in d.items():
                if subject.startswith(literal) and subject not in found and matches(p, subject):
                    found[subject] = e
        return sorted(found.values(), key=lambda e: e.stream_seq)
