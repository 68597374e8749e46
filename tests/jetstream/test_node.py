"""The node with JetStream as its source, end to end: real nats-server, real
node processes, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets

from fanout.publisher import Publisher
from tests.helpers.node import NodeProcess

SUBJECT = "odin.token.abc.update"


def start_node(url: str, node_id: str, **env: Any) -> NodeProcess:
    return NodeProcess({"NATS_URL": url, "FANOUT_NODE_ID": node_id, "JS_STREAM_NAME": "T",
                        **{k: str(v) for k, v in env.items()}}).start()


async def recv_json(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        return json.loads(await ws.recv())


async def subscribe(ws: Any, channels: list[str]) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "subscribe", "channels": channels}))
    reply = await recv_json(ws)
    assert reply["type"] == "subscribed", reply
    return reply


async def publish_n(url: str, n: int, start: int = 0, subject: str = SUBJECT, timeout: float = 10.0) -> list[int]:
    async with Publisher(servers=[url], timeout=timeout) as pub:
        return [await pub.publish(subject, json.dumps({"i": i}).encode()) for i in range(start, start + n)]


async def test_publish_reaches_clients_of_every_node(nats_server):
    a, b = start_node(nats_server.url, "a"), start_node(nats_server.url, "b")
    try:
        async with websockets.connect(a.ws_url) as wa, websockets.connect(b.ws_url) as wb:
            ea = (await subscribe(wa, ["odin.token.*.update"]))["epoch"]
            eb = (await subscribe(wb, ["odin.token.>"]))["epoch"]
            assert ea == eb != ""                      # one stream, one epoch
            seqs = await publish_n(nats_server.url, 50)
            for ws in (wa, wb):
                got = [await recv_json(ws) for _ in seqs]
                assert [m["stream_seq"] for m in got] == seqs
                assert [m["seq"] for m in got] == list(range(1, 51))
                assert [m["data"]["i"] for m in got] == list(range(50))
    finally:
        a.stop()
        b.stop()


async def test_resume_on_another_node_with_wildcards_no_gap_no_dup(nats_server):
    a, b = start_node(nats_server.url, "a"), start_node(nats_server.url, "b")
    try:
        async with websockets.connect(a.ws_url) as wa:
            epoch = (await subscribe(wa, ["odin.token.*.update"]))["epoch"]
            first = await publish_n(nats_server.url, 5)
            got = [await recv_json(wa) for _ in first]
            last = got[-1]["stream_seq"]
        # Disconnected: more traffic, on the channel and beside it.
        missed = await publish_n(nats_server.url, 7, start=5)
        await publish_n(nats_server.url, 3, start=100, subject="odin.global.trending")
        async with websockets.connect(b.ws_url) as wb:
            await wb.send(json.dumps({"type": "resume", "channels": ["odin.token.*.update"],
                                      "after": last, "epoch": epoch}))
            replayed = [await recv_json(wb) for _ in missed]
            done = await recv_json(wb)
            assert done["type"] == "resumed" and done["complete"] is True, done
            assert [m["stream_seq"] for m in replayed] == missed
            live = await publish_n(nats_server.url, 4, start=12)
            after = [await recv_json(wb) for _ in live]
            assert [m["stream_seq"] for m in after] == live
            assert [m["seq"] for m in replayed + after] == list(range(1, 12))
    finally:
        a.stop()
        b.stop()


async def test_resume_with_another_epoch_or_expired_retention_is_incomplete(nats_server):
    node = start_node(nats_server.url, "a", JS_STREAM_MAX_AGE="1s")
    try:
        async with websockets.connect(node.ws_url) as ws:
            await ws.send(json.dumps({"type": "resume", "channels": [SUBJECT], "after": 0, "epoch": "not-this-one"}))
            reply = await recv_json(ws)
            assert reply["type"] == "resumed" and reply["complete"] is False
        await publish_n(nats_server.url, 3)
        # Wait until the stream dropped them (max_age 1 s): poll the stream, bounded.
        import nats
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            for _ in range(100):
                info = await js.stream_info("T")
                if info.state.messages == 0:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("retention never expired")
        finally:
            await nc.close()
        async with websockets.connect(node.ws_url) as ws:
            await ws.send(json.dumps({"type": "resume", "channels": [SUBJECT], "after": 1}))
            reply = await recv_json(ws)
            assert reply["type"] == "resumed" and reply["complete"] is False, reply
    finally:
        node.stop()


async def test_nats_killed_and_restarted_under_load_no_loss_no_dup(nats_server):
    node = start_node(nats_server.url, "a")
    try:
        async with websockets.connect(node.ws_url) as ws:
            await subscribe(ws, [SUBJECT])
            seqs = await publish_n(nats_server.url, 30)
            nats_server.kill()
            status, _, _ = await asyncio.to_thread(_wait_ready_status, node, 503)
            assert status == 503                       # visibly degraded
            nats_server.start()
            await asyncio.to_thread(_wait_ready_status, node, 200)
            seqs += await publish_n(nats_server.url, 30, start=30)
            got = [await recv_json(ws, 20) for _ in seqs]
            assert [m["stream_seq"] for m in got] == seqs  # once each, in order
            assert [m["seq"] for m in got] == list(range(1, 61))
    finally:
        node.stop()


def _wait_ready_status(node: NodeProcess, want: int, timeout: float = 20.0) -> tuple[int, dict, bytes]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = node.http("GET", "/ready")
        if r[0] == want or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


async def test_node_restart_resumes_from_ack_floor_and_client_resume_is_exact(nats_server):
    node = start_node(nats_server.url, "a")
    async with websockets.connect(node.ws_url) as ws:
        epoch = (await subscribe(ws, [SUBJECT]))["epoch"]
        seqs = await publish_n(nats_server.url, 5)
        got = [await recv_json(ws) for _ in seqs]
    assert node.stop() == 0
    missed = await publish_n(nats_server.url, 6, start=5)   # while the node is down
    node = start_node(nats_server.url, "a")
    try:
        await asyncio.to_thread(_wait_ready_status, node, 200)
        async with websockets.connect(node.ws_url) as ws:
            await ws.send(json.dumps({"type": "resume", "channels": [SUBJECT],
                                      "after": got[-1]["stream_seq"], "epoch": epoch}))
            replayed = [await recv_json(ws) for _ in missed]
            done = await recv_json(ws)
            assert [m["stream_seq"] for m in replayed] == missed
            assert done["type"] == "resumed" and done["complete"] is True
            health = json.loads(node.http("GET", "/health")[2])
            assert health["last_stream_seq"] == missed[-1]
    finally:
        node.stop()


async def test_unreachable_nats_node_serves_health_not_ready(nats_server_factory):
    server = nats_server_factory(start=False)
    node = start_node(server.url, "a")
    try:
        assert node.http("GET", "/health")[0] == 200
        assert node.http("GET", "/ready")[0] == 503
        server.start()
        assert (await asyncio.to_thread(_wait_ready_status, node, 200))[0] == 200
    finally:
        node.stop()


async def test_cluster_member_killed_node_fails_over_clients_keep_everything(nats_cluster):
    node = start_node(nats_cluster.url, "a", JS_STREAM_REPLICAS=3)
    try:
        async with websockets.connect(node.ws_url) as ws:
            await subscribe(ws, [SUBJECT])
            health = json.loads(node.http("GET", "/health")[2])
            port = int(str(health["server"]).rsplit(":", 1)[1])
            victim = nats_cluster.server_by_port(port)
            others = [s.url for s in nats_cluster.servers if s is not victim]
            seqs = await publish_n(others[0], 20)
            victim.kill()
            # The stream may be electing a new leader for seconds: the publisher waits.
            seqs += await publish_n(others[1], 20, start=20, timeout=30)
            got = [await recv_json(ws, 25) for _ in seqs]
            assert [m["stream_seq"] for m in got] == seqs
            assert [m["seq"] for m in got] == list(range(1, 41))
            health = json.loads(node.http("GET", "/health")[2])
            assert health["server"] != f"nats://127.0.0.1:{port}"
    finally:
        node.stop()
