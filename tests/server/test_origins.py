"""WS_ALLOWED_ORIGINS on a real node over real sockets (issue 18: cross-site
WebSocket hijacking). The matching rules themselves are unit-tested in
tests/unit/test_origins.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from websockets.exceptions import InvalidStatus

from fanout.auth import sign
from tests.helpers.node import NodeProcess
from tests.server.support import LogMark, RawClient, connect

ALLOWED = "https://app.example.com,https://*.example.org"


@pytest.fixture(scope="module")
def origin_node() -> Iterator[NodeProcess]:
    n = NodeProcess({"WS_ALLOWED_ORIGINS": ALLOWED}).start()
    try:
        yield n
    finally:
        assert n.stop() == 0


async def _refused(node: NodeProcess, origin: str) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(node, origin=origin):
            pass
    return info.value.response.status_code


@pytest.mark.parametrize("origin", ["https://app.example.com", "HTTPS://App.Example.COM",
                                    "https://a.example.org", "https://a.b.example.org"])
async def test_an_allowed_origin_connects(origin_node, origin):
    async with connect(origin_node, origin=origin) as ws:
        await ws.heartbeat()


async def test_a_handshake_without_origin_connects(origin_node):
    # A server-side client: websockets sends no Origin unless told to.
    async with connect(origin_node) as ws:
        await ws.heartbeat()
    raw = await RawClient.connect(origin_node.ws_port)   # a plain handshake, no Origin header at all
    raw.writer.close()


async def test_an_origin_not_on_the_list_gets_403_a_log_line_and_a_metric(origin_node):
    before = origin_node.metric("fanout_connections_rejected_total", 'reason="origin"')
    mark = LogMark(origin_node)
    assert await _refused(origin_node, "https://evil.example.net") == 403
    line = mark.wait(lambda d: d.get("msg") == "handshake refused" and d.get("reason") == "origin")
    assert line["origin"] == "https://evil.example.net" and line["level"] == "info"
    assert origin_node.metric("fanout_connections_rejected_total", 'reason="origin"') == before + 1


@pytest.mark.parametrize("origin", [
    "https://example.org",              # the bare domain is not a subdomain
    "https://example.org.evil.com",     # nor a domain that merely starts with it
    "https://evilexample.org",
    "http://a.example.org",             # another scheme
    "https://app.example.com:8443",     # another port
    "null",
])
async def test_near_misses_are_refused(origin_node, origin):
    assert await _refused(origin_node, origin) == 403


async def test_refused_origins_log_once_per_interval(origin_node):
    mark = LogMark(origin_node)
    for _ in range(5):
        assert await _refused(origin_node, "https://flood.example.net") == 403
    # Sent after the five refusals: when its line is in, theirs would be too.
    assert await _refused(origin_node, "https://other.example.net") == 403
    mark.wait(lambda d: d.get("origin") == "https://other.example.net")
    assert len([d for d in mark.new() if d.get("origin") == "https://flood.example.net"]) == 1


async def test_the_origin_is_checked_before_the_token(node_factory):
    node = node_factory(WS_ALLOWED_ORIGINS=ALLOWED, WS_AUTH_SECRET="s" * 32)
    token = sign({"sub": "u1", "exp": 2**31}, "s" * 32)
    # A good token from a foreign page is still refused, and as 403, not 401.
    assert await _refused(node, "https://evil.example.net") == 403
    with pytest.raises(InvalidStatus) as info:
        async with connect(node, path=f"/ws?auth={token}", origin="https://evil.example.net"):
            pass
    assert info.value.response.status_code == 403
    async with connect(node, path=f"/ws?auth={token}", origin="https://app.example.com") as ws:
        await ws.heartbeat()
    assert node.metric("fanout_connections_rejected_total", 'reason="unauthorized"') == 0


async def test_by_default_any_origin_connects(shared_node):
    async with connect(shared_node, origin="https://anything.example.net") as ws:
        await ws.heartbeat()


def test_a_node_open_to_every_origin_warns_at_start():
    # Listening on all addresses (clients below still use 127.0.0.1) with no list and no auth.
    node = NodeProcess({"WS_HOST": "0.0.0.0"}).start()
    try:
        line = next(d for d in node.lines if d.get("msg") == "WebSocket port open to every origin")
        assert line["level"] == "warning" and "WS_ALLOWED_ORIGINS" in line["message"]
    finally:
        assert node.stop() == 0
    quiet = NodeProcess({"WS_HOST": "0.0.0.0", "WS_ALLOWED_ORIGINS": ALLOWED}).start()
    try:
        # The warning comes before "fanout listening", which start() has waited for.
        assert not any(d.get("msg") == "WebSocket port open to every origin" for d in quiet.lines)
    finally:
        assert quiet.stop() == 0
