"""The compiled core against the plain-Python reference model (hypothesis).

Random subscribe / unsubscribe / disconnect / publish / replay sequences must
give the same recipients, seqs, queued bytes and replay results.
"""

from __future__ import annotations

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
    def __init__(self) -> None:
        super().__init__()
        self.core = Core(CAPACITY, replay_size=REPLAY, queue_limit=1 << 30)
        self.ref = RefCore(CAPACITY, replay_size=REPLAY)
        self.slots: list[int] = []
        self.n = 0

    @precondition(lambda self: len(self.slots) < CAPACITY)
    @rule()
    def connect(self) -> None:
        a = self.core.add_client(-1)
        b = self.ref.add_client()
        assert a == b
        self.slots.append(a)

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, 10_000))
    def disconnect(self, i: int) -> None:
        slot = self.slots.pop(i % len(self.slots))
        self.core.remove_client(slot)
        self.ref.remove_client(slot)

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

    @invariant()
    def same_seqs_and_bytes(self) -> None:
        for slot in self.slots:
            assert self.core.seq(slot) == self.ref.seqs[slot]
        assert self.core.take_dirty() == self.ref.take_dirty()


TestCoreVsModel = CoreVsModel.TestCase
TestCoreVsModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
