"""Token auth through a real node: refused at the handshake with HTTP 401,
accepted from ?auth= or Authorization: Bearer; HS256 (WS_AUTH_SECRET), RS256
and EdDSA public keys (WS_AUTH_PUBLIC_KEY_FILE), a JWKS served on 127.0.0.1
by the test (WS_AUTH_JWKS_URL) with kid lookup and rotation; every claim case
(forged, expired, nbf, aud, iss, no sub, alg none, alg confusion, wrong kid);
expiry while connected (4001) and ``refresh`` (good, bad, other user); and the
token's ``channels`` grant bounding subscribe, resume and snapshot, wildcards
included."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from websockets.exceptions import InvalidStatus

from fanout.auth import sign
from tests.helpers.node import NodeProcess
from tests.server.support import LogMark, connect, sentinel

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


# ---------------------------------------------------------------------------
# Public keys, JWKS, claims, expiry, refresh and grants through a real node.
# ---------------------------------------------------------------------------


def _pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def claims(ttl: float = 60, **extra) -> dict:
    return {"sub": "user-1", "exp": int(time.time() + ttl), **extra}


async def _status(node: NodeProcess, tok: str | None) -> int:
    """101 when the handshake with this token succeeds, else the HTTP status."""
    path = "/ws" if tok is None else f"/ws?auth={tok}"
    try:
        async with connect(node, path=path) as c:
            await c.heartbeat()
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    (d / "rsa.pem").write_bytes(_pem(RSA_KEY))
    (d / "ed.pem").write_bytes(_pem(ED_KEY))
    return d


@pytest.fixture(scope="module")
def rs256_node(key_dir) -> Iterator[NodeProcess]:
    n = NodeProcess({"WS_AUTH_PUBLIC_KEY_FILE": str(key_dir / "rsa.pem"), "WS_AUTH_AUDIENCE": "odin-web",
                     "WS_AUTH_ISSUER": "https://id.example", "WS_AUTH_SECRET": SECRET}).start()
    try:
        yield n
    finally:
        assert n.stop() == 0


def rs(ttl: float = 60, key=RSA_KEY, alg: str = "RS256", **extra) -> str:
    base = {"aud": "odin-web", "iss": "https://id.example", **claims(ttl)}
    return sign({**base, **extra}, key, algorithm=alg)


async def test_rs256_node_accepts_and_refuses_every_token_case(rs256_node, key_dir):
    # Alg confusion: an HS256 token "signed" with the RSA public key (PEM) as the HMAC secret.
    pub = (key_dir / "rsa.pem").read_bytes()
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64({'aud': 'odin-web', 'iss': 'https://id.example', **claims()})}"
    mac = hmac.new(pub, signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    cases = {
        "good": (rs(), 101),
        "good RS512": (rs(alg="RS512"), 101),
        "forged (other key)": (rs(key=RSA_OTHER), 401),
        "expired": (rs(ttl=-30), 401),
        "nbf in the future": (rs(nbf=int(time.time()) + 120), 401),
        "nbf within leeway": (rs(nbf=int(time.time()) + 2), 101),
        "foreign aud": (rs(aud="other-app"), 401),
        "no aud": (sign({"iss": "https://id.example", **claims()}, RSA_KEY, algorithm="RS256"), 401),
        "foreign iss": (rs(iss="https://evil.example"), 401),
        "no sub": (sign({"aud": "odin-web", "iss": "https://id.example", "exp": int(time.time()) + 60},
                        RSA_KEY, algorithm="RS256"), 401),
        "alg none": (f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'aud': 'odin-web', **claims()})}.", 401),
        "alg confusion HS256 with the public key": (confused, 401),
        "EdDSA on an RSA key": (rs(key=ED_KEY, alg="EdDSA"), 401),
        # The secret is configured too (a migration): HS256 still works, with the real secret only.
        "HS256 with the secret": (sign({"aud": "odin-web", "iss": "https://id.example", **claims()}, SECRET), 101),
    }
    got = {name: await _status(rs256_node, tok) for name, (tok, _) in cases.items()}
    assert got == {name: want for name, (_, want) in cases.items()}


async def test_eddsa_public_key_node(node_factory, key_dir):
    node = node_factory(WS_AUTH_PUBLIC_KEY_FILE=str(key_dir / "ed.pem"))
    assert await _status(node, sign(claims(), ED_KEY, algorithm="EdDSA")) == 101
    assert await _status(node, sign(claims(), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA")) == 401
    assert await _status(node, sign(claims(), RSA_KEY, algorithm="RS256")) == 401
    assert await _status(node, sign(claims(), "x" * 32)) == 401          # no secret on this node


class JwksServer:
    """A JWKS document served on 127.0.0.1 by the test; ``keys`` may change (rotation)."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.hits += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"

    def publish(self, **kids) -> None:
        out = []
        for kid, key in kids.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            out.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        self.keys = out

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


async def test_jwks_node_with_kid_and_rotation(node_factory):
    jwks = JwksServer()
    try:
        jwks.publish(k1=RSA_KEY)
        node = node_factory(WS_AUTH_JWKS_URL=jwks.url, WS_AUTH_JWKS_MIN_INTERVAL="1s", WS_AUTH_JWKS_MAX_AGE="60s")
        node.wait_log(lambda d: d.get("msg") == "JWKS fetched" and d.get("kids") == ["k1"])

        def by(kid: str | None, key=RSA_KEY) -> str:
            return sign(claims(), key, algorithm="RS256", headers={"kid": kid} if kid else None)

        assert await _status(node, by("k1")) == 101
        assert await _status(node, by("k1", RSA_OTHER)) == 401       # right kid, wrong key: forged
        assert await _status(node, by(None)) == 401                  # no kid
        assert await _status(node, by("nope")) == 401                # wrong kid
        # Rotation: the identity provider now publishes k2 only. A k2 token makes the
        # node refetch (no sooner than WS_AUTH_JWKS_MIN_INTERVAL after the last try).
        jwks.publish(k2=RSA_OTHER)
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline:
            status = await _status(node, by("k2", RSA_OTHER))
            if status == 101:
                break
            await asyncio.sleep(0.2)     # the refetch is rate-limited by time, not by an event
        assert status == 101
        assert await _status(node, by("k1")) == 401                  # the removed key no longer works
        assert jwks.hits >= 2
    finally:
        jwks.close()


@pytest.fixture(scope="module")
def strict_node() -> Iterator[NodeProcess]:
    """HS256, no leeway: tokens expire exactly at exp."""
    n = NodeProcess({"WS_AUTH_SECRET": SECRET, "WS_AUTH_LEEWAY_SECONDS": "0"}).start()
    try:
        yield n
    finally:
        assert n.stop() == 0


async def _until(t: float) -> None:
    # Token expiry is wall-clock time: waiting for it is the test, not a synchronisation guess.
    await asyncio.sleep(max(0.0, t - time.time()))


async def test_token_expiry_while_connected_closes_4001(strict_node):
    exp = int(time.time()) + 2
    async with connect(strict_node, path=f"/ws?auth={sign({'sub': 'user-1', 'exp': exp}, SECRET)}") as c:
        await c.subscribe("odin.token.exp.x")
        code, _ = await c.closed(timeout=exp - time.time() + 3)
        assert code == 4001
        assert time.time() >= exp - 0.05


async def test_refresh_good_bad_and_other_user(strict_node):
    exp = int(time.time()) + 3
    async with connect(strict_node, path=f"/ws?auth={sign({'sub': 'user-1', 'exp': exp}, SECRET)}") as c:
        await c.subscribe("odin.token.refresh.x")
        for bad, why in [("garbage", "malformed"), (token(secret="other-secret"), "signature"),
                         (token(ttl=-10), "expired"), (token(sub="user-2"), "another user")]:
            r = await c.request({"type": "refresh", "token": bad, "id": why})
            assert (r["type"], r["code"], r["id"]) == ("error", "unauthorized", why), r
            assert why in r["message"], r
        new = token(ttl=600)
        r = await c.request({"type": "refresh", "token": new, "id": "ok"})
        assert r == {"type": "refreshed", "id": "ok", "exp": jwt.decode(new, options={"verify_signature": False})["exp"]} \
            or (r["type"] == "refreshed" and r["exp"] > exp), r
        await _until(exp + 1.0)
        strict_node.publish("odin.token.refresh.x", "after the old exp")
        (m,) = await c.messages(1)
        assert m["data"] == "after the old exp"
    # A refused refresh leaves the old token in force: that connection closes at its exp.
    exp = int(time.time()) + 2
    async with connect(strict_node, path=f"/ws?auth={sign({'sub': 'user-1', 'exp': exp}, SECRET)}") as c:
        r = await c.request({"type": "refresh", "token": token(sub="user-2", ttl=600)})
        assert r["code"] == "unauthorized"
        code, _ = await c.closed(timeout=exp - time.time() + 3)
        assert code == 4001


async def test_grants_bound_resume(auth_node):
    grant = ["odin.token.g1.>", "odin.global.sentinel"]
    for subject in ("odin.token.g1.update", "odin.token.g2.update", "odin.token.g1.trade"):
        auth_node.publish(subject, {"on": subject})
    async with connect(auth_node, path=f"/ws?auth={token(channels=grant)}") as c:
        # resume: the wildcard beyond the grant is refused, the one inside it is served.
        await c.send({"type": "resume", "channels": ["odin.token.>", "odin.token.g1.*"], "after": 0, "id": 1})
        before, r = await c.recv_until(lambda f: f["type"] == "resumed")
        errors = [f for f in before if f["type"] == "error"]
        msgs = [f for f in before if f["type"] == "message"]
        assert [(e["code"], e["channel"]) for e in errors] == [("forbidden", "odin.token.>")]
        assert r["channels"] == ["odin.token.g1.*"]
        assert msgs and all(m["channel"].startswith("odin.token.g1.") for m in msgs), msgs
        # Live: nothing outside the grant arrives.
        await c.subscribe("odin.global.sentinel")
        auth_node.publish("odin.token.g2.update", "not yours")
        auth_node.publish("odin.token.g1.update", "yours")
        frames = await sentinel(auth_node, c)
        assert [f["data"] for f in frames if f["type"] == "message"] == ["yours"]


async def test_grants_bound_snapshot(auth_node):
    """subscribe with snapshot:true (PROTOCOL 1.1): the newest message per subject, only inside the grant."""
    grant = ["odin.token.s1.>", "odin.global.sentinel"]
    for subject in ("odin.token.s1.update", "odin.token.s2.update", "odin.token.s1.trade"):
        auth_node.publish(subject, {"on": subject})
    async with connect(auth_node, path=f"/ws?auth={token(channels=grant)}") as c:
        await c.send({"type": "subscribe", "channels": ["odin.token.*.update", "odin.token.s1.>"],
                      "snapshot": True, "id": 2})
        before, r = await c.recv_until(lambda f: f["type"] == "subscribed")
        assert [(e["code"], e["channel"]) for e in before if e["type"] == "error"] == \
            [("forbidden", "odin.token.*.update")]
        snap = [f for f in before if f["type"] == "message"]
        assert {m["channel"] for m in snap} == {"odin.token.s1.update", "odin.token.s1.trade"}, (snap, r)
        assert r["snapshot"] == 2
        await c.subscribe("odin.global.sentinel")
        auth_node.publish("odin.token.s2.update", "not yours")
        auth_node.publish("odin.token.s1.update", "yours")
        frames = await sentinel(auth_node, c)
        assert [f["data"] for f in frames if f["type"] == "message"] == ["yours"]
