"""One connection per browser (@fanout/client's default): tabs of one origin in headless Chromium.

Several pages of one browser context (playwright-core driving the system's
Chromium: clients/js/test/driver/tabs.mjs) load the test driver page from a
static server here, which also serves the worker file (dist/fanout-worker.js)
next to the client bundle, where the client looks for it by default. Each page
runs the client at its defaults (no WebSocket class given) and reports every
event over its own WebSocket back to the test (the same driver as
test_js_client.py). The node is real; how many WebSockets it holds comes from
its metrics (``fanout_connections``).

- ``nosw=1`` hides SharedWorker from the page: the tabs elect a leader with
  Web Locks and talk over a BroadcastChannel;
- ``nolocks=1`` hides the Web Locks API, ``worker=/missing.js`` points the
  client at a worker file that is not there: each tab connects alone;
- ``nobye=1`` swallows the page's ``pagehide`` before the client sees it, so
  the owner can learn that the tab is gone only from its Web Lock.

Skips like the other browser tests (tests/clients/jsenv.py) when Node.js, npm
or Chromium are missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.clients.jsenv import PKG, chromium_setup, js_setup, node_bin
from tests.clients.test_js_client import CH, DRIVER_DIR, TRENDING, Driver, _StaticHandler, data_i, publish

TABS = DRIVER_DIR / "tabs.mjs"
SECRET = "fanout-shared-tabs-test-secret-0123456789"
OTHER = "odin.token.xyz.update"
THIRD = "odin.token.qrs.update"

SHARED_PAGE = b"""<!doctype html><meta charset="utf-8"><title>fanout shared client test</title>
<script type="module">
const q = new URLSearchParams(location.search);
if (q.get('nosw')) delete window.SharedWorker;
if (q.get('nobye')) addEventListener('pagehide', (e) => e.stopImmediatePropagation());
if (q.get('nolocks')) Object.defineProperty(navigator, 'locks', { value: undefined });
const { FanoutClient } = await import('/fanout-client.js');
const { clientOptions, drive, switchableNetwork } = await import('/driver.mjs');
const opts = Object.fromEntries(q.entries());
const report = new WebSocket(q.get('report'));
const out = (obj) => report.send(JSON.stringify(obj));
addEventListener('unhandledrejection', (ev) => out({ ev: 'unhandled', message: String(ev.reason && ev.reason.stack || ev.reason) }));
const network = switchableNetwork();
const client = new FanoutClient(clientOptions({ ...opts, shared: '1' }, WebSocket, network));
const handle = drive(client, out, network);
report.onmessage = (ev) => handle(JSON.parse(ev.data));
report.onopen = () => { out({ ev: 'started', impl: 'tab' }); client.connect(q.get('ws')); };
</script>
"""


class _SharedHandler(_StaticHandler):
    files = {**_StaticHandler.files,
             "/": (SHARED_PAGE, "text/html"),
             "/fanout-worker.js": (PKG / "dist" / "fanout-worker.js", "text/javascript")}


class Tab(Driver):
    impl = "tab"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.ws: ServerConnection | None = None
        self.connected_back = asyncio.Event()

    async def _send_line(self, line: str) -> None:
        assert self.ws is not None
        await self.ws.send(line)

    async def close(self) -> None:
        pass


class Browser:
    """One Chromium with tabs (tabs.mjs), the static server and the tabs' report sockets."""

    def __init__(self) -> None:
        self.tabs: dict[int, Tab] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self.replies: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._http: ThreadingHTTPServer | None = None
        self._report: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Browser:
        self._report = await serve(self._on_page, "127.0.0.1", 0)
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _SharedHandler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.proc = await asyncio.create_subprocess_exec(
            node_bin(), str(TABS), cwd=DRIVER_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "CHROMIUM": chromium_setup()})
        self._reader = asyncio.create_task(self._read())
        await self._reply(lambda r: r["ev"] == "started", 20)
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            ev = json.loads(line)
            if ev["ev"] == "log":
                tab = self.tabs.get(ev["id"])
                if tab is not None:
                    tab.diag.append(ev["text"] + "\n")
            async with self._changed:
                self.replies.append(ev)
                self._changed.notify_all()
        async with self._changed:
            self.replies.append({"ev": "exited"})
            self._changed.notify_all()

    async def _reply(self, pred, timeout: float = 15) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            async with self._changed:
                while True:
                    for r in self.replies:
                        if pred(r):
                            return r
                        assert r["ev"] != "exited", "tabs.mjs exited"
                    await self._changed.wait()
        return await asyncio.wait_for(run(), timeout)

    async def _op(self, **c: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(c) + "\n").encode())
        await self.proc.stdin.drain()
        done = "opened" if c["op"] == "open" else "closed"
        r = await self._reply(lambda r: r.get("id") == c["id"] and r["ev"] in (done, "failed"))
        assert r["ev"] == done, r

    async def _on_page(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        tab = self.tabs[int(ws.request.path.rsplit("/", 1)[1])]
        tab.ws = ws
        tab.connected_back.set()
        try:
            async for raw in ws:
                await tab._add(json.loads(raw))
        except Exception as exc:  # the page went away
            tab.diag.append(f"report socket: {exc}\n")
        await tab._add({"ev": "exited"})

    async def open(self, ws_url: str, **opts: Any) -> Tab:
        """A new tab running the client on ws_url; returns once the client says `connected`."""
        n = len(self.tabs) + 1
        tab = self.tabs[n] = Tab(n)
        assert self._http is not None
        report = f"ws://127.0.0.1:{self._report.sockets[0].getsockname()[1]}/tab/{n}"
        query = urlencode({"ws": ws_url, "report": report, **{k.replace("_", "-"): str(v) for k, v in opts.items()}})
        await self._op(op="open", id=n, url=f"http://127.0.0.1:{self._http.server_address[1]}/?{query}")
        await tab.wait(lambda e: e["ev"] == "connected", 15)
        return tab

    async def close_tab(self, tab: Tab) -> None:
        await self._op(op="close", id=tab.n)
        await tab.wait(lambda e: e["ev"] == "exited")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
        if self._report is not None:
            self._report.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


@pytest.fixture
async def browser():
    js_setup()
    chromium_setup()
    b = await Browser().start()
    yield b
    await b.stop()
    for tab in b.tabs.values():
        assert not tab.of("unhandled"), tab.of("unhandled")


async def until(pred, timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition the test cannot be told about (a node metric) until it holds, bounded."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what}"
        await asyncio.sleep(0.05)


def connections(node) -> float:
    return node.metric("fanout_connections")


def got(tab: Tab, channel: str) -> list[int]:
    return data_i([m for m in tab.of("message") if m["channel"] == channel])


# -------------------------------------------------------------------- tests
async def test_three_tabs_make_one_websocket_and_each_gets_its_channels(node, browser):
    tabs = [await browser.open(node.ws_url) for _ in range(3)]
    for tab, ch in zip(tabs, (CH, OTHER, THIRD), strict=True):
        r = await tab.cmd("subscribe", channels=[ch, TRENDING])
        assert r["channels"] == [ch, TRENDING] and r["errors"] == []
    assert connections(node) == 1
    assert node.metric("ws_connections") == 1
    n = 20
    for i in range(n):
        await publish(node, 1, start=i, channel=CH)
        await publish(node, 1, start=i, channel=OTHER)
        await publish(node, 1, start=i, channel=THIRD)
        await publish(node, 1, start=i, channel=TRENDING)
    for tab, ch in zip(tabs, (CH, OTHER, THIRD), strict=True):
        await tab.messages(2 * n)
        msgs = tab.of("message")
        assert {m["channel"] for m in msgs} == {ch, TRENDING}             # exactly its channels
        assert got(tab, ch) == list(range(n)) and got(tab, TRENDING) == list(range(n))
        assert [m["seq"] for m in msgs] == list(range(1, 2 * n + 1))      # its own seq, no gap
        ss = [m["stream_seq"] for m in msgs]
        assert ss == sorted(set(ss))
        assert {e["sub"] for e in tab.of("sub_message")} == {0}
    # a channel two tabs hold stays subscribed while one of them holds it
    await tabs[0].cmd("unsubscribe", sub=0)
    await tabs[0].cmd("heartbeat")
    await publish(node, 1, start=n, channel=TRENDING)
    await tabs[1].wait(lambda e: len(got(tabs[1], TRENDING)) == n + 1)
    await tabs[2].wait(lambda e: len(got(tabs[2], TRENDING)) == n + 1)
    await tabs[0].cmd("heartbeat")
    assert len(got(tabs[0], TRENDING)) == n
    assert connections(node) == 1


async def test_closing_tabs_leaves_the_others_whole(node, browser):
    """The first tab (the one that started the SharedWorker) closes, another goes without a goodbye."""
    first = await browser.open(node.ws_url)
    second = await browser.open(node.ws_url, nobye=1)
    third = await browser.open(node.ws_url)
    await first.cmd("subscribe", channels=[CH, OTHER])
    await second.cmd("subscribe", channels=[THIRD])
    await third.cmd("subscribe", channels=[CH])
    subs = node.metric("fanout_subscriptions")
    assert subs == 3 and connections(node) == 1            # CH, OTHER, THIRD on the one connection
    n = 200
    pub = asyncio.create_task(publish(node, n))
    await third.wait(lambda e: len(got(third, CH)) >= 20)
    await browser.close_tab(first)
    await until(lambda: node.metric("fanout_subscriptions") == 2, what="the closed tab's OTHER released")
    await browser.close_tab(second)                        # no pagehide: found by its Web Lock
    await until(lambda: node.metric("fanout_subscriptions") == 1, what="the crashed tab's THIRD released")
    await pub
    await third.wait(lambda e: len(got(third, CH)) >= n, 15)
    assert got(third, CH) == list(range(n))
    assert not third.of("disconnected")
    assert connections(node) == 1


async def test_leader_election_without_shared_worker_fails_over_without_a_gap(node, browser):
    leader = await browser.open(node.ws_url, nosw=1)
    await leader.cmd("subscribe", channels=[CH, OTHER])    # held before the others join: they learn it anyway
    tabs = [leader, await browser.open(node.ws_url, nosw=1), await browser.open(node.ws_url, nosw=1)]
    await tabs[1].cmd("subscribe", channels=[CH, OTHER])
    await tabs[2].cmd("subscribe", channels=[CH])
    assert connections(node) == 1
    n = 300
    pub = asyncio.create_task(publish(node, n))
    other = asyncio.create_task(publish(node, 50, channel=OTHER))
    await tabs[1].wait(lambda e: len(got(tabs[1], CH)) >= 30)
    await browser.close_tab(leader)                         # the connection goes with it
    await pub
    await other
    for tab in tabs[1:]:
        await tab.wait(lambda e, tab=tab: len(got(tab, CH)) >= n, 20)
        assert got(tab, CH) == list(range(n)), tab.n       # nothing lost, nothing twice
        ev = await tab.wait(lambda e: e["ev"] == "resumed")
        assert ev["complete"] is True, ev
        assert not tab.of("reset")
    await tabs[1].wait(lambda e: len(got(tabs[1], OTHER)) >= 50)
    assert got(tabs[1], OTHER) == list(range(50))
    await until(lambda: connections(node) == 1, what="one connection, the new leader's")
    await publish(node, 1, start=n)
    for tab in tabs[1:]:
        await tab.wait(lambda e, tab=tab: len(got(tab, CH)) == n + 1)


async def test_without_web_locks_or_the_worker_file_each_tab_connects_alone(node, browser):
    tabs = [await browser.open(node.ws_url, nolocks=1), await browser.open(node.ws_url, worker="/missing.js"),
            await browser.open(node.ws_url, nosw=1, worker="/missing.js")]
    for tab in tabs:
        await tab.cmd("subscribe", channels=[CH])
    assert connections(node) == 3
    await publish(node, 3)
    for tab in tabs:
        await tab.wait(lambda e, tab=tab: len(got(tab, CH)) == 3)
        assert got(tab, CH) == [0, 1, 2]


def _token(sub: str, exp: float, **claims: str) -> str:
    import jwt
    return jwt.encode({"sub": sub, "exp": int(exp), **claims}, SECRET, algorithm="HS256")


async def test_four_tabs_of_one_user_under_a_limit_of_three_are_never_cut(node_factory, browser):
    node = node_factory(WS_AUTH_SECRET=SECRET, WS_MAX_CONNECTIONS_PER_USER="3")
    token = _token("u1", time.time() + 600)
    tabs = [await browser.open(node.ws_url, token=token) for _ in range(4)]
    for tab in tabs:
        await tab.cmd("subscribe", channels=[CH])
    assert connections(node) == 1
    await publish(node, 5)
    for tab in tabs:
        await tab.wait(lambda e, tab=tab: len(got(tab, CH)) == 5)
        assert got(tab, CH) == list(range(5))
        assert not tab.of("disconnected")
    assert node.metric("fanout_connections_closed_total", 'code="4002"') == 0
    # Another user (a new login) does not share the first one's connection.
    other = await browser.open(node.ws_url, token=_token("u2", time.time() + 600))
    await other.cmd("subscribe", channels=[CH])
    assert connections(node) == 2


async def test_token_refresh_is_done_once_for_all_tabs(node_factory, browser):
    """Each tab has its own first token (fetched at its start, same exp) and would fetch a second one for
    its refresh: one tab fetches when the token nears its exp, the others get that token from the owner."""
    node = node_factory(WS_AUTH_SECRET=SECRET)
    soon = time.time() + 8
    later = [int(time.time()) + 3600 + 10 * i for i in range(3)]
    tabs = []
    for i in range(3):
        tokens = f"{_token('u1', soon, jti=str(i))},{_token('u1', later[i])}"
        tabs.append(await browser.open(node.ws_url, tokens=tokens, refresh_before=6500))
    for tab in tabs:
        await tab.wait(lambda e: e["ev"] == "refreshed" and e["exp"] > soon + 1000, 15)
    exps = {e["exp"] for tab in tabs for e in tab.of("refreshed")}
    assert len(exps) == 1 and exps <= set(later), exps     # one tab's second token, for all: one fetch
    assert node.metric("fanout_client_frames_total", 'type="refresh"') == 1
    assert connections(node) == 1
    assert not any(tab.of("disconnected") for tab in tabs)
