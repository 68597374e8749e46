"""Operator-mode (decentralized JWT auth) set-ups for real ``nats-server`` processes.

:class:`OperatorSetup` makes an operator, a system account and application
accounts with the maintained ``nats-jwt`` library (nkeys signing; no JWT is
hand-rolled here), writes standard ``.creds`` files (the layout ``nsc``
produces, which nats-py reads) and a server config that preloads the
accounts into a ``full`` resolver. Accounts can be updated on the running
server (revocations, limits) through the system account's
``$SYS.REQ.CLAIMS.UPDATE``, as ``nsc push`` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from nats_jwt.v2.account_claims import AccountClaims
from nats_jwt.v2.operator_claims import OperatorClaims
from nats_jwt.v2.snippets import Account, Operator, User

__all__ = ["OperatorSetup", "creds_text", "NODE_CONSUME_ONLY"]

CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""


def creds_text(jwt: str, seed: str) -> str:
    """A ``.creds`` file's text: the user JWT and its nkey seed, in nsc's layout."""
    return CREDS.format(jwt=jwt, seed=seed)


def NODE_CONSUME_ONLY(stream: str, durable: str) -> dict[str, list[str]]:  # noqa: N802 - a constant-like factory
    """The minimal permissions of a node that consumes ``stream`` through ``durable`` and may not manage the stream.

    The same set docs/managed-nats.md shows. History reads create ephemeral
    consumers (``fanout-read-<hex>``), hence the ``*`` in CONSUMER.CREATE.
    """
    api = "$JS.API"
    return {
        "pub": [f"{api}.STREAM.INFO.{stream}", f"{api}.CONSUMER.INFO.{stream}.{durable}",
                f"{api}.CONSUMER.CREATE.{stream}.*", f"{api}.CONSUMER.CREATE.{stream}.*.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                f"{api}.CONSUMER.MSG.NEXT.{stream}.*", f"{api}.CONSUMER.DELETE.{stream}.*",
                f"$JS.ACK.{stream}.>"],
        "sub": ["_INBOX.>"],
    }


class OperatorSetup:
    """One operator, its system account and named application accounts (JetStream enabled, unlimited by default)."""

    def __init__(self) -> None:
        self.operator = Operator()
        self.operator.set_claims(OperatorClaims(self.operator.key_pair.public_key.decode(), "fanout-test-op"))
        self.system = self.operator.create_account("SYS")
        self.operator.claims.nats.system_account = self.system.key_pair.public_key.decode()
        self.accounts: dict[str, Account] = {}

    # ------------------------------------------------------------- accounts
    def account(self, name: str, **js_limits: int) -> Account:
        """An application account; ``js_limits`` override nats-jwt's JetStreamLimits (-1 = unlimited)."""
        acc = self.operator.create_account(name)
        lim = acc.claims.nats.limits
        lim.disk_storage = lim.memory_storage = lim.streams = lim.consumer = -1
        for k, v in js_limits.items():
            setattr(lim, k, v)
        self.accounts[name] = acc
        return acc

    @staticmethod
    def pub(snippet: Account | User) -> str:
        return snippet.key_pair.public_key.decode()

    def account_jwt(self, acc: Account) -> str:
        return acc.jwt

    def revoke(self, acc: Account, user_pub: str) -> str:
        """The account's JWT with every user JWT of ``user_pub`` issued until now revoked."""
        claims: AccountClaims = acc.claims
        # A plain dict: nats-jwt 0.2.2 serializes its RevocationList (a dict
        # subclass that is also a field-less dataclass) as {}, dropping it.
        revs = dict(claims.nats.revocations or {})
        revs[user_pub] = int(time.time()) + 1
        claims.nats.revocations = revs  # type: ignore[assignment]
        return acc.jwt

    # ---------------------------------------------------------------- users
    def user(self, acc: Account, name: str, *, pub: list[str] | None = None, sub: list[str] | None = None,
             pub_deny: list[str] | None = None, expires_in: float | None = None) -> tuple[str, str, str]:
        """A user of ``acc``: (jwt, seed, public key). ``pub``/``sub`` are allow lists (None = anything)."""
        u = acc.create_user(name)
        perms: Any = u.claims.nats
        if pub is not None:
            perms.pub.allow = list(pub)
        if pub_deny:
            perms.pub.deny = list(pub_deny)
        if sub is not None:
            perms.sub.allow = list(sub)
        if expires_in is not None:
            u.claims.exp = int(time.time() + expires_in)
        return u.jwt, u.key_pair.seed.decode(), u.key_pair.public_key.decode()

    def write_creds(self, path: Path, acc: Account, name: str, **kwargs: Any) -> str:
        """Write a ``.creds`` file for a new user of ``acc``; returns the user's public key."""
        jwt, seed, upub = self.user(acc, name, **kwargs)
        path.write_text(creds_text(jwt, seed))
        return upub

    def system_creds(self, path: Path) -> Path:
        jwt, seed, _ = self.user(self.system, "sys")
        path.write_text(creds_text(jwt, seed))
        return path

    # --------------------------------------------------------------- server
    def server_config(self, path: Path, resolver_dir: Path, *, domain: str | None = None) -> Path:
        """A nats-server config (operator mode, full resolver preloaded); the ports come from flags."""
        preload = "\n".join(f"  {self.pub(a)}: {a.jwt}" for a in [self.system, *self.accounts.values()])
        js = f"jetstream {{ domain: {domain} }}\n" if domain else ""
        resolver_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"operator: {self.operator.jwt}\n"
            f"system_account: {self.pub(self.system)}\n"
            f"{js}"
            f"resolver: {{ type: full, dir: \"{resolver_dir}\", allow_delete: false, interval: \"2m\" }}\n"
            f"resolver_preload: {{\n{preload}\n}}\n")
        return path
