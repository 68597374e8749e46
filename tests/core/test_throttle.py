"""Graded throttling in the compiled core: levels raised by strikes, sampling by
priority, conflation of latest-value subjects, load shedding, lag buckets."""

from __future__ import annotations

import json

from fanout_core import Core
from tests.core.test_core import parse_frames


def tail(subject: str, i: int, size: int = 50) -> bytes:
    return b'"type":"message","channel":"%s","stream_seq":%d,"data":"%s"}' % (subject.encode(), i, b"x" * size)


def messages(core: Core, slot: int) -> list[dict]:
    out = core.take_dirty().get(slot, b"")
    return [json.loads(p) for b0, p in parse_frames(out) if b0 & 0x0F == 1]


def test_strikes_raise_one_level_at_a_time_then_the_heaviest_is_slow():
    core = Core(4, queue_limit=1000, slow_strikes=2, throttle=True)
    s = core.add_client(-1)
    core.subscribe(s, "a.b")
    levels = []
    for i in range(400):
        core.publish("a.b", tail("a.b", i, 200), 3)        # critical: never sampled away
        for slot in core.take_raised():
            levels.append(core.level(slot))
        if core.take_slow():
            break
    assert levels == [1, 2, 3]
    assert core.level(s) == 3


def test_throttle_disabled_closes_on_strikes():
    core = Core(4, queue_limit=1000, slow_strikes=2, throttle=False)
    s = core.add_client(-1)
    core.subscribe(s, "a.b")
    for i in range(20):
        core.publish("a.b", tail("a.b", i, 200))
    assert core.take_raised() == [] and core.take_slow() == [s]


def test_a_client_draining_after_a_raise_is_not_struck_again():
    core = Core(4, queue_limit=1000, slow_strikes=2, throttle=True)
    s = core.add_client(-1)
    core.subscribe(s, "a.b")
    while not core.take_raised():
        core.publish("a.b", tail("a.b", 0, 200), 3)
    # The queue is over the limit but no longer grows past where it was: no strikes.
    for i in range(3):
        core.publish("a.b", tail("a.b", i, 10), 3)
    assert core.take_raised() == [] and core.level(s) == 1


def test_sampling_delivers_the_levels_percent_with_no_seq_gap():
    core = Core(4, queue_limit=1 << 30, throttle=True, throttle_percents=(100, 75, 50, 25))
    s = core.add_client(-1)
    core.subscribe(s, "a.b")
    core.set_level(s, 2)
    for i in range(200):
        core.publish("a.b", tail("a.b", i), 2)
    got = messages(core, s)
    assert len(got) == 100                                  # 50 %
    assert [m["seq"] for m in got] == list(range(1, 101))   # dropped ones take no seq
    assert core.take_dropped(s) == 100 and core.take_dropped(s) == 0


def test_low_priority_goes_first_and_critical_always_passes():
    core = Core(4, queue_limit=1 << 30, throttle=True)
    s = core.add_client(-1)
    core.subscribe(s, "a.b")
    core.set_level(s, 2)
    for i in range(300):
        core.publish("a.b", tail("a.b", i), [0, 2, 3][i % 3])   # low, high, critical
    got = [m["stream_seq"] % 3 for m in messages(core, s)]
    assert got.count(2) == 100                      # every critical one
    assert got.count(1) == 100                      # high takes the 50 % budget of 200 non-critical
    assert got.count(0) == 0                        # low only on what high leaves
    drops = core.drops()
    assert drops[("throttled", 0)] == 100 and drops[("throttled", 3)] == 0


def test_conflation_keeps_the_newest_version_per_subject_and_its_seq():
    core = Core(4, queue_limit=1 << 30, throttle=True, conflate=["px.*"])
    s = core.add_client(-1)
    core.subscribe(s, "px.*")
    core.set_level(s, 3)
    for v in range(5):
        for sub in ("px.a", "px.b"):
            core.publish(sub, tail(sub, v))
    got = messages(core, s)
    assert [(m["channel"], m["stream_seq"], m["seq"]) for m in got] == [("px.a", 4, 1), ("px.b", 4, 2)]
    assert core.take_dropped(s) == 8 and core.conflated_drops == 8
    # Replay gives what was sent for that seq: the newest version.
    sent, missing = core.replay(s, 1, 2)
    again = messages(core, s)
    assert sent == 2 and missing is None and [m["stream_seq"] for m in again] == [4, 4]


def test_conflation_only_for_throttled_clients_and_configured_subjects():
    core = Core(4, queue_limit=1 << 30, throttle=True, conflate=["px.*"])
    fast, other = core.add_client(-1), core.add_client(-1)
    for c in (fast, other):
        core.subscribe(c, ">")
    core.set_level(other, 3)
    for v in range(4):
        core.publish("px.a", tail("px.a", v))
    assert [m["stream_seq"] for m in messages_all(core)[fast]] == [0, 1, 2, 3]


def messages_all(core: Core) -> dict[int, list[dict]]:
    return {s: [json.loads(p) for b0, p in parse_frames(b) if b0 & 0x0F == 1] for s, b in core.take_dirty().items()}


def test_load_shedding_drops_low_for_everyone_but_not_catch_up():
    core = Core(4, throttle=True)
    s = core.add_client(-1)
    core.subscribe(s, "a.b")
    core.shed_low = True
    core.publish("a.b", tail("a.b", 1), 0)
    core.publish("a.b", tail("a.b", 2), 1)
    core.deliver(s, tail("a.b", 3), 0, True)
    assert [m["stream_seq"] for m in messages(core, s)] == [2, 3]
    assert core.take_dropped(s) == 1


def test_lag_histogram_buckets_clients_by_queued_bytes():
    core = Core(4)
    a, _idle = core.add_client(-1), core.add_client(-1)
    core.subscribe(a, "a.b")
    core.publish("a.b", tail("a.b", 1, 2000))
    qb, ab, qsum, _ = core.lag_histogram([100, 10_000], [60.0])
    assert qb == [1, 2, 2]          # b has nothing queued, a about 2 KB
    assert ab == [2, 2] and 2000 < qsum < 2200
