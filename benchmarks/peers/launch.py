"""Start and stop the servers under test as processes, the same way for all.

Each :class:`Peer` knows its command line, the WebSocket URL and protocol its
clients speak, where to publish, and how to tell it is ready. Ports are
picked free at start so several runs (or other engineers' nodes) do not
collide. Server CPU and RSS are read with psutil over the process and its
children.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import nats_peer

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Peer:
    name: str
    proto: str = "fanout"  # what the load generator speaks to it
    ws_url: str = ""
    publish_url: str = ""
    ready_url: str = ""
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO        # the tree it runs from (an older checkout for A/B runs)
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""

    def start(self, timeout: float = 30.0) -> None:
        log = tempfile.NamedTemporaryFile(prefix=f"bench-{self.name}-", suffix=".log", delete=False)
        self.log_path = log.name
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=1.0) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _procs(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process tree so far."""
        total = 0.0
        for p in self._procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_bytes(self) -> int:
        total = 0
        for p in self._procs():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def fanout_peer(max_connections: int = 19850, extra_env: dict[str, str] | None = None) -> Peer:
    ws, ops = free_port(), free_port()
    env = {
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(ws),
        "HEALTH_HOST": "127.0.0.1",
        "HEALTH_PORT": str(ops),
        "WS_MAX_CONNECTIONS": str(max_connections),
        "WS_COMPRESSION": "true",
        "LOG_LEVEL": "warning",
    }
    env.update(extra_env or {})
    return Peer(
        name="fanout",
        ws_url=f"ws://127.0.0.1:{ws}/ws",
        publish_url=f"http://127.0.0.1:{ops}",
        ready_url=f"http://127.0.0.1:{ops}/ready",
        cmd=[sys.executable, "-m", "fanout", "serve"],
        env=env,
    )


def python_peer() -> Peer:
    ws, http = free_port(), free_port()
    return Peer(
        name="python",
        ws_url=f"ws://127.0.0.1:{ws}/ws",
        publish_url=f"http://127.0.0.1:{http}",
        ready_url=f"http://127.0.0.1:{http}/ready",
        cmd=[sys.executable, "-m", "benchmarks.peers.python_peer", "--ws-port", str(ws), "--http-port", str(http)],
    )


def nats_ws_peer() -> Peer:
    ws, port, mon = free_port(), free_port(), free_port()
    d = tempfile.mkdtemp(prefix="bench-nats-")
    conf = nats_peer.write_config(d, ws_port=ws, port=port, http_port=mon, compression=True)
    return Peer(
        name="nats",
        proto="nats",
        ws_url=f"ws://127.0.0.1:{ws}/",
        publish_url=f"nats://127.0.0.1:{port}",
        ready_url=f"http://127.0.0.1:{mon}/healthz",
        cmd=nats_peer.command(conf),
    )


PEERS = {"fanout": fanout_peer, "python": python_peer, "nats": nats_ws_peer}

# fanout with flush settings in its name: fanout-t2 (WS_FLUSH_THREADS=2),
# fanout-b0 (WS_FLUSH_LATENCY_MS=0), fanout-t1-b10, ...
_FANOUT_VARIANT = re.compile(r"^fanout((?:-(?:t\d+|b\d+(?:\.\d+)?))+)$")


def fanout_variant_env(name: str) -> dict[str, str] | None:
    """The env a fanout-tN-bMS peer name stands for; None if it is not one."""
    m = _FANOUT_VARIANT.match(name)
    if not m:
        return None
    env = {}
    for part in m.group(1).split("-")[1:]:
        env["WS_FLUSH_THREADS" if part[0] == "t" else "WS_FLUSH_LATENCY_MS"] = part[1:]
    return env


def make_peer(name: str, **kw: object) -> Peer:
    env = fanout_variant_env(name)
    if env is not None:
        peer = fanout_peer(extra_env=env)
        peer.name = name
        return peer
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; one of {sorted(PEERS)} or fanout-t<threads>-b<budget ms>")
    return PEERS[name](**kw)  # type: ignore[operator]


def fanout_counters(peer: Peer) -> dict[str, float]:
    """The core's deliveries and sendmsg() calls from a fanout peer's /metrics
    (frames per syscall over a window); empty for other peers or on error."""
    if not peer.name.startswith("fanout"):
        return {}
    want = {"fanout_deliveries_total": "deliveries", "fanout_send_syscalls_total": "send_calls",
            "fanout_throttle_raises_total": "level_raises", "fanout_throttled_drops_total": "throttled_drops",
            "fanout_slow_clients_total": "slow_closed"}
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(peer.publish_url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                name, _, value = line.partition(" ")
                if name in want:
                    out[want[name]] = float(value)
    except (OSError, ValueError):
        return {}
    return out
