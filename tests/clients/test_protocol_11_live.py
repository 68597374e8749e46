"""PROTOCOL.md 1.1 server features against a REAL node: snapshot, throttle_update, refresh, drain hint.

The client side of each is also tested against scripted servers
(test_js_client.py, test_python_client.py); these check both ends together.
They need Node.js + npm (JS parts) and Chromium (the React snapshot test) and
skip with the same reasons as the other JS tests.
"""

from __future__ import annotations

import asyncio
import signal
import time

from fanout.auth import sign
from fanout.client import Client
from tests.clients.test_js_client import js, proxy, publish  # noqa: F401  (fixtures)
from tests.clients.test_react_app import app_server, run_page  # noqa: F401  (fixture)

CH = "odin.token.abc.update"
TRENDING = "odin.global.trending"
FAST = {"reconnect_min": 0.05, "reconnect_max": 0.5, "request_timeout": 5.0}


async def test_js_snapshot_from_the_node(node, js):  # noqa: F811
    seqs = await publish(node, 2, channel=TRENDING)
    c = await js(node.ws_url)
    s = await c.cmd("subscribe", channels=[TRENDING], snapshot=True)
    ev = await c.wait(lambda e: e["ev"] == "sub_snapshot")
    assert ev["sub"] == s["sub"] and ev["count"] == 1
    msg = (await c.wait(lambda e: e["ev"] == "sub_message"))
    assert msg["snapshot"] is True and msg["stream_seq"] == seqs[-1]


async def test_python_snapshot_from_the_node(node):
    seqs = await publish(node, 2)
    async with Client(node.ws_url, **FAST) as client:
        await client.subscribe([CH], snapshot=True)
        got = await asyncio.wait_for(client.__anext__(), 10)
        assert got["snapshot"] is True and got["stream_seq"] == seqs[-1]


def test_react_app_renders_from_snapshot(node, app_server, tmp_path):  # noqa: F811
    node.publish(TRENDING, {"type": "trending_update", "data": {"top_100": [{"id": "tok3", "price": 2.5,
                                                                             "volume": 1}]}, "ts": 1})
    node.publish("odin.token.tok3.update", {"id": "tok3", "price": 2.5, "volume": 1})
    out = run_page(f"{app_server}?ws={node.ws_url}&token=tok3", "snapshot", tmp_path / "react-snapshot.png")
    assert out["rows"][0][1] == "tok3" and out["firstPrice"] == "2.5"


async def test_js_refresh_keeps_the_connection(node_factory, js):  # noqa: F811
    secret = "s" * 32
    node = node_factory(WS_AUTH_SECRET=secret)
    first = sign({"sub": "u", "exp": int(time.time()) + 3}, secret)
    second = sign({"sub": "u", "exp": int(time.time()) + 3600}, secret)
    c = await js(node.ws_url, tokens=f"{first},{second}", refresh_before=1500)
    ev = await c.wait(lambda e: e["ev"] == "refreshed", timeout=10)
    assert ev["exp"] > time.time() + 3000
    await asyncio.sleep(2)          # past the first token's exp: still the same connection
    assert len(c.of("connected")) == 1 and not c.of("disconnected")


async def test_js_drain_hint_from_the_node(node_factory, js):  # noqa: F811
    first = node_factory(WS_SHUTDOWN_TIMEOUT="5")
    from tests.clients.test_js_client import TcpProxy
    p = await TcpProxy(first.ws_port).start()
    try:
        c = await js(p.url())
        await c.cmd("subscribe", channels=[CH])
        second = node_factory()
        p.upstream_port = second.ws_port
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        hint = await c.wait(lambda e: e["ev"] == "reconnect", timeout=10)
        ev = await c.wait(lambda e: e["ev"] == "disconnected")
        assert ev["code"] == 1001 and ev["delay"] <= hint["after_ms"]
        await c.wait(lambda e: len(c.of("connected")) == 2, timeout=15)
    finally:
        await p.close()


async def test_python_throttle_update_from_a_slow_reader(node_factory):
    # The default throttle rule (a level per second of evidence); a small queue limit. The client's
    # receive buffer is the kernel's (autotuned), so how much it absorbs varies: publish until the
    # node reports the raise (bounded), then read up to the notice.
    node = node_factory(WS_CLIENT_QUEUE_BYTES="4096")
    seen: list[dict] = []
    dropped_connection: list[object] = []

    def publish_until_throttled() -> None:
        for i in range(0, 5000, 50):
            for k in range(i, i + 50):
                node.publish(CH, {"pad": "x" * 2000, "i": k})
            if node.metric("ws_throttle_transitions_total", 'from_level="0",to_level="1"') >= 1:
                return
        raise AssertionError("a client that does not read was never throttled")

    async with Client(node.ws_url, on_throttle=seen.append, on_disconnect=dropped_connection.append,
                      max_queue=1, **FAST) as client:
        await client.subscribe([CH])
        await asyncio.to_thread(publish_until_throttled)

        async def until_throttled() -> None:
            while not seen:
                await client.__anext__()
        # The notice's callback runs inside the iteration, which returns with a data
        # message: one more (critical: never sampled away) follows the notice.
        await asyncio.to_thread(node.publish, CH, {"i": "last"}, "critical")
        await asyncio.wait_for(until_throttled(), 20)
        assert seen[0]["level"] == 1 and "dropped" in seen[0] and "rate_percent" in seen[0]
        assert not dropped_connection
