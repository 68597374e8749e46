"""The cluster-wide per-user limit (fanout/userlimit.py): real node processes on
one real nats-server, real WebSocket clients, token auth, default policy and
limit (3) unless a test is about the other policy. The KV bucket's TTL (a
recovery time) is lowered only where a test waits for it: a dead node's slots,
key refreshes within the test."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fanout.auth import sign
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
        # Every node sees dave before carol's close is awaited below: otherwise a node that has
        # seen neither counts 3 too, and still refuses carol's next (a CI run did).
        await seen_everywhere([a, b, c], 4)
        for h in held:
            assert await alive(h)
        # One of carol's goes: her next one is admitted on another node.
        await held[0].ws.close()
        await seen_everywhere([a, b, c], 3)
        again = await stack.enter_async_context(connect(c, path("carol")))
        assert await alive(again)


async def closed_4002(c: Client) -> bool:
    """True if the server closed ``c`` with 4002 (waits for it), False if it answers a heartbeat."""
    try:
        await c.heartbeat()
        return False
    except ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 4002, exc
        return True


@pytest.mark.parametrize("policy", ["close_oldest", "refuse_new"])
async def test_simultaneous_handshakes_on_two_nodes_close_the_same_connection(nodes, policy):
    """Each of ``users`` users holds LIMIT - 1 connections, then opens one on a and one on b at
    the same moment: one too many. Every node decides from the KV revision order, so each user
    ends with exactly LIMIT: close_oldest closes her oldest (one, not two, and never a new one);
    refuse_new keeps the oldest LIMIT and closes (or refuses) one of the two new, never both."""
    users = 10
    held_n = LIMIT - 1
    a, b = nodes(2, WS_USER_LIMIT_POLICY=policy)
    await wait_health([a, b], lambda s: s["cluster"], what="cluster count in force")
    async with AsyncExitStack() as stack:
        held: dict[str, list[Client]] = {}
        for i in range(held_n):
            for u in range(users):
                held.setdefault(f"u{u}", []).append(
                    await stack.enter_async_context(connect((a, b)[(u + i) % 2], path(f"u{u}"))))
            await seen_everywhere([a, b], users * (i + 1))   # each round older than the next

        async def open_one(node: NodeProcess, sub: str) -> Client | None:
            try:
                return await stack.enter_async_context(connect(node, path(sub)))
            except InvalidStatus as exc:
                assert exc.response.status_code == 429
                return None

        new = await asyncio.gather(*(open_one(n, f"u{u}") for u in range(users) for n in (a, b)))
        refused = sum(1 for c in new if c is None)
        expected = users * (held_n + 2 - LIMIT) - refused    # one too many per user, minus the 429s

        def closes() -> float:
            return sum(n.metric("fanout_connections_closed_total", 'code="4002"') for n in (a, b))

        deadline = time.monotonic() + 10
        while await asyncio.to_thread(closes) < expected:      # the closes have no event to await
            assert time.monotonic() < deadline, f"{closes()} closes, {expected} expected"
            await asyncio.sleep(0.05)
        await seen_everywhere([a, b], users * LIMIT)
        for u in range(users):
            pair = [c for c in new[2 * u:2 * u + 2] if c is not None]
            old_closed = [await closed_4002(c) for c in held[f"u{u}"]]
            new_closed = [await closed_4002(c) for c in pair]
            if policy == "close_oldest":
                assert old_closed == [True] + [False] * (held_n - 1), (u, old_closed)
                assert new_closed == [False, False], u
            else:
                assert not any(old_closed), u
                assert len(pair) - sum(new_closed) == 1, (u, new_closed)
        assert closes() == expected           # and no more than that
        if policy == "refuse_new" and refused < users:   # a race the handshakes could not see, settled
            assert any(d.get("msg", "").startswith("per-user limit: newest connection closed")
                       for n in (a, b) for d in n.lines)
        # Each eviction counted once in the cluster.
        counted = sum(n.metric("fanout_user_limit_evictions_total", f'policy="{policy}",where="{w}"')
                      for n in (a, b) for w in ("local", "remote"))
        assert counted == expected


async def test_a_node_killed_with_sigkill_frees_its_users_slots_within_the_ttl(nodes):
    ttl = 5.0   # a recovery time: lowered so the test is short
    a, b = nodes(2, WS_USER_LIMIT_POLICY="refuse_new", WS_USER_LIMIT_TTL=f"{ttl:g}s")
    await wait_health([a, b], lambda s: s["cluster"], what="cluster count in force")
    async with AsyncExitStack() as stack:
        for _ in range(LIMIT):
            await stack.enter_async_context(connect(a, path("frank")))
        await seen_everywhere([a, b], LIMIT)
        assert a.proc is not None
        a.proc.kill()
        killed = time.monotonic()
        with pytest.raises(InvalidStatus) as err:     # the dead node's connections still count ...
            async with connect(b, path("frank")):
                pass
        assert err.value.response.status_code == 429
        await seen_everywhere([b], 0, timeout=ttl + 5)   # ... until they were not refreshed for a TTL
        assert time.monotonic() - killed <= ttl + 1.5   # + the sweep (TTL/10) and the polling
        c = await stack.enter_async_context(connect(b, path("frank")))
        assert await alive(c)


async def test_nats_stopped_and_restarted_falls_back_to_the_node_count_and_back(nodes, nats_server):
    a, b = nodes(2)
    both = [a, b]
    await wait_health(both, lambda s: s["cluster"], what="cluster count in force")
    async with AsyncExitStack() as stack:
        first = [await stack.enter_async_context(connect(n, path("gina"))) for n in (a, b)]
        await seen_everywhere(both, 2)
        nats_server.kill()
        await wait_health(both, lambda s: not s["cluster"] and s["reason"], what="fallback")
        for n in both:
            assert n.metric("fanout_user_limit_cluster") == 0
            n.wait_log(lambda d: d.get("msg", "").startswith("per-user limit: cluster-wide count unavailable"))
        # Each node counts its own now: 3 per node, and a handshake does not wait for NATS.
        t0 = time.monotonic()
        more = [await stack.enter_async_context(connect(n, path("gina"))) for n in (a, a, b, b)]
        assert time.monotonic() - t0 < 2.0
        everyone = first + more             # a: first[0], more[0], more[1]; b: first[1], more[2], more[3]
        for c in everyone:
            assert await alive(c)
        extra = await stack.enter_async_context(connect(a, path("gina")))   # a 4th on a: a's oldest goes
        assert await closed_4002(first[0])
        assert a.metric("fanout_user_limit_evictions_total", 'policy="close_oldest",where="local"') == 1
        survivors = [extra, more[0], more[1], first[1], more[2], more[3]]
        nats_server.restart()
        await wait_health(both, lambda s: s["cluster"], timeout=15, what="cluster count back")
        # Back to the cluster count: of gina's 6, every node keeps the same newest 3.
        deadline = time.monotonic() + 10
        def closes() -> float:
            return sum(n.metric("fanout_connections_closed_total", 'code="4002"') for n in both)

        while await asyncio.to_thread(closes) < 1 + 3:    # the closes have no event to await
            assert time.monotonic() < deadline, "3 of gina's 6 not closed"
            await asyncio.sleep(0.05)
        await seen_everywhere(both, LIMIT, timeout=10)
        closed = [await closed_4002(c) for c in survivors]
        assert sum(closed) == 3, closed
        assert closes() == 1 + 3
        assert any(d.get("msg") == "per-user limit: cluster-wide count in force" and d.get("previous")
                   for d in a.lines)


async def test_a_thousand_users_with_three_connections_over_three_nodes_no_false_eviction(nodes):
    """1,000 users x 3 connections, each user's on three different nodes: nobody is over the
    limit, so nothing is closed, also across the refreshes of the keys (TTL lowered to 3 s so
    they happen within the test)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    users = 1000
    trio = nodes(3, WS_USER_LIMIT_TTL="3s")
    await wait_health(trio, lambda s: s["cluster"], what="cluster count in force")
    tokens = [tok(f"user{u}") for u in range(users)]
    clients: list[RawClient] = []
    sem = asyncio.Semaphore(64)

    async def open_one(u: int, k: int) -> None:
        async with sem:
            node = trio[(u + k) % 3]
            while True:
                c = await RawClient.open(node.ws_port)
                status = await c.handshake(f"/ws?auth={tokens[u]}")
                if status == 101:
                    clients.append(c)
                    return
                # A loaded test machine may trip the resource guard's brake (503): retry, as a client does.
                c.close()
                assert status == 503, (status, c.headers)
                await asyncio.sleep(0.1)

    try:
        t0 = time.monotonic()
        async with asyncio.timeout(20):
            await asyncio.gather(*(open_one(u, k) for k in range(LIMIT) for u in range(users)))
        opened = time.monotonic() - t0
        await seen_everywhere(trio, users * LIMIT, timeout=10)
        await asyncio.sleep(0)   # nothing to wait for: the checks below must hold across a refresh
        t1 = time.monotonic()
        while time.monotonic() - t1 < 1.5:      # a refresh round (every TTL/3 = 1 s) falls in here
            for n in trio:
                s = await asyncio.to_thread(health, n)
                assert s["cluster"] and s["cluster_connections"] == users * LIMIT and s["cluster_users"] == users
            await asyncio.sleep(0.25)
        for n in trio:
            assert n.metric("fanout_connections") == users
            assert n.metric("fanout_connections_closed_total", 'code="4002"') == 0
            assert n.metric("fanout_user_limit_connections_per_user_bucket", 'le="2"') == 0
            assert n.metric("fanout_user_limit_connections_per_user_bucket", 'le="3"') == users
        print(f"opened {users * LIMIT} connections in {opened:.1f}s")
    finally:
        for c in clients:
            c.close()


async def test_scope_node_counts_each_node_alone(nodes):
    a, b = nodes(2, WS_USER_LIMIT_SCOPE="node")
    for n in (a, b):
        s = health(n)
        assert s["scope"] == "node" and s["cluster"] is False
    async with AsyncExitStack() as stack:
        held = [await stack.enter_async_context(connect(n, path("hank"))) for n in (a, a, a, b, b, b)]
        for c in held:
            assert await alive(c)
        assert a.metric("fanout_user_limit_users") == 1
        assert a.metric("fanout_user_limit_connections_per_user_gsum") == 3
