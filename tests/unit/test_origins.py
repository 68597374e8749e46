"""fanout.origins: WS_ALLOWED_ORIGINS entries as websockets' ServerProtocol matches them."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidOrigin
from websockets.server import ServerProtocol

from fanout.config import ConfigError, load
from fanout.origins import allowed_origins, exposure_warning, parse_allowed_origins


def allows(setting: str, origin: str | None) -> bool:
    """What a handshake with this Origin header (None: without one) gets."""
    protocol = ServerProtocol(origins=allowed_origins(setting))
    headers = Headers()
    if origin is not None:
        headers["Origin"] = origin
    try:
        protocol.process_origin(headers)
    except InvalidOrigin:
        return False
    return True


@pytest.mark.parametrize("origin", [
    "https://app.example.com",
    "HTTPS://APP.EXAMPLE.COM",          # scheme and host case-insensitive
    "https://app.example.com:443",      # the default port, written out
])
def test_an_exact_origin(origin):
    assert allows("https://app.example.com", origin)


@pytest.mark.parametrize("origin", [
    "http://app.example.com",           # scheme
    "https://app.example.com:8443",     # port
    "https://app.example.com.evil.com",
    "https://xapp.example.com",
    "https://a.app.example.com",        # no wildcard: no subdomains
    "https://app.example.com/",         # an origin has no path
    "null",
    "",
])
def test_an_exact_origin_refuses_near_misses(origin):
    assert not allows("https://app.example.com", origin)


def test_an_explicit_port_is_exact():
    assert allows("http://localhost:5173", "http://localhost:5173")
    assert not allows("http://localhost:5173", "http://localhost")
    assert not allows("http://localhost:5173", "http://localhost:51730")
    # A default port in the setting is the same as none.
    assert allows("https://x.example:443", "https://x.example")
    assert allows("http://[::1]:3000", "http://[::1]:3000")


@pytest.mark.parametrize("origin,ok", [
    ("https://a.example.com", True),
    ("https://a.b.example.com", True),          # any depth of subdomain
    ("https://A-1.Example.Com", True),
    ("https://example.com", False),             # not the bare domain: list it too
    ("https://example.com.evil.com", False),
    ("https://evil.com/.example.com", False),
    ("https://evilexample.com", False),
    ("https://a.evilexample.com", False),
    ("https://.example.com", False),
    ("https://-a.example.com", False),
    ("http://a.example.com", False),
    ("https://a.example.com:8443", False),
    ("https://a.example.com:443", True),
])
def test_a_wildcard_matches_subdomains_only(origin, ok):
    assert allows("https://*.example.com", origin) is ok


def test_a_missing_origin_is_allowed_and_an_empty_list_allows_everything():
    assert allows("https://app.example.com", None)
    assert allowed_origins("") is None and allowed_origins(" , ") is None
    assert allows("", "https://anything.example")


def test_null_is_allowed_only_when_listed():
    assert not allows("https://a.example", "null")
    assert allows("https://a.example, null", "null")


def test_several_entries():
    setting = "https://a.example, http://localhost:5173 ,https://*.b.example"
    assert [allows(setting, o) for o in ("https://a.example", "http://localhost:5173", "https://x.b.example",
                                         "https://b.example", "https://c.example")] == [True, True, True, False, False]


@pytest.mark.parametrize("entry", [
    "*", "example.com", "https://", "https://a.example/", "https://a.example/path", "https://a.*.example",
    "https://*", "https://*example.com", "*.example.com", "https://a.example:99999", "https://a.example:0",
    "https://a.example:", "https://user@a.example", "https://a_b.example", "https://*.[::1]", "https://[zz::1]",
    "https://a.example?x", "//a.example",
])
def test_malformed_entries_are_refused_at_load(entry):
    with pytest.raises(ValueError):
        parse_allowed_origins(entry)
    with pytest.raises(ConfigError, match="WS_ALLOWED_ORIGINS"):
        load(environ={"WS_ALLOWED_ORIGINS": f"https://ok.example,{entry}"})


def test_the_setting_and_its_flag():
    assert load(environ={}).ws_allowed_origins == ""
    cfg = load(environ={}, overrides={"WS_ALLOWED_ORIGINS": "https://*.example.com"})
    assert cfg.ws_allowed_origins == "https://*.example.com"


def test_exposure_warning():
    assert exposure_warning("0.0.0.0", "", auth=False)
    assert exposure_warning("::", "", auth=False)
    assert exposure_warning("", "", auth=False)
    assert exposure_warning("10.1.2.3", "", auth=False)
    assert exposure_warning("fanout.internal", "", auth=False)   # a name: cannot tell, so warn
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, "", auth=False) is None
    assert exposure_warning("0.0.0.0", "https://a.example", auth=False) is None
    assert exposure_warning("0.0.0.0", "", auth=True) is None
