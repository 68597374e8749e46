"""The ops port: /health, /ready, /metrics, and the node's JSON log lines."""

from __future__ import annotations

import asyncio
import json
import socket

from tests.server.support import connect


def test_health_is_ok_json(shared_node):
    status, headers, body = shared_node.http("GET", "/health")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["epoch"].startswith("e-") and health["broker"] == "embedded"
    assert isinstance(health["connections"], int) and isinstance(health["last_stream_seq"], int)


def test_ready_when_serving(shared_node):
    status, _, body = shared_node.http("GET", "/ready")
    assert status == 200 and json.loads(body) == {"ready": True}


def test_unknown_path_is_404(shared_node):
    status, _, body = shared_node.http("GET", "/nope")
    assert status == 404 and json.loads(body)["error"]


async def test_metrics_are_prometheus_text_with_fanout_and_ws_names(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.metrics.x")
        shared_node.publish("odin.token.metrics.x", "m")
        await c.messages(1)
        status, headers, body = shared_node.http("GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        for name in ("fanout_connections", "fanout_connections_accepted_total", "fanout_messages_published_total",
                     "fanout_deliveries_total", "fanout_bytes_sent_total", "fanout_slow_clients_total",
                     "fanout_compressions_total", "fanout_subscriptions", "fanout_last_stream_seq",
                     "fanout_ready", "fanout_dispatch_seconds_count", "fanout_client_frames_total",
                     "ws_connections", "ws_throttled_clients_light", "ws_throttled_clients_medium",
                     "ws_throttled_clients_heavy"):
            assert name in names, name
        assert shared_node.metric("ws_connections") >= 1
        assert shared_node.metric("fanout_connections") == shared_node.metric("ws_connections")
        assert shared_node.metric("fanout_subscriptions") >= 1
        assert shared_node.metric("fanout_messages_published_total") >= 1
        assert shared_node.metric("fanout_ready") == 1
        assert shared_node.metric("fanout_client_frames_total", 'type="subscribe"') >= 1


async def test_metrics_count_connections_deliveries_and_bytes(node):
    # Set at start-up, not only at the first periodic refresh a second later.
    assert node.metric("fanout_ready") == 1 and node.metric("fanout_broker_ready") == 1
    async with connect(node) as a, connect(node) as b:
        await a.subscribe("odin.token.count.x")
        await b.subscribe("odin.token.count.*")
        assert node.metric("ws_connections") == 2
        assert node.metric("fanout_subscriptions") == 2
        for i in range(3):
            node.publish("odin.token.count.x", {"i": i})
        await a.messages(3)
        await b.messages(3)
        assert node.metric("fanout_messages_published_total") == 3
        assert node.metric("fanout_deliveries_total") == 6
        assert node.metric("fanout_bytes_sent_total") >= node.metric("fanout_bytes_queued_total") > 0
        assert node.metric("fanout_connections_accepted_total") == 2


def test_ops_port_keeps_the_connection_alive(shared_node):
    with socket.create_connection(("127.0.0.1", shared_node.health_port), timeout=5) as s:
        f = s.makefile("rb")
        for _ in range(3):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert f.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(f.read(length))["status"] == "ok"


def test_ops_port_survives_garbage(shared_node):
    for junk in (b"\x00\x01\x02\r\n\r\n", b"GET /health\r\n\r\n", b"A" * 10000 + b"\r\n\r\n",
                 b"POST /publish/odin.token.a HTTP/1.1\r\nContent-Length: nope\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", shared_node.health_port), timeout=5) as s:
            s.sendall(junk)
            reply = s.recv(4096)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply
    assert shared_node.http("GET", "/health")[0] == 200


async def test_logs_are_json_lines(node):
    async with connect(node) as c:
        await c.request({"type": "nope"})
    node.wait_log(lambda d: d.get("msg") == "client error")
    assert node.stop() == 0
    assert len(node.raw) >= 4
    for raw in node.raw:
        line = json.loads(raw)
        assert isinstance(line, dict), raw
        assert {"ts", "level", "logger", "msg"} <= set(line), raw
        assert line["level"] in ("debug", "info", "warning", "error", "critical"), raw
    msgs = [json.loads(raw)["msg"] for raw in node.raw]
    assert msgs[0] == "fanout listening" and msgs[-1] == "stopped"


async def test_store_gauges_follow_clients_and_return_to_zero(node):
    # Issue 19: every store that grows with clients or subjects is a gauge, and
    # per-client state goes back to zero when the clients leave.
    base_tasks = node.metric("fanout_asyncio_tasks")
    async with connect(node) as a, connect(node) as b:
        await a.subscribe("odin.token.store.x")
        await b.subscribe("odin.token.store.*")
        node.publish("odin.token.store.x", "m")
        await a.messages(1)
        await b.messages(1)
        assert node.metric("fanout_store_patterns") == 2
        assert node.metric("fanout_store_routes") == 1
        assert node.metric("fanout_store_recipient_set_bytes") > 0
        assert node.metric("fanout_store_sessions") == 2
        assert node.metric("fanout_store_history_messages") == 1
        assert node.metric("fanout_store_snapshot_subjects") == 1
        assert node.metric("fanout_store_messages") == 1      # one message, in both clients' rings
    for _ in range(200):                                     # closes finish asynchronously (bounded wait)
        if node.metric("fanout_store_sessions") == 0:
            break
        await asyncio.sleep(0.05)
    for name in ("fanout_store_sessions", "fanout_store_patterns", "fanout_store_routes",
                 "fanout_store_recipient_set_bytes", "fanout_store_messages", "fanout_store_queued_bytes",
                 "fanout_store_catchups", "fanout_store_throttled_clients"):
        assert node.metric(name) == 0, name
    assert node.metric("fanout_asyncio_tasks") == base_tasks
    status, _, _ = node.http("GET", "/debug/tracemalloc")
    assert status == 404                                     # off unless FANOUT_TRACEMALLOC=1


def test_tracemalloc_endpoint_lists_growth_by_line(node_factory):
    n = node_factory(FANOUT_TRACEMALLOC="1")
    status, _, body = n.http("GET", "/debug/tracemalloc?reset=1")
    report = json.loads(body)
    assert status == 200 and report["tracing"] is True and report["traced_bytes"] > 0
    assert all({"where", "size_diff", "count_diff"} <= set(row) for row in report["top"])
