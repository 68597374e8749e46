"""The cluster-wide per-user limit (fanout/userlimit.py): real node processes on
one real nats-server, real WebSocket clients, token auth, default policy and
limit (3) unless a test is about the other policy. The KV bucket's TTL is
lowered only where a test waits for it (a dead node's slots)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fanout.auth import sign
from fanout.userlimit import user_token
from tests.helpers.node import NodeProcess
from tests.server.support import Client, RawClient, connect

SECRET = "cluster-user-limit-secret-32-bytes!"
LIMIT = 3


def tok(sub: str) -> str:
    return sign({"sub": sub, "exp": int(time.time()) + 600}, SECRET)


def path(sub: str) -> str:
    return f"/ws?auth={tok(sub)}"


def start_node(url: str, node_id: str, **env: Any) -> NodeProcess:
    return NodeProcess({"NATS_URL": url, "FANOUT_NODE_ID": node_id, "JS_STREAM_NAME": "T",
                        "WS_AUTH_SECRET": SECRET, **{k: str(v) for k, v in env.items()}}).start()


@pytest.fixture
def nodes(nats_server) -> Iterator[Any]:
    """``make(n, **env)``: n nodes on the one nats-server, stopped at teardown."""
    made: list[NodeProcess] = []

    def make(n: int, **env: Any) -> list[NodeProcess]:
        new = [start_node(nats_server.url, f"n{len(made) + i}", **env) for i in range(n)]
        made.extend(new)
        return new

    yield make
    for node in made:
        node.stop()


def health(node: NodeProcess) -> dict[str, Any]:
    return json.loads(node.http("GET", "/health")[2])["user_limit"]


async def wait_health(nodes: list[NodeProcess], pred: Any, timeout: float = 10.0, what: str = "") -> None:
    """Poll /health of every node until ``pred(user_limit)`` holds on all (state no event announces)."""
    deadline = time.monotonic() + timeout
    while True:
        states = [await asyncio.to_thread(health, n) for n in nodes]
        if all(pred(s) for s in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {states}")
        await asyncio.sleep(0.05)


async def seen_everywhere(nodes: list[NodeProcess], connections: int, timeout: float = 10.0) -> None:
    await wait_health(nodes, lambda s: s["cluster"] and s["cluster_connections"] == connections, timeout,
                      f"{connections} connections in every node's view")


async def alive(c: Client) -> bool:
    try:
        await c.heartbeat()
        return True
    except (ConnectionClosed, TimeoutError):
        return False


async def test_the_fourth_connection_on_another_node_evicts_the_oldest(nodes):
    a, b = nodes(2)
    await wait_health([a, b], lambda s: s["cluster"], what="cluster count in force")
    assert a.metric("fanout_user_limit_cluster") == 1
    async with AsyncExitStack() as stack:
        conns = []
        for i, node in enumerate((a, b, a)):       # oldest first, each seen by both before the next
            conns.append(await stack.enter_async_context(connect(node, path("alice"))))
            await seen_everywhere([a, b], i + 1)
        bob = await stack.enter_async_context(connect(a, path("bob")))
        await seen_everywhere([a, b], 4)
        assert a.metric("fanout_user_limit_users") == 2
        newest = await stack.enter_async_context(connect(b, path("alice")))   # alice's 4th, on b
        code, _ = await conns[0].closed()          # her oldest, held by a, closed by a
        assert code == 4002
        for c in (conns[1], conns[2], newest, bob):
            assert await alive(c)
        await seen_everywhere([a, b], 4)
        # Counted once, by the node whose connection caused it (b), as remote; a closed it.
        assert b.metric("fanout_user_limit_evictions_total", 'policy="close_oldest",where="remote"') == 1
        assert a.metric("fanout_user_limit_evictions_total", 'policy="close_oldest",where="remote"') == 0
        assert a.metric("fanout_connections_closed_total", 'code="4002"') == 1
        assert b.metric("fanout_connections_closed_total", 'code="4002"') == 0
        assert any(d.get("msg") == "per-user limit: oldest connection replaced" and d.get("user") == "alice"
                   and d.get("scope") == "cluster" for d in a.lines)
        # Connections per user, cluster-wide as each node sees them: alice 3, bob 1.
        for node in (a, b):
            assert node.metric("fanout_user_limit_connections_per_user_bucket", 'le="1"') == 1
            assert node.metric("fanout_user_limit_connections_per_user_bucket", 'le="3"') == 2
            assert node.metric("fanout_user_limit_connections_per_user_gsum") == 4


async def test_refuse_new_answers_429_on_any_node_once_the_user_holds_the_limit(nodes):
    a, b, c = nodes(3, WS_USER_LIMIT_POLICY="refuse_new")
    await wait_health([a, b, c], lambda s: s["cluster"], what="cluster count in force")
    async with AsyncExitStack() as stack:
        held = []
        for i, node in enumerate((a, b, c)):
            held.append(await stack.enter_async_context(connect(node, path("carol"))))
            await seen_everywhere([a, b, c], i + 1)
        for node in (a, b, c):
            with pytest.raises(InvalidStatus) as err:
                async with connect(node, path("carol")):
                    pass
            resp = err.value.response
            assert resp.status_code == 429 and 5 <= int(resp.headers["Retry-After"]) <= 15
            assert node.metric("fanout_connections_rejected_total", 'reason="user_limit"') == 1
        other = await stack.enter_async_context(connect(b, path("dave")))   # another user is unaffected
        assert await alive(other)
        for h in held:
            assert await alive(h)
        # One of carol's goes: her next one is admitted on another node.
        await held[0].ws.close()
        await seen_everywhere([a, b, c], 3)
        again = await stack.enter_async_context(connect(c, path("carol")))
        assert await alive(again)


async def test_user_tokens_are_valid_kv_keys_for_any_sub():
    import re

    for sub in ("alice", "", "a.b c/d*>", "ü" * 10, "x" * 96, "y" * 500, "\x00\n"):
        t = user_token(sub)
        assert re.fullmatch(r"[-_=a-zA-Z0-9]+", t), (sub, t)
    assert user_token("a" * 97).startswith("h") and len(user_token("a" * 97)) == 65
    assert user_token("alice") != user_token("alicf")
