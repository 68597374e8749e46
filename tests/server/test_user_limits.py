"""Per-user connection limits (WS_MAX_CONNECTIONS_PER_USER, WS_USER_LIMIT_POLICY)
on a real node with token auth: the user is the token's ``sub``; the limit is
per node. close_oldest closes the oldest with 4002; refuse_new answers the
handshake with HTTP 429 + Retry-After. Another user is never affected. (Across
nodes, in JetStream mode: tests/jetstream/test_user_limit_cluster.py.)"""

from __future__ import annotations

import json
import time

import pytest
from websockets.exceptions import InvalidStatus

from fanout.auth import sign
from tests.server.support import connect

SECRET = "user-limit-secret-of-32-bytes-long!"


def tok(sub: str) -> str:
    return sign({"sub": sub, "exp": int(time.time()) + 600}, SECRET)


def path(sub: str) -> str:
    return f"/ws?auth={tok(sub)}"


def users(node) -> int:
    return json.loads(node.http("GET", "/health")[2])["guard"]["users"]


async def test_close_oldest_replaces_the_oldest_with_4002(node_factory):
    node = node_factory(WS_AUTH_SECRET=SECRET, WS_MAX_CONNECTIONS_PER_USER=2)   # close_oldest is the default
    async with connect(node, path("alice")) as a1, connect(node, path("alice")) as a2, \
            connect(node, path("bob")) as b1:
        for c in (a1, a2, b1):
            await c.subscribe("odin.token.users.x")
        assert users(node) == 2
        async with connect(node, path("alice")) as a3:
            code, _ = await a1.closed()
            assert code == 4002
            await a3.subscribe("odin.token.users.x")
            node.publish("odin.token.users.x", "hello")
            for c in (a2, a3, b1):         # the newer two of alice's and bob's are served
                (m,) = await c.messages(1)
                assert m["data"] == "hello"
            # Replacing again takes the next oldest (a2), never bob.
            async with connect(node, path("alice")) as a4:
                code, _ = await a2.closed()
                assert code == 4002
                await a4.heartbeat()
                await b1.heartbeat()
    assert node.metric("fanout_connections_closed_total", 'code="4002"') == 2
    assert node.metric("fanout_user_limit_evictions_total", 'policy="close_oldest",where="local"') == 2
    # Embedded mode counts per node (there is no cluster to count across).
    health = json.loads(node.http("GET", "/health")[2])["user_limit"]
    assert health["scope"] == "node" and health["cluster"] is False
    assert node.metric("fanout_user_limit_cluster") == 0
    assert any(d.get("msg") == "per-user limit: oldest connection replaced" and d.get("user") == "alice"
               for d in node.lines)


async def test_refuse_new_answers_429_and_frees_the_slot_on_close(node_factory):
    node = node_factory(WS_AUTH_SECRET=SECRET, WS_MAX_CONNECTIONS_PER_USER=1, WS_USER_LIMIT_POLICY="refuse_new")
    async with connect(node, path("carol")) as c1:
        with pytest.raises(InvalidStatus) as err:
            async with connect(node, path("carol")):
                pass
        resp = err.value.response
        assert resp.status_code == 429 and 5 <= int(resp.headers["Retry-After"]) <= 15
        async with connect(node, path("dave")) as d1:     # another user is unaffected
            await d1.heartbeat()
        await c1.heartbeat()                              # and the first connection stays
    assert node.metric("fanout_connections_rejected_total", 'reason="user_limit"') == 1
    # carol's connection is gone: her next one is admitted.
    for _ in range(100):
        if users(node) == 0:
            break
        time.sleep(0.02)
    async with connect(node, path("carol")) as c2:
        await c2.heartbeat()


async def test_zero_turns_the_limit_off(node_factory):
    node = node_factory(WS_AUTH_SECRET=SECRET, WS_MAX_CONNECTIONS_PER_USER=0, WS_USER_LIMIT_POLICY="refuse_new")
    async with connect(node, path("erin")) as e1, connect(node, path("erin")) as e2, \
            connect(node, path("erin")) as e3, connect(node, path("erin")) as e4:
        for c in (e1, e2, e3, e4):
            await c.heartbeat()


async def test_without_auth_there_is_no_user_and_no_limit(node_factory):
    node = node_factory(WS_MAX_CONNECTIONS_PER_USER=1)
    async with connect(node) as c1, connect(node) as c2:
        await c1.heartbeat()
        await c2.heartbeat()
    assert users(node) == 0
