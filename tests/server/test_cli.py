"""The ``fanout`` command as a user runs it: ``config``, ``serve`` with bad
settings, and ``publish`` to a running node."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys

import pytest

from fanout.config import FIELDS
from tests.helpers.node import NodeProcess
from tests.server.support import connect

BASE_ENV = {**os.environ, "WS_HOST": "127.0.0.1", "HEALTH_HOST": "127.0.0.1", "WS_PORT": "0", "HEALTH_PORT": "0"}
for _k in [k for k in BASE_ENV if k.startswith(("WS_", "NATS_", "JS_")) and k not in ("WS_HOST", "WS_PORT")]:
    BASE_ENV.pop(_k)


def fanout(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
           timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fanout", *args], env={**BASE_ENV, **(env or {})},
                          input=stdin.decode() if stdin is not None else None,
                          capture_output=True, text=True, timeout=timeout)


async def afanout(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(fanout, *args, **kw)


# ----------------------------------------------------------------- config
def test_config_prints_the_effective_config_as_json():
    r = fanout("config", "--ws-port", "1234",
               env={"WS_PORT": "999", "WS_MAX_CONNECTIONS": "77", "WS_IDLE_TIMEOUT": "90s",
                    "WS_AUTH_SECRET": "hush", "LOG_LEVEL": "debug"})
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["WS_PORT"] == 1234                 # the flag wins over the env var
    assert cfg["WS_MAX_CONNECTIONS"] == 77
    assert cfg["WS_IDLE_TIMEOUT"] == 90.0
    assert cfg["LOG_LEVEL"] == "debug"
    assert cfg["WS_AUTH_SECRET"] == "***"         # secrets are masked
    assert cfg["HEALTH_PORT"] == 0 and cfg["WS_REPLAY_BUFFER"] == 100   # defaults and env
    assert "hush" not in r.stdout


# ------------------------------------------------------------------- help
def test_serve_help_shows_every_flags_env_var_and_default():
    r = fanout("serve", "--help", env={"COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())   # help text wraps at any width
    missing = [env for env in FIELDS if f"[env {env}; default " not in flat]
    assert not missing, f"--help lacks the env var of {missing}"
    for shown in ("--ws-port <str> WebSocket port (paths /ws and /) [env WS_PORT; default 3004]",
                  "[env WS_COMPRESSION; default true]", "[env NATS_URL; default (empty)]",
                  "[env WS_THROTTLE_LIGHT_PERCENT; default 75]"):
        assert shown in flat, shown


# ------------------------------------------------------- bad configuration
@pytest.mark.parametrize("env", [
    {"WS_PORT": "abc"},
    {"WS_PORT": "70000"},
    {"WS_MAX_CONNECTIONS": "0"},
    {"LOG_LEVEL": "loud"},
    {"WS_THROTTLE_LIGHT_PERCENT": "0"},
    {"WS_THROTTLE_LIGHT_PERCENT": "10"},
    {"WS_PRIORITY_RULES": "odin.token.*.x=urgent"},
    {"WS_CONFLATE_CHANNELS": "odin..x"},
    {"WS_IDLE_TIMEOUT": "soon"},
    {"WS_COMPRESSION": "maybe"},
    {"JS_STREAM_SUBJECTS": "odin..x"},
    {"NATS_CREDS_FILE": "/nonexistent/creds"},
], ids=lambda e: "=".join(next(iter(e.items()))))
def test_bad_env_value_stops_serve_with_a_message_naming_the_variable(env):
    r = fanout("serve", env=env)
    assert r.returncode != 0
    (name,) = env
    assert name in r.stderr, r.stderr
    assert "fanout listening" not in r.stderr


def test_bad_flag_value_names_the_variable():
    r = fanout("serve", "--ws-max-connections", "lots")
    assert r.returncode != 0 and "WS_MAX_CONNECTIONS" in r.stderr, r.stderr


def test_port_in_use_fails_the_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = fanout("serve", env={"WS_PORT": str(taken.getsockname()[1])})
    assert r.returncode == 1
    lines = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    assert any(d["msg"] == "start failed" and d["level"] == "error" for d in lines), r.stderr


# ----------------------------------------------------------------- publish
async def test_publish_command_sends_one_message(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.cli.>")
        r = await afanout("publish", "--url", shared_node.ops_url, "odin.token.cli.x", '{"a": 1}')
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        (m,) = await c.messages(1)
        assert m["stream_seq"] == reply["stream_seq"] and m["channel"] == "odin.token.cli.x"
        assert m["data"] == {"a": 1}
        # Without --url it goes to 127.0.0.1:$HEALTH_PORT.
        r = await afanout("publish", "-p", "critical", "odin.token.cli.y", "plain text",
                          env={"HEALTH_PORT": str(shared_node.health_port)})
        assert r.returncode == 0, r.stderr
        (m,) = await c.messages(1)
        assert m["data"] == "plain text"


async def test_publish_command_reads_at_file_and_stdin(shared_node, tmp_path):
    blob = tmp_path / "payload.bin"
    blob.write_bytes(b"\x00\xffbinary")
    doc = tmp_path / "doc.json"
    doc.write_bytes(b'{"from": "file", "n": [1, 2]}\n')
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.file.*")
        for name in (blob, doc):
            r = await afanout("publish", "--url", shared_node.ops_url, "odin.token.file.x", f"@{name}")
            assert r.returncode == 0, r.stderr
        r = await afanout("publish", "--url", shared_node.ops_url, "odin.token.file.y", "@-", stdin=b'["stdin"]')
        assert r.returncode == 0, r.stderr
        a, b, d = await c.messages(3)
        assert base64.b64decode(a["data_b64"]) == b"\x00\xffbinary"
        assert b["data"] == {"from": "file", "n": [1, 2]}
        assert d["data"] == ["stdin"] and d["channel"] == "odin.token.file.y"


@pytest.mark.parametrize("args, words", [
    (["odin.token.*", "x"], "400"),
    (["elsewhere.x", "x"], "outside the stream subjects"),
    (["-p", "urgent", "odin.token.a", "x"], "Fanout-Priority"),
])
def test_publish_command_reports_a_refusal(shared_node, args, words):
    r = fanout("publish", "--url", shared_node.ops_url, *args)
    assert r.returncode == 1 and "publish refused" in r.stderr and words in r.stderr, r.stderr


def test_publish_command_reports_an_unreachable_node():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # bound, not listening: connection refused
        r = fanout("publish", "--url", f"http://127.0.0.1:{port}", "odin.token.a", "x")
    assert r.returncode == 1 and "cannot reach" in r.stderr, r.stderr


def test_serve_flags_override_env():
    node = NodeProcess({"WS_MAX_CONNECTIONS": "5"}, args=["--ws-max-connections", "3"]).start()
    try:
        line = node.wait_log(lambda d: d.get("msg") == "fanout listening")
        assert line["max_connections"] == 3
    finally:
        assert node.stop() == 0
