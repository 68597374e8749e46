"""A client that stops reading is closed with 1008 once its queue stays over
WS_CLIENT_QUEUE_BYTES without shrinking (after WS_SLOW_CLIENT_GRACE with
WS_THROTTLE_ENABLED=false, after the heaviest throttle level otherwise); the
others on the same subject get everything."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.server.support import RawClient, apublish, connect

SUBJECT = "odin.token.slow.update"
BIG = "x" * 65536
MAX_MESSAGES = 400    # 26 MB: more than any loopback send buffer (tcp_wmem max is 4 MB here)


@pytest.mark.parametrize("throttle", ["false", "true"])
async def test_slow_client_is_closed_and_fast_client_gets_everything(node_factory, throttle):
    node = node_factory(WS_CLIENT_QUEUE_BYTES=65536, WS_THROTTLE_ENABLED=throttle)
    slow = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        slow.send_text({"type": "subscribe", "channels": [SUBJECT]})
        assert (await slow.read_json())["type"] == "subscribed"
        async with connect(node, max_size=2**20) as fast:
            await fast.subscribe(SUBJECT)
            reader = asyncio.create_task(fast.recv_until(lambda m: m["data"] == "end", timeout=30))
            # The slow client reads nothing while messages pile up in the kernel
            # buffers, then in its queue; stop once the node says it closed it
            # (or all are out: the periodic check judges a queue with no new
            # messages too: 3 windows of 3 s and 3 x the grace time, the documented bound).
            sent = 0
            for _ in range(MAX_MESSAGES):
                await apublish(node, SUBJECT, {"i": sent, "pad": BIG})
                sent += 1
                if any(d.get("msg") == "slow client closed" for d in list(node.lines)):
                    break
            await asyncio.to_thread(node.wait_log, lambda d: d.get("msg") == "slow client closed", 20)
            await apublish(node, SUBJECT, "end")
            # Reading at last (before the node's close timeout): whole frames, a
            # gapless prefix of the stream, then 1008.
            code, frames = await slow.read_until_close(timeout=20)
            assert code == 1008
            seqs = [m["seq"] for m in (json.loads(p) for op, p in frames if op == 0x1) if m["type"] == "message"]
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < sent
            # Meanwhile the fast client got every message.
            got, end = await reader
            assert end["seq"] == sent + 1
            assert [m["seq"] for m in got] == list(range(1, sent + 1))
            assert [m["data"]["i"] for m in got] == list(range(sent))
            assert all(m["data"]["pad"] == BIG for m in got)
            await fast.heartbeat()
    finally:
        slow.close()
    line = node.wait_log(lambda d: d.get("msg") == "slow client closed")
    assert line["limit"] == 65536
    assert node.metric("fanout_slow_clients_total") == 1
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 1
    # Throttled first: one step at a time up to the heaviest, and only then closed.
    steps = [node.metric("ws_throttle_transitions_total", f'from_level="{a}",to_level="{a + 1}"') for a in range(3)]
    assert steps == ([1, 1, 1] if throttle == "true" else [0, 0, 0])


N = 40


async def test_client_that_keeps_up_with_a_burst_is_not_closed(node_factory):
    node = node_factory(WS_CLIENT_QUEUE_BYTES=65536)
    async with connect(node, max_size=2**20) as c:
        await c.subscribe(SUBJECT)
        reader = asyncio.create_task(c.messages(N, timeout=20))
        for i in range(N):
            await apublish(node, SUBJECT, {"i": i, "pad": BIG[:32768]})
        got = await reader
        assert [m["seq"] for m in got] == list(range(1, N + 1))
        await c.heartbeat()
    assert node.metric("fanout_slow_clients_total") == 0
