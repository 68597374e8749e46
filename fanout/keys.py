"""Public keys that verify client tokens: reading them and the algorithms each may verify.

Used by :mod:`fanout.auth` (verifying) and :mod:`fanout.config` (checking
``WS_AUTH_PUBLIC_KEY_FILE`` at start). It imports nothing of ``fanout``, so
neither of them needs the other for it.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = ["ASYMMETRIC_ALGORITHMS", "algorithms_for", "load_public_key"]

_RSA_ALGORITHMS = ("RS256", "RS384", "RS512")
_EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
ASYMMETRIC_ALGORITHMS = (*_RSA_ALGORITHMS, "ES256", "ES384", "ES512", "EdDSA")


def algorithms_for(key: Any) -> tuple[str, ...]:
    """The algorithms a public key may verify, chosen by its type and size.

    Raises ValueError for a key the node does not accept (RSA under 2048
    bits, an EC curve other than P-256/384/521, DSA, ...).
    """
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"RSA key of {key.key_size} bits; at least 2048 are needed")
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algs = _EC_ALGORITHMS.get(key.curve.name)
        if algs is None:
            raise ValueError(f"EC curve {key.curve.name} is not supported (P-256, P-384, P-521 are)")
        return algs
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    raise ValueError(f"unsupported key type {type(key).__name__} (RSA, EC or Ed25519/Ed448 public keys are)")


def load_public_key(path: str) -> tuple[Any, tuple[str, ...]]:
    """Read a PEM public key or certificate; return it with its algorithms.

    Raises ValueError (with a reason fit for a ConfigError) when the file is
    missing, is not PEM, holds a private key, or holds an unsupported key.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY-----" in data:
        # A private key has no business on a node that only verifies.
        raise ValueError(f"{path!r} holds a private key; give the public key (openssl pkey -pubout)")
    key: Any
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path!r} is not a PEM public key or certificate ({exc})") from None
    try:
        return key, algorithms_for(key)
    except ValueError as exc:
        raise ValueError(f"{path!r}: {exc}") from None
