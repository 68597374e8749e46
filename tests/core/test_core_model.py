"""The compiled core against the plain-Python reference model (hypothesis).

Random subscribe / unsubscribe / disconnect / publish / replay sequences must
give the same recipients, seqs, queued bytes and replay results, whichever
form (sorted array or bitset) each recipient set is in; and the core's set
memory returns to zero whenever nobody is subscribed. The bytes are
checked as they arrive on real sockets (socketpairs) after ``flush()``, with
one flush thread and with three (``parallel_min=1``, so every flush uses all
of them).
"""

from __future__ import annotations

import socket

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fanout_core import Core
from tests.core.reference import RefCore

CAPACITY = 70          # > 64, so bitsets span two words
REPLAY = 5

TOKENS = st.sampled_from(["a", "b", "c"])
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=3).map(".".join)
PATTERNS = st.one_of(
    SUBJECTS,
    st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=3).map(".".join),
    st.lists(st.sampled_from(["a", "b", "*"]), min_size=0, max_size=2).map(lambda t: ".".join([*t, ">"])),
)


class CoreVsModel(RuleBasedStateMachine):
    THREADS = 1

    def __init__(self) -> None:
        super().__init__()
        self.core = Core(CAPACITY, replay_size=REPLAY, queue_limit=1 << 30,
                         flush_threads=self.THREADS, parallel_min=1)
        self.ref = RefCore(CAPACITY, replay_size=REPLAY)
        self.slots: list[int] = []
        self.socks: dict[int, tuple[socket.socket, socket.socket]] = {}
        self.n = 0

    def teardown(self) -> None:
        for a, b in self.socks.values():
            a.close()
            b.close()

    @precondition(lambda self: len(self.slots) < CAPACITY)
    @rule()
    def connect(self) -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        a = self.core.add_client(ours.fileno())
        b = self.ref.add_client()
        assert a == b
        self.slots.append(a)
        self.socks[a] = (ours, theirs)

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 10_000))
    def disconnect(self, i: int) -> None:
        slot = self.slots.pop(i % len(self.slots))
        self.core.remove_client(slot)
        self.ref.remove_client(slot)
        for s in self.socks.pop(slot):
            s.close()

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 10_000), pattern=PATTERNS)
    def subscribe(self, i: int, pattern: str) -> None:
        slot = self.slots[i % len(self.slots)]
        assert self.core.subscribe(slot, pattern) == self.ref.subscribe(slot, pattern)

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 10_000), pattern=PATTERNS)
    def unsubscribe(self, i: int, pattern: str) -> None:
        slot = self.slots[i % len(self.slots)]
        assert self.core.unsubscribe(slot, pattern) == self.ref.unsubscribe(slot, pattern)

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 10_000), pattern=PATTERNS)
    def resubscribe_all(self, i: int, pattern: str) -> None:
        # Many clients on one pattern: exercises the shared-pattern paths.
        for slot in self.slots[: 1 + i % len(self.slots)]:
            assert self.core.subscribe(slot, pattern) == self.ref.subscribe(slot, pattern)

    @rule(subject=SUBJECTS)
    def publish(self, subject: str) -> None:
        self.n += 1
        tail = b'"type":"message","channel":"%s","stream_seq":%d,"data":%s}' % (
            subject.encode(), self.n, b"x" * (self.n % 200))
        assert sorted(self.core.recipients(subject)) == self.ref.recipients(subject)
        assert self.core.publish(subject, tail) == self.ref.publish(subject, tail)

    @rule(subjects=st.lists(SUBJECTS, min_size=1, max_size=70))
    def publish_batch(self, subjects: list[str]) -> None:
        tails = []
        for subject in subjects:
            self.n += 1
            tails.append(b'"type":"message","channel":"%s","stream_seq":%d}' % (subject.encode(), self.n))
        want = sum(self.ref.publish(s, t) for s, t in zip(subjects, tails, strict=True))
        assert self.core.publish_batch(subjects, tails, [2] * len(subjects)) == want

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 10_000), a=st.integers(1, 40), span=st.integers(0, 10))
    def replay(self, i: int, a: int, span: int) -> None:
        slot = self.slots[i % len(self.slots)]
        got = self.core.replay(slot, a, a + span)
        want = self.ref.replay(slot, a, a + span)
        assert (got[0], got[1]) == want

    def _read(self, slot: int) -> bytes:
        out = bytearray()
        theirs = self.socks[slot][1]
        while True:
            try:
                chunk = theirs.recv(1 << 16)
            except BlockingIOError:
                return bytes(out)
            out += chunk

    @invariant()
    def memory_follows_subscriptions(self) -> None:
        # CAPACITY 70: two bitset words, so a set turns dense above 4 members
        # and back at 2; resubscribe_all pushes sets across both ways.
        words = (CAPACITY + 63) // 64
        held = self.core.pattern_count + self.core.route_count
        assert self.core.set_bytes <= held * words * 8
        if not any(self.core.subscriptions(s) for s in self.slots):
            assert (self.core.pattern_count, self.core.route_count, self.core.set_bytes) == (0, 0, 0)

    @invariant()
    def same_seqs_and_bytes(self) -> None:
        for slot in self.slots:
            assert self.core.seq(slot) == self.ref.seqs[slot]
        blocked, dead = self.core.flush()
        assert dead is None
        got = {s: self._read(s) for s in self.slots}
        for slot in blocked or []:          # a full socket: read, write the rest (bounded)
            for _ in range(1000):
                r = self.core.flush_slot(slot)
                got[slot] += self._read(slot)
                if r == 0:
                    break
            assert self.core.queued(slot) == 0
        assert {s: b for s, b in got.items() if b} == self.ref.take_dirty()


class CoreVsModel3(CoreVsModel):
    THREADS = 3


SETTINGS = settings(max_examples=100, stateful_step_count=60, deadline=None)
TestCoreVsModel = CoreVsModel.TestCase
TestCoreVsModel.settings = SETTINGS
TestCoreVsModel3Threads = CoreVsModel3.TestCase
TestCoreVsModel3Threads.settings = SETTINGS
