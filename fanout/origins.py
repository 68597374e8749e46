"""Which web pages may open WebSockets to the node: the ``WS_ALLOWED_ORIGINS`` list.

A browser sends the page's origin (``scheme://host[:port]``) in the
handshake's ``Origin`` header and lets any page open a WebSocket anywhere; only
the server can refuse. Without a check, any site can make its visitors'
browsers connect to the node (cross-site WebSocket hijacking: with cookies or
a token the page can reach, and in any case with the node's bandwidth).

The list is comma-separated; each entry is one of:

- an origin, ``https://app.example.com`` or ``http://localhost:5173``: the
  scheme and host compare case-insensitively, the port exactly (a default
  port, ``:443`` for https and ``:80`` for http, is the same as none, as
  browsers leave it out);
- a wildcard origin, ``https://*.example.com``: ``*`` stands for one or more
  whole DNS labels, so it matches ``https://a.example.com`` and
  ``https://a.b.example.com`` but neither ``https://example.com`` (list it as
  well) nor ``https://example.com.evil.com`` nor ``https://evilexample.com``.
  ``*`` is allowed only as the entire leftmost label; no other wildcards
  (scheme, port, the middle of a host);
- ``null``: the opaque origin a browser sends from ``file://`` pages and
  sandboxed frames (any page can make one, so list it only for development).

Empty (the default) allows every origin. A handshake without an ``Origin``
header is always allowed: browsers always send one, so it comes from a
server-side client (which could send any header it likes anyway).

The matching is websockets' own (``ServerProtocol(origins=...)``: exact
strings and anchored regular expressions); this module only turns the
setting into that list. It imports nothing of ``fanout``. Every handshake
that carries an Origin costs one anchored regex match per entry until one fits.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

from websockets.typing import Origin

__all__ = ["parse_allowed_origins", "allowed_origins", "exposure_warning"]

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ENTRY = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<wild>\*\.)?"
    r"(?P<host>" + _LABEL + r"(?:\." + _LABEL + r")*|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE | re.ASCII,
)
#: One or more DNS labels followed by a dot: what ``*.`` stands for.
_WILD = r"(?:" + _LABEL + r"\.)+"
#: Every pattern compares case-insensitively, in ASCII only (re.IGNORECASE
#: alone would let the Kelvin sign match "k").
_FLAGS = re.IGNORECASE | re.ASCII


def _pattern(entry: str) -> Origin | re.Pattern[str]:
    """An exact origin string, or a compiled pattern; ValueError when malformed."""
    if entry == "null":
        return Origin(entry)
    m = _ENTRY.fullmatch(entry)
    if m is None:
        raise ValueError(f"expected scheme://host[:port] (a leading *. for subdomains), got {entry!r}")
    scheme, host, port = m["scheme"].lower(), m["host"].lower(), m["port"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"bad IPv6 address in {entry!r}") from None
        if m["wild"]:
            raise ValueError(f"a wildcard needs a domain name, got {entry!r}")
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {entry!r}")
    default = _DEFAULT_PORTS.get(scheme)
    if port is not None and default == port.lstrip("0"):
        port = None
    if port is not None:
        suffix = re.escape(f":{int(port)}")
    else:   # browsers leave a default port out; another client may write it
        suffix = f"(?::{default})?" if default else ""
    # Always a pattern, also without a wildcard: the header's scheme and host may come in any case.
    return re.compile(re.escape(f"{scheme}://") + (_WILD if m["wild"] else "") + re.escape(host) + suffix, _FLAGS)


def parse_allowed_origins(text: str) -> list[Origin | re.Pattern[str]]:
    """The entries of ``WS_ALLOWED_ORIGINS`` as websockets matches them (see the
    module docstring); ValueError names the first malformed one."""
    out: list[Origin | re.Pattern[str]] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry == "*":
            raise ValueError("'*' is not an origin; leave WS_ALLOWED_ORIGINS empty to allow every origin")
        out.append(_pattern(entry))
    return out


@lru_cache(maxsize=8)
def allowed_origins(text: str) -> tuple[Origin | re.Pattern[str] | None, ...] | None:
    """``origins`` for websockets' ``ServerProtocol``: None (no check) for an
    empty setting, else the entries plus None (no ``Origin`` header: allowed).
    Cached: every handshake asks, the setting never changes."""
    entries = parse_allowed_origins(text)
    if not entries:
        return None
    return (*entries, None)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(ws_host: str, origins: str, auth: bool) -> str | None:
    """The start-up warning for a node any web page can use: it listens beyond
    loopback, with neither ``WS_ALLOWED_ORIGINS`` nor token auth. None otherwise."""
    if _loopback(ws_host) or auth or origins.strip():
        return None
    return (f"WebSocket port open on {ws_host or 'all addresses'} to pages from any origin, without auth: "
            "any web site can make its visitors' browsers connect here; set WS_ALLOWED_ORIGINS "
            "(or a WS_AUTH key)")
