"""The real ``haproxy`` with the shipped deploy/haproxy/haproxy.cfg serves
wss:// end to end in front of two real nodes, and its /ready check takes a
stopping node out well inside the drain window.

The config is used as shipped except for addresses, ports and the certificate
path, replaced by exact-string templating (each original must occur exactly
once, so a change to the shipped file that the test does not know about fails
here instead of silently testing something else). Everything is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets

from tests.deploy.conftest import DEPLOY, require
from tests.helpers.nats_server import free_port
from tests.helpers.node import NodeProcess

SHIPPED = DEPLOY / "haproxy" / "haproxy.cfg"
SUBJECT = "odin.token.edge.update"
DRAIN_WINDOW = 10.0   # WS_DRAIN_SECONDS default: the LB must take a node out within it


def render_config(cert: Path, wss_port: int, stats_port: int, admin_port: int, nodes: list[NodeProcess]) -> str:
    text = SHIPPED.read_text()
    swaps = {
        "bind :8443 ssl crt /etc/haproxy/certs/fanout.pem": f"bind 127.0.0.1:{wss_port} ssl crt {cert}",
        "bind :8405": f"bind 127.0.0.1:{stats_port}",
        "stats socket ipv4@127.0.0.1:9999": f"stats socket ipv4@127.0.0.1:{admin_port}",
    }
    for i, n in enumerate(nodes, 1):
        swaps[f"server fanout-{i} fanout-{i}:3004 check port 3002"] = \
            f"server fanout-{i} 127.0.0.1:{n.ws_port} check port {n.health_port}"
    for old, new in swaps.items():
        assert text.count(old) == 1, f"shipped haproxy.cfg changed: {old!r} not found exactly once"
        text = text.replace(old, new)
    return text


class Haproxy:
    def __init__(self, binary: str, cfg: Path, stats_port: int) -> None:
        self.stats = f"http://127.0.0.1:{stats_port}"
        self.log = cfg.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)

    def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers from the stats CSV: name -> row."""
        with urllib.request.urlopen(self.stats + "/stats;csv", timeout=2) as r:
            text = r.read().decode().lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "fanout" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait(self, pred, what: str, timeout: float = 15.0) -> float:
        """Poll the stats page until ``pred(servers)``; return the seconds it took."""
        t0 = time.monotonic()
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if pred(self.servers()):
                    return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() - t0 < timeout, f"haproxy: {what} not reached:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_shipped_config_is_valid(self_signed_cert: Path, tmp_path: Path) -> None:
    binary = require("haproxy")
    # Names that only resolve inside compose are allowed to fail resolution (init-addr none).
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SHIPPED.read_text().replace("/etc/haproxy/certs/fanout.pem", str(self_signed_cert / "fanout.pem")))
    run = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    # Readiness, not liveness, and established tunnels survive a DOWN mark.
    lines = [ln.split("#")[0].strip() for ln in SHIPPED.read_text().splitlines()]
    assert "http-check send meth GET uri /ready" in lines
    assert not any("on-marked-down" in ln for ln in lines)
    # Worst case from "/ready turns 503" to DOWN: one `inter`, then fall-1
    # `fastinter`s, each check taking up to `timeout check` (a hung node).
    # It must fit the drain window, or clients are told to reconnect while
    # the LB still sends new ones to the draining node.
    ds = next(ln for ln in lines if ln.startswith("default-server")).split()
    opt = dict(zip(ds, ds[1:], strict=False))
    sec = lambda v: float(v.removesuffix("ms")) / 1000 if v.endswith("ms") else float(v.removesuffix("s"))  # noqa: E731
    timeout_check = sec(next(ln for ln in lines if ln.startswith("timeout check")).split()[-1])
    fall = int(opt["fall"])
    worst = sec(opt["inter"]) + (fall - 1) * sec(opt["fastinter"]) + fall * timeout_check
    assert worst < DRAIN_WINDOW, worst


def test_wss_end_to_end_through_the_shipped_config(self_signed_cert: Path, tmp_path: Path) -> None:
    binary = require("haproxy")
    nodes = [NodeProcess({"FANOUT_NODE_ID": f"fanout-{i}", "WS_SHUTDOWN_TIMEOUT": "1"}).start() for i in (1, 2)]
    wss_port, stats_port, admin_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render_config(self_signed_cert / "fanout.pem", wss_port, stats_port, admin_port, nodes))
    lb = Haproxy(binary, cfg, stats_port)
    try:
        lb.wait(lambda s: len(s) == 2 and all(r["status"] == "UP" and r["check_status"] == "L7OK" for r in s.values()),
                "both servers UP after a /ready check")
        asyncio.run(_through_the_edge(lb, nodes, self_signed_cert / "fanout.crt", wss_port))
    finally:
        lb.stop()
        for n in nodes:
            n.stop()


async def _through_the_edge(lb: Haproxy, nodes: list[NodeProcess], ca: Path, port: int) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    url = f"wss://localhost:{port}/ws"

    async def recv(ws, timeout: float = 10.0) -> dict:
        return json.loads(await asyncio.wait_for(ws.recv(), timeout))

    # A client that does not trust the certificate is refused by TLS itself.
    with pytest.raises(ssl.SSLCertVerificationError):
        async with websockets.connect(url, ssl=ssl.create_default_context(), open_timeout=10):
            pass

    clients = [await websockets.connect(url, ssl=ctx, open_timeout=10) for _ in range(4)]
    try:
        for ws in clients:
            await ws.send(json.dumps({"type": "subscribe", "channels": [SUBJECT]}))
            assert (await recv(ws))["type"] == "subscribed"
        # leastconn spread the four over both nodes.
        per_node = [n.metric("fanout_connections") for n in nodes]
        assert per_node == [2.0, 2.0], per_node
        # Embedded mode: each node has its own bus, so each client gets its own node's message only.
        for i, n in enumerate(nodes, 1):
            await asyncio.to_thread(n.publish, SUBJECT, {"node": i})
        got = sorted([(await recv(ws))["data"]["node"] for ws in clients])
        assert got == [1, 1, 2, 2]

        # The ops endpoints do not pass the edge.
        req = urllib.request.Request(f"https://localhost:{port}/metrics")
        with pytest.raises(urllib.error.HTTPError) as err:
            await asyncio.to_thread(urllib.request.urlopen, req, None, 5, context=ctx)
        assert err.value.code == 404

        # Node 2 stops: its /ready check fails and HAProxy takes it out, well
        # inside the drain window; its clients are closed by the node (1001),
        # node 1's keep their tunnels.
        t0 = time.monotonic()
        nodes[1].proc.send_signal(signal.SIGTERM)
        took = await asyncio.to_thread(lb.wait, lambda s: s["fanout-2"]["status"].startswith("DOWN"), "fanout-2 DOWN")
        print(f"fanout-2 marked DOWN {time.monotonic() - t0:.2f} s after SIGTERM")
        assert time.monotonic() - t0 < DRAIN_WINDOW, took
        assert nodes[1].proc.wait(15) == 0
        survivors = []
        for ws in clients:
            try:
                await ws.send(json.dumps({"type": "heartbeat"}))
                if (await recv(ws, 5))["type"] == "heartbeat_ack":
                    survivors.append(ws)
            except websockets.ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 1001, exc
        assert len(survivors) == 2
        # New clients all land on node 1.
        for _ in range(3):
            ws = await websockets.connect(url, ssl=ctx, open_timeout=10)
            clients.append(ws)
            await ws.send(json.dumps({"type": "subscribe", "channels": [SUBJECT]}))
            assert (await recv(ws))["type"] == "subscribed"
        assert nodes[0].metric("fanout_connections") == 5.0
        assert lb.servers()["fanout-1"]["status"] == "UP"
    finally:
        for ws in clients:
            await ws.close()
