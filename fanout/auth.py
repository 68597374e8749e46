"""Client token checks for the WebSocket handshake and ``refresh`` (PROTOCOL.md "Auth").

Every signature and claim check is PyJWT's; this module only decides which key
and which algorithms a token may use, and turns PyJWT's errors into messages
that are safe to show the client. Algorithm pinning, ``exp``/``nbf``/``aud``/
``iss`` handling and JWKS parsing are easy to get subtly wrong by hand, so
none of them is written here.

Key sources (env vars; any one of them turns auth on, see :class:`Authenticator`):

- ``WS_AUTH_SECRET``: HMAC secret; tokens signed HS256, HS384 or HS512.
- ``WS_AUTH_PUBLIC_KEY_FILE``: one PEM public key (or X.509 certificate). The
  key type pins the algorithms: RSA (>= 2048 bits) RS256/RS384/RS512, EC P-256
  ES256, P-384 ES384, P-521 ES512, Ed25519/Ed448 EdDSA.
- ``WS_AUTH_JWKS_URL``: an http(s) JWKS; a token names its key with ``kid``.
  Each key's algorithms are pinned by its type the same way (narrowed to its
  ``alg`` member when it has one); ``oct`` (symmetric) keys in a JWKS are ignored.

The secret may be combined with one asymmetric source (a migration from HS256
to RS256 needs both for a while): the token's ``alg`` then picks the source by
family (HS* -> the secret, anything else -> the public key or JWKS), and each
source verifies only with its own algorithms, so an HS256 token "signed" with
the RSA public key as HMAC secret fails against the real secret. The public key
file and the JWKS URL together are refused (which one a kid-less token means
would be a guess).

Claims: ``sub`` (non-empty string) and ``exp`` are required: PROTOCOL.md lists
both for every token, a connection is closed with 4001 when ``exp`` passes, and
``refreshed`` reports it. ``exp``, ``nbf`` and ``iat`` must be finite numbers
(an ``exp`` of NaN, Infinity or a numeric string is refused); ``nbf``/``iat``
in the future and ``exp`` in the past are refused with ``WS_AUTH_LEEWAY_SECONDS``
of clock skew allowed. ``aud`` is checked against ``WS_AUTH_AUDIENCE`` (a token
must name one of its comma-separated values; a token that carries an ``aud``
while none is configured is refused, as RFC 7519 4.1.3 requires); ``iss``
against ``WS_AUTH_ISSUER`` when it is set. ``channels``, when present, is a list
of valid subject patterns bounding what the client may subscribe to.

Limits: a token longer than :data:`MAX_TOKEN_CHARS` or with anything but
unpadded base64url segments is refused before it is parsed. Tokens are
checked on the event loop: about 0.2 ms each for HS256, RS256 (2048) or EdDSA
as measured on a busy 2-core machine, mostly PyJWT's own Python code, so a
storm of 10,000 reconnects costs about 2 s of CPU. Only the JWKS download
runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from .config import Config, ConfigError, auth_problem
from .keys import ASYMMETRIC_ALGORITHMS, algorithms_for, load_public_key
from .log import event, limited_event
from .subjects import covers, valid_pattern

__all__ = [
    "AuthError", "AuthUnavailable", "Claims", "Authenticator", "MAX_TOKEN_CHARS",
    "load_public_key", "sign",
]

#: Longest token accepted. A handshake header line is limited to 8 KiB anyway.
MAX_TOKEN_CHARS = 8192
#: Largest JWKS document read; an identity provider's is a few KiB.
JWKS_MAX_BYTES = 1 << 20
#: Seconds one JWKS download may take before it counts as failed.
JWKS_TIMEOUT = 5.0
#: Shortest HMAC secret that does not get a warning at start (RFC 7518 3.2: a key
#: at least as long as the hash output, 32 bytes for HS256).
MIN_SECRET_BYTES = 32

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")

# Three unpadded base64url segments (the signature is empty only for alg "none",
# which is then refused by name). Anything else never reaches the JSON parser.
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# PyJWT warns (on stderr, per call site) about short HMAC keys at every
# verify; the node says it once, as a JSON log line, when it starts.
warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)


class AuthError(Exception):
    """The token is missing, malformed, badly signed, not yet valid or expired.

    The message is a fixed phrase, safe to show the client (HTTP 401 body, the
    ``error`` of a refused ``refresh``): it never echoes token content.
    """


class AuthUnavailable(AuthError):
    """The node has no JWKS keys yet (the JWKS server was never reached).

    The token may be fine: the server may answer 503 with ``Retry-After``
    rather than 401. Catching :class:`AuthError` catches this too.
    """


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants.

    ``exp`` is the token's own expiry (Unix seconds, no leeway added; see
    :meth:`Authenticator.expires_at`). ``channels`` is ``None`` when the token
    has no ``channels`` claim (any channel), else the granted patterns (an
    empty tuple grants nothing). ``raw`` is the whole verified payload, for
    callers that need a custom claim; treat it as read-only.
    """

    sub: str
    exp: float
    channels: tuple[str, ...] | None  # None = any channel
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def allows(self, pattern: str) -> bool:
        """True when the grant covers every subject ``pattern`` matches.

        A wildcard subscription is allowed only where one granted pattern
        covers all of it: a grant ``odin.token.*.update`` allows
        ``odin.token.abc.update`` and itself, not ``odin.token.>``.
        """
        return self.channels is None or any(covers(a, pattern) for a in self.channels)


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any  # a cryptography public key, or the HMAC secret
    algorithms: tuple[str, ...]


def _jwks_keys(doc: Any) -> tuple[dict[str, _Key], list[str]]:
    """Usable signing keys of a JWKS by ``kid``, and why each other entry was skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS (a JSON object with a 'keys' list)")
    keys: dict[str, _Key] = {}
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            skipped.append(f"#{i}: not an object")
            continue
        kid = jwk.get("kid")
        name = f"kid {kid!r}" if isinstance(kid, str) else f"#{i}"
        if not isinstance(kid, str) or not kid:
            skipped.append(f"{name}: no kid")
        elif jwk.get("use", "sig") != "sig":
            skipped.append(f"{name}: use is not sig")
        elif jwk.get("kty") not in ("RSA", "EC", "OKP"):
            # A symmetric key published in a JWKS would let anyone who can
            # read the JWKS sign tokens.
            skipped.append(f"{name}: kty {jwk.get('kty')!r} is not RSA, EC or OKP")
        else:
            try:
                key = jwt.PyJWK(jwk).key
                if not hasattr(key, "verify") and hasattr(key, "public_key"):
                    key = key.public_key()  # a JWK with private members: keep only the public half
                algs = algorithms_for(key)
                alg = jwk.get("alg")
                if alg is not None:
                    if alg not in algs:
                        raise ValueError(f"alg {alg!r} does not fit the key type")
                    algs = (alg,)
                keys[kid] = _Key(key, algs)
            except Exception as exc:  # noqa: BLE001 - one bad entry must not cost the others
                skipped.append(f"{name}: {exc}"[:200])
    return keys, skipped


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The JWKS URL is the operator's; a redirect elsewhere is not followed.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _download(url: str) -> Any:
    """GET the JWKS (blocking: run it in a thread). Raises OSError or ValueError."""
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "fanout-auth"})
    opener = urllib.request.build_opener(_NoRedirect())
    with opener.open(req, timeout=JWKS_TIMEOUT) as resp:
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")
        body = resp.read(JWKS_MAX_BYTES + 1)
    if len(body) > JWKS_MAX_BYTES:
        raise ValueError(f"JWKS larger than {JWKS_MAX_BYTES} bytes")
    return json.loads(body)


# ------------------------------------------------------------------ decoding
def _number(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError(f"token '{name}' must be a number")
    try:
        out = float(value)
    except OverflowError:
        raise AuthError(f"token '{name}' must be a number") from None
    if not math.isfinite(out):
        raise AuthError(f"token '{name}' must be a number")
    return out


_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience not accepted"),
    (jwt.InvalidIssuerError, "token issuer not accepted"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidKeyError, "token algorithm not accepted"),
    (jwt.exceptions.InvalidSubjectError, "token 'sub' must be a non-empty string"),
    (jwt.DecodeError, "malformed token"),
)
_REQUIRED = ("exp", "sub")


def _header(token: str | None) -> dict[str, Any]:
    if not token:
        raise AuthError("missing token")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError("token too long")
    if not _SHAPE.fullmatch(token):
        raise AuthError("malformed token")
    try:
        header = jwt.get_unverified_header(token)
    except Exception:  # noqa: BLE001 - PyJWTError, or RecursionError from deeply nested JSON
        raise AuthError("malformed token") from None
    if not isinstance(header.get("alg"), str):
        raise AuthError("token algorithm not accepted")
    return header


def _decode(token: str, key: _Key, *, audience: list[str] | None, issuer: list[str] | None,
            leeway: float) -> Claims:
    try:
        payload = jwt.decode(
            token, key.key, algorithms=list(key.algorithms), audience=audience, issuer=issuer,
            leeway=leeway, options={"require": list(_REQUIRED)},
        )
    except jwt.MissingRequiredClaimError as exc:
        claim = exc.claim if exc.claim in (*_REQUIRED, "aud", "iss") else "a required claim"
        raise AuthError(f"token has no {claim}") from None
    except jwt.PyJWTError as exc:
        for cls, text in _ERRORS:
            if isinstance(exc, cls):
                raise AuthError(text) from None
        raise AuthError("invalid token") from None
    except Exception as exc:  # noqa: BLE001 - bad input must never take the node down
        # A client can cause this at will, so the line is rate-limited.
        limited_event(("token_check_raised",), logging.WARNING, "token check raised",
                      error=f"{type(exc).__name__}: {exc}"[:200])
        raise AuthError("invalid token") from None
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("token 'sub' must be a non-empty string")
    exp = _number(payload, "exp")
    _number(payload, "nbf")
    _number(payload, "iat")
    channels = payload.get("channels")
    if channels is not None:
        if not isinstance(channels, list) or not all(isinstance(c, str) and valid_pattern(c) for c in channels):
            raise AuthError("token 'channels' must be a list of valid patterns")
        channels = tuple(channels)
    assert exp is not None  # required above
    return Claims(sub, exp, channels, payload)


def _split(text: str) -> list[str] | None:
    values = [v.strip() for v in text.split(",") if v.strip()]
    return values or None


# -------------------------------------------------------------- the checker
class Authenticator:
    """Verifies client tokens against the configured key sources.

    Interface for the server:

    - ``enabled``: a key source is configured, so every handshake needs a token.
    - ``await start()`` once before serving: fetches the JWKS (a failure is
      logged, not fatal: it is retried when a token needs a key).
    - ``await verify(token)`` -> :class:`Claims`, or raises :class:`AuthError`
      (message safe for the client; :class:`AuthUnavailable` when no JWKS key
      was ever fetched). Use it for the handshake and for ``refresh`` (the
      caller compares ``sub`` with the connection's).
    - ``expires_at(claims)``: wall-clock time after which the connection is
      closed with 4001 (``exp`` + leeway).
    - ``await close()`` at shutdown.

    JWKS caching: keys are held by ``kid``. A token with an unknown ``kid``,
    or any token once the keys are older than ``WS_AUTH_JWKS_MAX_AGE``,
    triggers a refetch, but never sooner than ``WS_AUTH_JWKS_MIN_INTERVAL``
    after the previous attempt (successful or not), so tokens with made-up
    kids cannot make the node hammer the JWKS server. Concurrent callers share
    one download. When a refetch fails the old keys stay in use. ``stats()``
    counts fetches for the metrics.

    ``clock`` (monotonic seconds) is injectable so tests can step past the
    refresh interval without sleeping.
    """

    def __init__(self, cfg: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        problem = auth_problem(cfg)
        if problem:
            raise ConfigError(problem)
        self._clock = clock
        self._secret = _Key(cfg.ws_auth_secret, HMAC_ALGORITHMS) if cfg.ws_auth_secret else None
        self._public: _Key | None = None
        if cfg.ws_auth_public_key_file:
            self._public = _Key(*load_public_key(cfg.ws_auth_public_key_file))
        self._jwks_url = cfg.ws_auth_jwks_url
        self._max_age = cfg.ws_auth_jwks_max_age
        self._min_interval = cfg.ws_auth_jwks_min_interval
        self._audience = _split(cfg.ws_auth_audience)
        self._issuer = _split(cfg.ws_auth_issuer)
        self.leeway = cfg.ws_auth_leeway_seconds
        self._keys: dict[str, _Key] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._stats = {"jwks_fetch_ok": 0, "jwks_fetch_failed": 0, "jwks_refresh_limited": 0}

    @property
    def enabled(self) -> bool:
        return bool(self._secret or self._public or self._jwks_url)

    def stats(self) -> dict[str, int]:
        """JWKS counters (fetches ok/failed, refreshes skipped by the rate limit) and keys held."""
        return {**self._stats, "jwks_keys": len(self._keys)}

    async def start(self) -> None:
        if self._secret is not None and len(self._secret.key.encode()) < MIN_SECRET_BYTES:
            event(logging.WARNING, "WS_AUTH_SECRET is short",
                  bytes=len(self._secret.key.encode()), recommended=MIN_SECRET_BYTES)
        if self._jwks_url:
            await self._refresh()

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            # The download thread itself cannot be interrupted; it ends within JWKS_TIMEOUT.
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def expires_at(self, claims: Claims) -> float:
        """Wall-clock Unix time when the token stops being valid here: ``exp`` + leeway."""
        return claims.exp + self.leeway

    async def verify(self, token: str | None) -> Claims:
        if not self.enabled:
            raise AuthError("token auth is not configured")  # fail closed if called anyway
        header = _header(token)
        assert token is not None  # _header refuses a missing one
        alg = header["alg"]
        key: _Key | None
        if alg in HMAC_ALGORITHMS:
            key = self._secret
        elif alg not in ASYMMETRIC_ALGORITHMS:
            key = None  # "none" and anything unknown, before any key lookup
        elif self._public is not None:
            key = self._public
        elif self._jwks_url:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise AuthError("token has no kid")
            key = await self._jwks_key(kid)
        else:
            key = None
        if key is None:
            raise AuthError("token algorithm not accepted")
        return _decode(token, key, audience=self._audience, issuer=self._issuer, leeway=self.leeway)

    # ---------------------------------------------------------------- JWKS
    async def _jwks_key(self, kid: str) -> _Key:
        refreshed = False
        if self._fetched_at is None or self._clock() - self._fetched_at > self._max_age:
            await self._refresh()
            refreshed = True
        key = self._keys.get(kid)
        if key is None and not refreshed:
            await self._refresh()
            key = self._keys.get(kid)
        if key is None:
            if self._fetched_at is None:
                raise AuthUnavailable("signing keys not available yet, try again later")
            raise AuthError("token key id not known")
        return key

    async def _refresh(self) -> None:
        """Refetch the JWKS unless one is in flight (then wait for it) or the last try was too recent."""
        if self._inflight is None:
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self._min_interval:
                self._stats["jwks_refresh_limited"] += 1
                return
            self._attempted_at = now
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        task = self._inflight
        # shield: a handshake that times out while waiting must not cancel the shared download.
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        try:
            doc = await asyncio.to_thread(_download, self._jwks_url)
            keys, skipped = _jwks_keys(doc)
            if not keys:
                raise ValueError("no usable signing keys: " + "; ".join(skipped[:5]))
        except Exception as exc:  # noqa: BLE001 - network, HTTP, JSON or JWK trouble: keep the old keys
            self._stats["jwks_fetch_failed"] += 1
            event(logging.WARNING, "JWKS fetch failed", url=self._jwks_url, error=str(exc)[:300],
                  keys_kept=len(self._keys))
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            self._stats["jwks_fetch_ok"] += 1
            event(logging.INFO, "JWKS fetched", url=self._jwks_url, kids=sorted(keys),
                  skipped=skipped[:10] or None)
        finally:
            self._inflight = None


# ------------------------------------------------------------------ minting
def sign(claims: Mapping[str, Any], key: Any, *, algorithm: str = "HS256",
         headers: dict[str, Any] | None = None) -> str:
    """Make a token (tests, examples, ``fanout token``): ``key`` is the HMAC secret or a private key."""
    with warnings.catch_warnings():
        # A short test secret is the caller's choice here; the node warns about its own at start.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(dict(claims), key, algorithm=algorithm, headers=headers)
