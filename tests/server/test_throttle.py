"""Degrade, don't disconnect (PROTOCOL.md 1.1 ``throttle_update``), against a
real node in embedded mode with real slow readers: a 4 KiB receive buffer and a
reader that reads at about half the stream's byte rate."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest

from tests.server.support import RawClient, connect

CH = "odin.token.thr.update"
PAD = "x" * 1000
ENV = dict(WS_CLIENT_QUEUE_BYTES=16384, WS_SOCKET_SNDBUF=4096, WS_SLOW_CLIENT_STRIKES=3,
           WS_THROTTLE_RECOVERY_SECONDS=1, WS_CONTROL_RATE=1000, WS_CONTROL_BURST=1000,
           WS_CPU_THROTTLE_THRESHOLD=0)   # load shedding (its own notices) is tested in tests/server/test_guard.py
PRIORITY = ["critical", "low", "low", "high", "high", "high", "medium", "high", "high", "high"]


class PacedReader:
    """Reads one frame at a time. With ``budget`` (a function: the bytes it may
    have read so far) it never reads ahead of it; without, as fast as it can.
    A budget tied to what was published makes "half the stream's byte rate"
    hold whatever speed the (shared, loaded) machine publishes at."""

    def __init__(self, raw: RawClient, budget: Any = None) -> None:
        self.raw = raw
        self.budget = budget
        self.read = 0
        self.messages: list[dict[str, Any]] = []
        self.notices: list[dict[str, Any]] = []
        self.notice_at: list[int] = []      # len(messages) when each notice arrived: its place in the stream
        self.close_code: int | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        import struct
        while True:
            while self.budget is not None and self.read >= self.budget():
                await asyncio.sleep(0.005)    # pacing the reader, not synchronisation
            op, payload = await self.raw.read_frame(timeout=30)
            self.read += len(payload)
            if op == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0]
                return
            if op == 0x1:
                m = json.loads(payload)
                if m["type"] == "message":
                    self.messages.append(m)
                else:
                    self.notices.append(m)
                    self.notice_at.append(len(self.messages))


class Publisher:
    """Publishes at a steady rate from a thread (the node's HTTP endpoint), recording what it published."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.published: list[tuple[int, str]] = []   # (stream_seq, priority)
        self.rate = 150.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.i = 0
        self.thread.start()

    def _run(self) -> None:
        t = time.monotonic()
        while not self.stop.is_set() and self.i < 20_000:
            prio = PRIORITY[self.i % len(PRIORITY)]
            seq = self.node.publish(CH, {"i": self.i, "pad": PAD}, prio)
            self.published.append((seq, prio))
            self.i += 1
            t += 1.0 / self.rate
            delay = t - time.monotonic()
            if delay > 0:
                time.sleep(delay)    # pacing the load, not synchronisation
            else:
                t = time.monotonic()


async def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_half_speed_reader_is_throttled_step_by_step_recovers_and_is_never_closed(node_factory):
    # 30 strikes: at level 3 the reader drains, but a stall of this (shared, loaded) test process
    # longer than a few strikes' worth of messages would look like a reader that stopped (1008).
    node = node_factory(**{**ENV, "WS_SLOW_CLIENT_STRIKES": 30})
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    async with connect(node, max_size=2**20) as fast:
        await fast.subscribe(CH)
        raw.send_text({"type": "subscribe", "channels": [CH]})
        assert (await raw.read_json())["type"] == "subscribed"
        fast_got: list[dict[str, Any]] = []
        fast_reader = asyncio.create_task(_drain(fast, fast_got))
        pub = Publisher(node)
        slow = PacedReader(raw, budget=lambda: 0.5 * len(pub.published) * 1040)   # half the stream's bytes
        try:
            # Phase 1: it falls behind and is throttled, one level at a time.
            await wait_for(lambda: any(n["level"] >= 2 for n in slow.notices), 25, "level 2")
            assert slow.close_code is None
            # Phase 2: it reads at full speed and comes back down to level 0.
            slow.budget = None
            pub.rate = 40.0
            await wait_for(lambda: slow.notices and slow.notices[-1]["level"] == 0, 15, "level 0")
            restored_at = len(pub.published)
            await wait_for(lambda: len(pub.published) >= restored_at + 40, 10, "more publishes")
        finally:
            pub.stop.set()
            await asyncio.to_thread(pub.thread.join, 10)
        # A critical last message: it arrives even if a stall throttled the reader again near the end.
        last = await asyncio.to_thread(node.publish, CH, {"i": pub.i, "pad": PAD}, "critical")
        pub.published.append((last, "critical"))
        await wait_for(lambda: slow.messages and slow.messages[-1]["stream_seq"] == last, 10, "the last message")
        await wait_for(lambda: slow.notices[-1]["level"] == 0, 10, "level 0 at the end")
        await wait_for(lambda: fast_got and fast_got[-1]["stream_seq"] == last, 10, "the fast reader's last")
        fast_reader.cancel()
    raw.close()
    levels = [n["level"] for n in slow.notices]
    assert all(n["type"] == "throttle_update" for n in slow.notices)
    assert all(abs(a - b) == 1 for a, b in zip([0] + levels, levels, strict=False)), levels   # one step at a time
    assert max(levels) >= 2 and levels[-1] == 0
    assert slow.notices[-1]["message"] == "Connection quality restored. Receiving all updates."
    assert all(n["rate_percent"] == [100, 75, 50, 25][n["level"]] for n in slow.notices)
    assert sum(n["dropped"] for n in slow.notices) > 0
    got = [m["stream_seq"] for m in slow.messages]
    assert [m["seq"] for m in slow.messages] == list(range(1, len(slow.messages) + 1))   # no seq gap
    published = [s for s, _ in pub.published]
    critical = {s for s, p in pub.published if p == "critical"}
    assert critical <= set(got)                                  # every critical message arrived
    assert len(got) < len(published)                             # it was throttled
    # After the last notice (level 0), every message arrived. A loaded machine can stall this
    # process long enough to throttle the reader again after the first level-0 notice, so the
    # place in the stream is the last notice's, not a publish count.
    after = got[slow.notice_at[-1]:]
    assert after and after == [s for s in published if s >= after[0]]
    if levels.index(0) == len(levels) - 1:      # not throttled again: that place is before restored_at
        assert after[0] <= pub.published[restored_at][0]
    # The fast reader on the same channel: everything, no notice.
    assert [m["stream_seq"] for m in fast_got] == published
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 0
    raises = sum(1 for a, b in zip([0] + levels, levels, strict=False) if (a, b) == (0, 1))
    assert node.metric("ws_throttle_transitions_total", 'from_level="0",to_level="1"') == raises >= 1
    assert node.metric("fanout_dropped_total", 'priority="critical",reason="throttled"') == 0
    assert node.metric("fanout_dropped_total", 'priority="low",reason="throttled"') > 0


async def _drain(client: Any, into: list[dict[str, Any]]) -> None:
    while True:
        m = await client.recv(timeout=60)
        assert m["type"] == "message", m            # a fast reader gets no throttle notice
        into.append(m)


@pytest.mark.parametrize("throttle", ["true", "false"])
async def test_a_reader_that_stops_is_closed_only_after_the_heaviest_level(node_factory, throttle):
    # With throttling disabled the close comes right after the strikes instead.
    node = node_factory(**ENV, WS_THROTTLE_ENABLED=throttle)
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        raw.send_text({"type": "subscribe", "channels": [CH]})
        assert (await raw.read_json())["type"] == "subscribed"
        for i in range(3000):                                    # bounded
            await asyncio.to_thread(node.publish, CH, {"i": i, "pad": PAD}, "high")
            if node.metric("fanout_connections_closed_total", 'code="1008"') >= 1:
                break
        else:
            raise AssertionError("a reader that stops was never closed")
    finally:
        raw.close()
    steps = [node.metric("ws_throttle_transitions_total", f'from_level="{a}",to_level="{a + 1}"') for a in range(3)]
    assert steps == ([1, 1, 1] if throttle == "true" else [0, 0, 0])
    assert node.metric("fanout_slow_clients_total") == 1


async def test_conflated_slow_reader_ends_with_the_newest_version_of_every_subject(node_factory):
    node = node_factory(**ENV, WS_CONFLATE_CHANNELS="odin.token.*.price")
    subjects = [f"odin.token.t{i:02d}.price" for i in range(20)]
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        raw.send_text({"type": "subscribe", "channels": ["odin.token.*.price", "odin.global.end"]})
        assert (await raw.read_json())["type"] == "subscribed"
        newest: dict[str, int] = {}
        version = 0
        # It does not read: the queue fills, it is throttled, then conflation
        # holds one version per subject, so it is never closed.
        for version in range(40):
            for sub in subjects:
                await asyncio.to_thread(node.publish, sub, {"v": version, "pad": PAD}, "high")
                newest[sub] = version
            if version >= 10 and node.metric("fanout_conflated_drops_total") > 100:
                break
        assert node.metric("fanout_conflated_drops_total") > 0
        node.publish("odin.global.end", "end", "critical")
        seen: dict[str, list[int]] = {s: [] for s in subjects}
        for _ in range(100_000):
            m = await raw.read_json(timeout=10)
            if m["type"] == "message":
                if m["channel"] == "odin.global.end":
                    break
                seen[m["channel"]].append(m["data"]["v"])
    finally:
        raw.close()
    for sub in subjects:
        assert seen[sub] and seen[sub][-1] == newest[sub], (sub, seen[sub][-5:])
        assert seen[sub] == sorted(set(seen[sub]))               # versions only move forward
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 0
