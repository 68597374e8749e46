"""Server pings and the idle timeout: silence (not even a pong) closes a client
with 1001; a client that answers pings stays."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.helpers.node import NodeProcess
from tests.server.support import RawClient, connect


@pytest.fixture(scope="module")
def ping_node() -> Iterator[NodeProcess]:
    n = NodeProcess({"WS_PING_INTERVAL": "0.2", "WS_IDLE_TIMEOUT": "1"}).start()
    try:
        yield n
    finally:
        assert n.stop() == 0


async def test_client_that_never_answers_pings_is_closed_and_one_that_pongs_stays(ping_node):
    async with connect(ping_node, ping_interval=None) as ok:   # websockets answers pings by itself
        await ok.heartbeat()
        silent = await RawClient.connect(ping_node.ws_port)
        try:
            t0 = time.monotonic()
            code, frames = await silent.read_until_close(timeout=10)
            elapsed = time.monotonic() - t0
        finally:
            silent.close()
        assert code == 1001
        assert elapsed >= 0.9, elapsed
        pings = [p for op, p in frames if op == 0x9]
        assert len(pings) >= 3, frames       # every 0.2 s for over a second
        # The websockets client has been connected longer than the silent one,
        # sending nothing but pongs: still open.
        await ok.heartbeat()
    assert ping_node.metric("fanout_connections_closed_total", 'code="1001"') == 1


async def test_client_that_answers_pings_by_hand_stays(ping_node):
    raw = await RawClient.connect(ping_node.ws_port)
    try:
        deadline = time.monotonic() + 1.6
        pongs = 0
        while time.monotonic() < deadline:          # bounded by the clock: 1.6 s > the idle timeout
            op, payload = await raw.read_frame(timeout=2)
            assert op == 0x9, (op, payload)
            raw.send_frame(0xA, payload)
            pongs += 1
        assert pongs >= 5
        raw.send_text({"type": "heartbeat"})
        assert (await raw.read_json())["type"] == "heartbeat_ack"
    finally:
        raw.close()
