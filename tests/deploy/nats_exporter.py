"""A test-only stand-in for ``natsio/prometheus-nats-exporter``.

compose.yaml runs the real exporter image; this machine has neither Docker nor
a Go toolchain to build it, so the live Prometheus test serves the same metric
names from the real nats-server's monitoring endpoints instead. It covers only
what the rules and the dashboard use, named and labelled as the exporter does
(collector/collector.go, jsz.go, healthz.go in nats-io/prometheus-nats-exporter):

* ``gnatsd_varz_<key>{server_id=<monitor URL>}`` for every top-level number of
  ``/varz`` (the exporter's ``-varz``);
* ``jetstream_consumer_num_pending{server_id, server_name, stream_name,
  consumer_name, ...}`` from ``/jsz?consumers=true&config=true&raft=true``
  (``-jsz=all``);
* ``gnatsd_healthz_status{server_id}``: 0 when ``/healthz`` says ok, else 1
  (``-healthz``).

Limits: no connz/routez/leafz metrics, and a NATS that cannot be reached gives
an empty page, where the real exporter keeps its last values.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["NatsExporter"]

_CONSUMER_LABELS = ("server_id", "server_name", "cluster", "domain", "meta_leader", "is_meta_leader",
                    "account", "account_name", "account_id", "stream_name", "stream_leader", "is_stream_leader",
                    "stream_raft_group", "consumer_name", "consumer_leader", "is_consumer_leader", "consumer_desc")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _line(name: str, labels: dict[str, Any], value: float) -> str:
    inner = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {float(value)!r}"


def render(monitor_url: str) -> str:
    """The exposition text for one nats-server's monitoring base URL."""
    out: list[str] = []
    varz = _get(monitor_url + "/varz")
    for key, value in sorted(varz.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(_line(f"gnatsd_varz_{key}", {"server_id": monitor_url}, value))
    try:
        health = _get(monitor_url + "/healthz")
        status = 0 if health.get("status") == "ok" else 1
    except OSError:
        status = 1
    out.append(_line("gnatsd_healthz_status", {"server_id": monitor_url}, status))
    jsz = _get(monitor_url + "/jsz?consumers=true&config=true&raft=true")
    meta = jsz.get("meta_cluster") or {}
    server_name = varz.get("server_name", "")
    base = {"server_id": monitor_url, "server_name": server_name, "cluster": meta.get("name", ""),
            "domain": (jsz.get("config") or {}).get("domain", ""), "meta_leader": meta.get("leader", ""),
            "is_meta_leader": "true" if not meta or meta.get("leader") == server_name else "false"}
    for acc in jsz.get("account_details") or []:
        for stream in acc.get("stream_detail") or []:
            for cons in stream.get("consumer_detail") or []:
                labels = {**base, "account": acc.get("name", ""), "account_name": acc.get("name", ""),
                          "account_id": acc.get("id", ""), "stream_name": stream.get("name", ""),
                          "stream_leader": (stream.get("cluster") or {}).get("leader", ""),
                          "is_stream_leader": "true", "stream_raft_group": stream.get("stream_raft_group", ""),
                          "consumer_name": cons.get("name", ""), "consumer_leader": "",
                          "is_consumer_leader": "true", "consumer_desc": (cons.get("config") or {}).get("description", "")}
                assert tuple(labels) == _CONSUMER_LABELS
                out.append(_line("jetstream_consumer_num_pending", labels, cons.get("num_pending", 0)))
    return "\n".join(out) + "\n"


class NatsExporter:
    """Serves :func:`render` of ``monitor_url`` at ``http://127.0.0.1:<port>/metrics``."""

    def __init__(self, monitor_url: str) -> None:
        monitor = monitor_url

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                try:
                    body, code = render(monitor).encode(), 200
                except OSError as exc:
                    body, code = f"# nats unreachable: {exc}\n".encode(), 200
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> NatsExporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
