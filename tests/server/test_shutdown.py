"""Graceful shutdown on SIGTERM/SIGINT: what was published reaches every
client before its 1001 close, new connections are refused, and the process
exits 0 within WS_SHUTDOWN_TIMEOUT."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time

import pytest

from tests.helpers.node import NodeProcess
from tests.server.support import RawClient, connect

SUBJECT = "odin.token.bye.update"


def split(frames: list) -> tuple[list[dict], list[dict]]:
    """Data messages, and the other frames (the drain's ``reconnect`` hint), of a closed connection."""
    objs = [json.loads(f if isinstance(f, (str, bytes)) else f[1]) for f in frames]
    return [m for m in objs if m["type"] == "message"], [m for m in objs if m["type"] != "message"]


def assert_hint_last(frames: list) -> None:
    """The drain (WS_DRAIN_SECONDS=0 here) sends ``reconnect`` after the data, before 1001."""
    last = json.loads(frames[-1] if isinstance(frames[-1], (str, bytes)) else frames[-1][1])
    assert last == {"type": "reconnect", "reason": "drain", "after_ms": 0}


def _kernel_send_buffer_max() -> int:
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


async def test_queued_messages_are_delivered_before_1001_and_exit_0(node_factory):
    node = node_factory(WS_SHUTDOWN_TIMEOUT=10, WS_CLIENT_QUEUE_BYTES=256 << 20)
    # Incompressible enough that deflate does not shrink it much: more than the
    # kernel buffers take, so part of it waits in the node's queues at SIGTERM.
    payload = base64.b64encode(os.urandom(48 << 10)).decode()
    n = _kernel_send_buffer_max() * 2 // len(payload) + 20
    async with connect(node, max_size=2**20) as a, connect(node, compression=None, max_size=2**20) as b:
        for cl in (a, b):
            await cl.subscribe(SUBJECT)
        # Published while the test's loop is busy here: nobody reads meanwhile.
        seqs = [node.publish(SUBJECT, {"i": i, "pad": payload}) for i in range(n)]
        assert node.metric("fanout_send_blocked_total") > 0    # bytes are waiting in the node
        t0 = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(node.stop, signal.SIGTERM))
        results = await asyncio.gather(a.closed(20), b.closed(20))
        code = await stopping
        elapsed = time.monotonic() - t0
    for close_code, frames in results:
        got, _ = split(frames)
        assert_hint_last(frames)
        assert [m["stream_seq"] for m in got] == seqs
        assert [m["seq"] for m in got] == list(range(1, n + 1))
        assert all(m["data"]["pad"] == payload for m in got)
        assert close_code == 1001
    assert code == 0
    assert elapsed < 10
    stopped = node.wait_log(lambda d: d.get("msg") == "stopped")
    assert stopped["unclean_closes"] == 0 and stopped["dispatched"] == n
    with pytest.raises(OSError):
        async with connect(node):
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_just_published_messages_are_delivered_before_1001(node_factory, sig):
    node = node_factory()
    async with connect(node) as a, connect(node, compression=None) as b:
        for cl in (a, b):
            await cl.subscribe(SUBJECT)
        seqs = [node.publish(SUBJECT, {"i": i}) for i in range(50)]
        node.proc.send_signal(sig)
        for close_code, frames in await asyncio.gather(a.closed(), b.closed()):
            assert [m["stream_seq"] for m in split(frames)[0]] == seqs
            assert_hint_last(frames)
            assert close_code == 1001
    assert await asyncio.to_thread(node.proc.wait, 5) == 0


async def test_drain_refuses_new_work_and_ends_within_the_timeout(node_factory):
    node = node_factory(WS_SHUTDOWN_TIMEOUT=2)
    # A client that never answers our close frame holds the drain open until the timeout.
    stubborn = await RawClient.connect(node.ws_port)
    try:
        stubborn.send_text({"type": "subscribe", "channels": [SUBJECT]})
        assert (await stubborn.read_json())["type"] == "subscribed"
        async with connect(node) as polite:
            await polite.subscribe(SUBJECT)
            node.publish(SUBJECT, "last")
            t0 = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(node.wait_log, lambda d: d.get("msg") == "shutting down")
            # Draining: not ready, no new WebSocket connections, no publishes.
            status, headers, body = node.http("GET", "/ready")
            assert status == 503 and json.loads(body)["reason"] == "draining" and "Retry-After" in headers
            assert node.http("GET", "/health")[0] == 200
            assert node.http("POST", f"/publish/{SUBJECT}", b"late")[0] == 503
            with pytest.raises(OSError):
                async with connect(node):
                    pass
            code, frames = await polite.closed()
            assert code == 1001 and [m["data"] for m in split(frames)[0]] == ["last"]
            assert_hint_last(frames)
        code, frames = await stubborn.read_until_close()
        texts = [f for f in frames if f[0] == 0x1]
        assert code == 1001 and [m["data"] for m in split(texts)[0]] == ["last"]
        assert_hint_last(texts)
        # We never answer: the node gives up at WS_SHUTDOWN_TIMEOUT and exits 0.
        exit_code = await asyncio.to_thread(node.proc.wait, 10)
        elapsed = time.monotonic() - t0
    finally:
        stubborn.close()
    assert exit_code == 0
    assert 2 <= elapsed < 6, elapsed
    assert node.wait_log(lambda d: d.get("msg") == "stopped")["unclean_closes"] == 1


def test_idle_node_stops_at_once():
    node = NodeProcess().start()
    t0 = time.monotonic()
    assert node.stop() == 0
    assert time.monotonic() - t0 < 5
