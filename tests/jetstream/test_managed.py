"""The plan's production path: operator-mode NATS (JWT accounts, .creds files, restricted users).

A real ``nats-server`` in operator mode with a full resolver preloaded; the
operator, accounts and users are made in the test with ``nats-jwt``. Real
node processes connect with ``NATS_CREDS_FILE``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from fanout.publisher import Publisher
from tests.helpers.nats_operator import NODE_CONSUME_ONLY, OperatorSetup
from tests.helpers.nats_server import NatsServer
from tests.helpers.node import NodeProcess

from .support import nats_conn
from .test_node import recv_json, subscribe

SUBJECT = "odin.token.abc.update"


class Managed:
    """An operator-mode server with account APP, an admin (backend) user and a helper to make node users."""

    def __init__(self, tmp: Path, *, domain: str | None = None, **js_limits: int) -> None:
        self.tmp = tmp
        self.op = OperatorSetup()
        self.app = self.op.account("APP", **js_limits)
        self.admin_creds = tmp / "admin.creds"
        self.op.write_creds(self.admin_creds, self.app, "backend")
        self.sys_creds = self.op.system_creds(tmp / "sys.creds")
        conf = self.op.server_config(tmp / "op.conf", tmp / "resolver", domain=domain)
        self.server = NatsServer(tmp / "store", extra_args=["-c", str(conf)]).start()

    @property
    def url(self) -> str:
        return self.server.url

    def creds(self, name: str, **kwargs: Any) -> tuple[Path, str]:
        path = self.tmp / f"{name}.creds"
        return path, self.op.write_creds(path, self.app, name, **kwargs)

    def node(self, creds: Path, node_id: str, **env: Any) -> NodeProcess:
        return NodeProcess({"NATS_URL": self.url, "NATS_CREDS_FILE": str(creds), "JS_STREAM_NAME": "T",
                            "FANOUT_NODE_ID": node_id, **{k: str(v) for k, v in env.items()}})

    def publisher(self, **kwargs: Any) -> Publisher:
        return Publisher(self.url, creds_file=str(self.admin_creds), **kwargs)

    async def push_account(self, jwt: str) -> None:
        """Update the account on the running server, as ``nsc push`` does."""
        async with nats_conn(self.url, user_credentials=str(self.sys_creds)) as nc:
            reply = await nc.request("$SYS.REQ.CLAIMS.UPDATE", jwt.encode(), timeout=5)
            assert b'"code":200' in reply.data, reply.data


@pytest.fixture
def managed(tmp_path: Path) -> Iterator[Callable[..., Managed]]:
    made: list[Managed] = []

    def make(**kwargs: Any) -> Managed:
        d = tmp_path / f"m{len(made)}"
        d.mkdir()
        m = Managed(d, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.server.kill()


def health(n: NodeProcess) -> dict[str, Any]:
    return json.loads(n.http("GET", "/health")[2])


def wait_http(n: NodeProcess, pred: Callable[[], bool], timeout: float, what: str) -> None:
    # /health and /ready have no event to await from outside the process: poll, bounded.
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {health(n)}")
        time.sleep(0.1)


async def test_creds_file_connects_consumes_and_resumes(managed):
    m = managed()
    creds, _ = m.creds("node")
    n = m.node(creds, "c1").start()
    try:
        assert n.http("GET", "/ready")[0] == 200
        async with websockets.connect(n.ws_url) as ws:
            epoch = (await subscribe(ws, [SUBJECT]))["epoch"]
            async with m.publisher(stream="T") as pub:
                seqs = [await pub.publish(SUBJECT, json.dumps({"i": i})) for i in range(5)]
            got = [await recv_json(ws) for _ in seqs]
            assert [g["stream_seq"] for g in got] == seqs
        async with m.publisher(stream="T") as pub:
            more = [await pub.publish(SUBJECT, json.dumps({"i": i})) for i in range(5, 8)]
        async with websockets.connect(n.ws_url) as ws:
            await ws.send(json.dumps({"type": "resume", "channels": [SUBJECT], "after": seqs[-1], "epoch": epoch}))
            frames = []
            while not frames or frames[-1]["type"] != "resumed":
                frames.append(await recv_json(ws))
            assert [f["stream_seq"] for f in frames[:-1]] == more and frames[-1]["complete"] is True
    finally:
        n.stop()


async def test_bad_creds_are_reported_in_health_logs_metrics_and_ready(managed, tmp_path):
    m = managed()
    stranger = OperatorSetup()
    bad = tmp_path / "stranger.creds"
    stranger.write_creds(bad, stranger.account("X"), "nobody")
    n = m.node(bad, "b1").start()
    try:
        assert n.http("GET", "/ready")[0] == 503
        h = health(n)
        assert h["connected"] is False and "NATS_CREDS_FILE" in h["last_error"] and "authorization" in h["last_error"]
        assert n.metric("fanout_broker_events_total", 'event="auth_refused"') >= 1
        assert n.metric("fanout_broker_ready") == 0
        assert any(ln.get("kind") == "auth" and ln.get("level") == "error" for ln in n.lines)
    finally:
        n.stop()


async def test_expired_user_then_rotated_creds_are_picked_up_on_reconnect(managed):
    m = managed()
    creds, _ = m.creds("node", expires_in=4)
    n = m.node(creds, "e1").start()
    try:
        assert n.http("GET", "/ready")[0] == 200
        wait_http(n, lambda: n.http("GET", "/ready")[0] == 503, 15, "/ready 503 after the JWT expired")
        wait_http(n, lambda: "expired" in (health(n)["last_error"] or "") or
                  "authorization" in (health(n)["last_error"] or ""), 10, "an auth error in /health")
        assert n.metric("fanout_broker_events_total", 'event="auth_refused"') >= 1
        # Rotation: a new user JWT in the same file, no restart, no signal.
        m.op.write_creds(creds, m.app, "node-rotated")
        wait_http(n, lambda: n.http("GET", "/ready")[0] == 200, 20, "/ready 200 with the rotated creds")
        async with websockets.connect(n.ws_url) as ws:
            await subscribe(ws, [SUBJECT])
            async with m.publisher(stream="T") as pub:
                seq = await pub.publish(SUBJECT, b'{"after":"rotation"}')
            assert (await recv_json(ws))["stream_seq"] == seq
    finally:
        n.stop()


async def test_revoked_user_is_reported_and_unready(managed):
    m = managed()
    creds, upub = m.creds("node")
    n = m.node(creds, "r1").start()
    try:
        assert n.http("GET", "/ready")[0] == 200
        await m.push_account(m.op.revoke(m.app, upub))
        wait_http(n, lambda: n.http("GET", "/ready")[0] == 503, 15, "/ready 503 after the revocation")
        wait_http(n, lambda: any(w in (health(n)["last_error"] or "") for w in ("revoked", "authorization")),
                  10, "an auth error in /health")
        assert n.metric("fanout_broker_events_total", 'event="auth_refused"') >= 1
    finally:
        n.stop()


async def _backend_creates_stream(m: Managed, **cfg: Any) -> None:
    async with nats_conn(m.url, user_credentials=str(m.admin_creds)) as nc:
        await nc.jetstream().add_stream(name="T", subjects=["odin.token.>", "odin.global.>"], **cfg)


async def test_consume_only_user_needs_js_stream_manage_false(managed):
    m = managed()
    # Created from the backend with its own limits (not the node's 30 s).
    await _backend_creates_stream(m, max_age=60.0, max_msgs=1000)
    creds, _ = m.creds("node", **NODE_CONSUME_ONLY("T", "ws-server-p1"))
    refused = m.node(creds, "p1")
    with pytest.raises(AssertionError):
        refused.start(timeout=20)
    assert refused.proc is not None and refused.proc.wait(10) == 1
    err = next(ln for ln in refused.lines if ln.get("msg") == "start failed")["error"]
    assert "JS_STREAM_MANAGE" in err and "$JS.API.STREAM.UPDATE.T" in err, err
    n = m.node(creds, "p1", JS_STREAM_MANAGE="false").start()
    try:
        assert n.http("GET", "/ready")[0] == 200
        async with websockets.connect(n.ws_url) as ws:
            epoch = (await subscribe(ws, [SUBJECT]))["epoch"]
            async with m.publisher(stream="T") as pub:
                seqs = [await pub.publish(SUBJECT, b"{}") for _ in range(3)]
            assert [(await recv_json(ws))["stream_seq"] for _ in seqs] == seqs
            # History (ephemeral consumers) works with the same permission set.
            await ws.send(json.dumps({"type": "resume", "channels": [SUBJECT], "after": 0, "epoch": epoch}))
            frames = []
            while not frames or frames[-1]["type"] != "resumed":
                frames.append(await recv_json(ws))
            assert frames[-1]["complete"] is True
    finally:
        n.stop()


async def test_user_that_may_not_create_durables_gets_a_clear_message_and_the_fallback_works(managed):
    m = managed()
    await _backend_creates_stream(m, max_age=30.0, max_msgs=100000, max_bytes=52428800)
    durable = "ws-server-d1"
    perms = NODE_CONSUME_ONLY("T", durable)
    deny = [f"$JS.API.CONSUMER.CREATE.T.{durable}", f"$JS.API.CONSUMER.CREATE.T.{durable}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.T.{durable}"]
    creds, _ = m.creds("node", pub=perms["pub"], sub=perms["sub"], pub_deny=deny)
    refused = m.node(creds, "d1", JS_STREAM_MANAGE="false")
    with pytest.raises(AssertionError):
        refused.start(timeout=20)
    err = next(ln for ln in refused.lines if ln.get("msg") == "start failed")["error"]
    assert f"may not create the durable consumer {durable}" in err and "managed-nats.md" in err, err
    # The documented fallback: the durable is created outside the node (as the backend/admin).
    async with nats_conn(m.url, user_credentials=str(m.admin_creds)) as nc:
        await nc.jetstream().add_consumer("T", durable_name=durable, name=durable, ack_policy="explicit",
                                          max_ack_pending=20000)
    n = m.node(creds, "d1", JS_STREAM_MANAGE="false").start()
    try:
        assert n.http("GET", "/ready")[0] == 200
        async with websockets.connect(n.ws_url) as ws:
            await subscribe(ws, [SUBJECT])
            async with m.publisher(stream="T") as pub:
                seq = await pub.publish(SUBJECT, b"{}")
            assert (await recv_json(ws))["stream_seq"] == seq
    finally:
        n.stop()


async def test_js_domain_is_passed_through(managed):
    m = managed(domain="hub")
    creds, _ = m.creds("node")
    n = m.node(creds, "dom1", JS_DOMAIN="hub").start()
    try:
        assert n.http("GET", "/ready")[0] == 200 and health(n)["domain"] == "hub"
        async with websockets.connect(n.ws_url) as ws:
            await subscribe(ws, [SUBJECT])
            async with m.publisher(stream="T", domain="hub") as pub:
                seq = await pub.publish(SUBJECT, b"{}")
            assert (await recv_json(ws))["stream_seq"] == seq
    finally:
        n.stop()
    wrong = m.node(creds, "dom2", JS_DOMAIN="elsewhere").start()
    try:
        assert wrong.http("GET", "/ready")[0] == 503
    finally:
        wrong.stop()


async def test_account_storage_limit_is_reported_at_start(managed):
    m = managed(disk_storage=1 << 20, memory_storage=1 << 20)
    creds, _ = m.creds("node")
    n = m.node(creds, "l1")  # wants JS_STREAM_MAX_BYTES=50 MB in an account of 1 MB
    with pytest.raises(AssertionError):
        n.start(timeout=20)
    err = next(ln for ln in n.lines if ln.get("msg") == "start failed")["error"]
    assert "account" in err and "JS_STREAM_MAX_BYTES" in err, err
    ok = m.node(creds, "l2", JS_STREAM_MAX_BYTES=str(512 << 10)).start()
    try:
        assert ok.http("GET", "/ready")[0] == 200
    finally:
        ok.stop()
