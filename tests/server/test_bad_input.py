"""Bad client input: each gets its PROTOCOL.md answer, a metric and a log line,
and (except where the contract says close) the connection stays usable."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from tests.server.support import LogMark, RawClient, connect, sentinel, wait_metric

BAD_REQUESTS = [
    # (frame, words the error message must contain)
    ("{nope", "not JSON"),
    ("", "not JSON"),
    ("[1, 2]", "JSON object"),
    ("42", "JSON object"),
    ('"heartbeat"', "JSON object"),
    ("null", "JSON object"),
    ({"type": "nope"}, "unknown type"),
    ({"channels": ["odin.token.a"]}, "'type'"),
    ({"type": 5}, "'type'"),
    ({"type": ["subscribe"]}, "'type'"),
    ({"type": "subscribe"}, "'channels'"),
    ({"type": "subscribe", "channels": "odin.token.a"}, "'channels'"),
    ({"type": "subscribe", "channels": [1, 2]}, "'channels'"),
    ({"type": "subscribe", "channels": ["odin.token.a", None]}, "'channels'"),
    ({"type": "subscribe", "channels": []}, "'channels'"),
    ({"type": "unsubscribe", "channels": {"odin.token.a": 1}}, "'channels'"),
    ({"type": "replay", "from_seq": "1", "to_seq": 2}, "'from_seq'"),
    ({"type": "replay", "from_seq": 1}, "'to_seq'"),
    ({"type": "replay", "from_seq": True, "to_seq": 2}, "'from_seq'"),
    ({"type": "replay", "from_seq": 1.5, "to_seq": 2}, "'from_seq'"),
    ({"type": "replay", "from_seq": 3, "to_seq": 2}, "from_seq <= to_seq"),
    ({"type": "replay", "from_seq": 0, "to_seq": 2}, "from_seq <= to_seq"),
    ({"type": "replay", "from_seq": 1, "to_seq": 2**64}, "'to_seq'"),     # over uint64
    ({"type": "resume", "channels": ["odin.token.a"], "after": "5"}, "'after'"),
    ({"type": "resume", "channels": ["odin.token.a"], "after": 2**64}, "'after'"),
    ({"type": "subscribe", "channels": [f"odin.token.c{i}" for i in range(1001)]}, "at most 1000"),
    ({"type": "resume", "channels": ["odin.token.a"], "after": -1}, "'after'"),
    ({"type": "resume", "channels": ["odin.token.a"]}, "'after'"),
    ({"type": "resume", "channels": "odin.token.a", "after": 1}, "'channels'"),
    ({"type": "resume", "channels": ["odin.token.a"], "after": 1, "epoch": 5}, "'epoch'"),
    ({"type": "heartbeat", "id": {"a": 1}}, "'id'"),
    ({"type": "heartbeat", "id": [1]}, "'id'"),
    ({"type": "heartbeat", "id": 1.5}, "'id'"),
    ({"type": "heartbeat", "id": True}, "'id'"),
]


def _label(case: tuple[object, str]) -> str:
    frame = case[0]
    return (frame if isinstance(frame, str) else json.dumps(frame))[:40] or "empty"


@pytest.mark.parametrize("frame, words", BAD_REQUESTS, ids=[_label(c) for c in BAD_REQUESTS])
async def test_bad_request_is_answered_counted_logged_and_connection_stays(shared_node, frame, words):
    before = shared_node.metric("fanout_client_errors_total", 'code="bad_request"')
    mark = LogMark(shared_node)
    async with connect(shared_node) as c:
        r = await c.request(frame)
        assert r["type"] == "error" and r["code"] == "bad_request", r
        assert words in r["message"], r
        await c.heartbeat()
    assert shared_node.metric("fanout_client_errors_total", 'code="bad_request"') == before + 1
    line = mark.wait(lambda d: d.get("msg") == "client error" and d.get("code") == "bad_request")
    assert line["error"] == r["message"] and line["level"] == "info"


@pytest.mark.parametrize("req_id", ["q-1", 12])
async def test_bad_request_echoes_a_valid_id(shared_node, req_id):
    async with connect(shared_node) as c:
        r = await c.request({"type": "nope", "id": req_id})
        assert r["code"] == "bad_request" and r["id"] == req_id


async def test_bad_requests_in_a_row_do_not_close_the_connection(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.global.sentinel")
        for frame, _ in BAD_REQUESTS[:20]:
            await c.send(frame)
        errors = await sentinel(shared_node, c)
        assert [e["code"] for e in errors] == ["bad_request"] * 20


async def test_binary_frame_is_a_bad_request(shared_node):
    before = shared_node.metric("fanout_client_errors_total", 'code="bad_request"')
    async with connect(shared_node) as c:
        r = await c.request(json.dumps({"type": "heartbeat"}).encode())
        assert r["type"] == "error" and r["code"] == "bad_request" and "binary" in r["message"]
        await c.heartbeat()
    assert shared_node.metric("fanout_client_errors_total", 'code="bad_request"') == before + 1


async def test_fragmented_frames(shared_node):
    raw = await RawClient.connect(shared_node.ws_port)
    try:
        # A text message in three fragments is one request.
        raw.send_frame(0x1, b'{"type":"hear', fin=False)
        raw.send_frame(0x0, b'tbeat","id"', fin=False)
        raw.send_frame(0x0, b':"frag"}')
        r = await raw.read_json()
        assert r["type"] == "heartbeat_ack" and r["id"] == "frag"
        # A ping between fragments is answered; the message still completes.
        raw.send_frame(0x1, b'{"type":', fin=False)
        raw.send_frame(0x9, b"between")
        raw.send_frame(0x0, b'"heartbeat"}')
        frames = {await raw.read_frame(), await raw.read_frame()}
        assert (0xA, b"between") in frames
        assert any(op == 0x1 and json.loads(p)["type"] == "heartbeat_ack" for op, p in frames)
        # A fragmented binary message is still a binary message.
        raw.send_frame(0x2, b'{"type":', fin=False)
        raw.send_frame(0x0, b'"heartbeat"}')
        r = await raw.read_json()
        assert r["type"] == "error" and r["code"] == "bad_request"
        raw.send_text({"type": "heartbeat"})
        assert (await raw.read_json())["type"] == "heartbeat_ack"
    finally:
        raw.close()


# ------------------------------------------------------------ invalid channels
INVALID = [
    "",                                  # empty
    "odin..token",                       # empty token
    "odin.token.",                       # trailing empty token
    ".odin",                             # leading empty token
    "odin.tok$en",                       # bad character
    "odin.tok en",                       # space
    "odin.t\u00f6ken",                   # not ASCII
    "odin.>.x",                          # '>' not last
    "odin.to*ken",                       # '*' inside a token
    "odin.tok>",                         # '>' inside a token
    ".".join(["t"] * 17),                # 17 tokens
    "odin." + "x" * 65,                  # token over 64 chars
    ".".join(["a" * 60] * 5),            # 304 bytes
    ".".join(["a" * 63] * 4 + ["b"]),    # 257 bytes
]
VALID_EDGES = [
    ".".join(["t"] * 16),                # 16 tokens
    "odin." + "x" * 64,                  # 64-char token
    ".".join(["a" * 63] * 3 + ["a" * 62, "b"]),   # 256 bytes exactly
    "*",
    ">",
    "A-z_0.*.>",
]


@pytest.mark.parametrize("pattern", INVALID, ids=range(len(INVALID)))
async def test_invalid_channel_is_refused_alone(shared_node, pattern):
    async with connect(shared_node) as c:
        r = await c.request({"type": "subscribe", "channels": [pattern], "id": "s"})
        assert r["type"] == "error" and r["code"] == "invalid_channel" and r["channel"] == pattern, r
        assert r["id"] == "s" and r["message"]
        done = await c.recv()
        assert done == {"type": "subscribed", "id": "s", "channels": [], "epoch": done["epoch"],
                        "stream_seq": done["stream_seq"]}
        await c.heartbeat()


async def test_invalid_channels_are_refused_one_by_one_and_the_rest_accepted(shared_node):
    assert len(VALID_EDGES[2]) == 256
    before = shared_node.metric("fanout_client_errors_total", 'code="invalid_channel"')
    mark = LogMark(shared_node)
    good = ["odin.token.mix.a", "odin.token.*.mix"]
    mixed = [good[0], *INVALID, good[1]]
    async with connect(shared_node) as c:
        await c.send({"type": "subscribe", "channels": mixed, "id": 3})
        errors, r = await c.recv_until(lambda f: f["type"] == "subscribed")
        assert r["channels"] == good and r["id"] == 3
        assert [(e["type"], e["code"], e["channel"], e["id"]) for e in errors] == [
            ("error", "invalid_channel", p, 3) for p in INVALID]
        r = await c.subscribe(*VALID_EDGES)
        assert r["channels"] == VALID_EDGES
        # The accepted patterns work.
        await c.request({"type": "unsubscribe", "channels": VALID_EDGES})
        await c.subscribe("odin.global.sentinel")
        shared_node.publish("odin.token.mix.a", "a")
        shared_node.publish("odin.token.b.mix", "b")
        got = await sentinel(shared_node, c)
        assert [m["data"] for m in got] == ["a", "b"]
    assert shared_node.metric("fanout_client_errors_total", 'code="invalid_channel"') == before + len(INVALID)
    # One log line per client and reason per 10 s: the first refusal is
    # logged, the others are counted as suppressed (no log amplification).
    line = mark.wait(lambda d: d.get("msg") == "client error" and d.get("code") == "invalid_channel")
    assert line["channel"] == INVALID[0]
    assert not [d for d in mark.new() if d.get("msg") == "client error" and d.get("channel") == "odin.>.x"]
    assert shared_node.metric("fanout_log_suppressed_total", 'reason="invalid_channel"') >= len(INVALID) - 1


async def test_invalid_channel_in_unsubscribe_and_resume(shared_node):
    async with connect(shared_node) as c:
        r = await c.request({"type": "unsubscribe", "channels": ["odin..x", "odin.token.ok"]})
        assert r["code"] == "invalid_channel" and r["channel"] == "odin..x"
        r = await c.recv()
        assert r == {"type": "unsubscribed", "channels": ["odin.token.ok"]}
        r = await c.request({"type": "resume", "channels": ["odin.>.x", "odin.token.ok"], "after": 0})
        assert r["code"] == "invalid_channel" and r["channel"] == "odin.>.x"
        frames, r = await c.recv_until(lambda f: f["type"] == "resumed")
        assert r["channels"] == ["odin.token.ok"] and r["complete"] is True
        await c.heartbeat()


# ------------------------------------------------------------- frame size
async def test_frame_at_the_limit_is_served(shared_node):
    frame = json.dumps({"type": "heartbeat", "pad": ""})
    frame = frame.replace('""', '"' + "x" * (65536 - len(frame)) + '"')
    assert len(frame) == 65536
    async with connect(shared_node, compression=None) as c:
        assert (await c.request(frame))["type"] == "heartbeat_ack"


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_oversize_frame_closes_with_1009(shared_node, compression):
    before = shared_node.metric("fanout_connections_closed_total", 'code="1009"')
    mark = LogMark(shared_node)
    async with connect(shared_node, compression=compression) as c:
        await c.heartbeat()
        # With deflate this is a few hundred bytes on the wire; the limit is on the message.
        await c.send(json.dumps({"type": "heartbeat", "pad": "x" * 65536}))
        code, frames = await c.closed()
        assert code == 1009 and frames == []
    assert shared_node.metric("fanout_connections_closed_total", 'code="1009"') == before + 1
    mark.wait(lambda d: d.get("msg") == "client closed" and d.get("code") == 1009)
    async with connect(shared_node) as c:
        await c.heartbeat()


async def test_fragments_over_the_limit_together_close_with_1009(shared_node):
    raw = await RawClient.connect(shared_node.ws_port)
    try:
        # 2 x 40000 bytes: each fragment fits, the message does not. (Nothing
        # more is sent: the node closes the socket at the second fragment.)
        raw.send_frame(0x1, b"x" * 40000, fin=False)
        raw.send_frame(0x0, b"x" * 40000, fin=False)
        code, frames = await raw.read_until_close()
        assert code == 1009 and frames == []
    finally:
        raw.close()


async def test_frame_limit_is_configurable(node_factory):
    node = node_factory(WS_MAX_FRAME_BYTES=256)
    async with connect(node) as c:
        await c.send(json.dumps({"type": "heartbeat", "pad": "x" * 250}))
        code, _ = await c.closed()
        assert code == 1009


# -------------------------------------------------------------- protocol errors
@pytest.mark.parametrize("bad", [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf"],
                         ids=["invalid-byte", "encoded-surrogate", "overlong"])
async def test_invalid_utf8_text_closes_with_1007(shared_node, bad):
    # RFC 6455 8.1: a text frame that is not UTF-8 fails the connection with 1007.
    before = shared_node.metric("fanout_connections_closed_total", 'code="1007"')
    raw = await RawClient.connect(shared_node.ws_port)
    try:
        raw.send_frame(0x1, b'{"type":"heartbeat","x":"' + bad + b'"}')
        code, _ = await raw.read_until_close()
        assert code == 1007
    finally:
        raw.close()
    assert shared_node.metric("fanout_connections_closed_total", 'code="1007"') == before + 1


async def test_invalid_utf8_across_fragments_closes_with_1007(shared_node):
    raw = await RawClient.connect(shared_node.ws_port)
    try:
        raw.send_frame(0x1, b'{"type":"heartbeat","x":"\xed', fin=False)
        raw.send_frame(0x0, b'\xa0\x80"}')
        code, _ = await raw.read_until_close()
        assert code == 1007
    finally:
        raw.close()


async def test_unmasked_client_frame_closes_with_1002(shared_node):
    raw = await RawClient.connect(shared_node.ws_port)
    try:
        raw.writer.write(b"\x81\x05hello")   # clients must mask
        code, _ = await raw.read_until_close()
        assert code == 1002
    finally:
        raw.close()
    assert shared_node.metric("fanout_connections_closed_total", 'code="1002"') >= 1


async def test_client_close_is_answered(shared_node):
    raw = await RawClient.connect(shared_node.ws_port)
    try:
        raw.send_close(4000)
        code, frames = await raw.read_until_close()
        assert code == 4000 and frames == []
        assert await raw.eof() == b""
    finally:
        raw.close()


# ------------------------------------------------------------------ flooding
async def test_flooding_gets_rate_limited_then_closed_with_1008(node_factory):
    # 0.1 frames/s refill: nothing comes back during the test, so counts are exact.
    node = node_factory(WS_CONTROL_RATE="0.1", WS_CONTROL_BURST=5, WS_CONTROL_STRIKES=3)
    async with connect(node) as c:
        for i in range(12):
            await c.send({"type": "heartbeat", "id": i})
        code, frames = await c.closed()
    replies = [json.loads(f) for f in frames]
    assert [r["type"] for r in replies] == ["heartbeat_ack"] * 5 + ["error"] * 2
    assert [r["id"] for r in replies[:5]] == [0, 1, 2, 3, 4]
    assert all(r["code"] == "rate_limited" for r in replies[5:])
    assert code == 1008
    assert node.metric("fanout_client_errors_total", 'code="rate_limited"') == 2
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 1
    node.wait_log(lambda d: d.get("msg") == "client flooding: closed")
    node.wait_log(lambda d: d.get("msg") == "client error" and d.get("code") == "rate_limited")
    async with connect(node) as c:   # others are not affected
        await c.heartbeat()


async def test_a_flooder_that_keeps_sending_still_reads_its_close_frame(node_factory):
    # The node stops reading a flooder, but it must not close the socket on
    # its unread bytes: that resets the connection, and a reset can throw our
    # close frame away before the client reads it. It lingers until our FIN.
    node = node_factory(WS_CONTROL_RATE="0.1", WS_CONTROL_BURST=5, WS_CONTROL_STRIKES=3)
    raw = await RawClient.connect(node.ws_port)
    try:
        for i in range(12):
            raw.send_text({"type": "heartbeat", "id": i})
        code, frames = await raw.read_until_close()
        assert code == 1008
        assert [json.loads(p)["type"] for _, p in frames] == ["heartbeat_ack"] * 5 + ["error"] * 2
        for i in range(20):                 # still flooding after the close frame
            raw.send_text({"type": "heartbeat", "id": 100 + i})
            await raw.writer.drain()        # a reset would fail these writes
        raw.writer.write_eof()
        assert await raw.eof() == b""
    finally:
        raw.close()


async def test_rate_limit_is_per_connection(node_factory):
    node = node_factory(WS_CONTROL_RATE="0.1", WS_CONTROL_BURST=3, WS_CONTROL_STRIKES=100)
    async with connect(node) as a, connect(node) as b:
        for _ in range(3):
            await a.heartbeat()
        r = await a.request({"type": "heartbeat"})
        assert r["code"] == "rate_limited"
        for _ in range(3):
            await b.heartbeat()


# ------------------------------------------------------- too many subscriptions
async def test_too_many_subscriptions(node_factory):
    node = node_factory(WS_MAX_SUBSCRIPTIONS=3)
    async with connect(node) as c:
        await c.send({"type": "subscribe", "channels": [f"odin.token.s{i}" for i in range(5)], "id": 1})
        errors, r = await c.recv_until(lambda f: f["type"] == "subscribed")
        assert r["channels"] == ["odin.token.s0", "odin.token.s1", "odin.token.s2"]
        assert [(e["code"], e["channel"], e["id"]) for e in errors] == [
            ("too_many_subscriptions", "odin.token.s3", 1), ("too_many_subscriptions", "odin.token.s4", 1)]
        # Re-subscribing a held pattern is not a new subscription.
        assert (await c.subscribe("odin.token.s0"))["channels"] == ["odin.token.s0"]
        # Resume counts against the same limit.
        r = await c.request({"type": "resume", "channels": ["odin.token.s9"], "after": 0})
        assert r["code"] == "too_many_subscriptions" and r["channel"] == "odin.token.s9"
        assert (await c.recv())["channels"] == []
        # Freeing one makes room.
        await c.request({"type": "unsubscribe", "channels": ["odin.token.s0"]})
        assert (await c.subscribe("odin.token.s3"))["channels"] == ["odin.token.s3"]
        node.publish("odin.token.s3", "in")
        (m,) = await c.messages(1)
        assert m["data"] == "in"
    assert node.metric("fanout_client_errors_total", 'code="too_many_subscriptions"') == 3
    node.wait_log(lambda d: d.get("msg") == "client error" and d.get("code") == "too_many_subscriptions")


# ------------------------------------------------------- garbage handshakes
GARBAGE = [
    b"\x00\xff\xfe garbage\r\n\r\n",
    b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws HTTP/9.9\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nno colon here\r\n\r\n",
    b"x" * 20000,                              # one endless line
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
async def test_garbage_instead_of_a_handshake_is_dropped(shared_node, garbage):
    before = shared_node.metric("fanout_connections_rejected_total", 'reason="bad_handshake"')
    mark = LogMark(shared_node)
    raw = await RawClient.open(shared_node.ws_port)
    try:
        raw.writer.write(garbage)
        rest = await raw.eof()
        assert rest == b"" or rest.startswith(b"HTTP/1.1 4"), rest
    finally:
        raw.close()
    assert shared_node.metric("fanout_connections_rejected_total", 'reason="bad_handshake"') == before + 1
    mark.wait(lambda d: d.get("msg") == "handshake refused")
    async with connect(shared_node) as c:
        await c.heartbeat()
    assert shared_node.http("GET", "/health")[0] == 200


@pytest.mark.parametrize("request_head, status", [
    (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),                     # plain HTTP, no upgrade
    (b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 404),
    (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
])
async def test_bad_handshake_gets_an_http_error(shared_node, request_head, status):
    raw = await RawClient.open(shared_node.ws_port)
    try:
        raw.writer.write(request_head)
        rest = await raw.eof()
        assert rest.startswith(b"HTTP/1.1 %d " % status), rest
    finally:
        raw.close()
    async with connect(shared_node) as c:
        await c.heartbeat()


async def test_half_handshakes_and_resets_do_not_hurt(shared_node):
    for _ in range(5):
        raw = await RawClient.open(shared_node.ws_port)
        raw.writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        await raw.writer.drain()
        raw.writer.transport.abort()
    raw = await RawClient.open(shared_node.ws_port)
    raw.close()
    async with connect(shared_node) as c:
        await c.heartbeat()


async def test_handshake_timeout_drops_a_silent_socket(node_factory):
    node = node_factory(WS_HANDSHAKE_TIMEOUT="0.3")
    raw = await RawClient.open(node.ws_port)
    try:
        raw.writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32))  # a TLS hello: no line end
        assert await raw.eof(timeout=5) == b""
    finally:
        raw.close()
    async with asyncio.timeout(5):
        async with connect(node) as c:
            await c.heartbeat()


async def test_many_bad_clients_at_once(shared_node):
    """Garbage, floods of bad frames and good clients together: the good ones are served."""
    async def bad() -> None:
        async with connect(shared_node) as c:
            for frame, _ in BAD_REQUESTS:
                await c.send(frame)
            await c.send({"type": "heartbeat"})
            errors, _ = await c.recv_until(lambda f: f["type"] == "heartbeat_ack")
            assert [e["code"] for e in errors] == ["bad_request"] * len(BAD_REQUESTS)

    async def good(i: int) -> None:
        async with connect(shared_node) as c:
            await c.subscribe(f"odin.token.good{i}.x")
            await c.heartbeat()

    await asyncio.gather(*(bad() for _ in range(5)), *(good(i) for i in range(5)))


# ----------------------------------------------------- hostile-input review
async def test_binary_message_split_into_fragments_is_never_executed(shared_node):
    # The first fragment is empty and the continuation carries a whole request.
    raw = await RawClient.connect(shared_node.ws_port)
    try:
        raw.send_frame(0x2, b"", fin=False)
        raw.send_frame(0x0, b'{"type":"heartbeat","id":"bin"}')
        r = await raw.read_json()
        assert r["type"] == "error" and r["code"] == "bad_request" and "binary" in r["message"]
    finally:
        raw.close()


@pytest.mark.parametrize("kind", ["pong", "continuation"])
async def test_pong_and_continuation_floods_are_rate_limited(node_factory, kind):
    node = node_factory(WS_CONTROL_RATE="0.1", WS_CONTROL_BURST=5, WS_CONTROL_STRIKES=3)
    raw = await RawClient.connect(node.ws_port)
    try:
        if kind == "continuation":
            raw.send_frame(0x1, b'{"type":', fin=False)
        for _ in range(300):
            if kind == "pong":
                raw.send_frame(0xA, b"x")
            else:
                raw.send_frame(0x0, b" ", fin=False)
        code, _ = await raw.read_until_close()
        assert code == 1008
    finally:
        raw.close()
    # One log line for the close, not one per frame after it.
    node.wait_log(lambda d: d.get("msg") == "client flooding: closed")
    assert sum(1 for d in list(node.lines) if d.get("msg") == "client flooding: closed") == 1
    assert node.metric("fanout_connections_closed_total", 'code="1008"') == 1


async def test_a_client_that_never_reads_its_replies_is_closed_as_slow(node_factory):
    # Each request yields ~1,000 error replies; a client that never reads them
    # must not grow the node without bound: it is slow like any other.
    node = node_factory(WS_CLIENT_QUEUE_BYTES=65536, WS_CONTROL_BURST=100, WS_CONTROL_RATE=1000)
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        bad = {"type": "subscribe", "channels": [f"bad..{i}" for i in range(1000)]}
        for _ in range(40):
            raw.send_text(bad)
        await raw.writer.drain()
        await wait_metric(node, "fanout_connections_closed_total", 'code="1008"', lambda v: v >= 1, timeout=10)
        node.wait_log(lambda d: d.get("msg") == "slow client closed")
    finally:
        raw.close()
    async with connect(node) as c:   # the node is fine
        await c.heartbeat()


async def test_wrong_websocket_version_names_the_supported_one(shared_node):
    raw = await RawClient.open(shared_node.ws_port)
    try:
        raw.writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
        async with asyncio.timeout(5):
            head = await raw.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split(" ")[1] == "426"
        assert "sec-websocket-version: 13" in [ln.lower() for ln in lines]
    finally:
        raw.close()


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "resume"])
async def test_lone_surrogate_in_a_channel_is_an_invalid_channel(shared_node, kind):
    raw = await RawClient.connect(shared_node.ws_port)
    try:
        extra = ',"after":0' if kind == "resume" else ""
        raw.send_text('{"type":"' + kind + '","channels":["odin.token.\\ud800"]' + extra + "}")
        r = await raw.read_json()
        assert r["type"] == "error" and r["code"] == "invalid_channel"
        r = await raw.read_json()
        assert r["type"] == {"subscribe": "subscribed", "unsubscribe": "unsubscribed", "resume": "resumed"}[kind]
        assert r["channels"] == []
        raw.send_text({"type": "heartbeat"})
        assert (await raw.read_json())["type"] == "heartbeat_ack"
    finally:
        raw.close()


async def test_deeply_nested_json_is_a_bad_request(shared_node):
    async with connect(shared_node) as c:
        r = await c.request("[" * 1000 + "]" * 1000)
        assert r["type"] == "error" and r["code"] == "bad_request"
        r = await c.request('{"type":"heartbeat","x":' + "[" * 1000 + "]" * 1000 + "}")
        assert r["type"] == "error" and r["code"] == "bad_request"
        await c.heartbeat()
