"""A real fanout node process for tests: started on ephemeral ports, stopped at teardown.

Ports come from the node's own "fanout listening" log line (WS_PORT=0,
HEALTH_PORT=0), so there is no port race and no sleep: start() returns when
the node says it listens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["NodeProcess"]


class NodeProcess:
    def __init__(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.env = {**os.environ, "WS_HOST": "127.0.0.1", "HEALTH_HOST": "127.0.0.1",
                    "WS_PORT": "0", "HEALTH_PORT": "0", "LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1",
                    # Tests stop nodes at once; the drain window is tested where it is set.
                    "WS_DRAIN_SECONDS": "0",
                    **(env or {})}
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.ws_port = 0
        self.health_port = 0

    # -------------------------------------------------------------- lifecycle
    def command(self) -> list[str]:
        """The node's argv (a subclass may start it differently)."""
        return [sys.executable, "-m", "fanout", "serve", *self.args]

    def start(self, timeout: float = 15.0) -> NodeProcess:
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.wait_log(lambda d: d.get("msg") == "fanout listening", timeout)
        self.ws_port = line["ws_port"]
        self.health_port = line["health_port"]
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            try:
                obj = json.loads(text)
            except ValueError:
                obj = {"msg": text, "level": "raw"}
            with self._cond:
                self.raw.append(text)
                self.lines.append(obj if isinstance(obj, dict) else {"msg": text})
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_log(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Block until a log line satisfies ``pred`` (or raise with the log so far)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None and seen == len(self.lines)):
                    raise AssertionError("log line not seen; node log:\n" + "\n".join(self.raw[-40:]))
                self._cond.wait(min(left, 0.5))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log_after_exit(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every log line of a process that exited, its stderr read to the end."""
        assert self.proc is not None and self.proc.poll() is not None, "the node is still running"
        self._reader.join(timeout)
        assert not self._reader.is_alive(), "the node's stderr did not end"
        return list(self.lines)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ ops
    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.ops_url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def publish(self, subject: str, payload: bytes | str | dict, priority: str | None = None) -> int:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        if isinstance(payload, str):
            payload = payload.encode()
        headers = {"Fanout-Priority": priority} if priority else {}
        status, _, body = self.http("POST", f"/publish/{subject}", payload, headers)
        assert status == 202, (status, body)
        return int(json.loads(body)["stream_seq"])

    def metric(self, name: str, labels: str = "") -> float:
        """Value of one sample from /metrics (0 when absent)."""
        _, _, body = self.http("GET", "/metrics")
        key = f"{name}{{{labels}}}" if labels else name
        for line in body.decode().splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0
