"""Bounded history of recently dispatched messages, for ``resume``, indexed by subject.

Like centrifuge's memory broker, which keeps a memstream per channel: the
window (a deque bounded by ``WS_HISTORY_SIZE`` messages and
``JS_STREAM_MAX_AGE`` seconds, evicted oldest first) is also split per
subject, so a catch-up reads only its own subjects' messages. Subjects are
found by a token trie (:class:`SubjectTrie`): an exact pattern is one dict
lookup, a wildcard walks only the branches it can match. A resume of five
subjects thus costs what it returns, whatever the window holds.

Completeness is judged per subject: each subject remembers the highest
``stream_seq`` of its that left the window (``lost``), so a client on quiet
subjects resumes completely after any absence. A subject whose last message
left keeps a tombstone (its ``lost``); tombstones are bounded by
``WS_HISTORY_SUBJECTS`` (the oldest loss forgotten first), and a forgotten
subject counts as lost up to the newest forgotten loss (``forgotten_upto``):
conservative, never wrong. Nothing at or below ``floor`` (the stream
position before the first message this memory saw: a JetStream node that
started mid-stream) is known here at all.

In embedded mode this is the whole retained stream; with JetStream it covers
the recent past, so most resumes never wait on NATS, and a resume that does
fetch from JetStream reads only what memory lacks on its subjects.
"""

from __future__ import annotations

import bisect
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, TypeVar

from .subjects import matches

__all__ = ["Entry", "MemoryStream", "LatestStore", "SubjectTrie", "View"]

V = TypeVar("V")
_seq = attrgetter("stream_seq")


@dataclass(slots=True)
class Entry:
    stream_seq: int
    subject: str
    tail: bytes      # the data message body after the per-client prefix
    priority: int
    at: float        # monotonic time of dispatch


def is_wildcard(pattern: str) -> bool:
    return "*" in pattern or ">" in pattern


class SubjectTrie(Generic[V]):
    """Values keyed by subject, found by NATS pattern in what the pattern can match.

    One dict per token prefix that has more than one subject below it: under a
    token, its child prefix (a dict), or, when only one subject lies below, that
    subject as a ``(subject, value)`` leaf (no dict for it: the common
    ``odin.token.<id>.update`` costs one slot of the ``odin.token`` dict); the
    value of a subject that ends at a token under ``"!" + token`` (``!`` is
    never in a token). ``odin.token.*.update`` walks ``odin`` -> ``token`` ->
    every child; it never looks at subjects of another prefix.
    """

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root: dict[str, Any] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, subject: str, value: V) -> None:
        toks = subject.split(".")
        last = len(toks) - 1
        node = self._root
        i = 0
        while True:
            t = toks[i]
            if i == last:
                key = sys.intern("!" + t)
                if key not in node:
                    self._size += 1
                node[key] = value
                return
            child = node.get(t)
            if child is None:
                node[t] = (subject, value)
                self._size += 1
                return
            if type(child) is tuple:
                if child[0] == subject:
                    node[t] = (subject, value)
                    return
                # A second subject below this prefix: give it a dict, the leaf one level down.
                d: dict[str, Any] = {}
                node[t] = d
                otoks = child[0].split(".")
                if i + 1 == len(otoks) - 1:
                    d[sys.intern("!" + otoks[i + 1])] = child[1]
                else:
                    d[otoks[i + 1]] = child
                child = d
            node = child
            i += 1

    def remove(self, subject: str) -> None:
        toks = subject.split(".")
        last = len(toks) - 1
        path: list[tuple[dict[str, Any], str]] = []
        node = self._root
        i = 0
        while True:
            t = toks[i]
            if i == last:
                if node.pop("!" + t, None) is None:
                    return
                break
            child = node.get(t)
            if child is None:
                return
            if type(child) is tuple:
                if child[0] != subject:
                    return
                del node[t]
                break
            path.append((node, t))
            node = child
            i += 1
        self._size -= 1
        while path and not node:                     # prune prefixes left empty
            parent, t = path.pop()
            del parent[t]
            node = parent

    def clear(self) -> None:
        self._root.clear()
        self._size = 0

    def match(self, pattern: str) -> list[V]:
        """Values of the subjects ``pattern`` matches (each once)."""
        toks = pattern.split(".")
        out: list[V] = []
        if not is_wildcard(pattern):
            node = self._root
            last = len(toks) - 1
            for i, t in enumerate(toks):
                if i == last:
                    v = node.get("!" + t)
                    if v is not None:
                        out.append(v)
                    break
                child = node.get(t)
                if child is None:
                    break
                if type(child) is tuple:
                    if child[0] == pattern:
                        out.append(child[1])
                    break
                node = child
            return out
        self._walk(self._root, pattern, toks, 0, out)
        return out

    def _walk(self, node: dict[str, Any], pattern: str, toks: list[str], i: int, out: list[V]) -> None:
        t = toks[i]
        last = i == len(toks) - 1
        if t == ">":                                # one or more tokens: the whole subtree
            stack = [node]
            while stack:
                n = stack.pop()
                for k, v in n.items():
                    if k[0] == "!":
                        out.append(v)
                    elif type(v) is tuple:
                        out.append(v[1])
                    else:
                        stack.append(v)
        elif t == "*":
            if last:
                out.extend(v for k, v in node.items() if k[0] == "!")
                return
            simple = i + 2 == len(toks) and not is_wildcard(toks[-1])
            key = "!" + toks[-1]
            for k, v in node.items():
                if k[0] == "!":
                    continue
                if type(v) is tuple:
                    if matches(pattern, v[0]):
                        out.append(v[1])
                elif simple:                        # a.*.b: one lookup per child
                    hit = v.get(key)
                    if hit is not None:
                        out.append(hit)
                else:
                    self._walk(v, pattern, toks, i + 1, out)
        elif last:
            v = node.get("!" + t)
            if v is not None:
                out.append(v)
        else:
            child = node.get(t)
            if child is None:
                return
            if type(child) is tuple:
                if matches(pattern, child[0]):
                    out.append(child[1])
            else:
                self._walk(child, pattern, toks, i + 1, out)


_NONE: list[Entry] = []     # the entries of a subject with none in the window


class _Subject:
    """One subject's part of the window: its entries (oldest first, from ``head``) and its losses."""

    __slots__ = ("subject", "entries", "head", "lost")

    def __init__(self, subject: str, lost: int) -> None:
        self.subject = subject
        self.entries: list[Entry] = _NONE
        self.head = 0                 # entries[:head] left the window (dropped lazily)
        self.lost = lost              # highest stream_seq of this subject that left the window


@dataclass(slots=True, eq=False)
class View:
    """What a catch-up reads: the subjects its patterns matched (see :meth:`MemoryStream.view`)."""

    patterns: list[str]
    subjects: list[_Subject]
    generation: int
    #: True when some pattern may match a subject this memory no longer indexes.
    forgotten: bool


class MemoryStream:
    def __init__(self, max_msgs: int, max_age: float, clock: Callable[[], float] = time.monotonic,
                 max_subjects: int = 100_000) -> None:
        self.max_msgs = max_msgs
        self.max_age = max_age
        self.max_subjects = max_subjects
        self.clock = clock
        self._q: deque[Entry] = deque()
        self._subjects: dict[str, _Subject] = {}
        self._trie: SubjectTrie[_Subject] = SubjectTrie()
        #: Subjects with nothing left in the window, oldest loss first (their ``lost`` ascending).
        self._tombs: dict[str, _Subject] = {}
        #: Highest stream_seq that has left the window, any subject (0: nothing lost yet).
        self.dropped_upto = 0
        #: Highest ``lost`` of a tombstone dropped for WS_HISTORY_SUBJECTS.
        self.forgotten_upto = 0
        #: The stream position before the first message seen (None: none seen yet).
        self.floor: int | None = None
        #: Changes whenever a subject is indexed or forgotten (a View made before is stale).
        self.generation = 0
        #: Entries and subjects examined by reads (catch-up cost; fanout_history_examined_total).
        self.examined = 0

    def __len__(self) -> int:
        return len(self._q)

    @property
    def subject_count(self) -> int:
        """Subjects indexed: with messages in the window, or tombstones."""
        return len(self._subjects)

    @property
    def tombstones(self) -> int:
        return len(self._tombs)

    def nbytes(self) -> int:
        """Bytes of the retained message bodies (a gauge; one pass, at scrape time)."""
        return sum(len(e.tail) for e in self._q)

    # ------------------------------------------------------------- writing
    def append(self, entry: Entry) -> None:
        if self.floor is None:
            self.floor = entry.stream_seq - 1
        subject = entry.subject
        rec = self._subjects.get(subject)
        if rec is None:
            # Never seen, or forgotten: it may have lost up to forgotten_upto.
            rec = self._subjects[subject] = _Subject(subject, self.forgotten_upto)
            self._trie.add(subject, rec)
            self.generation += 1
        if rec.head == len(rec.entries):            # new, or a tombstone back in the window
            self._tombs.pop(subject, None)
            rec.entries = [entry]
            rec.head = 0
        else:
            rec.entries.append(entry)
        self._q.append(entry)
        while len(self._q) > self.max_msgs:
            self._evict()
        self.expire(entry.at)

    def _evict(self) -> None:
        e = self._q.popleft()
        self.dropped_upto = e.stream_seq
        rec = self._subjects[e.subject]
        rec.lost = e.stream_seq
        rec.head += 1
        n = len(rec.entries)
        if rec.head == n:
            rec.entries = _NONE                     # (shared, never appended to)
            rec.head = 0
            self._tombs[rec.subject] = rec
            if len(self._tombs) > self.max_subjects:
                self._forget()
        elif rec.head > 16 and rec.head * 2 > n:
            del rec.entries[:rec.head]
            rec.head = 0

    def _forget(self) -> None:
        subject = next(iter(self._tombs))
        rec = self._tombs.pop(subject)
        del self._subjects[subject]
        self._trie.remove(subject)
        self.forgotten_upto = max(self.forgotten_upto, rec.lost)
        self.generation += 1

    def prepend(self, entries: list[Entry], after: int) -> int:
        """Older messages, ``after < stream_seq``, in stream order, read at start from the
        stream (JetStream: what this process did not dispatch itself, up to its floor):
        memory then answers for the stream from ``after`` on. Kept within the bounds
        (the newest ones; what does not fit or is too old moves ``floor`` up instead).
        Refused (0) once something has left memory: eviction must stay oldest first."""
        if self.floor is not None:
            if self.dropped_upto > self.floor:
                return 0
            entries = [e for e in entries if e.stream_seq <= self.floor]
        room = self.max_msgs - len(self._q)
        if room <= 0 or not entries:
            return 0
        if len(entries) > room:
            after = entries[-room - 1].stream_seq
            entries = entries[-room:]
        limit = self.clock() - self.max_age
        i = 0
        while i < len(entries) and entries[i].at < limit:
            after = entries[i].stream_seq                 # too old: as if it had left memory
            i += 1
        entries = entries[i:]
        if not entries:
            return 0
        groups: dict[str, list[Entry]] = {}
        for e in entries:
            groups.setdefault(e.subject, []).append(e)
        for subject, group in groups.items():
            rec = self._subjects.get(subject)
            if rec is None:
                rec = self._subjects[subject] = _Subject(subject, self.forgotten_upto)
                self._trie.add(subject, rec)
            else:
                self._tombs.pop(subject, None)
            rec.entries = group + rec.entries[rec.head:]
            rec.head = 0
        self._q.extendleft(reversed(entries))
        self.floor = after
        self.generation += 1
        return len(entries)

    def expire(self, now: float | None = None) -> None:
        limit = (self.clock() if now is None else now) - self.max_age
        q = self._q
        while q and q[0].at < limit:
            self._evict()

    def reset(self) -> None:
        """Forget everything (the stream was recreated)."""
        self._q.clear()
        self._subjects.clear()
        self._trie.clear()
        self._tombs.clear()
        self.dropped_upto = 0
        self.forgotten_upto = 0
        self.floor = None
        self.generation += 1

    # ------------------------------------------------------------- reading
    def view(self, patterns: list[str]) -> View:
        """The subjects ``patterns`` match, for :meth:`lost` and :meth:`take` (costs the subjects matched)."""
        found: dict[str, _Subject] = {}
        forgotten = False
        for p in patterns:
            wild = is_wildcard(p)
            hit = False
            for rec in self._trie.match(p):
                found[rec.subject] = rec
                hit = True
            if wild or not hit:
                forgotten = True
        self.examined += len(found)
        return View(list(patterns), list(found.values()), self.generation, forgotten)

    def fresh(self, view: View) -> View:
        """``view``, matched again if subjects were indexed or forgotten since."""
        return view if view.generation == self.generation else self.view(view.patterns)

    def lost(self, view: View, after: int) -> int:
        """The highest stream_seq this memory lacks on the view's subjects: above ``after``
        when some message after ``after`` left the window (or was never seen here); else
        at most ``after``. ``complete`` holds for memory alone iff ``lost(...) <= after``."""
        floor = self.floor
        if floor is None:
            # Nothing seen yet: nothing is known beyond what was dispatched (nothing).
            return 0
        worst = floor
        if view.forgotten and self.forgotten_upto > worst:
            worst = self.forgotten_upto
        for rec in view.subjects:
            if rec.lost > worst:
                worst = rec.lost
        self.examined += len(view.subjects)
        return worst

    def take(self, view: View, after: int, upto: int | None = None) -> list[Entry]:
        """The view's entries with ``after < stream_seq (<= upto)`` in the window, in stream order.

        Costs the smaller of: the view's subjects (a bisect each) and what it
        returns; or the window's entries after ``after`` (a set lookup each),
        read instead when the view has more subjects than that (a wildcard
        over most of the window)."""
        q = self._q
        subjects = view.subjects
        if not q or q[-1].stream_seq <= after or not subjects:
            self.examined += len(subjects)
            return []
        newer = q[-1].stream_seq - after          # at least the window's entries after ``after``
        if len(subjects) * 4 > newer or len(subjects) * 4 > len(q):
            return self._take_window(view, after, upto)
        parts: list[list[Entry]] = []
        n = 0
        for rec in subjects:
            ents = rec.entries
            hi = len(ents)
            if hi == rec.head or ents[-1].stream_seq <= after:
                continue
            lo = bisect.bisect_right(ents, after, rec.head, hi, key=_seq)
            if upto is not None:
                hi = bisect.bisect_right(ents, upto, lo, hi, key=_seq)
            if hi > lo:
                parts.append(ents[lo:hi])
                n += hi - lo
        self.examined += n + len(subjects)
        if not parts:
            return []
        if len(parts) == 1:
            return parts[0]
        out = [e for part in parts for e in part]
        out.sort(key=_seq)
        return out

    def _take_window(self, view: View, after: int, upto: int | None) -> list[Entry]:
        """:meth:`take` by reading the window from ``after`` (for views of many subjects)."""
        q = self._q
        names = {rec.subject for rec in view.subjects}
        i = bisect.bisect_right(q, after, key=_seq)
        out = []
        n = len(q)
        self.examined += n - i
        while i < n:
            e = q[i]
            if upto is not None and e.stream_seq > upto:
                break
            if e.subject in names:
                out.append(e)
            i += 1
        return out

    def since(self, after: int, patterns: list[str], upto: int | None = None) -> list[Entry]:
        """Entries with after < stream_seq (<= upto) on subjects matching any pattern, in order."""
        return self.take(self.view(patterns), after, upto)

    def covers(self, after: int, patterns: list[str]) -> bool:
        """True when every message after ``after`` on ``patterns`` that was dispatched is still here."""
        self.expire()
        return self.lost(self.view(patterns), after) <= after

    def stats(self) -> dict[str, int]:
        return {"messages": len(self._q), "subjects": len(self._subjects), "tombstones": len(self._tombs),
                "examined": self.examined}


class LatestStore:
    """The newest dispatched message of each subject, for ``subscribe`` with
    ``snapshot: true`` (PROTOCOL.md 1.1).

    Bounded by ``max_subjects`` (``WS_SNAPSHOT_MAX_SUBJECTS``): the subject
    updated least recently is evicted first, so iteration order is oldest
    update first, the order a snapshot is delivered in. A lookup by exact
    subject is a dict hit; a wildcard pattern walks a :class:`SubjectTrie`
    of the stored subjects, so it costs the subjects it can match.
    """

    def __init__(self, max_subjects: int) -> None:
        self.max_subjects = max_subjects
        self._d: OrderedDict[str, Entry] = OrderedDict()
        self._trie: SubjectTrie[str] = SubjectTrie()
        #: Subjects examined by wildcard lookups (fanout_history_examined_total counts them too).
        self.examined = 0

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
        else:
            self._trie.add(e.subject, e.subject)
        d[e.subject] = e
        if len(d) > self.max_subjects:
            gone, _ = d.popitem(last=False)
            self._trie.remove(gone)
        return True

    def clear(self) -> None:
        self._d.clear()
        self._trie.clear()

    def matching(self, patterns: list[str]) -> list[Entry]:
        """The newest entry of every subject matching any pattern, oldest update first."""
        d = self._d
        found: dict[str, Entry] = {}
        for p in patterns:
            for subject in self._trie.match(p):
                self.examined += 1
                e = d.get(subject)
                if e is not None:
                    found[subject] = e
        return sorted(found.values(), key=_seq)
