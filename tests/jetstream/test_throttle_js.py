"""Degrade, don't disconnect (PROTOCOL.md 1.1 ``throttle_update``) with JetStream
as the source: real nats-server, a real node process, real slow readers (a
4 KiB receive buffer; one that never reads) beside a fast reader on the same
channel. Messages are published with :class:`fanout.publisher.Publisher`,
concurrently in rounds; the node dispatches them in stream order, so the
expected order is that of the stream seqs the publishes returned."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fanout.publisher import Publisher
from tests.helpers.node import NodeProcess
from tests.jetstream.test_node import start_node
from tests.server.support import Client, RawClient, connect

CH = "odin.token.thr.update"
PAD = "x" * 1000
ENV = dict(WS_CLIENT_QUEUE_BYTES=16384, WS_SOCKET_SNDBUF=4096, WS_SLOW_CLIENT_STRIKES=3,
           WS_THROTTLE_RECOVERY_SECONDS=30, WS_CONTROL_RATE=1000, WS_CONTROL_BURST=1000)
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
                else:
                    raise AssertionError("a reader that stops was never closed")
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
    # The notices it could still read (frames not begun are dropped at the close) go up one step at a time.
    texts = [json.loads(p) for op, p in frames if op == 0x1]
    levels = [n["level"] for n in texts if n["type"] == "throttle_update"]
    assert levels == [1, 2, 3][:len(levels)], levels
    # The fast reader on the same channel: 100 %, in stream order, no gap, no notice.
    assert [m["stream_seq"] for m in fast_got] == published
    assert [m["seq"] for m in fast_got] == list(range(1, len(published) + 1))


async def test_conflated_slow_reader_ends_with_the_newest_version_of_every_subject(nats_server):
    node = start_node(nats_server.url, "a", **ENV, WS_CONFLATE_CHANNELS="odin.token.*.price")
    subjects = [f"odin.token.t{i:02d}.price" for i in range(20)]
    newest: dict[str, tuple[int, int]] = {}          # subject -> (stream_seq, version)
    seen: dict[str, list[int]] = {s: [] for s in subjects}
    try:
        # It does not read: the queue fills, it is throttled, then conflation
        # holds one version per subject, so it is never closed.
        raw = await subscribe_raw(node, "odin.token.*.price", "odin.global.end")
        async with Publisher(servers=[nats_server.url], timeout=10) as pub:
            for version in range(40):                 # bounded: 800 messages
                seqs = await asyncio.gather(*(pub.publish(s, json.dumps({"v": version, "pad": PAD}))
                                              for s in subjects))
                newest.update({s: (q, version) for s, q in zip(subjects, seqs, strict=True)})
                if version >= 10 and await asyncio.to_thread(node.metric, "fanout_conflated_drops_total") > 100:
                    break
            assert node.metric("fanout_conflated_drops_total") > 0
            end = await pub.publish("odin.global.end", '"end"', priority="critical")
        for _ in range(100_000):
            m = await raw.read_json(timeout=10)
            if m["type"] == "message":
                if m["channel"] == "odin.global.end":
                    assert m["stream_seq"] == end
                    break
                seen[m["channel"]].append(m["stream_seq"])
        raw.close()
        closed_1008 = node.metric("fanout_connections_closed_total", 'code="1008"')
        level = node.metric("ws_throttle_transitions_total", 'from_level="0",to_level="1"')
    finally:
        node.stop()
    for sub in subjects:
        assert seen[sub] and seen[sub][-1] == newest[sub][0], (sub, seen[sub][-5:], newest[sub])
        assert seen[sub] == sorted(set(seen[sub]))               # versions only move forward
    assert closed_1008 == 0 and level == 1
