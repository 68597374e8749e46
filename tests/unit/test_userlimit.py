"""The KV key of a user (fanout/userlimit.py): any ``sub`` becomes a valid, distinct key token."""

from __future__ import annotations

import re

from fanout.userlimit import user_token


def test_user_tokens_are_valid_kv_keys_for_any_sub() -> None:
    for sub in ("alice", "", "a.b c/d*>", "\u00fc" * 10, "x" * 96, "y" * 500, "\x00\n"):
        t = user_token(sub)
        assert re.fullmatch(r"[-_=a-zA-Z0-9]+", t), (sub, t)
    assert user_token("x" * 96).startswith("b")            # readable up to 96 bytes
    assert user_token("a" * 97).startswith("h") and len(user_token("a" * 97)) == 65
    assert user_token("alice") != user_token("alicf")
    assert user_token("a.b") != user_token("a_b")
