"""@fanout/client and delta messages (PROTOCOL 1.2) against a real node, under
Node.js and in headless Chromium (the drivers of test_js_client.py: a page
with its own connection, and one at the default, sharing through its
SharedWorker, which then applies the deltas), at the
client's and the node's defaults (deltas on).

- every payload comes out right: its value, and under Node.js its bytes (the
  client's own rebuilt payload, read from its delta base) against what was
  published, non-ASCII text included;
- a delta that fails its checksum is never shown: it is fetched again with
  ``replay``; when the replay cannot serve it, the client resumes on a new
  connection; either way every value arrives, in order, exactly once;
- ``delta: false`` gets full messages only;
- with one connection per browser (tabs in Chromium, test_js_shared.py's
  browser), the owner of the one WebSocket (SharedWorker, or the leader tab)
  applies the deltas and the tabs get full data;
- the React hooks, used as an app uses them (nothing about deltas), show the
  right values in Chromium over 1,000 token updates and 100 trending lists
  that came as deltas (clients/js/test/driver/react_delta.mjs): every message
  and every rendered value, byte for byte as published.

The corruption is done by the driver's WebSocket class (``corrupt=<seq>``):
it changes one literal byte of the delta of the first delta message from that
seq on, keeping its length, so that only the checksum can tell
(``drop-copy=1`` also loses the replayed copy). Skips like the other JS
client tests (tests/clients/jsenv.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from typing import Any

import pytest

from tests.clients.jsenv import PKG, chromium_setup, node_bin, react_app_setup
from tests.clients.test_js_client import js  # noqa: F401  (fixture)
from tests.clients.test_js_shared import browser  # noqa: F401  (fixture)
from tests.helpers.delta_check import token_stream

PATTERN = "odin.token.*.update"
S1, S2 = "odin.token.one.update", "odin.token.two.update"


def streams(n: int, start: int = 0) -> tuple[dict[str, list[bytes]], list[tuple[str, bytes]]]:
    """Token updates for S1 and S2, published interleaved (S1, S2, S1, ...); S2's carry non-ASCII text."""
    uni = '"name":"Tökén ✓ 🚀 '.encode()
    want = {S1: token_stream(start + n, 1)[start:],
            S2: [p.replace(b'"name":"', uni, 1) for p in token_stream(start + n, 2)[start:]]}
    return want, [(s, want[s][i]) for i in range(n) for s in (S1, S2)]


async def publish(node: Any, items: list[tuple[str, bytes]]) -> dict[int, bytes]:
    return await asyncio.to_thread(lambda: {node.publish(s, p): p for s, p in items})


def by_subject(msgs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {S1: [], S2: []}
    for m in msgs:
        out[m["channel"]].append(m["data"])
    return out


def values(want: dict[str, list[bytes]]) -> dict[str, list[Any]]:
    return {s: [json.loads(p) for p in ps] for s, ps in want.items()}


def assert_once_in_order(msgs: list[dict[str, Any]]) -> None:
    ss = [m["stream_seq"] for m in msgs]
    assert ss == sorted(set(ss)), ss


async def test_every_payload_rebuilt_from_the_nodes_deltas(node, js, request):  # noqa: F811
    shared = request.node.callspec.params["js"] == "chromium-shared"     # the page's SharedWorker applies them
    c = await js(node.ws_url, bytes=1)
    await c.cmd("subscribe", channels=[PATTERN])
    want, items = streams(40)
    published = await publish(node, items)
    msgs = await c.messages(80)
    assert by_subject(msgs) == values(want)
    assert_once_in_order(msgs)
    if c.impl == "node":
        # Byte for byte: what the client rebuilt (its delta base right after each message) is what was published.
        assert [base64.b64decode(m["b64"]) for m in msgs] == [published[m["stream_seq"]] for m in msgs]
    state = await c.cmd("state")
    assert state["deltaFailures"] == 0
    # All but each subject's first came as deltas, and the client (or its SharedWorker) applied every one.
    assert node.metric("fanout_sent_frames_total", 'kind="delta"') == 78
    assert state["deltas"] == (0 if shared else 78)


async def test_a_corrupted_delta_is_replayed_never_shown(node, js):  # noqa: F811
    c = await js(node.ws_url, corrupt=5)                  # the first delta from seq 5 on (S1's third message)
    await c.cmd("subscribe", channels=[PATTERN])
    want, items = streams(8)
    await publish(node, items)
    msgs = await c.messages(16)
    assert [m["seq"] for m in msgs] == list(range(1, 17))
    assert by_subject(msgs) == values(want)               # nothing wrong, nothing skipped, nothing twice
    state = await c.cmd("state")
    assert state["deltaFailures"] == 1 and state["reconnects"] == 0 and state["missing"] == []
    assert node.metric("fanout_replays_total", 'result="full"') == 1
    assert not c.of("missing") and not c.of("reset")


async def test_a_corrupted_delta_that_cannot_be_replayed_is_resumed(node, js):  # noqa: F811
    c = await js(node.ws_url, corrupt=5, drop_copy=1)
    await c.cmd("subscribe", channels=[PATTERN])
    want, items = streams(8)
    await publish(node, items)
    msgs = await c.messages(16)
    assert by_subject(msgs) == values(want)
    assert_once_in_order(msgs)
    state = await c.cmd("state")
    assert state["deltaFailures"] == 1 and state["reconnects"] == 1 and state["missing"] == []
    assert [e["complete"] for e in c.of("resumed")] == [True] and not c.of("reset")
    # Live messages after the recovery come as deltas again, and right.
    before = state["deltas"]
    more, items2 = streams(5, start=8)
    await publish(node, items2)
    msgs = await c.messages(26)
    assert by_subject(msgs[16:]) == values(more)
    assert (await c.cmd("state"))["deltas"] > before


async def test_delta_false_gets_full_messages(node, js):  # noqa: F811
    c = await js(node.ws_url, delta=0)
    await c.cmd("subscribe", channels=[PATTERN])
    want, items = streams(6)
    await publish(node, items)
    assert by_subject(await c.messages(12)) == values(want)
    assert (await c.cmd("state"))["deltas"] == 0
    assert node.metric("fanout_sent_frames_total", 'kind="delta"') == 0


@pytest.mark.parametrize("owner", ["sharedworker", "leader"])
async def test_tabs_get_full_data_the_one_connection_gets_deltas(node, browser, owner):  # noqa: F811
    opts = {"nosw": 1} if owner == "leader" else {}
    tabs = [await browser.open(node.ws_url, **opts) for _ in range(2)]
    for tab in tabs:
        assert (await tab.cmd("subscribe", channels=[PATTERN]))["channels"] == [PATTERN]
    assert node.metric("fanout_connections") == 1
    want, items = streams(30)
    await publish(node, items)
    for tab in tabs:
        msgs = await tab.messages(60)
        assert by_subject(msgs) == values(want)
        assert_once_in_order(msgs)
        assert (await tab.cmd("state"))["deltas"] == 0           # full data through the tunnel
    assert node.metric("fanout_sent_frames_total", 'kind="delta"') == 58    # the one connection: all but 2 firsts


def is_subsequence(part: list[Any], whole: list[Any]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


@pytest.mark.parametrize("shared", ["1", "0"], ids=["sharedworker", "page"])
async def test_react_hooks_show_the_right_values_over_1000_deltas(node, shared):
    react_app_setup()                     # React and react-dom come from examples/react-app
    env = {**os.environ, "CHROMIUM": chromium_setup(), "WS_URL": node.ws_url, "OPS_URL": node.ops_url,
           "N": "1000", "M": "100", "SHARED": shared}
    script = PKG / "test" / "driver" / "react_delta.mjs"
    res = await asyncio.to_thread(subprocess.run, [node_bin(), str(script)], cwd=script.parent, env=env,
                                  capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    tokens, lists = out["published"], out["publishedTrending"]
    assert len(tokens) == 1000 and len(lists) == 100
    assert out["all"] == tokens                       # every message, in order, byte for byte as published
    assert out["trendingAll"] == lists
    assert out["final"] == tokens[-1] and out["trendingFinal"] == lists[-1]
    # React may skip renders of values superseded before it rendered; what it rendered is right and in order.
    assert out["rendered"][-1] == tokens[-1] and is_subsequence(out["rendered"], tokens)
    # Deltas it was: all but each subject's first.
    assert node.metric("fanout_sent_frames_total", 'kind="delta"') == 999 + 99
