"""Rolling drain (PROTOCOL.md 1.1 ``reconnect``): on SIGTERM or POST /drain the
node turns unready at once, keeps serving the clients still connected, and
hands each a ``reconnect`` hint with ``after_ms`` spread over WS_DRAIN_SECONDS,
then closes it with 1001 at that time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from typing import Any

from tests.server.support import connect

CH = "odin.token.drain.update"
WINDOW = 2.0
N = 12


async def _watch(c: Any, t0: list[float]) -> dict[str, Any]:
    """Everything one client sees until its close: the hint, messages, when it closed."""
    out: dict[str, Any] = {"messages": [], "hint": None, "hint_at": None}
    code, frames = await c.closed(timeout=WINDOW + 10)
    out["closed_at"] = time.monotonic() - t0[0]
    out["code"] = code
    for f in frames:
        m = json.loads(f)
        if m["type"] == "reconnect":
            out["hint"] = m
        elif m["type"] == "message":
            out["messages"].append(m["data"])
    return out


async def test_sigterm_spreads_reconnect_hints_over_the_window_and_keeps_publishing(node_factory):
    node = node_factory(WS_DRAIN_SECONDS=WINDOW, WS_SHUTDOWN_TIMEOUT=3)
    clients = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(N):
            c = await stack.enter_async_context(connect(node))
            await c.subscribe(CH)
            clients.append(c)
        t0 = [time.monotonic()]
        watchers = [asyncio.create_task(_watch(c, t0)) for c in clients]
        node.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(node.wait_log, lambda d: d.get("msg") == "shutting down")
        status, _, body = node.http("GET", "/ready")
        assert status == 503 and json.loads(body)["reason"] == "draining"
        # Publishing continues to those still connected during the window.
        assert node.http("POST", f"/publish/{CH}", b'"during"')[0] == 202
        results = await asyncio.gather(*watchers)
        exit_code = await asyncio.to_thread(node.proc.wait, 10)
        elapsed = time.monotonic() - t0[0]
    assert exit_code == 0
    assert elapsed < WINDOW + 3 + 2
    hints = sorted(r["hint"]["after_ms"] for r in results)
    assert all(r["hint"]["reason"] == "drain" for r in results)
    assert all(r["code"] == 1001 for r in results)
    # Spread from 30 % of the window to its end, not a burst.
    assert hints[0] >= 0.3 * WINDOW * 1000 - 1 and hints[-1] < WINDOW * 1000
    assert len(set(hints)) == N
    # Each was closed at (about) its turn: the late ones later than the early ones.
    by_hint = sorted(results, key=lambda r: r["hint"]["after_ms"])
    assert by_hint[-1]["closed_at"] - by_hint[0]["closed_at"] > 0.4 * WINDOW
    # Those still connected got the message published during the drain.
    assert sum(1 for r in results if "during" in r["messages"]) >= N - 2


async def test_post_drain_empties_the_node_and_it_stays_up_unready(node_factory):
    node = node_factory(WS_DRAIN_SECONDS=0.5)
    async with connect(node) as c:
        await c.subscribe(CH)
        status, _, body = node.http("POST", "/drain", b"")
        assert status == 202 and json.loads(body)["draining"] is True
        code, frames = await c.closed(timeout=5)
        kinds = [json.loads(f)["type"] for f in frames]
        assert code == 1001 and kinds == ["reconnect"]
    assert node.http("GET", "/ready")[0] == 503
    assert node.http("GET", "/health")[0] == 200
    assert node.http("GET", "/drain")[0] == 405
    assert node.proc.poll() is None
    assert node.stop() == 0
