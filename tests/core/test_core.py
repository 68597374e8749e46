"""Unit tests of the compiled core's parts the model does not cover:
compression, throttling, slow clients, the real-socket flush, the frame-boundary cut."""

from __future__ import annotations

import json
import socket
import zlib

import pytest

from fanout_core import Core
from tests.core.reference import data_frame


def tail(i: int, size: int = 50) -> bytes:
    return b'"type":"message","channel":"a.b","stream_seq":%d,"data":"%s"}' % (i, b"x" * size)


def small_socketpair() -> tuple[socket.socket, socket.socket]:
    """(server side, non-blocking; client side) with small buffers, so they fill fast."""
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


def parse_frames(buf: bytes) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each server frame in buf."""
    out, pos = [], 0
    while pos < len(buf):
        b0, n = buf[pos], buf[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(buf[pos:pos + 2], "big")
            pos += 2
        elif n == 127:
            n = int.from_bytes(buf[pos:pos + 8], "big")
            pos += 8
        out.append((b0, buf[pos:pos + n]))
        pos += n
    assert pos == len(buf)
    return out


@pytest.mark.parametrize("wbits", [9, 10, 12, 15])
def test_deflate_frames_inflate_with_a_standard_inflater(wbits):
    core = Core(8)
    plain, z = core.add_client(-1), core.add_client(-1, wbits)
    for s in (plain, z):
        core.subscribe(s, "a.*")
    sizes = [10, 300, 5000, 70000]
    for i, size in enumerate(sizes):
        assert core.publish("a.b", tail(i, size)) == 2
    out = core.take_dirty()
    inflater = zlib.decompressobj(-wbits)  # one inflater for the whole connection (context kept)
    zframes = parse_frames(out[z])
    pframes = parse_frames(out[plain])
    assert [b0 for b0, _ in zframes] == [0xC1] * len(sizes)   # FIN + RSV1 + text
    assert [b0 for b0, _ in pframes] == [0x81] * len(sizes)
    for (_, zp), (_, pp) in zip(zframes, pframes, strict=True):
        assert inflater.decompress(zp + b"\x00\x00\xff\xff") == pp
    assert core.compressions == len(sizes)   # once per message, not per client


def test_compressed_once_for_many_clients_each_with_own_seq():
    core = Core(100)
    slots = [core.add_client(-1, 15) for _ in range(50)]
    for s in slots[:10]:
        core.subscribe(s, "a.b")
        core.publish("x.y", tail(0))  # nobody: no compression needed
    for s in slots:
        core.subscribe(s, "a.b")
    core.publish("a.b", tail(1))
    core.publish("a.b", tail(2))
    assert core.compressions == 2
    out = core.take_dirty()
    for s in slots:
        frames = parse_frames(out[s])
        d = zlib.decompressobj(-15)
        docs = [json.loads(d.decompress(p + b"\x00\x00\xff\xff")) for _, p in frames]
        assert [m["stream_seq"] for m in docs] == [1, 2]
        assert docs[-1]["seq"] == core.seq(s)


def test_throttle_drops_take_no_seq_and_critical_always_passes():
    core = Core(4, throttle_percents=(100, 75, 50, 25))
    s = core.add_client(-1)
    core.subscribe(s, "a.b")
    core.set_level(s, 2)  # 50%
    for i in range(10):
        core.publish("a.b", tail(i), 2)          # high: sampled to 50%
    for i in range(5):
        core.publish("a.b", tail(100 + i), 0)    # low: all dropped
    for i in range(3):
        core.publish("a.b", tail(200 + i), 3)    # critical: all pass
    frames = parse_frames(core.take_dirty()[s])
    seqs = [json.loads(p)["seq"] for _, p in frames]
    assert seqs == list(range(1, len(frames) + 1))   # no false gap
    assert len(frames) == 5 + 3
    assert core.throttled_drops == 5 + 5


def test_slow_client_marked_after_the_grace_time_and_gets_no_more_data():
    # Throttling off: over the limit and not shrinking for grace_seconds (here on a fixed clock).
    core = Core(4, queue_limit=1000, grace_seconds=2.0, hard_limit=100_000)
    core.set_clock(10.0)
    slow, ok = core.add_client(-1), core.add_client(-1)
    core.subscribe(slow, "a.b")
    for i in range(12):
        core.publish("a.b", tail(i, 200))
    assert core.take_slow() == []
    core.set_clock(12.0)
    core.publish("a.b", tail(12, 200))
    assert core.take_slow() == [slow]
    assert core.take_slow() == []
    queued = core.queued(slow)
    # `ok` joins now, with an empty queue: the next message reaches it and not
    # the slow client (a client never subscribed, as before, proved nothing).
    core.subscribe(ok, "a.b")
    assert core.publish("a.b", tail(99)) == 1
    assert core.queued(slow) == queued    # nodata now
    assert core.slow_marked == 1
    frames = parse_frames(core.take_dirty()[ok])
    assert [(json.loads(p)["seq"], json.loads(p)["stream_seq"]) for _, p in frames] == [(1, 99)]


def test_flush_writes_one_send_per_client_and_reports_blocked():
    a, b = small_socketpair()
    core = Core(4, queue_limit=1 << 30)
    s = core.add_client(a.fileno())
    core.subscribe(s, "a.b")
    for i in range(5):
        core.publish("a.b", tail(i, 20))
    calls = core.send_calls
    assert core.flush() == (None, None)
    assert core.send_calls == calls + 1         # five frames, one syscall
    got = b.recv(65536)
    assert [json.loads(p)["seq"] for _, p in parse_frames(got)] == [1, 2, 3, 4, 5]
    # Fill the socket: the core reports it blocked and keeps the rest queued.
    for i in range(400):
        core.publish("a.b", tail(i, 1000))
    blocked, dead = core.flush()
    assert blocked == [s] and dead is None
    assert core.blocked(s) and core.queued(s) > 0
    received = bytearray()
    b.setblocking(False)
    for _ in range(10_000):
        try:
            received += b.recv(1 << 20)
        except BlockingIOError:
            if core.flush_slot(s) == 0:
                break
    else:
        pytest.fail("queue never drained")
    for _ in range(100):
        try:
            received += b.recv(1 << 20)
        except BlockingIOError:
            break
    frames = parse_frames(bytes(received))
    assert [json.loads(p)["seq"] for _, p in frames] == list(range(6, 406))
    a.close()
    b.close()


def test_dead_socket_reported():
    a, b = socket.socketpair()
    b.close()
    core = Core(2)
    s = core.add_client(a.fileno())
    core.subscribe(s, "a.b")
    core.publish("a.b", tail(1))
    assert core.flush() == (None, [s])
    a.close()


def test_truncate_keeps_the_partly_written_frame():
    a, b = small_socketpair()
    core = Core(2, queue_limit=1 << 30)
    s = core.add_client(a.fileno())
    core.subscribe(s, "a.b")
    for i in range(100):
        core.publish("a.b", tail(i, 3000))
    core.flush()
    assert core.blocked(s)
    core.truncate(s)
    core.enqueue_raw(s, b"\x88\x02\x03\xf0")   # close 1008
    b.setblocking(False)
    received = bytearray()
    for _ in range(10_000):
        try:
            received += b.recv(1 << 20)
        except BlockingIOError:
            if core.flush_slot(s) == 0:
                try:
                    received += b.recv(1 << 20)
                except BlockingIOError:
                    pass
                break
    frames = parse_frames(bytes(received))   # parses cleanly: no frame was cut
    assert frames[-1] == (0x88, b"\x03\xf0")
    seqs = [json.loads(p)["seq"] for op, p in frames[:-1]]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 100
    a.close()
    b.close()


def test_route_cache_follows_new_patterns_and_unsubscribes():
    core = Core(200)
    s1, s2 = core.add_client(-1), core.add_client(-1)
    assert core.recipients("odin.token.x.update") == []       # cached as empty
    core.subscribe(s1, "odin.token.*.update")
    assert core.recipients("odin.token.x.update") == [s1]
    core.subscribe(s2, "odin.>")
    core.subscribe(s2, "odin.token.x.update")
    assert core.recipients("odin.token.x.update") == [s1, s2]
    core.unsubscribe(s2, "odin.>")
    assert core.recipients("odin.token.x.update") == [s1, s2]  # still via the exact pattern
    core.unsubscribe(s2, "odin.token.x.update")
    assert core.recipients("odin.token.x.update") == [s1]
    core.remove_client(s1)
    assert core.recipients("odin.token.x.update") == []
    assert core.pattern_count == 0


def test_slots_are_reused_lowest_first_and_capacity_is_enforced():
    core = Core(3)
    slots = [core.add_client(-1) for _ in range(3)]
    with pytest.raises(OverflowError):
        core.add_client(-1)
    core.remove_client(slots[1])
    core.remove_client(slots[0])
    assert core.add_client(-1) == 0
    assert core.add_client(-1) == 1
    with pytest.raises(KeyError):
        core.seq(99)


def test_replay_bytes_identical_to_first_send():
    core = Core(2, replay_size=4)
    s = core.add_client(-1)
    core.subscribe(s, "a.b")
    for i in range(6):
        core.publish("a.b", tail(i))
    first = core.take_dirty()[s]
    assert core.replay(s, 1, 6) == (4, (1, 2))
    again = core.take_dirty()[s]
    assert again == first[len(data_frame(1, tail(0))) + len(data_frame(2, tail(1))):]


def test_broadcast_raw_reaches_every_client_taking_data():
    core = Core(4)
    a, b, c = (core.add_client(-1) for _ in range(3))
    core.set_nodata(c)
    core.broadcast_raw(b"\x89\x00")
    assert core.take_dirty() == {a: b"\x89\x00", b: b"\x89\x00"}


def test_no_text_after_a_client_stops_taking_data():
    # Closing: its close frame (raw) may still go, a reply or notice may not follow it.
    core = Core(4)
    a, b = core.add_client(-1), core.add_client(-1)
    assert core.send_text(a, b"{}") is True
    core.set_nodata(b)
    assert core.send_text(b, b"{}") is False
    core.enqueue_raw(b, b"\x88\x00")
    assert core.take_dirty() == {a: b"\x81\x02{}", b: b"\x88\x00"}


def test_recipient_sets_turn_dense_and_back_at_the_threshold():
    # 10,000 slots: a bitset is 157 words (1,256 bytes), so a set stays a
    # sorted array up to 314 slots, turns dense above, and back at 157.
    core = Core(10000)
    words = 157
    assert core.sparse_max == 2 * words
    slots = [core.add_client(-1) for _ in range(400)]
    order = slots[::2] + slots[1::2]                   # not in slot order: the array keeps itself sorted
    core.subscribe(order[0], "odin.a")
    assert core.recipients("odin.a") == [order[0]]     # route made now
    assert core.set_bytes == 2 * 4 * 4                 # two arrays of 4 slots: pattern and route
    for s in order[1:core.sparse_max]:
        core.subscribe(s, "odin.a")
    assert core.set_bytes <= 2 * core.sparse_max * 4   # still arrays
    assert core.set_bytes < 2 * words * 8 + 1
    core.subscribe(order[core.sparse_max], "odin.a")
    assert core.set_bytes == 2 * words * 8             # both bitsets now
    assert core.recipients("odin.a") == sorted(order[:core.sparse_max + 1])
    assert core.publish("odin.a", tail(1)) == core.sparse_max + 1
    # back down: unsubscribe in the dense form, then in the sparse form
    for s in order[words:core.sparse_max + 1]:
        assert core.unsubscribe(s, "odin.a")
    assert core.set_bytes < 2 * words * 8              # arrays again (at half the threshold)
    assert core.recipients("odin.a") == sorted(order[:words])
    assert core.publish("odin.a", tail(2)) == words
    for s in order[1:words]:
        assert core.unsubscribe(s, "odin.a")
    assert core.recipients("odin.a") == [order[0]]
    assert not core.unsubscribe(order[1], "odin.a")
    core.unsubscribe(order[0], "odin.a")
    assert (core.pattern_count, core.route_count, core.set_bytes) == (0, 0, 0)


def test_route_is_the_union_of_sparse_and_dense_patterns_with_slot_reuse():
    core = Core(200)                                   # 4 words: arrays up to 8 slots
    slots = [core.add_client(-1) for _ in range(40)]
    for s in slots[:30]:
        core.subscribe(s, "odin.*.update")             # dense pattern
    for s in slots[25:35]:
        core.subscribe(s, "odin.x.update")             # dense too
    core.subscribe(slots[39], "odin.>")                # sparse
    assert core.recipients("odin.x.update") == sorted(slots[:35] + [slots[39]])
    # the route is dense; removing the overlap keeps the others
    for s in slots[25:30]:
        core.unsubscribe(s, "odin.x.update")
    assert core.recipients("odin.x.update") == sorted(slots[:35] + [slots[39]])
    for s in slots[2:30]:
        core.unsubscribe(s, "odin.*.update")
    assert core.recipients("odin.x.update") == sorted(slots[:2] + slots[30:35] + [slots[39]])
    # a slot reused by a new client starts with no subscriptions
    core.remove_client(slots[0])
    again = core.add_client(-1)
    assert again == slots[0]
    assert core.recipients("odin.x.update") == sorted(slots[1:2] + slots[30:35] + [slots[39]])
    core.subscribe(again, "odin.x.update")
    n = core.publish_batch(["odin.x.update", "odin.y.update", "odin.x.update"], [tail(1), tail(2), tail(3)], [2, 2, 2])
    assert n == 2 * 8 + 2                              # odin.y.update: slots[1] and slots[39]
    for s in [again, *slots[1:40]]:
        core.remove_client(s)
    assert (core.pattern_count, core.route_count, core.set_bytes) == (0, 0, 0)


def test_subscription_churn_returns_core_memory_to_zero():
    # The leak check: many subjects, wildcard and exact, clients coming and
    # going; once everyone left, no pattern, route or set byte remains, and no
    # message is held (the rings and queues went with their clients).
    import random

    from fanout_core._core import live_messages
    rnd = random.Random(7)
    core = Core(500, replay_size=16)
    live0 = live_messages()
    slots: list[int] = []
    for step in range(20000):
        op = rnd.random()
        if op < 0.05 and len(slots) < 500:
            slots.append(core.add_client(-1))
        elif op < 0.08 and slots:
            core.remove_client(slots.pop(rnd.randrange(len(slots))))
        elif op < 0.55 and slots:
            s = rnd.choice(slots)
            pat = rnd.choice((f"odin.*.t{rnd.randrange(50)}", "odin.>", f"odin.s{rnd.randrange(100)}.t{rnd.randrange(50)}"))
            core.subscribe(s, pat) if rnd.random() < 0.6 else core.unsubscribe(s, pat)
        else:
            subj = f"odin.s{rnd.randrange(100)}.t{rnd.randrange(50)}"
            core.publish(subj, tail(step))
        if step % 64 == 0:
            core.discard_queued()
    assert core.set_bytes > 0
    for s in slots:
        core.remove_client(s)
    assert (core.pattern_count, core.route_count, core.set_bytes) == (0, 0, 0)
    assert live_messages() == live0
    assert core.publish("odin.s1.t1", tail(0)) == 0
    assert core.route_count == 0                       # no wildcard: nothing cached for nobody


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_rings_hold_at_most_replay_size_messages_and_memory_goes_back_when_clients_leave():
    # Issue 19: RSS grew ~150 bytes per delivery and stayed at its peak after
    # every client left. The growth was replay rings filling (bounded: every
    # client keeps replay_size messages; now a gauge), the peak was glibc
    # keeping the freed blocks: trim_memory() gives them back.
    import random

    from fanout_core._core import live_message_bytes, live_messages
    rnd = random.Random(3)
    live0 = live_messages()
    core = Core(2000, replay_size=100)
    names = [f"odin.token.s{j}.update" for j in range(4000)]
    slots = [core.add_client(-1) for _ in range(1000)]
    for s in slots:
        for n in rnd.sample(names, 5):
            core.subscribe(s, n)
    body = tail(0, 300)
    core.trim_memory()          # freed blocks of earlier tests would absorb the growth
    base = _rss_anon()
    for _ in range(150):
        core.publish_batch([rnd.choice(names) for _ in range(64)], [body] * 64, [2] * 64)
        core.discard_queued()
        held = live_messages() - live0
        assert held <= len(slots) * core.replay_size
    assert core.stats()["messages_held"] == live_messages()
    assert core.stats()["message_bytes"] == live_message_bytes()
    grown = _rss_anon() - base
    assert grown > 4 << 20                             # the rings really hold something
    for s in slots:
        core.remove_client(s)
    assert live_messages() == live0 and core.set_bytes == 0
    core.trim_memory()
    assert _rss_anon() - base < grown / 2              # most of it is back with the OS
