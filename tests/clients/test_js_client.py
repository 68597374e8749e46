"""@fanout/client (clients/js) against a real node, under Node.js and in headless Chromium.

A driver (clients/js/test/driver/driver.mjs) runs the built client: commands in, every
event the client reports out, one JSON object each. Under Node.js it is
run_client.mjs on stdin/stdout; in Chromium it is a page served from here
that talks to the test over a WebSocket. Every test runs once per runtime.

The client's TCP connection runs through a small proxy here, so a test can cut
it (both sides aborted, no close frame) or refuse reconnects for a while,
whatever WebSocket implementation the client uses. Seq gaps come from a
WebSocket class injected through the client's ``WebSocket`` option that loses
chosen live frames.

Under Node.js it runs dist/index.js (tsc's output), in Chromium the minified
bundle dist/fanout-client.min.js. Every test also checks that the runtime saw
no unhandled promise rejection.

Requirements, else the runtime's tests skip with the reason (tests/clients/jsenv.py):
Node.js >= 18 and clients/js's dev dependencies (``npm ci --prefix clients/js``;
run once when missing), Chromium on PATH (``chromium``, ``chromium-browser``,
``google-chrome``) or in ``$CHROMIUM``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.clients.jsenv import PKG, chromium_setup, js_setup, node_bin

DRIVER_DIR = PKG / "test" / "driver"
DRIVER = DRIVER_DIR / "run_client.mjs"
CH = "odin.token.abc.update"
TRENDING = "odin.global.trending"


# ------------------------------------------------------------------ proxy
class TcpProxy:
    """127.0.0.1 TCP forwarder to a node's WebSocket port: ``kill()`` cuts every
    connection (both sides aborted, no close frame); while ``blocked`` new
    connections are dropped at once; ``upstream_port`` may change."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.blocked = False
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_w)
        self._conns.add(pair)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                w.write_eof()
            except (ConnectionError, OSError, RuntimeError):
                w.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._conns.discard(pair)
        for w in pair:
            w.close()

    def kill(self) -> int:
        n = len(self._conns)
        for a, b in list(self._conns):
            a.transport.abort()
            b.transport.abort()
        return n

    async def close(self) -> None:
        self.kill()
        if self._server is not None:
            self._server.close()


# ---------------------------------------------------------------- drivers
class Driver:
    """A running client driver: ``cmd()`` sends a command and waits for its reply; ``wait()`` for an event."""

    impl = "?"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.diag: list[str] = []       # the driver's stderr / Chromium's log, for failure messages
        self._changed = asyncio.Condition()

    async def _add(self, ev: dict[str, Any]) -> None:
        async with self._changed:
            self.events.append(ev)
            self._changed.notify_all()

    async def _send_line(self, line: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def wait(self, pred, timeout: float = 10.0, since: int = 0) -> dict[str, Any]:
        """The first event at or after index ``since`` that satisfies ``pred``."""
        async def run() -> dict[str, Any]:
            async with self._changed:
                i = since
                while True:
                    for ev in self.events[i:]:
                        if pred(ev):
                            return ev
                        if ev["ev"] == "exited":
                            raise AssertionError(f"{self.impl} driver exited:\n" + "".join(self.diag[-30:]))
                    i = len(self.events)
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(run(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.impl}: event not seen; last events: {self.events[-8:]}; "
                                 f"log: {''.join(self.diag[-10:])}") from None

    async def cmd(self, name: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        since = len(self.events)
        await self._send_line(json.dumps({"cmd": name, **args}))
        ev = await self.wait(lambda e: e["ev"] in (f"{name}_done", f"{name}_failed"), timeout, since)
        assert ev["ev"] == f"{name}_done", ev
        return ev

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == kind]

    async def messages(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until n data messages were reported; returns them all."""
        await self.wait(lambda e: len(self.of("message")) >= n, timeout)
        return self.of("message")


class NodeDriver(Driver):
    """run_client.mjs under Node.js: commands on stdin, events on stdout."""

    impl = "node"

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        super().__init__()
        self.proc = proc
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]

    @classmethod
    async def start(cls, url: str, opts: dict[str, str]) -> NodeDriver:
        proc = await asyncio.create_subprocess_exec(
            node_bin(), str(DRIVER), url, *(f"--{k}={v}" for k, v in opts.items()), cwd=DRIVER_DIR,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NO_COLOR": "1"})
        return cls(proc)

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"ev": "raw", "line": line.decode(errors="replace")}
            await self._add(ev)
        await self._add({"ev": "exited"})

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.diag.append(line.decode(errors="replace"))

    async def _send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()     # the driver disconnects and exits
                await asyncio.wait_for(self.proc.wait(), 5)
            except (TimeoutError, OSError):
                self.proc.kill()
                await self.proc.wait()
        for t in self._tasks:
            t.cancel()


BROWSER_PAGE = b"""<!doctype html><meta charset="utf-8"><title>fanout client test</title>
<script type="module">
import { FanoutClient } from '/fanout-client.js';
import { clientOptions, drive, switchableNetwork } from '/driver.mjs';
const q = new URLSearchParams(location.search);
const opts = Object.fromEntries(q.entries());
const report = new WebSocket(q.get('report'));
const out = (obj) => report.send(JSON.stringify(obj));
addEventListener('unhandledrejection', (ev) => out({ ev: 'unhandled', message: String(ev.reason && ev.reason.stack || ev.reason) }));
const network = switchableNetwork();
const client = new FanoutClient(clientOptions(opts, WebSocket, network));
const handle = drive(client, out, network);
report.onmessage = (ev) => handle(JSON.parse(ev.data));
report.onopen = () => { out({ ev: 'started', impl: 'browser', ua: navigator.userAgent }); client.connect(q.get('ws')); };
</script>
"""


class _StaticHandler(BaseHTTPRequestHandler):
    files: dict[str, tuple[bytes | Path, str]] = {
        "/": (BROWSER_PAGE, "text/html"),
        "/fanout-client.js": (PKG / "dist" / "fanout-client.min.js", "text/javascript"),
        "/driver.mjs": (DRIVER_DIR / "driver.mjs", "text/javascript"),
        "/fanout-worker.js": (PKG / "dist" / "fanout-worker.js", "text/javascript"),
    }

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        entry = self.files.get(self.path.split("?", 1)[0])
        if entry is None:
            self.send_error(404)
            return
        body = entry[0] if isinstance(entry[0], bytes) else entry[0].read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", entry[1])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class BrowserDriver(Driver):
    """The same driver in headless Chromium: a page served from here, commands and
    events over a WebSocket between the page and the test."""

    impl = "chromium"

    def __init__(self) -> None:
        super().__init__()
        self._page_ws: ServerConnection | None = None
        self._connected = asyncio.Event()
        self._tmp = tempfile.TemporaryDirectory(prefix="fanout-chromium-")
        self._http: ThreadingHTTPServer | None = None
        self._report: Any = None
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    async def start(cls, url: str, opts: dict[str, str]) -> BrowserDriver:
        chromium = chromium_setup()
        self = cls()
        self._report = await serve(self._on_page, "127.0.0.1", 0)
        report_port = self._report.sockets[0].getsockname()[1]
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _StaticHandler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        query = urlencode({"ws": url, "report": f"ws://127.0.0.1:{report_port}/", **opts})
        page = f"http://127.0.0.1:{self._http.server_address[1]}/?{query}"
        with open(os.path.join(self._tmp.name, "chromium.log"), "wb") as log:
            self.proc = subprocess.Popen(
                [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking", f"--user-data-dir={self._tmp.name}",
                 page],
                stdout=log, stderr=log, start_new_session=True)
        try:
            await asyncio.wait_for(self._connected.wait(), 20)
        except TimeoutError:
            await self.close()
            raise AssertionError("the page did not connect back:\n" + "".join(self.diag)) from None
        return self

    async def _on_page(self, ws: ServerConnection) -> None:
        self._page_ws = ws
        self._connected.set()
        try:
            async for raw in ws:
                await self._add(json.loads(raw))
        except Exception as exc:  # the browser went away
            self.diag.append(f"report socket: {exc}\n")
        await self._add({"ev": "exited"})

    async def _send_line(self, line: str) -> None:
        assert self._page_ws is not None
        await self._page_ws.send(line)

    async def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)    # Chromium and the helpers it started
            await asyncio.to_thread(self.proc.wait)
        if self._report is not None:
            self._report.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        try:
            with open(os.path.join(self._tmp.name, "chromium.log"), errors="replace") as f:
                self.diag.extend(f.readlines()[-20:])
        except OSError:
            pass
        self._tmp.cleanup()


@pytest.fixture(params=["node", "chromium", "chromium-shared"])
async def js(request):
    """``await js(url, drop="3,7", heartbeat_interval=100, ...)`` starts a client driver
    (options as in run_client.mjs), under Node.js or in headless Chromium; all stop at teardown.
    ``chromium-shared``: the browser client at its default, one connection per browser (its
    SharedWorker owns the connection; tests/clients/test_js_shared.py has the tests with several
    tabs), except where a test injects lost frames (``drop``: a WebSocket class of its own)."""
    js_setup()
    if request.param != "node":
        chromium_setup()
    kind = NodeDriver if request.param == "node" else BrowserDriver
    extra = {"shared": "1"} if request.param == "chromium-shared" else {}
    started: list[Driver] = []

    async def make(url: str, **opts: Any) -> Driver:
        d = await kind.start(url, {k.replace("_", "-"): str(v) for k, v in {**extra, **opts}.items()})
        started.append(d)
        await d.wait(lambda e: e["ev"] == "connected")
        return d

    yield make
    for d in started:
        await d.close()
    for d in started:
        assert not d.of("unhandled"), d.of("unhandled")


@pytest.fixture
async def proxy(node):
    p = await TcpProxy(node.ws_port).start()
    yield p
    await p.close()


async def publish(node, n: int, start: int = 0, channel: str = CH) -> list[int]:
    return await asyncio.to_thread(lambda: [node.publish(channel, {"i": i}) for i in range(start, start + n)])


def data_i(msgs: list[dict[str, Any]]) -> list[int]:
    return [m["data"]["i"] for m in msgs]


# -------------------------------------------------------------------- tests
async def test_subscribe_receive_listen_heartbeat(node, js):
    c = await js(node.ws_url)
    await c.cmd("listen", pattern="odin.token.*.update")
    sub = await c.cmd("subscribe", channels=[CH, TRENDING, "odin..bad"])
    assert sub["channels"] == [CH, TRENDING] and sub["errors"] == ["invalid_channel"]
    assert c.of("error")[0]["channel"] == "odin..bad"
    seqs = await publish(node, 3)
    seqs += await publish(node, 1, start=3, channel=TRENDING)
    msgs = await c.messages(4)
    assert [m["seq"] for m in msgs] == [1, 2, 3, 4]
    assert [m["stream_seq"] for m in msgs] == seqs
    assert data_i(msgs) == [0, 1, 2, 3]
    assert [e["channel"] for e in c.of("channel_message")] == [CH] * 3     # the pattern listener
    assert isinstance((await c.cmd("heartbeat"))["ts"], int)
    state = await c.cmd("state")
    assert state["channels"] == [CH, TRENDING] and state["lastStreamSeq"] == seqs[-1] and state["epoch"]


async def test_tcp_cut_while_publishing_exactly_once(node, proxy, js):
    c = await js(proxy.url())
    await c.cmd("subscribe", channels=[CH])
    n = 300
    pub = asyncio.create_task(publish(node, n))
    await c.messages(50)
    assert proxy.kill() == 1
    msgs = await c.messages(n, timeout=20)
    await pub
    assert data_i(msgs) == list(range(n))
    ss = [m["stream_seq"] for m in msgs]
    assert ss == sorted(set(ss))
    assert [e["complete"] for e in c.of("resumed")] == [True]
    assert c.of("disconnected")[0]["code"] == 1006 and c.of("disconnected")[0]["reconnecting"] is True
    assert (await c.cmd("state"))["reconnects"] == 1


async def test_outage_resumed_and_new_subscription_sent_after_reconnect(node, proxy, js):
    c = await js(proxy.url())
    await c.cmd("subscribe", channels=[CH])
    await publish(node, 5)
    await c.messages(5)
    proxy.blocked = True
    proxy.kill()
    await c.wait(lambda e: e["ev"] == "disconnected")
    await publish(node, 5, start=5)                 # published while the client is away
    sub = asyncio.create_task(c.cmd("subscribe", channels=[TRENDING]))   # waits for the connection
    await c.wait(lambda e: len(c.of("disconnected")) >= 2)    # a refused reconnect, at least
    proxy.blocked = False
    assert (await sub)["channels"] == [TRENDING]
    await publish(node, 1, start=100, channel=TRENDING)
    msgs = await c.messages(11)
    assert data_i(msgs) == [*range(10), 100]
    assert [e["complete"] for e in c.of("resumed")] == [True]
    assert (await c.cmd("state"))["channels"] == [CH, TRENDING]


async def test_unsubscribed_channel_is_not_resumed(node, proxy, js):
    c = await js(proxy.url())
    await c.cmd("subscribe", channels=[CH])
    await c.cmd("subscribe", channels=[TRENDING])
    await publish(node, 1)
    await publish(node, 1, start=1, channel=TRENDING)
    await c.messages(2)
    await c.cmd("unsubscribe", sub=1)
    proxy.kill()
    await c.wait(lambda e: e["ev"] == "resumed")
    assert c.of("resumed")[0]["channels"] == [CH]
    await publish(node, 1, start=2, channel=TRENDING)
    await publish(node, 1, start=3)
    msgs = await c.messages(3)
    assert data_i(msgs) == [0, 1, 3]


async def test_gap_is_replayed_in_order(node, js):
    c = await js(node.ws_url, drop="3,7,8")
    await c.cmd("subscribe", channels=[CH])
    await publish(node, 10)
    msgs = await c.messages(10)
    assert [m["seq"] for m in msgs] == list(range(1, 11))
    assert data_i(msgs) == list(range(10))
    assert (await c.cmd("state"))["missing"] == []
    assert node.metric("fanout_replays_total", 'result="full"') == 2


async def test_gap_beyond_replay_buffer_reports_missing(node_factory, js):
    node = node_factory(WS_REPLAY_BUFFER="2")
    c = await js(node.ws_url, drop="2,3,4,5")
    await c.cmd("subscribe", channels=[CH])
    await publish(node, 6)          # seq 6 shows the gap; the node still holds 5 and 6
    await c.messages(3)
    await publish(node, 1, start=6)
    msgs = await c.messages(4)
    assert [m["seq"] for m in msgs] == [1, 5, 6, 7]
    assert [(e["first"], e["last"]) for e in c.of("missing")] == [(2, 4)]
    i_missing = c.events.index(c.of("missing")[0])
    assert c.events[i_missing + 1]["seq"] == 5       # reported where the gap is, before what follows it


async def test_manual_replay_returns_copies(node, js):
    c = await js(node.ws_url)
    await c.cmd("subscribe", channels=[CH])
    await publish(node, 4)
    await c.messages(4)
    r = await c.cmd("replay", **{"from": 2, "to": 3})
    assert r["seqs"] == [2, 3] and r["missing"] is None
    await publish(node, 1, start=4)
    assert [m["seq"] for m in await c.messages(5)] == [1, 2, 3, 4, 5]   # the copies were not delivered again


async def test_node_restart_reports_epoch_change(node_factory, js):
    first = node_factory()
    p = await TcpProxy(first.ws_port).start()
    try:
        c = await js(p.url())
        await c.cmd("subscribe", channels=[CH])
        await publish(first, 3)
        await c.messages(3)
        second = node_factory()          # a new epoch; its stream_seq starts at 1 again
        p.upstream_port = second.ws_port
        p.kill()
        ev = await c.wait(lambda e: e["ev"] == "resumed")
        assert ev["complete"] is False and ev["reason"] == "epoch_changed"
        assert (await c.cmd("state"))["lastStreamSeq"] == 0
        seqs = await publish(second, 2, start=3)
        msgs = await c.messages(5)
        assert [m["stream_seq"] for m in msgs[3:]] == seqs == [1, 2]
    finally:
        await p.close()


async def test_quiet_channel_resumes_from_its_subscribe_position(node, proxy, js):
    c = await js(proxy.url())
    await c.cmd("subscribe", channels=[CH])
    proxy.kill()
    ev = await c.wait(lambda e: e["ev"] == "resumed")
    assert ev["complete"] is True and ev["channels"] == [CH], ev
    await publish(node, 1)
    assert data_i(await c.messages(1)) == [0]


async def test_throttle_update_event(js):
    """The node sends throttle_update only when it throttles; a scripted server sends one on cue."""
    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            req = json.loads(raw)
            if req["type"] == "subscribe":
                await ws.send(json.dumps({"type": "subscribed", "id": req["id"], "channels": req["channels"],
                                          "epoch": "e-1"}))
                await ws.send(json.dumps({"type": "throttle_update", "level": 3, "rate_percent": 25,
                                          "message": "Your connection is very slow."}))
                await ws.send(json.dumps({"seq": 1, "type": "message", "channel": CH, "stream_seq": 5, "ts": 1,
                                          "data": {"i": 0}}))

    async with serve(handler, "127.0.0.1", 0) as server:
        c = await js(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws")
        await c.cmd("subscribe", channels=[CH])
        await c.messages(1)
        assert [e["ev"] for e in c.events if e["ev"] in ("throttle_update", "message")] == ["throttle_update", "message"]
        assert c.of("throttle_update")[0]["rate_percent"] == 25
        assert (await c.cmd("state"))["throttle"]["level"] == 3


async def test_silent_connection_is_replaced_after_missed_heartbeat(js):
    connections: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(ws)
        async for raw in ws:
            req = json.loads(raw)
            if req["type"] == "heartbeat" and len(connections) > 1:     # the first one plays dead
                await ws.send(json.dumps({"type": "heartbeat_ack", "id": req["id"], "ts": 7}))

    async with serve(handler, "127.0.0.1", 0) as server:
        c = await js(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws",
                     heartbeat_interval=100, heartbeat_timeout=200)
        await c.wait(lambda e: len(c.of("connected")) == 2)
        assert c.of("disconnected")[0]["code"] == 4000 and c.of("disconnected")[0]["reason"] == "heartbeat timeout"
        assert (await c.cmd("heartbeat"))["ts"] == 7


# ------------------------------------------------ the package's 1.1 client API
async def test_channels_are_reference_counted_across_subscriptions(node, js):
    c = await js(node.ws_url)
    a = await c.cmd("subscribe", channels=[CH])
    b = await c.cmd("subscribe", channels=[CH, TRENDING])
    await c.cmd("unsubscribe", sub=a["sub"])        # b still holds CH: the node must keep sending it
    assert (await c.cmd("state"))["channels"] == [CH, TRENDING]
    await publish(node, 2)
    await c.wait(lambda e: len(c.of("sub_message")) >= 2)
    assert {e["sub"] for e in c.of("sub_message")} == {b["sub"]}
    await c.cmd("unsubscribe", sub=b["sub"])
    await c.cmd("heartbeat")                        # the unsubscribe went out before this round trip
    assert (await c.cmd("state"))["channels"] == []
    await publish(node, 1, start=2, channel=TRENDING)
    await publish(node, 1, start=3)
    await c.cmd("heartbeat")
    assert data_i(c.of("message")) == [0, 1]


async def test_async_iteration_of_a_subscription(node, js):
    c = await js(node.ws_url)
    s = await c.cmd("subscribe", channels=[CH])
    since = len(c.events)
    it = asyncio.create_task(c.cmd("iterate", sub=s["sub"], n=3))
    # The iterator buffers from its start only: publish once it runs.
    await c.wait(lambda e: e["ev"] == "iterating", since=since)
    seqs = await publish(node, 3)
    assert (await it)["stream_seqs"] == seqs
    assert (await c.cmd("state"))["channels"] == []     # leaving the loop unsubscribed


async def test_disconnect_during_pending_subscribe_rejects_nothing(node, proxy, js):
    c = await js(proxy.url())
    proxy.blocked = True
    proxy.kill()
    await c.wait(lambda e: e["ev"] == "disconnected")
    s = await c.cmd("subscribe", channels=[TRENDING], nowait=True)
    await c.cmd("disconnect")
    r = await c.cmd("ready", sub=s["sub"])
    assert r["channels"] == [] and r["errors"] == ["closed"]
    assert (await c.cmd("state"))["state"] == "disconnected"
    # the fixture's teardown asserts that no unhandled rejection was reported


async def test_node_restart_gives_reset(node_factory, js):
    first = node_factory()
    p = await TcpProxy(first.ws_port).start()
    try:
        c = await js(p.url())
        s = await c.cmd("subscribe", channels=[CH])
        await publish(first, 2)
        await c.messages(2)
        first.stop()                    # SIGTERM: close 1001, the client retries with backoff
        second = node_factory()
        p.upstream_port = second.ws_port
        ev = await c.wait(lambda e: e["ev"] == "reset", timeout=15)
        assert ev["channels"] == [CH] and ev["reason"] == "epoch_changed"
        assert (await c.wait(lambda e: e["ev"] == "sub_reset"))["sub"] == s["sub"]
        assert c.of("disconnected")[0]["code"] == 1001
        await publish(second, 1, start=2)
        assert data_i(await c.messages(3)) == [0, 1, 2]
    finally:
        await p.close()


async def test_offline_pauses_reconnects_until_online(node, proxy, js):
    c = await js(proxy.url())
    await c.cmd("subscribe", channels=[CH])
    await c.cmd("offline")
    proxy.kill()
    ev = await c.wait(lambda e: e["ev"] == "disconnected")
    assert ev["reconnecting"] is True and ev["delay"] is None      # no timer: waits for `online`
    await asyncio.sleep(0.3)        # an observation window (absence cannot be awaited): min backoff is 50 ms
    assert len(c.of("connected")) == 1
    await c.cmd("online")
    await c.wait(lambda e: len(c.of("connected")) == 2)
    assert [e["complete"] for e in c.of("resumed")] == [True]


class Scripted:
    """A scripted WebSocket server for what today's node does not send (1.1 notices) or to close on cue."""

    def __init__(self, on_frame) -> None:
        self.on_frame = on_frame
        self.connections: list[ServerConnection] = []
        self.paths: list[str] = []
        self.frames: list[dict[str, Any]] = []
        self.opened = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        self.paths.append(ws.request.path if ws.request else "")
        self.opened.set()
        try:
            async for raw in ws:
                req = json.loads(raw)
                self.frames.append(req)
                if req["type"] == "resume":
                    await ws.send(json.dumps({"type": "resumed", "id": req["id"], "channels": req["channels"],
                                              "epoch": "e-1", "complete": True, "stream_seq": 0}))
                await self.on_frame(self, ws, req)
        except ConnectionClosed:
            pass

    @staticmethod
    async def subscribed(ws: ServerConnection, req: dict[str, Any], **extra: Any) -> None:
        await ws.send(json.dumps({"type": "subscribed", "id": req["id"], "channels": req["channels"],
                                  "epoch": "e-1", "stream_seq": 0, **extra}))


def _jwt(exp: float) -> str:
    import base64
    body = base64.urlsafe_b64encode(json.dumps({"sub": "u", "exp": int(exp)}).encode()).decode().rstrip("=")
    return f"e30.{body}.sig"


async def _expire_first_connection(srv: Scripted, ws: ServerConnection, req: dict[str, Any]) -> None:
    """Answer subscribe; the first connection then closes with 4001 (token expired)."""
    if req["type"] == "subscribe":
        await Scripted.subscribed(ws, req)
        if len(srv.connections) == 1:
            await ws.close(4001, "token expired")


async def test_4001_stops_retrying_until_a_new_token(js):
    srv = Scripted(_expire_first_connection)
    async with serve(srv.handler, "127.0.0.1", 0) as server:
        c = await js(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", token="old")
        await c.cmd("subscribe", channels=[CH])
        ev = await c.wait(lambda e: e["ev"] == "disconnected")
        assert ev["code"] == 4001 and ev["reconnecting"] is False
        assert any(e["code"] == "token_expired" for e in c.of("error"))
        await asyncio.sleep(0.3)        # an observation window: with 50 ms backoff it would have retried
        assert len(srv.connections) == 1
        await c.cmd("set_token", token="new")
        await c.wait(lambda e: len(c.of("connected")) == 2)
        assert srv.paths[0].endswith("auth=old") and srv.paths[1].endswith("auth=new")


async def test_4001_with_get_token_reconnects_with_the_new_one(js):
    srv = Scripted(_expire_first_connection)
    async with serve(srv.handler, "127.0.0.1", 0) as server:
        c = await js(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", tokens="t1,t2")
        await c.cmd("subscribe", channels=[CH])
        await c.wait(lambda e: len(c.of("connected")) == 2)
        assert [p.rsplit("=", 1)[1] for p in srv.paths] == ["t1", "t2"]
        assert [f["type"] for f in srv.frames] == ["subscribe", "resume"]


async def test_reconnect_hint_waits_after_ms(js):
    async def on_frame(srv: Scripted, ws: ServerConnection, req: dict[str, Any]) -> None:
        if req["type"] == "subscribe":
            await Scripted.subscribed(ws, req)
            if len(srv.connections) == 1:
                await ws.send(json.dumps({"type": "reconnect", "reason": "drain", "after_ms": 400}))
                await ws.close(1001, "draining")

    srv = Scripted(on_frame)
    async with serve(srv.handler, "127.0.0.1", 0) as server:
        c = await js(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", reconnect_max=50)
        await c.cmd("subscribe", channels=[CH])
        hint = await c.wait(lambda e: e["ev"] == "reconnect")
        assert hint["after_ms"] == 400
        ev = await c.wait(lambda e: e["ev"] == "disconnected")
        assert ev["code"] == 1001 and 250 <= ev["delay"] <= 400, ev      # not the 50 ms backoff cap
        closed = asyncio.get_running_loop().time()
        await c.wait(lambda e: len(c.of("connected")) == 2)
        assert asyncio.get_running_loop().time() - closed >= 0.2


async def test_throttle_update_with_dropped(js):
    async def on_frame(srv: Scripted, ws: ServerConnection, req: dict[str, Any]) -> None:
        if req["type"] == "subscribe":
            await Scripted.subscribed(ws, req)
            await ws.send(json.dumps({"type": "throttle_update", "level": 2, "rate_percent": 50, "dropped": 412,
                                      "message": "Your connection is slow. Receiving 50% of updates."}))

    async with serve(Scripted(on_frame).handler, "127.0.0.1", 0) as server:
        c = await js(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws")
        await c.cmd("subscribe", channels=[CH])
        ev = await c.wait(lambda e: e["ev"] == "throttle_update")
        assert (ev["level"], ev["rate_percent"], ev["dropped"]) == (2, 50, 412)
        assert (await c.cmd("state"))["throttle"]["dropped"] == 412


async def test_snapshot_messages_go_to_who_asked(js):
    """A 1.1 node sends the newest message per subject before `subscribed` (scripted here)."""
    async def on_frame(srv: Scripted, ws: ServerConnection, req: dict[str, Any]) -> None:
        if req["type"] == "subscribe":
            if req.get("snapshot"):
                await ws.send(json.dumps({"seq": 1, "type": "message", "channel": TRENDING, "stream_seq": 7,
                                          "ts": 1, "data": {"i": 7}}))
            await Scripted.subscribed(ws, req, **({"snapshot": 1} if req.get("snapshot") else {}))

    srv = Scripted(on_frame)
    async with serve(srv.handler, "127.0.0.1", 0) as server:
        c = await js(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws")
        await c.cmd("subscribe", channels=[CH])
        s = await c.cmd("subscribe", channels=[TRENDING], snapshot=True)
        snap = await c.wait(lambda e: e["ev"] == "sub_snapshot")
        assert snap["sub"] == s["sub"] and snap["count"] == 1
        msg = c.of("sub_message")[0]
        assert msg["sub"] == s["sub"] and msg["snapshot"] is True and msg["data"] == {"i": 7}
        assert srv.frames[1]["snapshot"] is True and "snapshot" not in srv.frames[0]
        # A second subscriber of a held channel gets it from the client's cache, not from the node.
        s2 = await c.cmd("subscribe", channels=[TRENDING], snapshot=True)
        got = await c.wait(lambda e: e["ev"] == "sub_message" and e["sub"] == s2["sub"])
        assert got["snapshot"] is True and got["stream_seq"] == 7
        assert len([f for f in srv.frames if f["type"] == "subscribe"]) == 2


async def test_snapshot_with_nothing_retained_then_live(node, js):
    c = await js(node.ws_url)
    s = await c.cmd("subscribe", channels=[TRENDING], snapshot=True)
    assert s["channels"] == [TRENDING]
    ev = await c.wait(lambda e: e["ev"] == "sub_snapshot")
    assert ev["count"] == 0                 # a fresh node retains nothing: an empty snapshot, then live
    seqs = await publish(node, 1, channel=TRENDING)
    got = await c.wait(lambda e: e["ev"] == "sub_message")
    assert got["stream_seq"] == seqs[0] and got["snapshot"] is False


async def test_refresh_before_exp(js):
    async def on_frame(srv: Scripted, ws: ServerConnection, req: dict[str, Any]) -> None:
        if req["type"] == "refresh":
            await ws.send(json.dumps({"type": "refreshed", "id": req["id"], "exp": 4_000_000_000}))

    srv = Scripted(on_frame)
    first, second = _jwt(time.time() + 3), _jwt(4_000_000_000)
    async with serve(srv.handler, "127.0.0.1", 0) as server:
        c = await js(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", tokens=f"{first},{second}",
                     refresh_before=1500)
        ev = await c.wait(lambda e: e["ev"] == "refreshed", timeout=10)
        assert ev["exp"] == 4_000_000_000
        assert [f["token"] for f in srv.frames if f["type"] == "refresh"] == [second]
        assert len(srv.connections) == 1
