"""Catch-up is paced by the client's socket and never cut short (PROTOCOL.md,
the ``resume`` row): a reader with a 4 KiB receive buffer asks for ten times
its queue limit of history and gets every message, then ``complete:true``,
then live messages with no gap and no duplicate, and is never closed as slow."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.server.support import RawClient, connect

CH = "odin.token.big.update"
QUEUE = 65536
PAYLOAD = json.dumps({"pad": "x" * 2048})
N = 400          # 400 x 2 KiB = 12x the queue limit


async def read_until(raw: RawClient, kind: str, limit: int = 10_000) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    for _ in range(limit):
        m = await raw.read_json(timeout=15)
        if m["type"] == kind:
            return frames, m
        frames.append(m)
    raise AssertionError(f"no {kind} in {limit} frames")


async def test_resume_ten_times_the_queue_limit_arrives_whole_to_a_slow_reader(node_factory):
    node = node_factory(WS_CLIENT_QUEUE_BYTES=QUEUE)
    async with connect(node) as c:
        r = await c.subscribe(CH)
    after, epoch = r["stream_seq"], r["epoch"]
    seqs = [node.publish(CH, PAYLOAD) for _ in range(N)]
    assert N * len(PAYLOAD) > 10 * QUEUE
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        raw.send_text({"type": "resume", "channels": [CH], "after": after, "epoch": epoch, "id": 1})
        frames, done = await read_until(raw, "resumed")
        assert done["complete"] is True and done["channels"] == [CH]
        assert [f["stream_seq"] for f in frames] == seqs
        assert [f["seq"] for f in frames] == list(range(1, N + 1))
        live = node.publish(CH, "live")
        m = await raw.read_json()
        assert (m["stream_seq"], m["seq"], m["data"]) == (live, N + 1, "live")
    finally:
        raw.close()
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 0
    assert node.metric("fanout_resumes_total", 'complete="true"') == 1


async def test_live_messages_during_a_paced_resume_follow_it_without_gap_or_duplicate(node_factory):
    node = node_factory(WS_CLIENT_QUEUE_BYTES=QUEUE)
    async with connect(node) as c:
        r = await c.subscribe(CH)
    seqs = [node.publish(CH, PAYLOAD) for _ in range(N)]
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        raw.send_text({"type": "resume", "channels": [CH], "after": r["stream_seq"]})
        # Publish more while the catch-up is still being paced out.
        first = await raw.read_json()
        seqs += [node.publish(CH, {"live": i}) for i in range(20)]
        frames, done = await read_until(raw, "resumed")
        frames.insert(0, first)
        rest = [await raw.read_json() for _ in range(N + 20 - len(frames))]
        got = [f["stream_seq"] for f in frames + rest]
        assert got == seqs                       # every one, in order, once
        assert [f["seq"] for f in frames + rest] == list(range(1, N + 21))
        assert done["complete"] is True
    finally:
        raw.close()


async def test_replay_of_more_than_the_queue_limit_is_paced_not_cut(node_factory):
    node = node_factory(WS_CLIENT_QUEUE_BYTES=QUEUE, WS_REPLAY_BUFFER=N)
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        raw.send_text({"type": "subscribe", "channels": [CH]})
        await read_until(raw, "subscribed")
        # Read while they are published: this reader keeps up with live traffic.
        reading = asyncio.ensure_future(asyncio.gather(*[raw.read_json(timeout=15) for _ in range(1)]))
        first = []
        publishing = asyncio.create_task(asyncio.to_thread(lambda: [node.publish(CH, PAYLOAD) for _ in range(N)]))
        reading.cancel()
        while len(first) < N:
            first.append(await raw.read_json(timeout=15))
        await publishing
        raw.send_text({"type": "replay", "from_seq": 1, "to_seq": N})
        again, done = await read_until(raw, "replay_done")
        assert done["missing"] is None
        assert again == first                    # byte for byte the same messages, same seqs
    finally:
        raw.close()
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 0
