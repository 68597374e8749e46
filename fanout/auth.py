"""HS256 JWT check for the handshake (PROTOCOL.md "Auth").

Small enough to keep here rather than add a JWT dependency: one algorithm,
constant-time signature compare, ``exp`` required, optional ``channels``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from .subjects import covers, valid_pattern

__all__ = ["AuthError", "Claims", "verify", "sign"]


class AuthError(Exception):
    """The token is missing, malformed, badly signed or expired (HTTP 401)."""


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    exp: float
    channels: tuple[str, ...] | None  # None = any channel

    def allows(self, pattern: str) -> bool:
        return self.channels is None or any(covers(a, pattern) for a in self.channels)


def _b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def verify(token: str | None, secret: str, now: float | None = None) -> Claims:
    if not token:
        raise AuthError("missing token")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed token")
    try:
        header = json.loads(_b64d(parts[0]))
        payload = json.loads(_b64d(parts[1]))
        sig = _b64d(parts[2])
    except (ValueError, TypeError):
        raise AuthError("malformed token") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise AuthError("token algorithm must be HS256")
    expect = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expect, sig):
        raise AuthError("bad signature")
    if not isinstance(payload, dict):
        raise AuthError("malformed token")
    exp = payload.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise AuthError("token has no exp")
    if exp <= (time.time() if now is None else now):
        raise AuthError("token expired")
    sub = payload.get("sub")
    channels = payload.get("channels")
    if channels is not None:
        if not isinstance(channels, list) or not all(isinstance(c, str) and valid_pattern(c) for c in channels):
            raise AuthError("token 'channels' must be a list of valid patterns")
        channels = tuple(channels)
    return Claims(str(sub) if sub is not None else "", float(exp), channels)


def sign(claims: dict, secret: str) -> str:
    """Make a token (tests, examples, `fanout token`)."""
    head = _b64e(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64e(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64e(sig)}"
