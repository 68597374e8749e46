"""Token auth (WS_AUTH_SECRET): refused at the handshake with HTTP 401, accepted
from ?auth= or Authorization: Bearer, and a token's ``channels`` bound what the
client may subscribe to."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
from websockets.exceptions import InvalidStatus

from fanout.auth import sign
from tests.helpers.node import NodeProcess
from tests.server.support import LogMark, connect

SECRET = "test-secret"


@pytest.fixture(scope="module")
def auth_node() -> Iterator[NodeProcess]:
    n = NodeProcess({"WS_AUTH_SECRET": SECRET}).start()
    try:
        yield n
    finally:
        assert n.stop() == 0


def token(secret: str = SECRET, ttl: float = 60, **claims) -> str:
    return sign({"sub": "user-1", "exp": int(time.time() + ttl), **claims}, secret)


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


BAD_TOKENS = {
    "missing": None,
    "empty": "",
    "garbage": "not-a-token",
    "bad signature": token(secret="other-secret"),
    "expired": token(ttl=-5),
    "no exp": sign({"sub": "user-1"}, SECRET),
    "alg none": f"{_b64({'alg': 'none'})}.{_b64({'sub': 'u', 'exp': time.time() + 600})}.",
    "tampered": token()[:-4] + "AAAA",
    "bad channels claim": token(channels=["odin..x"]),
}


@pytest.mark.parametrize("how", ["query", "bearer"])
@pytest.mark.parametrize("name", list(BAD_TOKENS))
async def test_bad_token_is_refused_at_the_handshake_with_401(auth_node, name, how):
    tok = BAD_TOKENS[name]
    before = auth_node.metric("fanout_connections_rejected_total", 'reason="unauthorized"')
    kwargs: dict = {}
    path = "/ws"
    if tok is not None and how == "query":
        path = f"/ws?auth={tok}"
    elif tok is not None:
        kwargs["additional_headers"] = {"Authorization": f"Bearer {tok}"}
    mark = LogMark(auth_node)
    with pytest.raises(InvalidStatus) as err:
        async with connect(auth_node, path=path, **kwargs):
            pass
    response = err.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert auth_node.metric("fanout_connections_rejected_total", 'reason="unauthorized"') == before + 1
    mark.wait(lambda d: d.get("msg") == "handshake refused")


async def test_valid_token_in_the_query(auth_node):
    async with connect(auth_node, path=f"/ws?auth={token()}") as c:
        await c.subscribe("odin.token.auth.x")
        auth_node.publish("odin.token.auth.x", "hi")
        (m,) = await c.messages(1)
        assert m["data"] == "hi"


@pytest.mark.parametrize("path", ["/ws", "/"])
async def test_valid_token_as_bearer_header(auth_node, path):
    async with connect(auth_node, path=path, additional_headers={"Authorization": f"Bearer {token()}"}) as c:
        await c.heartbeat()


async def test_token_channels_bound_subscriptions(auth_node):
    tok = token(channels=["odin.token.abc.>", "odin.global.news"])
    before = auth_node.metric("fanout_client_errors_total", 'code="forbidden"')
    async with connect(auth_node, path=f"/ws?auth={tok}") as c:
        allowed = ["odin.token.abc.update", "odin.token.abc.*", "odin.token.abc.>", "odin.global.news"]
        refused = ["odin.token.xyz.update", "odin.token.>", "odin.token.*.update", "odin.global.>", ">"]
        await c.send({"type": "subscribe", "channels": refused[:2] + allowed + refused[2:], "id": 1})
        errors, r = await c.recv_until(lambda f: f["type"] == "subscribed")
        assert r["channels"] == allowed
        assert [(e["code"], e["channel"], e["id"]) for e in errors] == [("forbidden", ch, 1) for ch in refused]
        # Resume is bound the same way.
        r = await c.request({"type": "resume", "channels": ["odin.token.xyz.update"], "after": 0})
        assert r["code"] == "forbidden" and r["channel"] == "odin.token.xyz.update"
        r = await c.recv()
        assert r["type"] == "resumed" and r["channels"] == []
        # The connection stays usable and the allowed ones deliver.
        auth_node.publish("odin.token.xyz.update", "not for you")
        auth_node.publish("odin.token.abc.update", "for you")
        (m,) = await c.messages(1)
        assert m["data"] == "for you" and m["seq"] == 1
    assert auth_node.metric("fanout_client_errors_total", 'code="forbidden"') == before + len(refused) + 1


async def test_query_token_wins_over_a_bad_header(auth_node):
    async with connect(auth_node, path=f"/ws?auth={token()}",
                       additional_headers={"Authorization": "Bearer junk"}) as c:
        await c.heartbeat()


async def test_no_secret_no_auth(shared_node):
    async with connect(shared_node, path="/ws?auth=whatever") as c:
        await c.heartbeat()
