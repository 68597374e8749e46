"""The hub alone: a real Core, socketpairs as client sockets, a fake clock, and
a recording Peer. Checks routing, what is reported back (blocked, dead, slow,
drained) and the paced catch-up of resume and replay."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fanout.brokers.base import History, Message
from fanout.hub import Hub, Resumed
from fanout.metrics import Metrics
from tests.helpers.inproc import FakeClock, RecPeer, drain_loop, make_cfg

CH = "odin.token.a.update"


def frames(data: bytes) -> list[dict[str, Any]]:
    """Unframe unmasked server text frames."""
    out, i = [], 0
    while i < len(data):
        n = data[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            n, j = int.from_bytes(data[j:j + 2], "big"), j + 2
        elif n == 127:
            n, j = int.from_bytes(data[j:j + 8], "big"), j + 8
        if j + n > len(data):
            break                          # a frame still arriving
        out.append(json.loads(data[j:j + n]))
        i = j + n
    return out


def resume_after_backlog(hub: Hub, n: int) -> tuple[RecPeer, int, list[Resumed]]:
    """``n`` messages of ~1 KiB dispatched, then a slow reader resuming from 0."""
    for i in range(1, n + 1):
        hub.dispatch(msg(i, size=1000))
    hub.publish_pending()
    p = RecPeer(rcvbuf=4096)
    s = hub.attach(p, 0)
    done: list[Resumed] = []
    hub.resume(s, [CH], 0, None, done.append)
    return p, s, done


def throttled_client(recovery: float) -> tuple[Hub, FakeClock, RecPeer, int]:
    """A hub on a fake clock and a client that does not read, published to until it is at level 1."""
    import asyncio
    clock = FakeClock()
    h = Hub(make_cfg(WS_CLIENT_QUEUE_BYTES=4096, WS_THROTTLE_RECOVERY_SECONDS=recovery), Metrics(), clock)
    h.bind(asyncio.get_running_loop(), None)
    p = RecPeer(rcvbuf=4096)
    s = h.attach(p, 0)
    h.subscribe(s, [CH])
    i = 0
    while h.throttle_level(s) == 0 and i < 500:
        i += 1
        h.dispatch(msg(i, size=500))
        h.publish_pending()
        clock.advance(0.05)
    return h, clock, p, s


async def read_until_empty(h: Hub, p: RecPeer, s: int) -> bytes:
    """Read the client's socket while the hub writes, until its queue is empty (bounded)."""
    data = b""
    for _ in range(500):
        await drain_loop(1)
        data += p.read()
        if h.flush_one(s) == 0 and h.queued(s) == 0:
            break
    return data + p.read()


class StreamBroker:
    """History from a list: what a JetStream broker would answer (no network)."""

    name = "stub"

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.calls: list[tuple[int, int]] = []

    async def history(self, patterns: list[str], after: int, upto: int) -> History:
        self.calls.append((after, upto))
        return History([m for m in self.messages if after < m.stream_seq <= upto], True)


@pytest.fixture
async def hub() -> Hub:
    import asyncio
    h = Hub(make_cfg(WS_CLIENT_QUEUE_BYTES=8192), Metrics(), FakeClock())
    h.bind(asyncio.get_running_loop(), None)
    return h


def msg(seq: int, subject: str = CH, size: int = 10) -> Message:
    return Message(subject, json.dumps({"i": seq, "pad": "x" * size}).encode(), seq, 1, 2)


async def test_dispatch_reaches_subscribers_in_one_flush(hub):
    a, b = RecPeer(), RecPeer()
    sa, sb = hub.attach(a, 0), hub.attach(b, 0)
    assert hub.subscribe(sa, [CH]) == ([CH], [])
    hub.subscribe(sb, ["odin.token.*.other"])
    for i in range(1, 4):
        hub.dispatch(msg(i))
    await drain_loop()
    got = frames(a.read())
    assert [(f["seq"], f["stream_seq"]) for f in got] == [(1, 1), (2, 2), (3, 3)]
    assert b.read() == b""
    assert hub.core.send_calls == 1          # three frames, one sendmsg
    assert hub.metrics.registry.get_sample_value("fanout_publish_to_write_seconds_count") == 3


async def test_duplicates_are_dropped(hub):
    p = RecPeer()
    s = hub.attach(p, 0)
    hub.subscribe(s, [CH])
    assert hub.dispatch(msg(5)) == 1
    assert hub.dispatch(msg(5)) == -1
    assert hub.dispatch(msg(4)) == -1
    await drain_loop()
    assert len(frames(p.read())) == 1


async def test_blocked_then_writable_then_drained():
    import asyncio
    hub = Hub(make_cfg(WS_CLIENT_QUEUE_BYTES=1 << 20), Metrics(), FakeClock())
    hub.bind(asyncio.get_running_loop(), None)
    p = RecPeer(rcvbuf=4096)
    s = hub.attach(p, 0)
    hub.subscribe(s, [CH])
    for i in range(1, 40):
        hub.dispatch(msg(i, size=1000))
    await drain_loop()
    assert p.calls == ["blocked"]
    hub.watch_drain(s)
    got: list[dict[str, Any]] = []
    data = b""
    for _ in range(200):
        data += p.read()
        if hub.flush_one(s) == 0:
            break
    data += p.read()
    got = frames(data)
    assert [f["seq"] for f in got] == list(range(1, 40))
    assert p.calls[-1] == "drained"


async def test_a_dead_socket_is_reported(hub):
    p = RecPeer()
    s = hub.attach(p, 0)
    hub.subscribe(s, [CH])
    p.client.close()
    hub.dispatch(msg(1))
    await drain_loop()
    assert p.calls == ["dead"]


async def test_a_reader_that_stops_steps_up_each_window_then_is_slow_and_keeps_its_last_notice(hub):
    clock = hub.clock
    p = RecPeer(rcvbuf=4096)
    s = hub.attach(p, 0)
    hub.subscribe(s, [CH])
    levels, when = [], []
    for i in range(1, 400):                   # 20 msg/s of ~1 KiB on the fake clock; it never reads
        hub.dispatch(msg(i, size=1000))
        hub.publish_pending()
        if hub.throttle_level(s) != (levels[-1] if levels else 0):
            levels.append(hub.throttle_level(s))
            when.append(clock())
        if "slow" in p.calls:
            break
        clock.advance(0.05)
    assert levels == [1, 2, 3] and p.calls == ["slow"]
    steps = [b - a for a, b in zip(when, when[1:], strict=False)] + [clock() - when[-1]]
    assert steps == [pytest.approx(x, abs=0.06) for x in (1.0, 1.0, 2.0)]   # WS_THROTTLE_RAISE_SECONDS, then the grace
    # The session's 1008 close: data not begun is dropped, the notices are kept before the close frame.
    hub.stop_data(s)
    hub.discard_queued(s)
    hub.send_raw(s, b"\x88\x02\x03\xf0")
    data = await read_until_empty(hub, p, s)
    notices = [f for f in frames(data[:-4]) if f.get("type") == "throttle_update"]
    assert [n["level"] for n in notices] == [1, 2, 3] and data.endswith(b"\x88\x02\x03\xf0")


async def test_replies_over_the_queue_limit_count_like_data(hub):
    # A client that does not read its replies is judged over time like any other (no 1008 at once).
    p = RecPeer(rcvbuf=4096)
    s = hub.attach(p, 0)
    for _ in range(20):
        hub.reply(s, b'{"type":"error","pad":"' + b"x" * 1000 + b'"}')
    assert hub.queued(s) > hub.cfg.ws_client_queue_bytes and p.calls == []
    for _ in range(80):
        hub.clock.advance(0.25)
        hub.throttle_tick(hub.clock())
        if p.calls:
            break
    assert p.calls == ["slow"] and hub.throttle_level(s) == 3
    # No messages: a window ends after 3 (WS_SLOW_CLIENT_STRIKES, the default, not set here) times its time, from the first tick.
    assert hub.clock() - 1000.0 == pytest.approx(0.25 + 3 * 3 * 1.0 + 3 * 2.0)


async def test_subscription_limit_splits_accepted_and_refused():
    import asyncio
    h = Hub(make_cfg(WS_MAX_SUBSCRIPTIONS=2), Metrics(), FakeClock())
    h.bind(asyncio.get_running_loop(), None)
    s = h.attach(RecPeer(), 0)
    assert h.subscribe(s, ["a.1", "a.2", "a.3"]) == (["a.1", "a.2"], ["a.3"])
    assert h.subscribe(s, ["a.1", "a.4"]) == (["a.1"], ["a.4"])
    assert h.subscription_count == 2
    h.detach(s)
    assert h.subscription_count == 0


async def test_resume_is_paced_by_the_socket_and_live_follows_exactly(hub):
    # 200 messages of ~1 KiB = 25x the 8 KiB queue limit.
    p, s, done = resume_after_backlog(hub, 200)
    peak = hub.queued(s)
    assert peak <= hub.cfg.ws_client_queue_bytes      # never filled past the limit
    data = b""
    live_sent = False
    for _ in range(2000):
        await drain_loop(1)
        data += p.read()
        hub.flush_one(s)
        peak = max(peak, hub.queued(s))
        if done:
            break
        if not live_sent and len(frames(data)) >= 100:
            live_sent = True
            hub.dispatch(msg(201, size=10))      # live while the catch-up runs
            hub.dispatch(msg(202, size=10))
    assert live_sent
    assert done and done[0].complete is True and done[0].accepted == [CH]
    assert peak <= hub.cfg.ws_client_queue_bytes
    hub.dispatch(msg(203, size=10))
    await drain_loop()
    for _ in range(50):
        data += p.read()
        hub.flush_one(s)
    got = frames(data)
    assert [f["stream_seq"] for f in got] == list(range(1, 204))
    assert [f["seq"] for f in got] == list(range(1, 204))
    assert "slow" not in p.calls


async def test_resume_reads_what_memory_lost_from_the_broker():
    import asyncio
    h = Hub(make_cfg(WS_HISTORY_SIZE=5), Metrics(), FakeClock())
    broker = StreamBroker()
    h.bind(asyncio.get_running_loop(), broker)  # type: ignore[arg-type]
    for i in range(1, 21):
        broker.messages.append(msg(i))
        h.dispatch(msg(i))
    h.publish_pending()
    p = RecPeer()
    s = h.attach(p, 0)
    done: list[Resumed] = []
    h.resume(s, [CH], 3, None, done.append)
    for _ in range(20):
        await drain_loop(1)
        if done:
            break
    await drain_loop()
    assert done and done[0].complete is True
    assert broker.calls == [(3, 15)]     # only what memory lost (16..20 come from memory)
    assert [f["stream_seq"] for f in frames(p.read())] == list(range(4, 21))


async def test_resume_of_another_epoch_is_incomplete_and_sends_no_history(hub):
    for i in range(1, 6):
        hub.dispatch(msg(i))
    hub.publish_pending()
    p = RecPeer()
    s = hub.attach(p, 0)
    done: list[Resumed] = []
    hub.resume(s, [CH], 2, "other-epoch", done.append)
    assert done and done[0].complete is False
    await drain_loop()
    assert p.read() == b""
    hub.dispatch(msg(6))
    await drain_loop()
    assert [f["stream_seq"] for f in frames(p.read())] == [6]


async def test_resume_skips_what_a_live_subscription_already_sent(hub):
    p = RecPeer()
    s = hub.attach(p, 0)
    hub.subscribe(s, ["odin.token.*.update"])
    hub.dispatch(msg(1))
    hub.dispatch(msg(2, subject="odin.token.a.trade"))
    await drain_loop()
    assert [f["stream_seq"] for f in frames(p.read())] == [1]
    done: list[Resumed] = []
    hub.resume(s, ["odin.token.a.>"], 0, None, done.append)
    await drain_loop()
    assert done[0].complete is True
    assert [f["stream_seq"] for f in frames(p.read())] == [2]


async def test_detach_during_a_catch_up_never_calls_back(hub):
    p, s, done = resume_after_backlog(hub, 100)
    assert hub.catching_up(s)
    hub.detach(s)
    assert not hub.catching_up(s)
    await drain_loop()
    assert done == []


async def test_replay_is_paced_and_reports_what_left_the_ring():
    import asyncio
    h = Hub(make_cfg(WS_CLIENT_QUEUE_BYTES=8192, WS_REPLAY_BUFFER=50), Metrics(), FakeClock())
    h.bind(asyncio.get_running_loop(), None)
    p = RecPeer(rcvbuf=4096)
    s = h.attach(p, 0)
    h.subscribe(s, [CH])
    data = b""
    for i in range(1, 81):
        h.dispatch(msg(i, size=500))
        h.publish_pending()
        await drain_loop(1)
        data += p.read()
        h.flush_one(s)
    data += p.read()
    assert len(frames(data)) == 80
    missing: list[Any] = []
    h.replay(s, 20, 80, missing.append)
    data = b""
    for _ in range(2000):
        await drain_loop(1)
        data += p.read()
        h.flush_one(s)
        assert h.queued(s) <= h.cfg.ws_client_queue_bytes
        if missing:
            break
    for _ in range(20):
        data += p.read()
        h.flush_one(s)
    assert missing == [(20, 30)]
    assert [f["seq"] for f in frames(data)] == list(range(31, 81))



async def test_throttle_raise_notice_then_recovery_on_the_fake_clock():
    h, clock, p, s = throttled_client(recovery=5)
    assert h.throttle_level(s) == 1
    data = await read_until_empty(h, p, s)     # the reader catches up
    notices = [f for f in frames(data) if f.get("type") == "throttle_update"]
    assert [(n["level"], n["rate_percent"]) for n in notices] == [(1, 75)]
    assert notices[0]["message"] == "Your connection is slightly slow. Receiving 75% of updates."
    h.throttle_tick(clock())                   # kept up, but not for long enough yet
    assert h.throttle_level(s) == 1
    clock.advance(5.0)
    h.throttle_tick(clock())
    assert h.throttle_level(s) == 0
    await drain_loop()
    back = [f for f in frames(p.read()) if f.get("type") == "throttle_update"]
    assert [(n["level"], n["rate_percent"], n["dropped"]) for n in back] == [(0, 100, 0)]
    assert "slow" not in p.calls


async def test_a_closing_client_leaves_throttling_and_gets_nothing_after_its_close_frame():
    # A slow client's 1008 (or any close) stops its data; neither recovery
    # ticks nor load-shedding notices may queue text after its close frame.
    h, clock, p, s = throttled_client(recovery=1)
    assert h.throttle_level(s) == 1 and h.metrics.throttled_light._value.get() == 1
    h.stop_data(s)
    h.discard_queued(s)
    close = b"\x88\x02\x03\xf0"                  # close 1008, as websockets would queue it
    h.send_raw(s, close)
    assert h.throttle_level(s) == 0 and h.metrics.throttled_light._value.get() == 0
    clock.advance(5.0)
    h.throttle_tick(clock())
    h.set_load_shed(True)
    h.reply(s, b'{"type":"error"}')
    data = await read_until_empty(h, p, s)
    assert data.endswith(close)                # the close frame is the last thing written
    before = data[:data.rindex(close)]
    assert b'"level":0' not in before and b'"reason":"load"' not in before and b'"error"' not in before
    down = h.metrics.throttle_transitions.labels("1", "0")._value.get()
    assert down == 0                           # no recovery counted for a client that is closing


async def test_priority_rules_apply_to_messages_without_a_priority(hub):
    p = RecPeer()
    s = hub.attach(p, 0)
    hub.subscribe(s, ["odin.token.>"])
    for i, sub in enumerate(["odin.token.a.metadata", "odin.token.a.comment", "odin.token.a.update",
                             "odin.token.a.trade", "odin.token.a.other"], 1):
        hub.dispatch(Message(sub, b"1", i, 1, -1))
    hub.dispatch(Message("odin.token.b.metadata", b"1", 6, 1, 3))     # an explicit priority wins
    assert [e.priority for e in hub.recent.since(0, [">"])] == [0, 1, 2, 3, 2, 3]


async def _resume(h: Hub, p: RecPeer, s: int, patterns: list[str], after: int) -> Resumed:
    done: list[Resumed] = []
    h.resume(s, patterns, after, None, done.append)
    for _ in range(50):
        await drain_loop(1)
        if done:
            break
    assert done, "resume never finished"
    return done[0]


async def test_resume_of_a_quiet_subject_after_more_than_the_window_is_complete():
    import asyncio
    clock = FakeClock()
    h = Hub(make_cfg(), Metrics(), clock)        # defaults: 30 s window
    h.bind(asyncio.get_running_loop(), None)
    quiet = "odin.token.quiet.update"
    h.dispatch(msg(1, subject=quiet))
    after = 1                                    # the client got it, then left for 100 s
    for i in range(2, 102):
        clock.advance(1.0)
        h.dispatch(msg(i))                       # busy subject, all along
    h.publish_pending()
    h.recent.expire()
    assert h.recent.dropped_upto > after         # the window moved past the client's position
    p = RecPeer()
    s = h.attach(p, 0)
    r = await _resume(h, p, s, [quiet], after)
    assert r.complete is True                    # its own subject lost nothing after 1
    assert frames(p.read()) == []
    q = RecPeer()
    s2 = h.attach(q, 0)
    r = await _resume(h, q, s2, [CH], after)
    assert r.complete is False                   # this one lost 2..70
    got = [f["stream_seq"] for f in frames(q.read())]
    assert got == list(range(71, 102))           # what the 30 s window still holds, in order
    assert h.metrics.render().count(b'fanout_resumes_total{complete="false"} 1.0') == 1


async def test_resume_examines_what_it_returns_not_the_window(hub):
    import random
    rng = random.Random(5)
    for i in range(1, 9001):
        hub.dispatch(msg(i, subject=f"odin.token.s{rng.randrange(20000)}.update"))
        if i % 500 == 0:
            hub.publish_pending()
    hub.publish_pending()
    chans = [f"odin.token.s{j}.update" for j in range(5)]
    want = [e.stream_seq for e in hub.recent._q if e.subject in chans]
    p = RecPeer()
    s = hub.attach(p, 0)
    before = hub.history_stats()["examined"]
    r = await _resume(hub, p, s, chans, 0)
    examined = hub.history_stats()["examined"] - before
    assert r.complete is True
    assert [f["stream_seq"] for f in frames(p.read())] == want
    # The old resume tested every one of the 9,000; now a few looks per subject plus each returned.
    assert examined <= 8 * len(chans) + 2 * len(want), examined
    text = hub.metrics.render()
    assert b"fanout_history_examined_total" in text and b"fanout_history_tombstones" in text


async def test_a_node_that_started_mid_stream_reads_the_older_part_from_the_broker():
    import asyncio
    h = Hub(make_cfg(), Metrics(), FakeClock())
    broker = StreamBroker()
    h.bind(asyncio.get_running_loop(), broker)  # type: ignore[arg-type]
    for i in range(1, 121):
        broker.messages.append(msg(i))
        if i > 100:
            h.dispatch(msg(i))                   # this process consumed from 101 on
    h.publish_pending()
    p = RecPeer()
    s = h.attach(p, 0)
    r = await _resume(h, p, s, [CH], 50)
    await drain_loop()
    assert r.complete is True
    assert broker.calls == [(50, 100)]           # memory knows nothing at or below 100
    assert [f["stream_seq"] for f in frames(p.read())] == list(range(51, 121))


async def test_resume_before_anything_was_dispatched_asks_the_broker_up_to_its_start():
    import asyncio
    h = Hub(make_cfg(), Metrics(), FakeClock())
    broker = StreamBroker()
    broker.last_stream_seq = 100                 # type: ignore[attr-defined]  # the consumer starts after 100
    broker.messages = [msg(i) for i in range(1, 101)]
    h.bind(asyncio.get_running_loop(), broker)  # type: ignore[arg-type]
    p = RecPeer()
    s = h.attach(p, 0)
    r = await _resume(h, p, s, [CH], 90)
    await drain_loop()
    assert r.complete is True
    assert broker.calls == [(90, 100)]
    assert [f["stream_seq"] for f in frames(p.read())] == list(range(91, 101))


async def test_store_gauges_return_to_zero_and_the_heap_is_trimmed_after_clients_leave():
    import asyncio
    import gc

    from fanout.hub import TRIM_INTERVAL
    gc.collect()        # messages_held counts every core in the process: earlier tests' hubs must be gone
    clock = FakeClock()
    h = Hub(make_cfg(), Metrics(), clock)
    h.bind(asyncio.get_running_loop(), None)
    slots = [h.attach(RecPeer(), 0) for _ in range(5)]
    for i, s in enumerate(slots):
        h.subscribe(s, [CH, f"odin.token.t{i}.*"])
    for i in range(20):
        h.dispatch(msg(i + 1))
    h.publish_pending()
    sizes = h.store_sizes()
    assert sizes["patterns"] == 6 and sizes["routes"] >= 1 and sizes["messages_held"] > 0
    assert sizes["history_messages"] == 20 and sizes["history_bytes"] > 0
    assert not h.trim_tick(clock())                    # nobody left yet
    for s in slots:
        h.detach(s)
    sizes = h.store_sizes()
    assert {k: sizes[k] for k in ("patterns", "routes", "set_bytes", "messages_held", "queued_bytes",
                                  "catchups", "throttled", "watched", "buffer_bytes")} == dict.fromkeys(
        ("patterns", "routes", "set_bytes", "messages_held", "queued_bytes", "catchups", "throttled", "watched",
         "buffer_bytes"), 0)
    assert h.trim_tick(clock())
    s = h.attach(RecPeer(), 0)
    h.detach(s)
    assert not h.trim_tick(clock())                    # at most every TRIM_INTERVAL
    clock.advance(TRIM_INTERVAL)
    assert h.trim_tick(clock())


async def test_republished_subjects_add_no_memory_once_every_subject_was_seen():
    """Each broker hands every message a new subject string. The stores keyed by subject
    (snapshot, the resume memory's index, tombstones and trie, the route and priority
    caches) keep the first copy as their key; an entry that kept its message's copy kept
    a second one alive per subject. A soak over 50,000 subjects grew ~70 bytes per subject
    republished that way: 3.4 MB, more than any per-10-minute bound."""
    import asyncio
    import gc
    import sys

    h = Hub(make_cfg(WS_HISTORY_SIZE=100), Metrics(), FakeClock())
    h.bind(asyncio.get_running_loop(), None)
    s = h.attach(RecPeer(), 0)
    h.subscribe(s, ["odin.global.g0.*"])        # a route too: 200 of the subjects reach it
    n, seq = 2000, 10**6                        # no small (cached) ints among the stream_seqs

    def round_() -> None:
        nonlocal seq
        for j in range(n):
            seq += 1
            h.dispatch(Message(f"odin.global.g{j // 200}.k{j % 200}", b'{"v":1}', seq, 1, -1))
        h.publish_pending()
        h.discard_queued(s)

    round_()                                    # every subject seen once: the stores' steady size
    gc.collect()
    base = sys.getallocatedblocks()
    for _ in range(3):
        round_()
    gc.collect()
    grown = sys.getallocatedblocks() - base
    assert h.store_sizes()["snapshot_subjects"] == n
    # What may grow: the resume memory's live records (100) now hold their last loss.
    assert grown < n // 4, f"{grown} Python blocks more after republishing {n} subjects"
