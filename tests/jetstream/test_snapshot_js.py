"""``subscribe`` with ``snapshot: true`` with JetStream as the source: the store
filled by consumption, and seeded at start from the stream's last message per
subject (JetStream's own ``DeliverPolicy.LAST_PER_SUBJECT`` delivery), so a
restarted node serves snapshots before any new message arrives. Real
nats-server, real node processes, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fanout.publisher import Publisher
from tests.helpers.node import NodeProcess
from tests.jetstream.test_node import start_node
from tests.server.support import Client, connect, wait_metric

SUBJECTS = [f"odin.token.s{i:02d}.update" for i in range(20)]
VERSIONS = 3


async def publish_rounds(url: str, subjects: list[str], versions: int) -> dict[str, tuple[int, int]]:
    """Publish ``versions`` rounds over ``subjects`` (each round's publishes concurrent, rounds in order);
    returns subject -> (stream_seq, version) of its newest message."""
    newest: dict[str, tuple[int, int]] = {}
    async with Publisher(servers=[url], timeout=10) as pub:
        for v in range(versions):
            seqs = await asyncio.gather(*(pub.publish(s, json.dumps({"s": s, "v": v}).encode()) for s in subjects))
            for s, seq in zip(subjects, seqs, strict=True):
                newest[s] = (seq, v)
    return newest


async def publish_through(node: NodeProcess, url: str, versions: int) -> dict[str, tuple[int, int]]:
    """:func:`publish_rounds` while a client of ``node`` receives all of them: so ``node``
    dispatched (and acks) every one before it is stopped."""
    async with connect(node) as c:
        await c.subscribe("odin.token.>")
        newest = await publish_rounds(url, SUBJECTS, versions)
        await c.messages(len(SUBJECTS) * versions, timeout=15)
    return newest


async def snapshot(c: Client, *patterns: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    await c.send({"type": "subscribe", "channels": list(patterns), "snapshot": True})
    frames, reply = await c.recv_until(lambda f: f["type"] == "subscribed", timeout=10)
    assert all(f["type"] == "message" for f in frames), frames
    return frames, reply


def seeded_line(node: NodeProcess) -> dict[str, Any]:
    return node.wait_log(lambda d: str(d.get("msg", "")).startswith("JetStream snapshot store seed"), 15)


async def test_restarted_node_serves_the_newest_of_each_subject_from_the_stream(nats_server):
    url = nats_server.url
    first = start_node(url, "a")
    try:
        newest = await publish_through(first, url, VERSIONS)
    finally:
        first.stop()
    # A new process of the same node: its durable resumes after everything, so
    # nothing is consumed again and only the seeding can fill the store.
    node = start_node(url, "a")
    try:
        line = seeded_line(node)
        assert line["seeded"] == 20 and line["complete"] is True, line
        assert node.metric("fanout_broker_events_total", 'event="snapshot_seeded"') == 20
        async with connect(node) as c:
            frames, reply = await snapshot(c, "odin.token.*.update")
            assert reply["snapshot"] == 20
            # The newest of each, oldest update first, each with its own seq.
            want = sorted(newest.items(), key=lambda kv: kv[1][0])
            assert [(f["channel"], f["stream_seq"], f["data"]["v"]) for f in frames] == \
                [(s, seq, v) for s, (seq, v) in want]
            assert all(f["data"]["v"] == VERSIONS - 1 for f in frames)
            assert [f["seq"] for f in frames] == list(range(1, 21))
            # Live follows: no gap, no duplicate (concurrent publishes, ordered by their stream seqs).
            async with Publisher(servers=[url], timeout=10) as pub:
                live = sorted(await asyncio.gather(*(pub.publish(s, b'{"v": 99}') for s in SUBJECTS[:7])))
            got = await c.messages(7, timeout=10)
            assert [m["stream_seq"] for m in got] == live
            assert [m["seq"] for m in got] == list(range(21, 28))
            await c.heartbeat()             # nothing else was queued
            # A later snapshot has the live versions on top.
            async with connect(node) as c2:
                frames2, reply2 = await snapshot(c2, "odin.token.>")
                assert reply2["snapshot"] == 20
                assert [f["stream_seq"] for f in frames2][-7:] == live
    finally:
        node.stop()


async def test_a_new_node_snapshot_comes_from_its_own_consumption(nats_server):
    url = nats_server.url
    start_node(url, "maker").stop()          # it creates the stream
    newest = await publish_rounds(url, SUBJECTS, VERSIONS)
    node = start_node(url, "fresh")          # a new durable reads the stream from its start
    try:
        last = max(seq for seq, _ in newest.values())
        await wait_metric(node, "fanout_last_stream_seq", pred=lambda v: v >= last, timeout=15)
        async with connect(node) as c:
            frames, reply = await snapshot(c, "odin.token.*.update")
            assert reply["snapshot"] == 20
            assert [f["stream_seq"] for f in frames] == sorted(seq for seq, _ in newest.values())
            assert all(f["data"]["v"] == VERSIONS - 1 for f in frames)
        # Seeding stays out of the way: what the consumer delivers is the store.
        assert node.metric("fanout_broker_events_total", 'event="snapshot_seeded"') == 0
    finally:
        node.stop()


async def test_seeding_is_bounded_by_ws_snapshot_max_subjects(nats_server):
    url = nats_server.url
    first = start_node(url, "a")
    try:
        newest = await publish_through(first, url, 2)
    finally:
        first.stop()
    node = start_node(url, "a", WS_SNAPSHOT_MAX_SUBJECTS=5)
    try:
        line = seeded_line(node)
        assert line["seeded"] == 5 and line["max_subjects"] == 5, line
        async with connect(node) as c:
            frames, reply = await snapshot(c, "odin.token.>")
            assert reply["snapshot"] == 5
            # The five most recently updated subjects are the ones kept.
            want = sorted(newest.values())[-5:]
            assert [(f["stream_seq"], f["data"]["v"]) for f in frames] == want
    finally:
        node.stop()


async def test_snapshot_with_wildcards_overlapping_patterns_and_other_channels(nats_server):
    url = nats_server.url
    node = start_node(url, "a")
    try:
        async with Publisher(servers=[url], timeout=10) as pub:
            seqs = {}
            for s, body in [("odin.token.a.update", "a0"), ("odin.token.a.trade", "t0"),
                            ("odin.token.b.update", "b0"), ("odin.token.a.update", "a1"),
                            ("odin.global.trending", "g0"), ("odin.token.c.comment", "c0")]:
                seqs[s] = await pub.publish(s, json.dumps(body).encode())
        await wait_metric(node, "fanout_last_stream_seq", pred=lambda v: v >= max(seqs.values()), timeout=10)
        async with connect(node) as c:
            # Two patterns that overlap on odin.token.a.update: it comes once.
            frames, reply = await snapshot(c, "odin.token.*.update", "odin.token.a.>")
            assert reply["snapshot"] == 3 and reply["channels"] == ["odin.token.*.update", "odin.token.a.>"]
            assert [(f["channel"], f["data"]) for f in frames] == [
                ("odin.token.a.trade", "t0"), ("odin.token.b.update", "b0"), ("odin.token.a.update", "a1")]
            assert [f["stream_seq"] for f in frames] == sorted(f["stream_seq"] for f in frames)
    finally:
        node.stop()


async def test_snapshot_with_nothing_retained(nats_server):
    url = nats_server.url
    node = start_node(url, "a")
    try:
        async with Publisher(servers=[url], timeout=10) as pub:
            other = await pub.publish("odin.token.x.update", b'"elsewhere"')
        await wait_metric(node, "fanout_last_stream_seq", pred=lambda v: v >= other, timeout=10)
        async with connect(node) as c:
            frames, reply = await snapshot(c, "odin.global.>")
            assert frames == [] and reply["snapshot"] == 0
            async with Publisher(servers=[url], timeout=10) as pub:
                live = await pub.publish("odin.global.trending", b'"live"')
            (m,) = await c.messages(1, timeout=10)
            assert (m["seq"], m["stream_seq"], m["data"]) == (1, live, "live")
        assert node.metric("fanout_snapshots_total", 'result="empty"') == 1
    finally:
        node.stop()


async def test_restart_on_an_empty_stream_seeds_nothing(nats_server):
    first = start_node(nats_server.url, "a")
    first.stop()
    node = start_node(nats_server.url, "a")
    try:
        async with connect(node) as c:
            frames, reply = await snapshot(c, "odin.token.>")
            assert frames == [] and reply["snapshot"] == 0
        assert node.metric("fanout_broker_events_total", 'event="snapshot_seeded"') == 0
    finally:
        node.stop()
