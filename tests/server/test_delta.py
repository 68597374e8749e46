"""Delta messages (PROTOCOL 1.2) end to end in embedded mode: real node,
real WebSocket clients (permessage-deflate negotiated as a browser does),
every payload rebuilt and compared byte for byte with what was published,
and the base rule's cases: overlapping patterns, replay, unsubscribe and
subscribe again, binary payloads, snapshot then live, a throttled reader
with drops on a conflated and a plain channel, a client that did not ask."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from tests.helpers.delta_check import Rebuilder, token_stream
from tests.server.support import Client, RawClient, connect

UPD = "odin.token.{}.update"
DELTA = {"delta": "fossil"}


async def publish_all(node: Any, items: list[tuple[str, bytes]], published: dict[int, bytes],
                      priority: str | None = None) -> list[int]:
    def run() -> list[int]:
        out = []
        for subject, payload in items:
            ss = node.publish(subject, payload, priority)
            published[ss] = payload
            out.append(ss)
        return out
    return await asyncio.to_thread(run)


async def feed(c: Client, r: Rebuilder, n: int, timeout: float = 10.0) -> None:
    """Read until ``n`` more data messages were rebuilt."""
    want = len(r.got) + n
    async with asyncio.timeout(timeout):
        while len(r.got) < want:
            r.frame(await c.recv_raw(timeout))


async def test_every_payload_rebuilt_and_only_who_asked_gets_deltas(node):
    published: dict[int, bytes] = {}
    async with connect(node) as a, connect(node) as b:
        assert "permessage-deflate" in (a.ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        ra = await a.request({"type": "subscribe", "channels": [UPD.format("*")], **DELTA})
        assert ra["type"] == "subscribed" and ra["delta"] == "fossil", ra
        rb = await b.request({"type": "subscribe", "channels": [UPD.format("*")]})
        assert rb["type"] == "subscribed" and "delta" not in rb, rb
        streams = {t: token_stream(10, t) for t in range(3)}
        items = [(UPD.format(f"t{t}"), streams[t][i]) for i in range(10) for t in range(3)]
        await publish_all(node, items, published)
        ra_, rb_ = Rebuilder(), Rebuilder()
        await feed(a, ra_, 30)
        await feed(b, rb_, 30)
    ra_.check(published)
    rb_.check(published)
    for t in range(3):
        assert ra_.kinds(UPD.format(f"t{t}")) == ["full"] + ["delta"] * 9
    assert set(rb_.kinds()) == {"full"}
    assert node.metric("fanout_deltas_total") == 27
    full = node.metric("fanout_sent_bytes_total", 'kind="full"')
    delta = node.metric("fanout_sent_bytes_total", 'kind="delta"')
    assert 0 < delta < full / 2, (delta, full)


async def test_base_rule_on_one_connection(node):
    async def pub(items: list[tuple[str, bytes]], published: dict[int, bytes]) -> None:
        await publish_all(node, items, published)
    await base_rule_on_one_connection(node, pub)


async def base_rule_on_one_connection(node: Any, publish: Any) -> None:
    """Overlapping patterns, replay, unsubscribe and subscribe again, binary
    payloads, on one connection; ``publish(items, published)`` publishes (the
    node's endpoint, or JetStream) and records stream_seq -> payload."""
    s = UPD.format("aaa")
    stream = token_stream(12, 7)
    published: dict[int, bytes] = {}
    r = Rebuilder()

    async def publish_all(_node: Any, items: list[tuple[str, bytes]], into: dict[int, bytes]) -> None:
        await publish(items, into)

    async with connect(node) as a:
        # Two overlapping patterns: one delivery per message, still deltas.
        assert (await a.request({"type": "subscribe", "channels": [UPD.format("*")], **DELTA}))["delta"] == "fossil"
        assert (await a.request({"type": "subscribe", "channels": ["odin.token.>"], **DELTA}))["delta"] == "fossil"
        await publish_all(node, [(s, p) for p in stream[:4]], published)
        await feed(a, r, 4)
        assert r.kinds() == ["full", "delta", "delta", "delta"]
        assert [g.seq for g in r.got] == [1, 2, 3, 4]
        # replay: the copies come full (of what was first sent as deltas), and
        # the next live message is full too.
        await a.send({"type": "replay", "from_seq": 2, "to_seq": 3})
        await feed(a, r, 2)
        assert r.kinds()[-2:] == ["full", "full"] and [g.seq for g in r.got[-2:]] == [2, 3]
        assert (await a.recv())["type"] == "replay_done"
        await publish_all(node, [(s, p) for p in stream[4:6]], published)
        await feed(a, r, 2)
        assert r.kinds()[-2:] == ["full", "delta"]
        # unsubscribe, subscribe again: the first message is full.
        assert (await a.request({"type": "unsubscribe", "channels": [UPD.format("*"), "odin.token.>"]}))["type"] == "unsubscribed"
        await a.request({"type": "subscribe", "channels": [s], **DELTA})
        await publish_all(node, [(s, p) for p in stream[6:8]], published)
        await feed(a, r, 2)
        assert r.kinds()[-2:] == ["full", "delta"]
        # Binary payloads go full (data_b64), and so does the JSON after them.
        rng = random.Random(5)
        blobs = [b"\xff\xfe" + rng.randbytes(300), b"\xff\xfe" + rng.randbytes(300)]
        await publish_all(node, [(s, blobs[0]), (s, blobs[1]), (s, stream[8]), (s, stream[9])], published)
        await feed(a, r, 4)
        assert r.kinds()[-4:] == ["full", "full", "full", "delta"]
    r.check(published)


async def test_snapshot_then_live(node):
    s = UPD.format("snap")
    stream = token_stream(6, 9)
    published: dict[int, bytes] = {}
    await publish_all(node, [(s, p) for p in stream[:3]], published)
    r = Rebuilder()
    async with connect(node) as a:
        await a.send({"type": "subscribe", "channels": [UPD.format("*")], "snapshot": True, **DELTA})
        await feed(a, r, 1)
        reply = await a.recv()
        assert reply["type"] == "subscribed" and reply["snapshot"] == 1 and reply["delta"] == "fossil", reply
        await publish_all(node, [(s, p) for p in stream[3:]], published)
        await feed(a, r, 3)
    assert r.kinds() == ["full", "full", "delta", "delta"]
    assert r.got[0].stream_seq == max(published) - 3
    r.check(published)


async def test_throttled_reader_with_drops_on_conflated_and_plain_channels(node_factory):
    node = node_factory(WS_CLIENT_QUEUE_BYTES=16384, WS_SOCKET_SNDBUF=4096,
                        WS_CONFLATE_CHANNELS=UPD.format("*"), WS_CPU_THROTTLE_THRESHOLD=0)
    conflated, plain, end = UPD.format("cf"), "odin.token.cf.comment", "odin.token.cf.trade"
    rng = random.Random(11)

    def payload(i: int, kind: str) -> bytes:
        # Half stable, half new on every message: deltas of about half the size.
        return json.dumps({"i": i, "kind": kind, "stable": "s" * 500, "noise": rng.randbytes(250).hex()},
                          separators=(",", ":")).encode()

    published: dict[int, bytes] = {}
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        raw.send_text({"type": "subscribe", "channels": [conflated, plain], **DELTA})
        assert (await raw.read_json())["delta"] == "fossil"
        raw.send_text({"type": "subscribe", "channels": [end]})
        assert (await raw.read_json())["type"] == "subscribed"
        # Rounds of 60 messages published while the reader does not read (the
        # queue goes over its limit: throttled, conflated), then it reads
        # everything up to a critical end marker.
        r = Rebuilder()
        for rnd in range(6):
            items = [(conflated if i % 2 else plain, payload(i, "c" if i % 2 else "p"))
                     for i in range(60 * rnd, 60 * rnd + 60)]
            await publish_all(node, items, published)
            last = await publish_all(node, [(end, b'{"end":%d}' % rnd)], published, "critical")
            if rnd == 0:
                # The time-based rule raises a level once the queue stayed over
                # its limit without shrinking for WS_THROTTLE_RAISE_SECONDS.
                async with asyncio.timeout(10):
                    while node.metric("ws_throttle_transitions_total", 'from_level="0",to_level="1"') == 0:
                        await asyncio.sleep(0.05)
            async with asyncio.timeout(20):
                while not r.got or r.got[-1].stream_seq != last[0]:
                    op, data = await raw.read_frame(timeout=10)
                    assert op != 0x8, data
                    if op == 0x1:
                        r.frame(data)
    finally:
        raw.close()
    r.check(published)
    assert any(m.get("type") == "throttle_update" for m in r.other)
    assert len(r.got) < len(published)                      # some were throttled or conflated away
    assert "delta" in r.kinds(conflated) and "delta" in r.kinds(plain)
    assert node.metric("fanout_conflated_drops_total") > 0
