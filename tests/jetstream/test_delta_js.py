"""Delta messages (PROTOCOL 1.2) with JetStream as the source: real
nats-server, two node processes on one stream, real WebSocket clients.
Every payload is rebuilt and compared byte for byte with what was
published; a resume on the other node starts full; the Python client
applies deltas (and one that did not ask gets none)."""

from __future__ import annotations

import asyncio

from fanout.client import Client
from fanout.publisher import Publisher
from tests.helpers.delta_check import Rebuilder, token_stream
from tests.jetstream.test_node import start_node
from tests.server.support import connect
from tests.server.test_delta import base_rule_on_one_connection

S = "odin.token.djs.update"
DELTA = {"delta": "fossil"}


async def feed(c, r: Rebuilder, n: int, timeout: float = 15.0) -> None:
    want = len(r.got) + n
    async with asyncio.timeout(timeout):
        while len(r.got) < want:
            r.frame(await c.recv_raw(timeout))


async def test_deltas_then_resume_on_another_node_starts_full(nats_server):
    url = nats_server.url
    a = start_node(url, "a")
    b = start_node(url, "b")
    stream = token_stream(20, 3)
    published: dict[int, bytes] = {}
    try:
        async with Publisher(servers=[url], timeout=10) as pub:
            async def send(payloads: list[bytes]) -> None:
                for p in payloads:
                    published[await pub.publish(S, p)] = p

            r1 = Rebuilder()
            async with connect(a) as c:
                reply = await c.request({"type": "subscribe", "channels": ["odin.token.*.update"], **DELTA})
                assert reply["delta"] == "fossil", reply
                epoch = reply["epoch"]
                await send(stream[:8])
                await feed(c, r1, 8)
            assert r1.kinds() == ["full"] + ["delta"] * 7
            after = r1.got[-1].stream_seq
            await send(stream[8:12])                     # while the client is away
            r2 = Rebuilder()
            async with connect(b) as c:
                await c.send({"type": "resume", "channels": ["odin.token.*.update"], "after": after,
                              "epoch": epoch, **DELTA})
                await feed(c, r2, 4)
                reply = await c.recv(10)
                assert reply["type"] == "resumed" and reply["complete"] is True, reply
                assert reply["delta"] == "fossil"
                await send(stream[12:16])
                await feed(c, r2, 4)
            # Catch-up is full; the first live message after it too; then deltas.
            assert r2.kinds() == ["full"] * 5 + ["delta"] * 3
            assert [g.stream_seq for g in r2.got[:4]] == sorted(published)[8:12]
            r1.check(published)
            r2.check(published)

            # The Python client: deltas on by default, every payload rebuilt;
            # one that turned them off gets full messages only.
            async with Client(a.ws_url, keep_raw=True, request_timeout=10) as pc, \
                    Client(b.ws_url, delta=False, keep_raw=True, request_timeout=10) as plain:
                await pc.subscribe([S])
                await plain.subscribe([S])
                await send(stream[16:20])
                for client in (pc, plain):
                    async with asyncio.timeout(15):
                        got = [await client.__anext__() for _ in range(4)]
                    assert [m["raw"] for m in got] == stream[16:20]
                    assert [published[m["stream_seq"]] for m in got] == stream[16:20]
                assert pc.tracker.deltas == 3 and plain.tracker.deltas == 0
    finally:
        a.stop()
        b.stop()


async def test_base_rule_on_one_connection_with_jetstream(nats_server):
    node = start_node(nats_server.url, "a")
    try:
        async with Publisher(servers=[nats_server.url], timeout=10) as pub:
            async def publish(items: list[tuple[str, bytes]], published: dict[int, bytes]) -> None:
                for subject, payload in items:
                    published[await pub.publish(subject, payload)] = payload
            await base_rule_on_one_connection(node, publish)
    finally:
        node.stop()
