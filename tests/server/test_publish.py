"""The embedded publish endpoint: POST /publish/<subject> on the ops port."""

from __future__ import annotations

import json
import socket

import pytest

from tests.server.support import connect


async def test_publish_is_accepted_with_202_and_fanned_out(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.global.pub.x")
        status, _, body = shared_node.http("POST", "/publish/odin.global.pub.x", b'{"k":"v"}')
        assert status == 202
        reply = json.loads(body)
        assert reply["subject"] == "odin.global.pub.x" and isinstance(reply["stream_seq"], int)
        (m,) = await c.messages(1)
        assert m["stream_seq"] == reply["stream_seq"] and m["data"] == {"k": "v"}
    s2 = shared_node.publish("odin.token.pub.y", "next")
    assert s2 > reply["stream_seq"]


@pytest.mark.parametrize("subject, words", [
    ("odin.token.*", "wildcards"),
    ("odin.token.>", "wildcards"),
    ("odin.token.a.*.b", "wildcards"),
    ("odin.tok$en.a", "bad token"),
    ("odin..a", "bad token"),
    ("odin.token.a%20b", "bad token"),
    ("odin.token." + "x" * 65, "bad token"),
    (".".join(["odin", "token"] + ["t"] * 15), "tokens"),
    ("other.subject", "outside the stream subjects"),
    ("odin.token", "outside the stream subjects"),     # odin.token.> needs one more token
    ("odin.global", "outside the stream subjects"),
    ("odin", "outside the stream subjects"),
    ("", "empty"),
])
def test_invalid_subject_is_refused_with_400_and_a_reason(shared_node, subject, words):
    before = shared_node.metric("fanout_publish_rejected_total", 'reason="invalid_subject"')
    status, _, body = shared_node.http("POST", f"/publish/{subject}", b"{}")
    assert status == 400, body
    reply = json.loads(body)
    assert reply["error"] == "invalid_subject" and words in reply["message"], reply
    assert shared_node.metric("fanout_publish_rejected_total", 'reason="invalid_subject"') == before + 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_get_405(shared_node, method):
    status, headers, _ = shared_node.http(method, "/publish/odin.token.a.b")
    assert status == 405 and headers["Allow"] == "POST"


def test_oversize_payload_gets_413_before_the_body_is_sent(shared_node):
    with socket.create_connection(("127.0.0.1", shared_node.health_port), timeout=5) as s:
        s.sendall(b"POST /publish/odin.token.big.x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % ((1 << 20) + 1))
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 413 ")
    assert shared_node.http("GET", "/health")[0] == 200


async def test_payload_at_the_size_limit_is_delivered(shared_node):
    payload = b'"' + b"x" * ((1 << 20) - 2) + b'"'
    async with connect(shared_node, max_size=2 << 20) as c:
        await c.subscribe("odin.token.big.y")
        status, _, body = shared_node.http("POST", "/publish/odin.token.big.y", payload)
        assert status == 202, body
        (m,) = await c.messages(1)
        assert m["data"] == payload.decode()[1:-1]


def test_broadcast_rate_limit_answers_429(node_factory):
    node = node_factory(WS_MAX_BROADCAST_RATE="2")
    codes = [node.http("POST", "/publish/odin.token.rate.x", b"1") for _ in range(4)]
    assert [c[0] for c in codes[:2]] == [202, 202]
    assert 429 in [c[0] for c in codes[2:]]
    refused = next(c for c in codes if c[0] == 429)
    assert refused[1]["Retry-After"] == "1"
    assert node.metric("fanout_publish_rejected_total", 'reason="rate_limited"') >= 1
