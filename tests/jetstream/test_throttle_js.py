"""Degrade, don't disconnect (PROTOCOL.md 1.1 ``throttle_update``) with JetStream
as the source: real nats-server, a real node process, real slow readers (a
4 KiB receive buffer; one that never reads) beside a fast reader on the same
channel. Messages are published with :class:`fanout.publisher.Publisher`,
concurrently in rounds (the node dispatches them in stream order, so the
expected order is that of the stream seqs the publishes returned), or at a
steady rate through the node's /publish for the paced readers (the embedded
tests' scenarios, tests/server/test_throttle.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fanout.publisher import Publisher
from tests.helpers.node import NodeProcess
from tests.jetstream.test_node import start_node
from tests.server.support import Client, RawClient, connect
from tests.server.test_throttle import conflated_scenario, half_speed_scenario

CH = "odin.token.thr.update"
PAD = "x" * 1000
# The default throttle rule; only the queue limit and the grace time lowered.
ENV = dict(WS_CLIENT_QUEUE_BYTES=16384, WS_SLOW_CLIENT_GRACE=1)
ROUND = 20          # concurrent publishes per round
MAX_ROUNDS = 150    # bound on every load loop: 3000 messages


async def read_all(client: Client, into: list[dict[str, Any]]) -> None:
    """A fast reader: every frame must be a data message (no throttle notice ever)."""
    while True:
        m = await client.recv(timeout=60)
        assert m["type"] == "message", m
        into.append(m)


async def until(pred: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)
    assert pred(), what


async def subscribe_raw(node: NodeProcess, *channels: str) -> RawClient:
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    raw.send_text({"type": "subscribe", "channels": list(channels)})
    assert (await raw.read_json())["type"] == "subscribed"
    return raw


async def test_a_reader_that_stops_is_closed_only_after_the_heaviest_level_a_fast_one_gets_all(nats_server):
    node = start_node(nats_server.url, "a", **ENV)
    published: list[int] = []
    fast_got: list[dict[str, Any]] = []
    try:
        raw = await subscribe_raw(node, CH)
        async with connect(node, max_size=2**20) as fast, Publisher(servers=[nats_server.url], timeout=10) as pub:
            await fast.subscribe(CH)
            reader = asyncio.create_task(read_all(fast, fast_got))
            try:
                for i in range(MAX_ROUNDS):
                    seqs = await asyncio.gather(*(pub.publish(CH, json.dumps({"i": i * ROUND + k, "pad": PAD}))
                                                  for k in range(ROUND)))
                    published += seqs
                    if await asyncio.to_thread(node.metric, "fanout_connections_closed_total", 'code="1008"') >= 1:
                        break
                # Judged by time: within 3 windows and the grace time of passing the limit,
                # with or without more messages (the periodic check). If the rounds ended
                # first, a quiet stream's windows are WS_SLOW_CLIENT_STRIKES (3, the default) times as long:
                # 3 x 3 s + 3 x 2 s = 15 s at most.
                await until(lambda: node.metric("fanout_connections_closed_total", 'code="1008"') >= 1, 18,
                            "the 1008 close")
                published.sort()
                await until(lambda: len(fast_got) >= len(published), 15, "the fast reader's last message")
            finally:
                reader.cancel()
        code, frames = await raw.read_until_close(timeout=10)
        raw.close()
        steps = [node.metric("ws_throttle_transitions_total", f'from_level="{a}",to_level="{a + 1}"')
                 for a in range(3)]
        down = node.metric("ws_throttle_transitions_total", 'from_level="3",to_level="2"')
        slow = node.metric("fanout_slow_clients_total")
    finally:
        node.stop()
    # Closed with 1008, and only after one step to each level up to the heaviest.
    assert code == 1008
    assert steps == [1, 1, 1] and down == 0 and slow == 1
    # Data frames not begun are dropped at the close, the notices kept: one step at a time, the last at level 3.
    texts = [json.loads(p) for op, p in frames if op == 0x1]
    levels = [n["level"] for n in texts if n["type"] == "throttle_update"]
    assert levels == [1, 2, 3], levels
    # The fast reader on the same channel: 100 %, in stream order, no gap, no notice.
    assert [m["stream_seq"] for m in fast_got] == published
    assert [m["seq"] for m in fast_got] == list(range(1, len(published) + 1))


def test_half_speed_reader_steps_up_comes_back_and_is_never_closed(nats_server):
    # The embedded test's scenario, the stream going through JetStream (the node's /publish).
    node = start_node(nats_server.url, "a", WS_CLIENT_QUEUE_BYTES=65536, WS_THROTTLE_RECOVERY_SECONDS=1,
                      WS_CPU_THROTTLE_THRESHOLD=0)
    try:
        half_speed_scenario(node)
    finally:
        node.stop()


def test_a_conflated_reader_at_30_percent_keeps_the_newest_value_of_every_subject(nats_server):
    node = start_node(nats_server.url, "a", WS_CLIENT_QUEUE_BYTES=65536, WS_THROTTLE_RECOVERY_SECONDS=1,
                      WS_CPU_THROTTLE_THRESHOLD=0, WS_CONFLATE_CHANNELS="odin.token.*.price")
    try:
        conflated_scenario(node)
    finally:
        node.stop()
