"""The resource guard on a real node: the brake driven by real load (CPU,
event-loop lag, memory), memory shedding with 1013, and the handshake limit.

Load is real work on the node's process, never a mocked sample: a storm of
WebSocket handshakes (each one HTTP parsing, a session, a core slot and, with
auth on, an RS256 signature check), and non-reading clients whose queues hold
large messages. Thresholds are set low so that the 2-core development machine
reaches them with a bounded burst; every burst stops when the node says what
the test waits for, or after a bounded time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers.node import NodeProcess
from tests.server.support import LogMark, RawClient, apublish, connect

FAST = {"WS_GUARD_INTERVAL": "0.25s"}
STORM_SECONDS = 15.0


def _request(extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


async def _handshake(port: int, extra: str = "") -> tuple[int, dict[str, str]]:
    """One raw handshake; (status, headers). The socket is closed at once."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(_request(extra))
        async with asyncio.timeout(5):
            head = await r.readuntil(b"\r\n\r\n")
    finally:
        w.close()
    first, *rest = head.decode("latin-1").split("\r\n")
    return int(first.split(" ")[1]), {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in rest if ln)}


async def storm(port: int, until: Callable[[], bool], *, workers: int = 16, extra: str = "",
                seconds: float = STORM_SECONDS) -> int:
    """Handshakes from ``workers`` concurrent clients until ``until()`` or ``seconds``; how many."""
    end = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end and not until():
            try:
                await _handshake(port, extra)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                pass  # refused or reset under load: the load is what counts
            done += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done


class Stop:
    """A flag the load loops poll between handshakes (set from the test's own task)."""

    def __init__(self) -> None:
        self.done = False

    def set(self) -> None:
        self.done = True

    def __call__(self) -> bool:
        return self.done


def brake_on(reason: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d.get("msg") == "emergency brake on: refusing new connections" and d.get("reason") == reason


def brake_off(reason: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d.get("msg") == "emergency brake off" and d.get("reason") == reason


def health(node: NodeProcess) -> dict[str, Any]:
    status, _, body = node.http("GET", "/health")
    assert status == 200
    return json.loads(body)


async def assert_braking(node: NodeProcess, reason: str) -> None:
    """New handshakes 503 + jittered Retry-After; /ready 503 naming the reason; /health and metrics agree."""
    status, headers = await _handshake(node.ws_port)
    assert status == 503, (status, headers)
    assert 5 <= int(headers["retry-after"]) <= 10
    code, _, body = node.http("GET", "/ready")
    ready = json.loads(body)
    assert code == 503 and ready["reason"] == "braking" and reason in ready["braking"], ready
    g = health(node)["guard"]
    assert g["braking"] is True and reason in g["reasons"]
    assert node.metric("fanout_guard_braking", f'reason="{reason}"') == 1
    assert node.metric("fanout_braking") == 1
    assert node.metric("fanout_connections_rejected_total", 'reason="overload"') >= 1


async def test_cpu_brake_from_real_load_then_ready_again(node_factory):
    node = node_factory(WS_CPU_REJECT_THRESHOLD=10, WS_CPU_RESUME_THRESHOLD=5, WS_CPU_THROTTLE_THRESHOLD=0,
                        WS_MAX_LOOP_LAG_MS=0, **FAST)
    async with connect(node) as old:
        await old.subscribe("odin.token.guard.cpu")
        mark = LogMark(node)
        done = Stop()
        load = asyncio.create_task(storm(node.ws_port, done))
        try:
            on = await asyncio.to_thread(mark.wait, brake_on("cpu"), STORM_SECONDS)
            assert on["cpu_percent"] >= 10, on
            # Under load: new clients are refused, connected ones are served as before.
            await assert_braking(node, "cpu")
            await apublish(node, "odin.token.guard.cpu", "still served")
            # Braking also sheds low priority for everyone, and says so first.
            seen, m = await old.recv_until(lambda f: f["type"] == "message")
            assert all(f["type"] == "throttle_update" and f["reason"] == "load" for f in seen), seen
            assert m["data"] == "still served"
            await old.heartbeat()
        finally:
            done.set()
            n = await load
        # The load ended: the brake releases below the resume threshold, /ready is 200 again.
        mark.wait(brake_off("cpu"), timeout=10)
        assert node.http("GET", "/ready")[0] == 200
        assert (await _handshake(node.ws_port))[0] == 101
        assert node.metric("fanout_guard_braking", 'reason="cpu"') == 0
        assert n > 0


def _rsa_key(tmp_path) -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "rs256.pub.pem"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    token = jwt.encode({"sub": "load", "exp": int(time.time()) + 600}, key, algorithm="RS256")
    return str(pem), token


async def test_loop_lag_brake_from_a_handshake_burst(node_factory, tmp_path):
    """Hundreds of handshakes arriving together, each with an RS256 check on the
    loop: timers run late, the lag brake engages (CPU brake off, so it is the lag)."""
    pem, token = _rsa_key(tmp_path)
    node = node_factory(WS_AUTH_PUBLIC_KEY_FILE=pem, WS_MAX_LOOP_LAG_MS=25, WS_CPU_REJECT_THRESHOLD=0,
                        WS_CPU_THROTTLE_THRESHOLD=0, WS_MAX_CONNECTIONS_PER_USER=0, **FAST)
    mark = LogMark(node)
    done = Stop()
    load = asyncio.create_task(storm(node.ws_port, done, workers=256, extra=f"Authorization: Bearer {token}\r\n"))
    try:
        on = await asyncio.to_thread(mark.wait, brake_on("loop_lag"), STORM_SECONDS)
        assert on["loop_lag_ms"] >= 25, on
        await assert_braking(node, "loop_lag")
    finally:
        done.set()
        await load
    assert health(node)["guard"]["thresholds"]["max_loop_lag_ms"] == 25
    mark.wait(brake_off("loop_lag"), timeout=10)
    assert node.http("GET", "/ready")[0] == 200
    assert node.metric("fanout_loop_lag_seconds_count") > 0
    assert node.metric("fanout_guard_ingest_paused_seconds_total") > 0   # ingest was told to slow down


async def _rss(node_factory) -> int:
    """Memory of an idle default node (the guard's RSS reading)."""
    probe = node_factory(WS_MEMORY_LIMIT_BYTES=1 << 40, **FAST)
    for _ in range(200):
        g = health(probe)["guard"]
        if "memory_used_bytes" in g:
            probe.stop()
            return int(g["memory_used_bytes"])
        await asyncio.sleep(0.05)
    raise AssertionError("no guard sample")


async def test_memory_brake_then_shed_the_most_queued_client(node_factory):
    rss = await _rss(node_factory)
    # An idle node at ~50 % of its budget: 25 % more is the brake, 40 % more the shed.
    limit = 2 * rss
    node = node_factory(WS_MEMORY_LIMIT_BYTES=limit, WS_MEMORY_REJECT_PERCENT=75, WS_MEMORY_SHED_PERCENT=90,
                        WS_CPU_REJECT_THRESHOLD=0, WS_CPU_THROTTLE_THRESHOLD=0, WS_MAX_LOOP_LAG_MS=0,
                        WS_HISTORY_SIZE=0, WS_REPLAY_BUFFER=1, WS_CLIENT_QUEUE_BYTES=1 << 30,
                        WS_COMPRESSION="false", **FAST)
    big = b'"' + b"m" * 900_000 + b'"'
    hog = await RawClient.connect(node.ws_port, rcvbuf=4096)           # never reads
    hog.send_text({"type": "subscribe", "channels": ["odin.token.hog.x"]})
    assert (await hog.read_json())["type"] == "subscribed"     # from here on it reads nothing
    reader_ctx = connect(node)
    reader = await reader_ctx.__aenter__()
    try:
        await reader.subscribe("odin.token.small.x")
        mark = LogMark(node)
        sent = 0
        for _ in range(int(limit * 0.6 // len(big)) + 20):                 # bounded: past the shed line
            await asyncio.to_thread(node.publish, "odin.token.hog.x", big)
            sent += 1
            if any(brake_on("memory")(d) for d in mark.new()):
                break
        mark.wait(brake_on("memory"), timeout=3)
        await assert_braking(node, "memory")
        # The reader is served while braking.
        node.publish("odin.token.small.x", "small")
        seen, m = await reader.recv_until(lambda f: f["type"] == "message")
        assert all(f["type"] == "throttle_update" and f["reason"] == "load" for f in seen), seen
        assert m["data"] == "small"
        for _ in range(int(limit * 0.4 // len(big)) + 20):
            if any(d.get("msg") == "client shed at the memory limit" for d in mark.new()):
                break
            await asyncio.to_thread(node.publish, "odin.token.hog.x", big)
            sent += 1
        shed = mark.wait(lambda d: d.get("msg") == "client shed at the memory limit", timeout=3)
        assert shed["queued_bytes"] >= 10 * len(big), shed
        code, _ = await hog.read_until_close(timeout=10, limit=1_000_000)
        assert code == 1013
        assert node.metric("fanout_guard_shed_total") >= 1
        assert node.metric("fanout_connections_closed_total", 'code="1013"') >= 1
        assert health(node)["guard"]["shed_total"] >= 1
        # The reader, with nothing queued, was not shed and is still served.
        node.publish("odin.token.small.x", "after")
        (m,) = await reader.messages(1)
        assert m["data"] == "after"
    finally:
        hog.close()
        await reader_ctx.__aexit__(None, None, None)


async def test_handshake_limit(node_factory):
    node = node_factory(WS_MAX_PENDING_HANDSHAKES=3, WS_HANDSHAKE_TIMEOUT="20s")
    idle = [await asyncio.open_connection("127.0.0.1", node.ws_port) for _ in range(3)]
    try:
        # Accepted in order: the node holds the three idle sockets before it reads this request.
        status, headers = await _handshake(node.ws_port)
        assert status == 503 and 1 <= int(headers["retry-after"]) <= 3
        assert node.metric("fanout_connections_rejected_total", 'reason="handshake_limit"') == 1
        assert health(node)["guard"]["handshakes_pending"] == 3
    finally:
        for _, w in idle:
            w.close()
    for _ in range(200):
        if health(node)["guard"]["handshakes_pending"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await _handshake(node.ws_port))[0] == 101


@pytest.mark.parametrize("env", [{"WS_CPU_REJECT_THRESHOLD": "50"}, {"WS_MEMORY_REJECT_PERCENT": "95"}])
def test_bad_guard_settings_stop_the_node(env):
    n = NodeProcess(env)
    with pytest.raises(AssertionError):
        n.start(timeout=10)
    assert n.proc is not None and n.proc.wait(10) == 2
    assert any(list(env)[0] in line or "WS_CPU_RESUME_THRESHOLD" in line for line in n.raw)
