"""Degrade, don't disconnect (PROTOCOL.md 1.1 ``throttle_update``), against a
real node in embedded mode at the default throttle settings (only the queue
limit, the recovery time and the grace time lowered, to keep it short), with
real paced readers: a 4 KiB receive buffer, reading a set share of the
stream's bytes (tests/helpers/paced.py). The stream is the issue's: 4 KB
messages, a quarter of them critical, so the heaviest level needs about 44 %
of the bytes (every critical message and a quarter of the rest)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.helpers.paced import ByteReader, Pacer, Stream

CH = "odin.token.thr.update"
LIMIT = 65536
# Load shedding (its own notices, for everyone) is tested in tests/server/test_guard.py.
ENV = dict(WS_CLIENT_QUEUE_BYTES=LIMIT, WS_THROTTLE_RECOVERY_SECONDS=1, WS_CPU_THROTTLE_THRESHOLD=0)
HARD = 8 * LIMIT                       # WS_CLIENT_QUEUE_HARD_FACTOR's default
RAISE, GRACE = 1.0, 1.0                # WS_THROTTLE_RAISE_SECONDS's default; the grace lowered
FRAME = 4000


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def subscribed(*readers: ByteReader) -> None:
    for r in readers:
        wait_for(lambda r=r: (r.pump(1 << 16), r.replies)[1], 10, "subscribed")
        assert r.replies[0]["type"] == "subscribed"


def steps(levels: list[int]) -> bool:
    return all(abs(a - b) == 1 for a, b in zip([0] + levels, levels, strict=False))


def test_half_speed_reader_steps_up_comes_back_and_is_never_closed_a_fast_one_gets_all(node_factory):
    half_speed_scenario(node_factory(**ENV))


def half_speed_scenario(node: Any) -> None:
    """Also run against a JetStream node (tests/jetstream/test_throttle_js.py)."""
    fast = ByteReader(node.ws_port, [CH], None, rcvbuf=1 << 20)
    slow = ByteReader(node.ws_port, [CH], 0.5)
    subscribed(fast, slow)
    stream = Stream(node.health_port, 250, FRAME, [CH])
    pacer = Pacer([fast, slow], stream)
    try:
        # It falls behind and is throttled, a level at a time.
        wait_for(lambda: slow.level >= 2 or slow.closed, 15, "level 2")
        assert not slow.closed
        # It reads at full speed again (and the stream slows): back down to level 0.
        slow.pace = None
        stream.rate = 60
        wait_for(lambda: slow.notices[-1]["level"] == 0 or slow.closed, 10, "level 0")
        back_at = len(stream.published)
        wait_for(lambda: len(stream.published) >= back_at + 20, 5, "more publishes")
    finally:
        stream.finish()
        last = stream.published[-1][0]
        wait_for(lambda: all(r.messages and r.messages[-1]["stream_seq"] >= last for r in (fast, slow)), 10,
                 "the last message")
        pacer.finish()
    levels = [n["level"] for n in slow.notices]
    assert slow.close_code is None and steps(levels) and max(levels) >= 2 and levels[-1] == 0, levels
    assert slow.notices[-1]["message"] == "Connection quality restored. Receiving all updates."
    assert all(n["rate_percent"] == [100, 75, 50, 25][n["level"]] for n in slow.notices)
    assert sum(n["dropped"] for n in slow.notices) > 0
    got = [m["stream_seq"] for m in slow.messages]
    assert [m["seq"] for m in slow.messages] == list(range(1, len(got) + 1))          # no seq gap
    published = [s for s, _, _, _ in stream.published]
    assert {s for s, _, p, _ in stream.published if p == "critical"} <= set(got)      # every critical one
    assert len(got) < len(published)                                                   # it was throttled
    after = got[slow.notice_at[-1]:]              # after its last notice (level 0): everything
    assert after == [s for s in published if s >= after[0]]
    # The fast reader on the same channel: 100 %, no notice.
    assert [m["stream_seq"] for m in fast.messages] == published and fast.notices == []
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 0
    ups = sum(1 for a, b in zip([0] + levels, levels, strict=False) if (a, b) == (0, 1))
    assert node.metric("ws_throttle_transitions_total", 'from_level="0",to_level="1"') == ups >= 1
    assert node.metric("fanout_dropped_total", 'priority="critical",reason="throttled"') == 0
    assert node.metric("fanout_dropped_total", 'priority="low",reason="throttled"') > 0
    fast.close()
    slow.close()


@pytest.mark.parametrize("pace", [0.0, 0.1], ids=["stopped", "too-slow-for-critical"])
def test_a_reader_the_heaviest_level_cannot_help_is_closed_in_bounded_time_and_memory(node_factory, pace):
    # 50 msg/s of 4 KB (200 KB/s); 0.1 of its bytes is below its critical traffic alone (a quarter).
    node = node_factory(**ENV, WS_SLOW_CLIENT_GRACE=GRACE)
    r = ByteReader(node.ws_port, [CH], None)
    subscribed(r)
    r.pace = pace
    stream = Stream(node.health_port, 50, FRAME, [CH])
    pacer = Pacer([r], stream)
    t0 = time.monotonic()
    over: float | None = None
    peak = 0.0
    try:
        while node.metric("fanout_slow_clients_total") < 1:
            q = node.metric("fanout_client_queued_bytes_gsum")
            peak = max(peak, q)
            if over is None and q > LIMIT:
                over = time.monotonic()
            assert time.monotonic() - t0 < 25, "never closed"
            time.sleep(0.05)
        closed = time.monotonic()
    finally:
        stream.finish()
        r.pace = None                       # read what is left, up to the close frame
        wait_for(lambda: r.closed, 10, "the close frame")
        pacer.finish()
    # The documented bound: 3 windows and the grace time after its queue passed the limit, a
    # window ending at the first message (or periodic check, every second) after its time.
    assert over is not None and closed - over < 3 * RAISE + GRACE + 1.5, (closed - over, peak)
    print(f"closed {closed - over:.2f} s after passing the limit; peak queue {peak:.0f} B")
    assert peak <= HARD + FRAME + 200, peak                       # the hard cap holds its memory
    assert r.close_code == 1008
    # One step per level, and the last notice (level 3) reached it before the close.
    assert [n["level"] for n in r.notices] == [1, 2, 3]
    steps_ = [node.metric("ws_throttle_transitions_total", f'from_level="{a}",to_level="{a + 1}"') for a in range(3)]
    assert steps_ == [1, 1, 1] and node.metric("fanout_slow_clients_total") == 1
    assert [m["seq"] for m in r.messages] == list(range(1, len(r.messages) + 1))
    r.close()


def test_a_stopped_reader_on_a_heavy_stream_is_closed_at_the_hard_cap(node_factory):
    # 250 msg/s of 4 KB: non-critical stops at half the cap, critical fills the rest in about a second.
    node = node_factory(**ENV)
    r = ByteReader(node.ws_port, [CH], None)
    subscribed(r)
    r.pace = 0.0
    stream = Stream(node.health_port, 250, FRAME, [CH])
    pacer = Pacer([r], stream)
    peak = 0.0
    t0 = time.monotonic()
    try:
        while node.metric("fanout_slow_clients_total") < 1:
            peak = max(peak, node.metric("fanout_client_queued_bytes_gsum"))
            assert time.monotonic() - t0 < 20, "never closed"
            time.sleep(0.02)
    finally:
        stream.finish()
        r.pace = None
        wait_for(lambda: r.closed, 10, "the close frame")
        pacer.finish()
    assert r.close_code == 1008 and peak <= HARD + FRAME + 200, peak
    assert node.metric("fanout_dropped_total", 'priority="low",reason="throttled"') > 0
    assert node.metric("fanout_dropped_total", 'priority="critical",reason="throttled"') == 0
    r.close()


def test_throttle_disabled_closes_a_stopped_reader_after_the_grace_time(node_factory):
    node = node_factory(**ENV, WS_SLOW_CLIENT_GRACE=GRACE, WS_THROTTLE_ENABLED="false")
    r = ByteReader(node.ws_port, [CH], None)
    subscribed(r)
    r.pace = 0.0
    stream = Stream(node.health_port, 250, FRAME, [CH])
    pacer = Pacer([r], stream)
    try:
        wait_for(lambda: node.metric("fanout_slow_clients_total") >= 1, 10, "the close")
    finally:
        stream.finish()
        r.pace = None
        wait_for(lambda: r.closed, 10, "the close frame")
        pacer.finish()
    assert r.close_code == 1008 and r.notices == []
    assert node.metric("ws_throttle_transitions_total", 'from_level="0",to_level="1"') == 0
    r.close()


def test_a_conflated_reader_at_30_percent_keeps_the_newest_value_of_every_subject(node_factory):
    conflated_scenario(node_factory(**ENV, WS_CONFLATE_CHANNELS="odin.token.*.price"))


def conflated_scenario(node: Any) -> None:
    """20 subjects of 4 KB: their newest values alone (80 KB) are more than the 64 KiB limit.
    Also run against a JetStream node (tests/jetstream/test_throttle_js.py)."""
    subjects = [f"odin.token.t{i:02d}.price" for i in range(20)]
    r = ByteReader(node.ws_port, ["odin.token.*.price"], 0.3)
    subscribed(r)
    stream = Stream(node.health_port, 250, FRAME, subjects, priority=lambda i: "high",
                    payload=lambda i, s: {"v": i})
    pacer = Pacer([r], stream)
    t0 = time.monotonic()
    try:
        # 8 s of stream (however many messages a loaded machine publishes in them).
        wait_for(lambda: time.monotonic() - t0 >= 8 or r.closed, 10, "8 s of stream")
    finally:
        stream.finish()
        r.pace = None
        newest = {s: q for q, s, _, _ in stream.published}
        # The newest version may stand early in the queue (a conflated frame keeps the
        # place of the version it replaced), so look at each subject's last message.
        def newest_seen() -> bool:
            last = {m["channel"]: m["stream_seq"] for m in list(r.messages)}
            return all(last.get(s) == q for s, q in newest.items())
        wait_for(lambda: newest_seen() or r.closed, 20, "the newest of every subject")
        pacer.finish()
    assert r.close_code is None and node.metric("fanout_connections_closed_total", 'code="1008"') == 0
    seen: dict[str, list[int]] = {}
    for m in r.messages:
        seen.setdefault(m["channel"], []).append(m["stream_seq"])
    for s in subjects:
        assert seen[s][-1] == newest[s] and seen[s] == sorted(set(seen[s])), (s, seen[s][-5:])
    assert r.notices and r.notices[0]["level"] == 1
    assert node.metric("fanout_conflated_drops_total") > 0
    assert len(r.messages) < len(stream.published)
    r.close()
