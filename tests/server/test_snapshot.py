"""``subscribe`` with ``snapshot: true`` (PROTOCOL.md 1.1): the newest message
of every matching subject first (oldest update first, each with its own seq),
then the reply with ``snapshot: N``, then live with no gap and no duplicate."""

from __future__ import annotations

import json

from tests.server.support import RawClient, connect


async def test_snapshot_with_a_wildcard_then_live(node_factory):
    node = node_factory()
    last: dict[str, int] = {}
    for v in range(3):
        for t in ("a", "b", "c"):
            last[f"odin.token.{t}.update"] = node.publish(f"odin.token.{t}.update", {"v": v})
    node.publish("odin.token.a.trade", "other channel")
    node.publish("odin.token.b.update", {"v": 3})       # b is now the most recently updated
    last["odin.token.b.update"] += 4
    async with connect(node) as c:
        await c.send({"type": "subscribe", "channels": ["odin.token.*.update"], "snapshot": True, "id": 9})
        frames, r = await c.recv_until(lambda f: f["type"] == "subscribed")
        assert r["snapshot"] == 3 and r["id"] == 9 and r["channels"] == ["odin.token.*.update"]
        assert [(f["channel"], f["data"]["v"]) for f in frames] == [
            ("odin.token.a.update", 2), ("odin.token.c.update", 2), ("odin.token.b.update", 3)]
        assert [f["seq"] for f in frames] == [1, 2, 3]
        assert [f["stream_seq"] for f in frames] == sorted(f["stream_seq"] for f in frames)
        live = node.publish("odin.token.c.update", {"v": 4})
        (m,) = await c.messages(1)
        assert (m["seq"], m["stream_seq"], m["data"]) == (4, live, {"v": 4})
    assert node.metric("fanout_snapshots_total", 'result="delivered"') == 1


async def test_snapshot_with_nothing_retained(node_factory):
    node = node_factory()
    node.publish("odin.token.a.update", "x")
    async with connect(node) as c:
        r = await c.request({"type": "subscribe", "channels": ["odin.global.>"], "snapshot": True})
        assert r["type"] == "subscribed" and r["snapshot"] == 0
        node.publish("odin.global.trending", "live")
        (m,) = await c.messages(1)
        assert m["data"] == "live" and m["seq"] == 1
    assert node.metric("fanout_snapshots_total", 'result="empty"') == 1


async def test_snapshot_skips_subjects_a_live_subscription_already_covers(node_factory):
    node = node_factory()
    node.publish("odin.token.a.update", "a0")
    async with connect(node) as c:
        await c.subscribe("odin.token.a.update")
        node.publish("odin.token.b.update", "b0")
        r = await c.request({"type": "subscribe", "channels": ["odin.token.*.update"], "snapshot": True})
        assert r["type"] == "message" and r["data"] == "b0"
        r = await c.recv()
        assert r["type"] == "subscribed" and r["snapshot"] == 1


async def test_snapshot_bigger_than_the_queue_is_paced_to_a_slow_reader(node_factory):
    node = node_factory(WS_CLIENT_QUEUE_BYTES=16384)
    pad = "x" * 2000
    subjects = [f"odin.token.s{i:03d}.update" for i in range(150)]        # ~300 KB, 18x the queue
    seqs = [node.publish(s, {"s": s, "pad": pad}) for s in subjects]
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        raw.send_text({"type": "subscribe", "channels": ["odin.token.*.update"], "snapshot": True})
        got = []
        while True:
            m = await raw.read_json(timeout=15)
            if m["type"] == "subscribed":
                break
            got.append(m)
        assert m["snapshot"] == 150
        assert [g["stream_seq"] for g in got] == seqs
        live = node.publish("odin.token.s000.update", "live")
        m = await raw.read_json()
        assert (m["stream_seq"], m["seq"]) == (live, 151)
    finally:
        raw.close()
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 0


async def test_snapshot_store_is_bounded(node_factory):
    node = node_factory(WS_SNAPSHOT_MAX_SUBJECTS=5)
    for i in range(8):
        node.publish(f"odin.token.k{i}.update", str(i))
    async with connect(node) as c:
        await c.send({"type": "subscribe", "channels": ["odin.token.>"], "snapshot": True})
        frames, r = await c.recv_until(lambda f: f["type"] == "subscribed")
        assert r["snapshot"] == 5
        assert [f["data"] for f in frames] == [3, 4, 5, 6, 7]   # least recently updated evicted


async def test_snapshot_must_be_a_boolean(shared_node):
    async with connect(shared_node) as c:
        r = await c.request(json.dumps({"type": "subscribe", "channels": ["odin.x"], "snapshot": "yes"}))
        assert r["type"] == "error" and r["code"] == "bad_request"
