"""Node identity on one host, config cross-checks, the CLI's stream check, the test helper's binary lookup.

Real nodes on a real nats-server: two nodes with the default id get their
own durables; a node whose durable another live node pulls from refuses to
start, naming FANOUT_NODE_ID; a stopped node's id can be reused at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import websockets

from fanout.brokers.jetstream import consumer_name
from fanout.config import ConfigError, load
from tests.helpers.nats_server import nats_server_binary
from tests.helpers.node import NodeProcess

from .support import nats_conn
from .test_node import publish_n, recv_json, subscribe

ROOT = Path(__file__).resolve().parents[2]


def node(url: str, **env: str) -> NodeProcess:
    return NodeProcess({"NATS_URL": url, "JS_STREAM_NAME": "T", **env})


def test_default_node_id_is_unique_per_process_on_one_host(monkeypatch):
    monkeypatch.delenv("FANOUT_NODE_ID", raising=False)
    a, b = load({"WS_PORT": "3004"}), load({"WS_PORT": "3005"})
    assert a.node_name != b.node_name and a.node_name.endswith("-3004")
    assert load({"WS_PORT": "0"}).node_name.endswith(f"-p{os.getpid()}")
    assert load({"FANOUT_NODE_ID": "edge-1", "WS_PORT": "0"}).node_name == "edge-1"
    assert consumer_name(load({"FANOUT_NODE_ID": "a.b c"})) == "ws-server-a_b_c"


@pytest.mark.parametrize("url,why", [
    ("http://127.0.0.1:4222", "scheme"), ("nats://", "no host"), ("127.0.0.1:4222", "scheme"),
    ("nats://a:4222,,nats://b:4222", "empty"), ("nats://a:70000", "Port"),
])
def test_nats_url_is_validated_at_start(url, why):
    with pytest.raises(ConfigError, match=f"^NATS_URL: .*{why}"):
        load({"NATS_URL": url})


def test_good_nats_urls_pass():
    for url in ("nats://127.0.0.1:4222", "tls://a:4222, nats://b:4222", "ws://h:8080", "wss://connect.ngs.global"):
        assert load({"NATS_URL": url}).nats_url == url


def test_js_domain_is_checked():
    assert load({"JS_DOMAIN": "hub"}).js_domain == "hub"
    with pytest.raises(ConfigError, match="^JS_DOMAIN: "):
        load({"JS_DOMAIN": "bad domain"})


def test_cli_publish_outside_the_stream_names_js_stream_subjects():
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1", "JS_STREAM_SUBJECTS": "odin.token.>"}
    r = subprocess.run([sys.executable, "-m", "fanout", "publish", "odin.global.trending", "{}"], env=env,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "JS_STREAM_SUBJECTS=odin.token.>" in r.stderr, r


def test_nats_server_binary_found_without_an_activated_venv():
    # No PATH entry for the venv, no NATS_SERVER_BIN: the interpreter's own environment is searched.
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    code = "from tests.helpers.nats_server import nats_server_binary as f; print(f() or '')"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.strip() == nats_server_binary(), r


async def test_two_nodes_with_default_ids_each_get_every_message(nats_server, monkeypatch):
    monkeypatch.delenv("FANOUT_NODE_ID", raising=False)
    a = node(nats_server.url).start()
    try:
        b = node(nats_server.url).start()
        try:
            async with nats_conn(nats_server.url) as nc:
                names = {c.name async for c in _consumers(nc)}
            assert len(names) == 2, names
            async with websockets.connect(a.ws_url) as wa, websockets.connect(b.ws_url) as wb:
                await subscribe(wa, ["odin.token.>"])
                await subscribe(wb, ["odin.token.>"])
                seqs = await publish_n(nats_server.url, 40)
                for ws in (wa, wb):
                    assert [(await recv_json(ws))["stream_seq"] for _ in seqs] == seqs
        finally:
            b.stop()
    finally:
        a.stop()
    # Each logged its connection once, from the broker (not again from a hook).
    for n in (a, b):
        assert [ln["msg"] for ln in n.lines].count("NATS connected") == 1
        assert not [ln for ln in n.lines if ln.get("msg", "").startswith("nats ")]


async def _consumers(nc):
    js = nc.jetstream()
    for ci in await js.consumers_info("T"):
        yield ci


async def test_second_node_with_the_same_id_refuses_to_start(nats_server):
    a = node(nats_server.url, FANOUT_NODE_ID="same").start()
    try:
        b = node(nats_server.url, FANOUT_NODE_ID="same")
        with pytest.raises(AssertionError):
            b.start()
        assert b.proc is not None and b.proc.wait(15) == 1
        failed = [ln for ln in b.lines if ln.get("msg") == "start failed"]
        assert failed and "FANOUT_NODE_ID" in failed[0]["error"] and "in use by another live node" in failed[0]["error"]
        # The first node is unharmed.
        assert a.http("GET", "/ready")[0] == 200
    finally:
        a.stop()
    # Once it is gone (stopped or killed), the id is free again at once.
    for sig in ("TERM", "KILL"):
        c = node(nats_server.url, FANOUT_NODE_ID="same").start()
        assert c.http("GET", "/ready")[0] == 200
        if sig == "KILL":
            c.stop(9)
        else:
            c.stop()
    d = node(nats_server.url, FANOUT_NODE_ID="same").start()
    try:
        assert d.http("GET", "/ready")[0] == 200
    finally:
        d.stop()

