"""Test doubles and helpers for the JetStream tests."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from fanout.brokers.base import Message
from fanout.brokers.jetstream import JetStreamBroker
from fanout.config import Config


class RecordingSink:
    """A Sink that records what it is fed and drops duplicates like the hub."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.epochs: list[str] = []
        self.duplicates = 0
        self._last = 0
        self._changed = asyncio.Event()

    @property
    def last_stream_seq(self) -> int:
        return self._last

    @property
    def seqs(self) -> list[int]:
        return [m.stream_seq for m in self.messages]

    def set_epoch(self, epoch: str) -> None:
        if self.epochs and epoch != self.epochs[-1]:
            self._last = 0
        self.epochs.append(epoch)
        self._changed.set()

    def dispatch(self, msg: Message) -> int:
        if msg.stream_seq <= self._last:
            self.duplicates += 1
            return -1
        self._last = msg.stream_seq
        self.messages.append(msg)
        self._changed.set()
        return 1

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        """Wait (on dispatch events) until ``pred()`` holds."""
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what or pred}: have {len(self.messages)} messages, "
                                     f"last seq {self._last}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def wait_count(self, n: int, timeout: float = 10.0) -> None:
        await self.wait_for(lambda: len(self.messages) >= n, timeout, f"{n} messages")


class HookRecorder:
    """A metrics_hook that keeps every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]

    def total(self, event: str) -> int:
        return sum(f.get("n", 1) for e, f in self.events if e == event)


@contextlib.asynccontextmanager
async def running_broker(cfg: Config, sink: Any = None, *, hook: Any = None,
                         **kwargs: Any) -> AsyncIterator[JetStreamBroker]:
    broker = JetStreamBroker(cfg, metrics_hook=hook, **kwargs)
    await broker.start(sink if sink is not None else RecordingSink())
    try:
        yield broker
    finally:
        await broker.stop()


async def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
                     what: str = "") -> None:
    """Poll a condition that has no event to await (e.g. server state)."""
    deadline = time.monotonic() + timeout
    while True:
        res = pred()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def nats_conn(url: str, **kwargs: Any) -> AsyncIterator[NATS]:
    async def quiet(exc: Exception) -> None:
        pass

    kwargs.setdefault("error_cb", quiet)
    nc = await nats.connect(url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, **kwargs)
    try:
        yield nc
    finally:
        await nc.close()


async def publish_retrying(js: Any, subject: str, payload: bytes, msg_id: str, *,
                           headers: dict[str, str] | None = None, timeout: float = 20.0) -> int:
    """Publish with ack, retrying through outages; Nats-Msg-Id keeps retries from storing twice."""
    deadline = time.monotonic() + timeout
    hdrs = {"Nats-Msg-Id": msg_id, **(headers or {})}
    while True:
        try:
            ack = await js.publish(subject, payload, headers=dict(hdrs), timeout=1.0)
            return int(ack.seq)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class TcpProxy:
    """A loopback TCP proxy that can hold back and then lose what the server sends.

    ``hold()`` keeps server-to-client bytes in the proxy; ``cut()`` aborts
    every connection and throws the held bytes away: deliveries the server
    counts as sent never reach the client, as when a link dies.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.holding = False
        self._server: asyncio.AbstractServer | None = None
        self._conns: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._conns.append((writer, up_w))
        for src, dst, down in ((reader, up_w, False), (up_r, writer, True)):
            t = asyncio.create_task(self._pump(src, dst, down))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if down and self.holding:
                    continue  # lost when cut
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.transport.abort()

    def hold(self) -> None:
        self.holding = True

    def cut(self) -> None:
        for a, b in self._conns:
            a.transport.abort()
            b.transport.abort()
        self._conns.clear()
        self.holding = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()


def make_tls_files(d: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (PEM files, via openssl)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    d.mkdir(parents=True, exist_ok=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=fanout-test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")
    return {k: str(d / k) for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
