"""examples/react-app in real headless Chromium (playwright-core with the system's Chromium).

The app is built with esbuild from its own package (examples/react-app, with
@fanout/client as a file: dependency), served over HTTP from here, and runs
against a real node fed by examples/node-publisher's demo (the payload shapes
the publisher really sends). A screenshot of each run lands in the pytest
tmp dir. The script is clients/js/test/driver/react_app.mjs.

Skips (with the reason) like the other JS tests when Node.js, npm or Chromium are missing.
"""

from __future__ import annotations

import json
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.clients.jsenv import APP, PKG, chromium_setup, node_bin, react_app_setup

SCRIPT = PKG / "test" / "driver" / "react_app.mjs"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def app_server():
    react_app_setup()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(APP)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def run_page(page: str, mode: str, shot: Path, ops_url: str = "") -> dict[str, Any]:
    env = {"PAGE_URL": page, "CHROMIUM": chromium_setup(), "SHOT": str(shot), "MODE": mode, "OPS_URL": ops_url,
           "PATH": "/usr/bin:/bin"}
    res = subprocess.run([node_bin(), str(SCRIPT)], cwd=SCRIPT.parent, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["errors"] == [], out["errors"]
    assert shot.stat().st_size > 1000
    return out


def test_react_app_renders_trending_and_live_token_price(node, app_server, tmp_path):
    page = f"{app_server}?ws={node.ws_url}&token=tok3"
    out = run_page(page, "live", tmp_path / "react-live.png", node.ops_url)
    rows = out["rows"]
    assert len(rows) == 20                                  # the demo's 20 tokens, from {type, data:{top_100}}
    assert {r[1] for r in rows} == {f"tok{i}" for i in range(20)}
    assert all(float(r[2]) > 0 for r in rows)
    assert float(out["firstPrice"]) > 0 and float(out["laterPrice"]) > 0
    assert out["updates"] >= out["firstUpdates"] + 3        # live updates of odin.token.tok3.update


async def test_react_app_shows_throttle_notice(app_server, tmp_path):
    """Today's node sends throttle_update only when it throttles: a scripted server sends one."""
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            req = json.loads(raw)
            if req["type"] == "subscribe":
                await ws.send(json.dumps({"type": "subscribed", "id": req["id"], "channels": req["channels"],
                                          "epoch": "e-1", "stream_seq": 0}))
                await ws.send(json.dumps({"type": "throttle_update", "level": 2, "rate_percent": 50, "dropped": 412,
                                          "message": "Your connection is slow. Receiving 50% of updates."}))

    import asyncio
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        out = await asyncio.to_thread(run_page, f"{app_server}?ws=ws://127.0.0.1:{port}/ws&token=tok1", "throttle",
                                      tmp_path / "react-throttle.png")
    assert out["level"] == "2"
    assert "Receiving 50% of updates." in out["throttle"] and "412 skipped" in out["throttle"]
