"""Channel (NATS subject) syntax and wildcard matching, as PROTOCOL.md states it.

A channel is tokens of ``[A-Za-z0-9_-]`` (1..64 chars) joined by ``.``, at most
16 tokens and 256 bytes. A pattern may use ``*`` (exactly one token) and ``>``
(last token only: one or more tokens). The compiled core has its own matcher
for the hot path; this one serves validation, history filtering and tests.
"""

from __future__ import annotations

import re

__all__ = ["valid_subject", "valid_pattern", "subject_error", "matches", "matches_any", "covers", "overlaps"]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOKENS = 16
MAX_BYTES = 256


def subject_error(text: object, *, wildcards: bool) -> str | None:
    """Why ``text`` is not a valid channel (or pattern), or None when it is."""
    if not isinstance(text, str):
        return "channel must be a string"
    if not text:
        return "channel is empty"
    # surrogatepass: a lone surrogate (JSON "\ud800") has no UTF-8 form; it must
    # come back as a bad token below, not raise here.
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return f"channel longer than {MAX_BYTES} bytes"
    tokens = text.split(".")
    if len(tokens) > MAX_TOKENS:
        return f"channel has more than {MAX_TOKENS} tokens"
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        if wildcards and tok == "*":
            continue
        if wildcards and tok == ">":
            if i != last:
                return "'>' may only be the last token"
            continue
        if not _TOKEN.match(tok):
            if tok in ("*", ">"):
                return "wildcards are not allowed here"
            return f"bad token {tok!r}: tokens are 1..64 of A-Z a-z 0-9 _ -"
    return None


def valid_subject(text: object) -> bool:
    return subject_error(text, wildcards=False) is None


def valid_pattern(text: object) -> bool:
    return subject_error(text, wildcards=True) is None


def matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match of a valid pattern against a valid subject."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def matches_any(patterns: list[str] | tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


def covers(allowed: str, pattern: str) -> bool:
    """True when every subject ``pattern`` matches is matched by ``allowed`` too."""
    a = allowed.split(".")
    p = pattern.split(".")
    for i, tok in enumerate(a):
        if tok == ">":
            return len(p) > i
        if i >= len(p):
            return False
        if p[i] == ">":
            return False
        if tok != "*" and (p[i] == "*" or tok != p[i]):
            return False
    return len(a) == len(p)


def overlaps(a: str, b: str) -> bool:
    """True when some subject matches both patterns."""
    x = a.split(".")
    y = b.split(".")
    for i in range(max(len(x), len(y))):
        if i >= len(x) or i >= len(y):
            return False
        if x[i] == ">" or y[i] == ">":
            return True     # each side still has a token here, and '>' takes the rest
        if x[i] != "*" and y[i] != "*" and x[i] != y[i]:
            return False
    return True
