"""WS_FLUSH_LATENCY_MS in the hub: hot clients get several frames per
sendmsg(), light traffic is flushed at once, 0 turns it off; and the hub's
core gets WS_FLUSH_THREADS.

Real Core, socketpairs, a real event loop. Traffic is paced with short
sleeps (the load itself, bounded in count); the assertions are on counts of
frames and syscalls, never on times.
"""

from __future__ import annotations

import asyncio
import json

import pytest

import fanout.hub as hub_mod
from fanout.brokers.base import Message
from fanout.hub import Hub
from fanout.metrics import Metrics
from tests.helpers.inproc import FakeClock, RecPeer, drain_loop, make_cfg


def count_frames(data: bytes) -> int:
    n = i = 0
    while i < len(data):
        ln, j = data[i + 1] & 0x7F, i + 2
        if ln == 126:
            ln, j = int.from_bytes(data[j:j + 2], "big"), j + 2
        json.loads(data[j:j + ln])
        i = j + ln
        n += 1
    return n


@pytest.fixture(autouse=True)
def short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_mod, "FLUSH_WINDOW", 0.05)   # decide after 50 ms of traffic, not 500


async def run(budget_ms: float, clients: int, messages: int, subjects: int) -> tuple[Hub, list[RecPeer], int]:
    """``messages`` dispatched 2 ms apart, round-robin over ``subjects``
    (client i on subject i % subjects). Returns the hub, peers and the frames
    the clients received."""
    hub = Hub(make_cfg(WS_FLUSH_LATENCY_MS=budget_ms, WS_FLUSH_THREADS=2), Metrics(), FakeClock())
    hub.bind(asyncio.get_running_loop(), None)
    peers = [RecPeer() for _ in range(clients)]
    for i, p in enumerate(peers):
        hub.subscribe(hub.attach(p, 0), [f"odin.token.s{i % subjects}.update"])
    for seq in range(1, messages + 1):
        hub.dispatch(Message(f"odin.token.s{seq % subjects}.update", b'{"i":%d}' % seq, seq, 1, 2))
        await asyncio.sleep(0.002)
    got = 0
    for _ in range(100):                     # bounded: the held flush comes within one budget
        await drain_loop()
        got += sum(count_frames(p.read()) for p in peers)
        if got >= messages:
            break
        await asyncio.sleep(budget_ms / 1000 / 4 or 0.001)
    return hub, peers, got


async def test_hot_clients_share_a_sendmsg_within_the_budget() -> None:
    # 1 client at ~500 frames/s, budget 40 ms: ~20 frames per held flush.
    hub, _, got = await run(40, clients=1, messages=150, subjects=1)
    assert got == 150                        # nothing lost or doubled by holding
    assert hub.coalescing
    assert hub.core.send_calls * 3 <= got, f"{hub.core.send_calls} sendmsg for {got} frames: not coalesced"


async def test_light_traffic_is_flushed_at_once() -> None:
    # 50 clients on 50 subjects: each gets ~10 frames/s, far under one per 40 ms.
    hub, _, got = await run(40, clients=50, messages=150, subjects=50)
    assert got == 150
    assert not hub.coalescing
    assert hub.core.send_calls == got        # every frame went at once, alone


async def test_budget_zero_never_holds() -> None:
    hub, _, got = await run(0, clients=1, messages=60, subjects=1)
    assert got == 60
    assert not hub.coalescing
    assert hub.core.send_calls == got


def test_flush_threads_setting_reaches_the_core() -> None:
    assert Hub(make_cfg(WS_FLUSH_THREADS=3), Metrics(), FakeClock()).core.flush_threads == 3
    auto = make_cfg().flush_threads
    assert 1 <= auto <= 8
    assert Hub(make_cfg(), Metrics(), FakeClock()).core.flush_threads == auto
