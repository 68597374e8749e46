"""The resume memory alone (fanout/memstream.py): reads cost what they return
(counted in ``examined``, not timed), completeness is judged per subject, and
every store is bounded."""

from __future__ import annotations

import random

import pytest

from fanout.memstream import Entry, LatestStore, MemoryStream, SubjectTrie
from fanout.subjects import matches


def entry(seq: int, subject: str, at: float = 0.0) -> Entry:
    return Entry(seq, subject, b"x", 2, at)


def window(n: int = 9000, subjects: int = 20000, rate: float = 300.0, seed: int = 1) -> tuple[MemoryStream, float]:
    """A full 30 s window: ``n`` messages at ``rate`` msg/s over ``subjects`` subjects."""
    ms = MemoryStream(10000, 30.0, clock=lambda: 0.0)
    rng = random.Random(seed)
    t = 0.0
    for seq in range(1, n + 1):
        t += 1.0 / rate
        ms.append(entry(seq, f"odin.token.s{rng.randrange(subjects)}.update", t))
    return ms, t


def test_a_resume_of_five_subjects_examines_what_it_returns_not_the_window():
    ms, _ = window()
    assert len(ms) == 9000
    subjects = [f"odin.token.s{j}.update" for j in (1, 2, 3, 4, 5)]
    before = ms.examined
    view = ms.view(subjects)
    got = ms.take(view, 0)
    assert ms.lost(view, 0) == 0
    # The old scan tested all 9,000; now: each subject once (view, take) plus what is returned.
    assert ms.examined - before <= 2 * len(subjects) + len(got)
    assert [e.stream_seq for e in got] == sorted(e.stream_seq for e in got)
    assert all(e.subject in subjects for e in got)
    # Same answer as testing every message.
    assert got == [e for e in ms._q if e.subject in subjects]


def test_a_wildcard_over_most_subjects_costs_the_window_at_most_once():
    ms, _ = window(2000, subjects=200)
    before = ms.examined
    got = ms.since(0, ["odin.token.*.update"])
    assert len(got) == 2000
    assert ms.examined - before <= 2000 + 2 * 200


def test_take_with_upto_and_after_in_the_middle():
    ms = MemoryStream(100, 30.0, clock=lambda: 0.0)
    for seq in range(1, 21):
        ms.append(entry(seq, "a.b" if seq % 2 else "a.c"))
    assert [e.stream_seq for e in ms.since(10, ["a.b"], upto=15)] == [11, 13, 15]
    assert [e.stream_seq for e in ms.since(10, ["a.*"], upto=14)] == [11, 12, 13, 14]
    assert [e.stream_seq for e in ms.since(18, ["a.>", "a.b"])] == [19, 20]


def test_a_quiet_subject_is_complete_after_an_absence_longer_than_the_window():
    now = [0.0]
    ms = MemoryStream(10000, 30.0, clock=lambda: now[0])
    ms.append(entry(1, "odin.token.quiet.update", 0.0))
    after = 1                                  # the client got it, then left for 100 s
    seq = 1
    for t in range(1, 100):
        seq += 1
        ms.append(entry(seq, f"odin.token.busy{t % 7}.update", float(t)))
    now[0] = 100.0
    ms.expire()
    assert ms.dropped_upto > after             # the window moved far past the client
    view = ms.view(["odin.token.quiet.update"])
    assert ms.lost(view, after) <= after       # but its subject lost nothing after it
    assert ms.covers(after, ["odin.token.quiet.update"])
    # A subject that lost messages after ``after`` is not complete.
    busy = ms.view(["odin.token.busy3.update"])
    assert ms.lost(busy, after) > after
    assert not ms.covers(after, ["odin.token.*.update"])


def test_a_subject_that_lost_some_messages_reports_its_own_highest_loss():
    ms = MemoryStream(5, 30.0, clock=lambda: 0.0)
    for seq in range(1, 11):
        ms.append(entry(seq, "a.x" if seq <= 3 or seq == 8 else "a.y"))
    # a.x: 1..3 left the window, 8 is still there; a.y: 4..5 left, 6,7,9,10 there.
    assert ms.lost(ms.view(["a.x"]), 0) == 3
    assert ms.lost(ms.view(["a.y"]), 0) == 5
    assert ms.lost(ms.view(["a.y"]), 5) == 5      # <= after: complete from 5 on
    assert [e.stream_seq for e in ms.since(3, ["a.x"])] == [8]


def test_tombstones_are_bounded_and_a_forgotten_subject_counts_as_lost():
    ms = MemoryStream(1, 30.0, clock=lambda: 0.0, max_subjects=3)
    for seq in range(1, 11):
        ms.append(entry(seq, f"t.s{seq}"))      # each evicts the one before: a tombstone
    assert len(ms) == 1
    assert ms.tombstones == 3                   # s7..s9 remembered, s10 in the window
    assert ms.subject_count == 4
    assert ms.forgotten_upto == 6               # s1..s6 forgotten, the newest of those at 6
    # A remembered subject is judged by its own loss; a forgotten one conservatively.
    assert ms.lost(ms.view(["t.s8"]), 7) == 8
    assert ms.lost(ms.view(["t.s2"]), 5) == 6   # forgotten (it lost 2): counts as lost up to 6
    assert ms.lost(ms.view(["t.s2"]), 6) <= 6
    assert ms.lost(ms.view(["t.never"]), 6) <= 6
    # A forgotten subject that comes back starts with the forgotten loss.
    ms.append(entry(11, "t.s1"))
    assert ms.lost(ms.view(["t.s1"]), 0) == 6   # not 0: it lost seq 1, and 6 was the newest forgotten loss


def test_the_floor_makes_what_came_before_the_first_message_unknown():
    ms = MemoryStream(100, 30.0, clock=lambda: 0.0)
    ms.append(entry(101, "a.b"))                # a node that started mid-stream
    assert ms.floor == 100
    assert ms.lost(ms.view(["a.b"]), 50) == 100
    assert ms.lost(ms.view(["a.b"]), 100) == 100
    ms.reset()
    assert ms.floor is None and ms.subject_count == 0


def test_memory_off_still_judges_per_subject():
    ms = MemoryStream(0, 30.0, clock=lambda: 0.0)
    ms.append(entry(1, "a.b"))
    ms.append(entry(2, "a.c"))
    assert len(ms) == 0
    assert ms.lost(ms.view(["a.b"]), 0) == 1
    assert ms.lost(ms.view(["a.b"]), 1) == 1    # nothing after 1 on a.b: complete
    assert ms.lost(ms.view(["a.c"]), 1) == 2


def test_the_index_follows_eviction_and_stays_bounded_by_the_window():
    ms = MemoryStream(100, 30.0, clock=lambda: 0.0, max_subjects=50)
    rng = random.Random(3)
    for seq in range(1, 5001):
        ms.append(entry(seq, f"x.{rng.randrange(400)}.y"))
    assert len(ms) == 100
    assert ms.subject_count <= 100 + 50
    assert ms.tombstones <= 50
    live = {e.subject for e in ms._q}
    for s in live:
        got = ms.since(0, [s])
        assert got == [e for e in ms._q if e.subject == s]


@pytest.mark.parametrize("pattern", ["a.*", "a.>", "*.b.*", "a.*.c", ">", "a.b", "*", "a.b.>", "*.*.c", "x.>"])
def test_the_trie_matches_exactly_what_the_matcher_matches(pattern):
    rng = random.Random(pattern)
    toks = ["a", "b", "c", "d"]
    subjects = {".".join(rng.choice(toks) for _ in range(rng.randint(1, 4))) for _ in range(300)}
    trie: SubjectTrie[str] = SubjectTrie()
    for s in subjects:
        trie.add(s, s)
    removed = set(rng.sample(sorted(subjects), 60))
    for s in removed:
        trie.remove(s)
    left = subjects - removed
    assert len(trie) == len(left)
    assert sorted(trie.match(pattern)) == sorted(s for s in left if matches(pattern, s))


def test_trie_removal_prunes_empty_prefixes():
    trie: SubjectTrie[int] = SubjectTrie()
    trie.add("a.b.c", 1)
    trie.add("a.b", 2)
    trie.remove("a.b.c")
    assert trie.match("a.>") == [2]
    trie.remove("a.b")
    assert trie._root == {} and len(trie) == 0


def test_snapshot_store_wildcards_walk_only_matching_subjects():
    ls = LatestStore(100000)
    for i in range(5000):
        ls.put(entry(i + 1, f"odin.token.s{i}.update"))
        ls.put(entry(100000 + i, f"odin.other.s{i}.update"))
    before = ls.examined
    got = ls.matching(["odin.token.s7.*"])
    assert [e.subject for e in got] == ["odin.token.s7.update"]
    assert ls.examined - before == 1
    got = ls.matching(["odin.token.*.update"])
    assert len(got) == 5000 and [e.stream_seq for e in got] == sorted(e.stream_seq for e in got)


def test_snapshot_store_bound_keeps_its_index_in_step():
    ls = LatestStore(3)
    for i in range(1, 7):
        ls.put(entry(i, f"a.s{i}"))
    assert len(ls) == 3 and len(ls._trie) == 3
    assert [e.stream_seq for e in ls.matching(["a.*"])] == [4, 5, 6]


def test_prepend_fills_memory_below_its_floor_within_the_bounds():
    now = [100.0]
    ms = MemoryStream(10, 30.0, clock=lambda: now[0])
    ms.append(entry(21, "a.b", 100.0))                   # a node that starts consuming after 20
    assert ms.floor == 20
    older = [entry(s, "a.b" if s % 2 else "a.c", 100.0) for s in range(1, 21)]
    assert ms.prepend(older, 0) == 9                      # room for 9 of the newest
    assert ms.floor == 11                                 # what did not fit counts as unknown
    assert [e.stream_seq for e in ms._q] == list(range(12, 22))
    assert [e.stream_seq for e in ms.since(11, ["a.b"])] == [13, 15, 17, 19, 21]
    assert ms.lost(ms.view(["a.c"]), 11) == 11
    assert ms.lost(ms.view(["a.c"]), 5) == 11             # before the floor: unknown


def test_prepend_drops_what_is_too_old_and_is_refused_once_memory_evicted():
    now = [100.0]
    ms = MemoryStream(100, 30.0, clock=lambda: now[0])
    old = [entry(1, "a.b", 10.0), entry(2, "a.b", 80.0), entry(3, "a.c", 90.0)]
    assert ms.prepend(old, 0) == 2
    assert ms.floor == 1 and [e.stream_seq for e in ms.since(0, [">"])] == [2, 3]
    ms2 = MemoryStream(1, 30.0, clock=lambda: now[0])
    ms2.append(entry(11, "a.b", 100.0))
    ms2.append(entry(12, "a.b", 100.0))                  # 11 left memory
    assert ms2.prepend([entry(10, "a.b", 100.0)], 9) == 0
    assert ms2.floor == 10


def test_prepend_in_chunks_newest_first_extends_memory_back_step_by_step():
    ms = MemoryStream(100, 30.0, clock=lambda: 0.0)
    ms.append(entry(31, "a.b"))
    older = [entry(s, f"a.s{s % 3}") for s in range(1, 31)]
    for end in (30, 20, 10):
        chunk = older[end - 10:end]
        assert ms.prepend(chunk, chunk[0].stream_seq - 1) == 10
        assert ms.floor == end - 10
    assert [e.stream_seq for e in ms._q] == list(range(1, 32))
    assert [e.stream_seq for e in ms.since(0, ["a.s1"])] == list(range(1, 31, 3))
