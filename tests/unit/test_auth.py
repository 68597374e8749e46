"""fanout.auth in process: every token case against real keys, a real JWKS
server on 127.0.0.1, config validation, and channel grants.

Keys are generated with ``cryptography`` per module. The JWKS tests step an
injected monotonic clock past the refresh interval instead of sleeping.
"""

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
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from typer.testing import CliRunner

from fanout import config
from fanout.auth import Authenticator, AuthError, AuthUnavailable, Claims, sign
from fanout.config import ConfigError

SECRET = "s" * 64  # long enough for HS512 (RFC 7518 3.2), so PyJWT has nothing to warn about
NOW = time.time()


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"sub": "user-1", "exp": int(time.time()) + 3600}  # tokens are built at import: outlive a long run
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def hs_raw(header: dict[str, Any] | str, payload_text: str, secret: bytes | str = SECRET, alg=hashlib.sha256) -> str:
    """A token built by hand, for headers and payloads PyJWT would not encode (NaN exp) and forged keys."""
    key = secret.encode() if isinstance(secret, str) else secret
    head = header if isinstance(header, str) else json.dumps(header)
    signing_input = f"{b64(head.encode())}.{b64(payload_text.encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), alg).digest())}"


def unsigned(header: dict[str, Any]) -> str:
    """An ``alg: none`` style token: header and claims, empty signature."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}."


def pem(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_cfg(**env: Any) -> config.Config:
    return config.load(environ={k: str(v) for k, v in env.items()})


def auth(clock=time.monotonic, **env: Any) -> Authenticator:
    return Authenticator(make_cfg(**env), clock=clock)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec256": ec.generate_private_key(ec.SECP256R1()),
        "ec384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.fixture
def key_file(tmp_path: Path, keys):
    def write(name: str) -> str:
        path = tmp_path / f"{name}.pem"
        path.write_bytes(pem(keys[name].public_key()))
        return str(path)
    return write


# ------------------------------------------------------------- HMAC secret
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_token_is_accepted(alg):
    a = auth(WS_AUTH_SECRET=SECRET)
    assert a.enabled
    tok = sign(claims(channels=["odin.token.*.update"], custom=7), SECRET, algorithm=alg)
    c = await a.verify(tok)
    assert c.sub == "user-1" and c.channels == ("odin.token.*.update",) and c.raw["custom"] == 7
    assert a.expires_at(c) == c.exp + 5.0


BAD_HS = {
    "missing": (None, "missing token"),
    "empty": ("", "missing token"),
    "garbage": ("not-a-token", "malformed token"),
    "forged signature": (sign(claims(), "other-secret-other-secret-other-secret"), "bad signature"),
    "expired": (sign(claims(exp=int(time.time()) - 60), SECRET), "token expired"),
    "nbf in the future": (sign(claims(nbf=int(time.time()) + 1800), SECRET), "token not yet valid"),
    "iat in the future": (sign(claims(iat=int(time.time()) + 1800), SECRET), "token not yet valid"),
    "no sub": (sign(claims(sub=None), SECRET), "token has no sub"),
    "empty sub": (sign(claims(sub=""), SECRET), "token 'sub' must be a non-empty string"),
    "numeric sub": (sign(claims(sub=42), SECRET), "token 'sub' must be a non-empty string"),
    "no exp": (sign(claims(exp=None), SECRET), "token has no exp"),
    "aud but none configured": (sign(claims(aud="fanout"), SECRET), "token audience not accepted"),
    "bad channels claim": (sign(claims(channels=["odin..x"]), SECRET), "token 'channels' must be a list of valid patterns"),
    "channels not a list": (sign(claims(channels="odin.>"), SECRET), "token 'channels' must be a list of valid patterns"),
    "too long": ("a" * 9000, "token too long"),
    "alg none": (unsigned({"alg": "none"}), "token algorithm not accepted"),
    "alg None-cased": (unsigned({"alg": "None"}), "token algorithm not accepted"),
    "no alg": (hs_raw({"typ": "JWT"}, json.dumps(claims())), "token algorithm not accepted"),
    "header not an object": (f"{b64(b'[1]')}.{b64(json.dumps(claims()).encode())}.abc", "malformed token"),
    "payload not an object": (hs_raw({"alg": "HS256"}, "[1,2]"), "malformed token"),
    "payload not JSON": (hs_raw({"alg": "HS256"}, "{nope"), "malformed token"),
    "deeply nested header": (hs_raw('{"alg":"HS256","x":' + "[" * 2000 + "]" * 2000 + "}", json.dumps(claims())),
                             "malformed token"),
    "deeply nested payload": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":99999999999,"x":' + "[" * 2500 + "]" * 2500 + "}"),
                              "malformed token"),
    "exp NaN": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":NaN}'), "malformed token"),
    "exp Infinity": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":Infinity}'), "malformed token"),
    "exp 1e400": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":1e400}'), "malformed token"),
    "exp huge int": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":' + "9" * 400 + "}"), "token 'exp' must be a number"),
    "exp a numeric string": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":"99999999999"}'), "token 'exp' must be a number"),
    "exp true": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":true}'), "token expired"),
    "nbf NaN": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":99999999999,"nbf":NaN}'), "malformed token"),
    "nbf a string": (hs_raw({"alg": "HS256"}, '{"sub":"u","exp":99999999999,"nbf":"1"}'), "token 'nbf' must be a number"),
    "kid not a string": (hs_raw({"alg": "HS256", "kid": 5}, json.dumps(claims())), "malformed token"),
    "unknown crit header": (sign(claims(), SECRET, headers={"crit": ["exp"], "exp": 1}), "malformed token"),
}


@pytest.mark.parametrize("name", list(BAD_HS))
async def test_bad_hmac_token_is_refused_with_a_safe_message(name):
    tok, message = BAD_HS[name]
    with pytest.raises(AuthError) as info:
        await auth(WS_AUTH_SECRET=SECRET).verify(tok)
    assert str(info.value) == message


async def test_junk_and_non_strict_base64_are_refused():
    a = auth(WS_AUTH_SECRET=SECRET)
    tok = sign(claims(), SECRET)
    head, body, sig = tok.split(".")
    assert (await a.verify(tok)).sub == "user-1"
    # HS256's 32-byte MAC is 43 base64url chars: the last one carries 4 bits and
    # 2 unused ones. Flipping only the unused bits decodes to the same bytes, so
    # a lenient decoder would accept a second spelling of one signature.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(sig[-1]) ^ 1]
    assert base64.urlsafe_b64decode(sig[:-1] + twin + "=") == base64.urlsafe_b64decode(sig + "=")
    variants = {
        "junk in the signature": f"{head}.{body}.!!!!{sig}",
        "signature with padding": f"{head}.{body}.{sig}=",
        "non-canonical signature": f"{head}.{body}.{sig[:-1]}{twin}",
        "standard alphabet": f"{head}.{body}.{sig.replace('-', '+').replace('_', '/')}" if ("-" in sig or "_" in sig) else None,
        "whitespace inside": f"{head}.{body[:5]} {body[5:]}.{sig}",
        "payload padded": f"{head}.{body}{'=' * (-len(body) % 4) or '=='}.{sig}",
        "four segments": f"{tok}.{sig}",
        "two segments": f"{head}.{body}",
        "truncated signature": f"{head}.{body}.{sig[:-2]}",
    }
    for name, variant in variants.items():
        if variant is None:
            continue
        with pytest.raises(AuthError):
            await a.verify(variant)
            pytest.fail(f"{name} was accepted")


async def test_exp_within_leeway_is_accepted_and_expires_at_adds_the_leeway():
    a = auth(WS_AUTH_SECRET=SECRET, WS_AUTH_LEEWAY_SECONDS=30)
    exp = int(time.time()) - 10
    c = await a.verify(sign(claims(exp=exp), SECRET))
    assert c.exp == exp and a.expires_at(c) == exp + 30
    assert (await a.verify(sign(claims(nbf=int(time.time()) + 10), SECRET))).sub == "user-1"
    with pytest.raises(AuthError, match="token expired"):
        await a.verify(sign(claims(exp=int(time.time()) - 60), SECRET))
    with pytest.raises(AuthError, match="token expired"):  # no leeway at all
        await auth(WS_AUTH_SECRET=SECRET, WS_AUTH_LEEWAY_SECONDS=0).verify(sign(claims(exp=exp), SECRET))


async def test_audience_and_issuer():
    a = auth(WS_AUTH_SECRET=SECRET, WS_AUTH_AUDIENCE="fanout, fanout-staging", WS_AUTH_ISSUER="https://id.example")
    good = claims(aud="fanout", iss="https://id.example")
    assert (await a.verify(sign(good, SECRET))).sub == "user-1"
    assert (await a.verify(sign({**good, "aud": ["other", "fanout-staging"]}, SECRET))).sub == "user-1"
    cases = {
        "wrong aud": ({**good, "aud": "other"}, "token audience not accepted"),
        "no aud": ({**good, "aud": None}, "token has no aud"),
        "aud not a string": ({**good, "aud": 5}, "token audience not accepted"),
        "wrong iss": ({**good, "iss": "https://evil.example"}, "token issuer not accepted"),
        "no iss": ({**good, "iss": None}, "token has no iss"),
    }
    for name, (payload, message) in cases.items():
        payload = {k: v for k, v in payload.items() if v is not None}
        with pytest.raises(AuthError) as info:
            await a.verify(sign(payload, SECRET))
        assert str(info.value) == message, name


# ------------------------------------------------------- public key file
@pytest.mark.parametrize(("name", "alg"), [
    ("rsa", "RS256"), ("rsa", "RS384"), ("rsa", "RS512"),
    ("ec256", "ES256"), ("ec384", "ES384"), ("ed25519", "EdDSA"),
])
async def test_public_key_token_is_accepted(keys, key_file, name, alg):
    a = auth(WS_AUTH_PUBLIC_KEY_FILE=key_file(name))
    assert (await a.verify(sign(claims(), keys[name], algorithm=alg))).sub == "user-1"


async def test_public_key_refusals(keys, key_file):
    a = auth(WS_AUTH_PUBLIC_KEY_FILE=key_file("rsa"))
    rsa_pem = pem(keys["rsa"].public_key())
    cases = {
        "signed by another RSA key": (sign(claims(), keys["rsa2"], algorithm="RS256"), "bad signature"),
        "ES256 against an RSA key": (sign(claims(), keys["ec256"], algorithm="ES256"), "token algorithm not accepted"),
        "PS256 is not pinned": (sign(claims(), keys["rsa"], algorithm="PS256"), "token algorithm not accepted"),
        # The classic confusion: HS256 "signed" with the public PEM as the HMAC secret.
        "HS256 with the public key as secret": (hs_raw({"alg": "HS256"}, json.dumps(claims()), rsa_pem), "token algorithm not accepted"),
        "expired": (sign(claims(exp=int(time.time()) - 60), keys["rsa"], algorithm="RS256"), "token expired"),
        "no sub": (sign(claims(sub=None), keys["rsa"], algorithm="RS256"), "token has no sub"),
    }
    for name, (tok, message) in cases.items():
        with pytest.raises(AuthError) as info:
            await a.verify(tok)
        assert str(info.value) == message, name
    with pytest.raises(AuthError, match="token algorithm not accepted"):  # ES384 token, P-256 key
        await auth(WS_AUTH_PUBLIC_KEY_FILE=key_file("ec256")).verify(sign(claims(), keys["ec384"], algorithm="ES384"))


async def test_secret_and_public_key_together_pick_the_key_by_algorithm_family(keys, key_file):
    a = auth(WS_AUTH_SECRET=SECRET, WS_AUTH_PUBLIC_KEY_FILE=key_file("rsa"))
    assert (await a.verify(sign(claims(sub="hs"), SECRET))).sub == "hs"
    assert (await a.verify(sign(claims(sub="rs"), keys["rsa"], algorithm="RS256"))).sub == "rs"
    # With a secret configured, the confused token is checked against the real secret and fails.
    confused = hs_raw({"alg": "HS256"}, json.dumps(claims()), pem(keys["rsa"].public_key()))
    with pytest.raises(AuthError, match="bad signature"):
        await a.verify(confused)
    with pytest.raises(AuthError, match="token algorithm not accepted"):  # RS256 to a secret-only node
        await auth(WS_AUTH_SECRET=SECRET).verify(sign(claims(), keys["rsa"], algorithm="RS256"))


def test_a_certificate_file_is_accepted(tmp_path, keys):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = keys["ec256"]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    a = auth(WS_AUTH_PUBLIC_KEY_FILE=path)
    assert asyncio.run(a.verify(sign(claims(), key, algorithm="ES256"))).sub == "user-1"


# -------------------------------------------------------------------- JWKS
def jwk(private_key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    doc = json.loads(jwt.algorithms.get_default_algorithms()[
        "RS256" if isinstance(private_key, rsa.RSAPrivateKey) else "ES256" if isinstance(private_key, ec.EllipticCurvePrivateKey) else "EdDSA"
    ].to_jwk(private_key.public_key()))
    return {**doc, "kid": kid, "use": "sig", **extra}


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving ``doc`` (or ``status``); counts GETs."""

    def __init__(self) -> None:
        self.doc: Any = {"keys": []}
        self.status = 200
        self.hits = 0
        self.hit = threading.Event()  # set at each GET
        self.gate = threading.Event()  # cleared: hold the response until it is set (5 s at most)
        self.gate.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.hits += 1
                outer.hit.set()
                outer.gate.wait(5)
                body = json.dumps(outer.doc).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    s = JwksServer()
    try:
        yield s
    finally:
        s.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_jwks_accepts_each_key_type_by_kid(jwks, keys):
    jwks.doc = {"keys": [jwk(keys["rsa"], "r"), jwk(keys["ec256"], "e"), jwk(keys["ed25519"], "d")]}
    a = auth(WS_AUTH_JWKS_URL=jwks.url)
    await a.start()
    try:
        for kid, key, alg in (("r", "rsa", "RS512"), ("e", "ec256", "ES256"), ("d", "ed25519", "EdDSA")):
            tok = sign(claims(sub=kid), keys[key], algorithm=alg, headers={"kid": kid})
            assert (await a.verify(tok)).sub == kid
        assert jwks.hits == 1 and a.stats()["jwks_keys"] == 3
        cases = {
            "wrong kid": (sign(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "nope"}), "token key id not known"),
            "no kid": (sign(claims(), keys["rsa"], algorithm="RS256"), "token has no kid"),
            "key of another kid": (sign(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "e"}), "token algorithm not accepted"),
            "forged under a known kid": (sign(claims(), keys["rsa2"], algorithm="RS256", headers={"kid": "r"}), "bad signature"),
            "HS256 with a kid": (sign(claims(), SECRET, headers={"kid": "r"}), "token algorithm not accepted"),
            "HS256 with the JWK as secret": (hs_raw({"alg": "HS256", "kid": "r"}, json.dumps(claims()), json.dumps(jwk(keys["rsa"], "r"))), "token algorithm not accepted"),
            "alg none with a kid": (unsigned({"alg": "none", "kid": "r"}), "token algorithm not accepted"),
        }
        for name, (tok, message) in cases.items():
            with pytest.raises(AuthError) as info:
                await a.verify(tok)
            assert str(info.value) == message, name
    finally:
        await a.close()


async def test_jwks_key_alg_and_kty_pin_what_it_verifies(jwks, keys):
    secret_jwk = {"kty": "oct", "kid": "sym", "k": b64(SECRET.encode())}
    jwks.doc = {"keys": [jwk(keys["rsa"], "r", alg="RS256"), secret_jwk, jwk(keys["ec256"], "enc", use="enc")]}
    a = auth(WS_AUTH_JWKS_URL=jwks.url)
    await a.start()
    assert a.stats()["jwks_keys"] == 1  # the oct and the enc keys are skipped
    assert (await a.verify(sign(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "r"}))).sub == "user-1"
    with pytest.raises(AuthError, match="token algorithm not accepted"):
        await a.verify(sign(claims(), keys["rsa"], algorithm="RS384", headers={"kid": "r"}))
    with pytest.raises(AuthError, match="token algorithm not accepted"):
        await a.verify(sign(claims(), SECRET, headers={"kid": "sym"}))
    await a.close()


async def test_jwks_rotation_refreshes_on_unknown_kid_within_the_rate_limit(jwks, keys):
    clock = Clock()
    jwks.doc = {"keys": [jwk(keys["rsa"], "k1")]}
    a = auth(clock, WS_AUTH_JWKS_URL=jwks.url, WS_AUTH_JWKS_MIN_INTERVAL="30s", WS_AUTH_JWKS_MAX_AGE="300s")
    await a.start()
    old = sign(claims(sub="old"), keys["rsa"], algorithm="RS256", headers={"kid": "k1"})
    new = sign(claims(sub="new"), keys["rsa2"], algorithm="RS256", headers={"kid": "k2"})
    assert (await a.verify(old)).sub == "old" and jwks.hits == 1

    jwks.doc = {"keys": [jwk(keys["rsa"], "k1"), jwk(keys["rsa2"], "k2")]}  # the issuer rotates
    # Right after the start fetch the refresh is rate-limited: no request, kid unknown.
    with pytest.raises(AuthError, match="token key id not known"):
        await a.verify(new)
    assert jwks.hits == 1 and a.stats()["jwks_refresh_limited"] == 1

    clock.t += 31
    # Automatic refresh on the unknown kid; concurrent handshakes wait for the one download.
    accepted = await asyncio.gather(*(a.verify(new) for _ in range(10)))
    assert [c.sub for c in accepted] == ["new"] * 10 and jwks.hits == 2

    # A flood of made-up kids inside the interval costs no request at all...
    flood = [sign(claims(), keys["rsa2"], algorithm="RS256", headers={"kid": f"x{i}"}) for i in range(50)]
    results = await asyncio.gather(*(a.verify(t) for t in flood), return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results) and jwks.hits == 2
    # ...and after it, concurrent unknown kids share one download.
    clock.t += 31
    results = await asyncio.gather(*(a.verify(t) for t in flood), return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results) and jwks.hits == 3
    assert (await a.verify(old)).sub == "old"  # known kids keep working without a request
    assert jwks.hits == 3

    # k1 is withdrawn: once the keys are older than WS_AUTH_JWKS_MAX_AGE they are refetched.
    jwks.doc = {"keys": [jwk(keys["rsa2"], "k2")]}
    clock.t += 301
    with pytest.raises(AuthError, match="token key id not known"):
        await a.verify(old)
    assert jwks.hits == 4 and (await a.verify(new)).sub == "new"
    # 1 + 50 refreshes were skipped by the rate limit; the ones that waited for a download were not.
    assert a.stats() == {"jwks_fetch_ok": 4, "jwks_fetch_failed": 0, "jwks_refresh_limited": 51, "jwks_keys": 1}
    await a.close()


async def test_a_cancelled_handshake_does_not_cancel_the_shared_download(jwks, keys):
    jwks.doc = {"keys": [jwk(keys["ed25519"], "d")]}
    jwks.gate.clear()
    a = auth(WS_AUTH_JWKS_URL=jwks.url)
    tok = sign(claims(), keys["ed25519"], algorithm="EdDSA", headers={"kid": "d"})
    first = asyncio.ensure_future(a.verify(tok))
    assert await asyncio.to_thread(jwks.hit.wait, 5)  # the download is in flight
    first.cancel()  # e.g. that client's handshake timed out
    second = asyncio.ensure_future(a.verify(tok))
    jwks.gate.set()
    assert (await second).sub == "user-1"
    assert first.cancelled() and jwks.hits == 1
    await a.close()


async def test_jwks_outage_is_not_fatal_and_keeps_the_old_keys(jwks, keys):
    clock = Clock()
    jwks.status = 500
    a = auth(clock, WS_AUTH_JWKS_URL=jwks.url, WS_AUTH_JWKS_MIN_INTERVAL="10s")
    await a.start()  # logs, does not raise
    assert a.stats()["jwks_fetch_failed"] == 1
    tok = sign(claims(), keys["ec256"], algorithm="ES256", headers={"kid": "e"})
    with pytest.raises(AuthUnavailable):  # within the interval: no retry, no key yet
        await a.verify(tok)
    assert jwks.hits == 1
    jwks.status, jwks.doc = 200, {"keys": [jwk(keys["ec256"], "e")]}
    clock.t += 11
    assert (await a.verify(tok)).sub == "user-1"  # retried on demand
    assert jwks.hits == 2

    jwks.doc = "not a jwks"
    clock.t += 400  # stale: refetch fails, the old keys stay in use
    assert (await a.verify(tok)).sub == "user-1"
    assert jwks.hits == 3 and a.stats()["jwks_fetch_failed"] == 2
    await a.close()


async def test_jwks_unreachable_at_start(keys):
    a = auth(WS_AUTH_JWKS_URL="http://127.0.0.1:9/jwks.json")  # discard port: connection refused
    await a.start()
    assert a.stats() == {"jwks_fetch_ok": 0, "jwks_fetch_failed": 1, "jwks_refresh_limited": 0, "jwks_keys": 0}
    with pytest.raises(AuthUnavailable):
        await a.verify(sign(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "k"}))
    await a.close()


# ------------------------------------------------------------------ config
def test_no_key_means_auth_off():
    a = auth()
    assert not a.enabled
    with pytest.raises(AuthError):
        asyncio.run(a.verify(sign(claims(), SECRET)))


def test_config_refusals_name_the_variable(tmp_path, keys, key_file):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    private = tmp_path / "private.pem"
    private.write_bytes(keys["ec256"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    small = tmp_path / "small.pem"
    small.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()))
    k1 = ec.generate_private_key(ec.SECP256K1())
    secp256k1 = tmp_path / "k1.pem"
    secp256k1.write_bytes(pem(k1.public_key()))
    cases = [
        ({"WS_AUTH_PUBLIC_KEY_FILE": tmp_path / "absent.pem"}, "WS_AUTH_PUBLIC_KEY_FILE: cannot read"),
        ({"WS_AUTH_PUBLIC_KEY_FILE": garbage}, "WS_AUTH_PUBLIC_KEY_FILE: "),
        ({"WS_AUTH_PUBLIC_KEY_FILE": private}, "private key"),
        ({"WS_AUTH_PUBLIC_KEY_FILE": small}, "at least 2048"),
        ({"WS_AUTH_PUBLIC_KEY_FILE": secp256k1}, "secp256k1 is not supported"),
        ({"WS_AUTH_PUBLIC_KEY_FILE": key_file("rsa"), "WS_AUTH_JWKS_URL": "https://id.example/jwks"},
         "WS_AUTH_JWKS_URL: set together with WS_AUTH_PUBLIC_KEY_FILE"),
        ({"WS_AUTH_JWKS_URL": "file:///etc/passwd"}, "WS_AUTH_JWKS_URL: must be an http"),
        ({"WS_AUTH_JWKS_URL": "ftp://id.example/jwks"}, "WS_AUTH_JWKS_URL: must be an http"),
        ({"WS_AUTH_JWKS_URL": "https:///jwks"}, "WS_AUTH_JWKS_URL: must be an http"),
        ({"WS_AUTH_JWKS_URL": "https://id.example:99999/jwks"}, "WS_AUTH_JWKS_URL: bad URL"),
        ({"WS_AUTH_SECRET": pem(keys["rsa"].public_key()).decode()}, "WS_AUTH_SECRET: looks like a key"),
        ({"WS_AUTH_AUDIENCE": "fanout"}, "WS_AUTH_AUDIENCE: set, but no key"),
        ({"WS_AUTH_ISSUER": "https://id.example"}, "WS_AUTH_ISSUER: set, but no key"),
        ({"WS_AUTH_JWKS_URL": "https://id.example/jwks", "WS_AUTH_JWKS_MIN_INTERVAL": "10m",
          "WS_AUTH_JWKS_MAX_AGE": "5m"}, "WS_AUTH_JWKS_MIN_INTERVAL: must not exceed"),
        ({"WS_AUTH_LEEWAY_SECONDS": "-1"}, "WS_AUTH_LEEWAY_SECONDS: must be >= 0"),
    ]
    for env, words in cases:
        with pytest.raises(ConfigError) as info:
            make_cfg(**env)
        assert words in str(info.value), (env, str(info.value))
    # A Config built directly (not through load) is checked by Authenticator too.
    with pytest.raises(ConfigError, match="WS_AUTH_PUBLIC_KEY_FILE"):
        Authenticator(config.Config(ws_auth_public_key_file=str(garbage)))
    # Allowed: the secret with one asymmetric source.
    make_cfg(WS_AUTH_SECRET=SECRET, WS_AUTH_PUBLIC_KEY_FILE=key_file("ed25519"))
    make_cfg(WS_AUTH_SECRET=SECRET, WS_AUTH_JWKS_URL="https://id.example/jwks")
    assert make_cfg(WS_AUTH_SECRET=SECRET).as_env()["WS_AUTH_SECRET"] == "***"


def test_fanout_token_command_mints_a_token_the_authenticator_accepts():
    from fanout.cli import app

    r = CliRunner().invoke(app, ["token", "user-9", "--channels", "odin.token.*.update, odin.global.>",
                                 "--ttl", "120", "--secret", SECRET])
    assert r.exit_code == 0, r.output
    c = asyncio.run(auth(WS_AUTH_SECRET=SECRET).verify(r.output.strip()))
    assert c.sub == "user-9" and c.channels == ("odin.token.*.update", "odin.global.>")
    assert time.time() + 100 < c.exp <= time.time() + 121


# ------------------------------------------------------------------ grants
@pytest.mark.parametrize(("grant", "pattern", "allowed"), [
    (None, "odin.>", True),
    ((), "odin.token.a.update", False),
    (("odin.token.*.update",), "odin.token.abc.update", True),
    (("odin.token.*.update",), "odin.token.*.update", True),
    (("odin.token.*.update",), "odin.token.abc.trade", False),
    (("odin.token.*.update",), "odin.token.>", False),
    (("odin.token.*.update",), "odin.*.abc.update", False),
    (("odin.token.>",), "odin.token.*.update", True),
    (("odin.token.>",), "odin.token.>", True),
    (("odin.token.>",), "odin.token", False),
    (("odin.token.>",), "odin.>", False),
    (("odin.token.abc.update",), "odin.token.*.update", False),
    (("odin.token.abc.update",), "odin.token.abc.update", True),
    (("odin.global.>", "odin.token.abc.*"), "odin.token.abc.trade", True),
    (("odin.global.>", "odin.token.abc.*"), "odin.token.abc.>", False),
    (("*.*",), "odin.global", True),
    (("*.*",), "odin.global.x", False),
])
def test_channel_grants(grant, pattern, allowed):
    assert Claims("u", NOW, grant).allows(pattern) is allowed


async def test_grant_from_a_verified_token():
    c = await auth(WS_AUTH_SECRET=SECRET).verify(sign(claims(channels=["odin.token.abc.*", "odin.global.>"]), SECRET))
    assert c.allows("odin.token.abc.update") and c.allows("odin.global.trending")
    assert not c.allows("odin.token.*.update") and not c.allows("odin.>")
