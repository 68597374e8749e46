"""A load-generator worker process: holds up to a few thousand connections on
its own asyncio loop and answers the controller's commands over a pipe.

Several workers are needed because a process may hold at most 20,000 open
files here, and because one Python process is one core.

Commands (``(request_id, name, args)`` in, ``(request_id, result)`` out):
``connect``, ``reset``, ``stats``, ``storm``, ``heartbeat``, ``stop``. Every
wait is bounded: connects and handshakes by ``connect_timeout``, closes by a
fixed grace period.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import socket
import ssl
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from . import native
from .client import Client, Tally
from .common import H_BUCKETS, Distribution, bucketize, is_slow
from .wsclient import OP_BINARY, OP_TEXT, HandshakeError, Url, client_frame, handshake_request, parse_handshake_response


@dataclass
class WorkerConfig:
    url: str
    proto: str = "fanout"  # or "nats"
    dist: Distribution = field(default_factory=Distribution)
    deflate: bool = False
    delta: bool = False
    slow_share: float = 0.0
    slow_rcvbuf: int = 4096
    slow_pause_s: float = 2.0  # slow readers stop reading this long ...
    slow_read_s: float = 0.25  # ... then read this long, in a loop
    slow_bps: int = 0          # > 0: slow readers read this many bytes/s instead (C engine), steadily
    connect_concurrency: int = 100
    connect_timeout: float = 15.0
    connect_retries: int = 2
    engine: str = "c"  # "c": compiled receive engine (native/engine.c); "py": pure Python


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to the hard cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Worker:
    def __init__(self, pipe: Connection, wid: int, cfg: WorkerConfig) -> None:
        self.pipe = pipe
        self.wid = wid
        self.cfg = cfg
        self.url = Url.parse(cfg.url)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if self.url.tls else None
        self.fast = Tally(array("q"))
        self.slow = Tally(array("q"))
        self.events: Counter[str] = Counter()
        self.clients: dict[int, Client] = {}
        self.stop = asyncio.Event()
        self.slow_task: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # Compiled engine state: slots (dense ints) name connections there.
        self.engine: native.Engine | None = None
        self.slot_of: dict[int, int] = {}  # cid -> slot
        self.slow_slots: set[int] = set()
        self.waiting: dict[int, asyncio.Future[None]] = {}
        self.next_slot = 0
        if cfg.engine == "c":
            if self.url.tls:
                raise ValueError("the compiled engine does not do TLS: use --engine py for wss://")
            self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                import fcntl

                fcntl.fcntl(self.notify_w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for bursts
            except OSError:
                pass
            self.engine = native.Engine(self.notify_w, H_BUCKETS)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._on_pipe)
        thread = None
        if self.engine is not None:
            import threading

            thread = threading.Thread(target=self.engine.run, name="engine", daemon=True)
            thread.start()
            loop.add_reader(self.notify_r, self._on_notify)
        try:
            await self.stop.wait()
        finally:
            loop.remove_reader(self.pipe.fileno())
            await self._close_all()
            if self.engine is not None and thread is not None:
                loop.remove_reader(self.notify_r)
                self.engine.stop()
                thread.join(timeout=5)
                if not thread.is_alive():
                    self.engine.free()

    def _on_notify(self) -> None:
        """Engine notifications: 8 bytes each, (slot << 8) | kind."""
        try:
            data = os.read(self.notify_r, 8 * 8192)
        except BlockingIOError:
            return
        for v in np.frombuffer(data[: len(data) // 8 * 8], dtype=np.uint64).tolist():
            slot, kind = v >> 8, v & 0xFF
            f = self.waiting.pop(slot, None)
            if kind == native.N_READY:
                if f is not None and not f.done():
                    f.set_result(None)
            elif kind == native.N_CLOSED:
                if f is not None and not f.done():
                    f.set_exception(ConnectionError("closed before ready"))
                self.slow_slots.discard(slot)

    def _on_pipe(self) -> None:
        try:
            rid, name, args = self.pipe.recv()
        except EOFError:  # controller gone: stop on our own
            self.stop.set()
            return
        t = asyncio.ensure_future(self._dispatch(rid, name, args))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _dispatch(self, rid: int, name: str, args: dict[str, Any]) -> None:
        try:
            result = await getattr(self, "cmd_" + name)(**args)
        except Exception as e:  # reported to the controller, which raises
            result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        self.pipe.send((rid, result))

    # -- connecting ----------------------------------------------------------
    async def _open(self, cid: int) -> float | None:
        """Open one client; returns seconds taken, or None when it failed."""
        cfg = self.cfg
        slow = is_slow(cid, cfg.slow_share)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        for attempt in range(cfg.connect_retries + 1):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if slow:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.slow_rcvbuf)
            client: Client | None = None
            if self.engine is not None:
                reason = await self._open_native(cid, sock, slow)
                if reason is None:
                    return time.monotonic() - t0
                self.events[f"connect_fail_{reason}"] += 1
                if attempt < cfg.connect_retries:
                    await asyncio.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
                continue
            try:
                async with asyncio.timeout(cfg.connect_timeout):
                    await loop.sock_connect(sock, (self.url.host, self.url.port))
                    _, client = await loop.create_connection(
                        lambda: Client(
                            self.url,
                            cfg.dist.channels(cid),
                            nats=cfg.proto == "nats",
                            deflate=cfg.deflate,
                            tally=self.slow if slow else self.fast,
                            events=self.events,
                        ),
                        sock=sock,
                        ssl=self.ssl,
                        server_hostname=self.url.host if self.ssl else None,
                    )
                    await client.ready
                self.clients[cid] = client
                if client.deflate is not None:
                    self.events["deflate_negotiated"] += 1
                return time.monotonic() - t0
            except HandshakeError as e:
                reason = f"handshake_{e.status}"
            except TimeoutError:
                reason = "timeout"
            except ConnectionError as e:  # before OSError: it is one
                reason = f"closed:{e}"[:60]
            except OSError as e:
                reason = f"oserror_{e.errno}" if e.errno else f"oserror_{type(e).__name__}"
            if client is not None and client.transport is not None:
                client.transport.abort()
            else:
                sock.close()
            self.events[f"connect_fail_{reason}"] += 1
            if attempt < cfg.connect_retries:
                await asyncio.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
        return None

    async def _open_native(self, cid: int, sock: socket.socket, slow: bool) -> str | None:
        """Connect, handshake and subscribe in Python, then hand the socket to
        the engine, which parses everything after the response head (so the
        inflater sees every compressed frame from the first). Returns None on
        success, else a short reason."""
        assert self.engine is not None
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        slot = -1
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                await loop.sock_connect(sock, (self.url.host, self.url.port))
                req, accept = handshake_request(self.url, cfg.deflate)
                await loop.sock_sendall(sock, req)
                head = b""
                while (h := head.find(b"\r\n\r\n")) < 0:
                    chunk = await loop.sock_recv(sock, 65536)
                    if not chunk:
                        raise ConnectionError("closed during handshake")
                    head += chunk
                    if len(head) > 65536:
                        raise ConnectionError("handshake too big")
                deflate = parse_handshake_response(head[:h], accept)
                channels = cfg.dist.channels(cid)
                if cfg.proto == "nats":
                    sub = client_frame(OP_BINARY, b"".join(
                        [b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"echo":false,'
                         b'"headers":false,"no_responders":false,"lang":"bench","version":"0"}\r\n']
                        + [b"SUB %s %d\r\n" % (c.encode(), i + 1) for i, c in enumerate(channels)]
                        + [b"PING\r\n"]))
                else:
                    req: dict[str, Any] = {"type": "subscribe", "channels": channels, "id": 1}
                    if cfg.delta:
                        req["delta"] = "fossil"
                    sub = client_frame(OP_TEXT, json.dumps(req).encode())
                await loop.sock_sendall(sock, sub)
                flags = (native.F_NATS if cfg.proto == "nats" else 0) | (native.F_SLOW if slow else 0)
                if deflate is not None:
                    flags |= native.F_DEFLATE
                    if deflate.server_no_context_takeover:
                        flags |= native.F_NOCTX
                    self.events["deflate_negotiated"] += 1
                slot = self.next_slot
                self.next_slot += 1
                fut = loop.create_future()
                self.waiting[slot] = fut
                fd = sock.detach()
                rc = self.engine.add(fd, slot, flags, head[h + 4 :])
                if rc != 0:
                    os.close(fd)
                    self.waiting.pop(slot, None)
                    return f"engine_add_{rc}"
                await fut
        except HandshakeError as e:
            sock.close()
            return f"handshake_{e.status}"
        except TimeoutError:
            if slot >= 0:
                self.waiting.pop(slot, None)
                if self.engine.state(slot) == native.S_READY:
                    return self._adopt(cid, slot, slow)
                self.engine.close(slot)
            else:
                sock.close()
            return "timeout"
        except ConnectionError as e:
            if slot < 0:
                sock.close()
            return f"closed:{e}"[:60]
        except OSError as e:
            if slot < 0:
                sock.close()
            return f"oserror_{e.errno}"
        return self._adopt(cid, slot, slow)

    def _adopt(self, cid: int, slot: int, slow: bool) -> None:
        self.slot_of[cid] = slot
        if slow:
            self.slow_slots.add(slot)
        return None

    async def _open_many(self, cids: list[int]) -> tuple[int, list[float]]:
        sem = asyncio.Semaphore(self.cfg.connect_concurrency)
        times: list[float] = []

        async def one(cid: int) -> None:
            async with sem:
                dt = await self._open(cid)
            if dt is not None:
                times.append(dt)

        await asyncio.gather(*(one(c) for c in cids))
        return len(cids) - len(times), times

    async def cmd_connect(self, cids: list[int]) -> dict[str, Any]:
        t0 = time.monotonic()
        failed, times = await self._open_many(cids)
        if self.cfg.slow_share > 0 and self.slow_task is None:
            self.slow_task = asyncio.ensure_future(self._slow_loop())
        return {"ok": len(times), "failed": failed, "elapsed": time.monotonic() - t0, "open": self.n_open()}

    def n_open(self) -> int:
        if self.engine is not None:
            return self.engine.open_count()
        return sum(1 for c in self.clients.values() if c.state == 1)

    async def _slow_loop(self) -> None:
        """Slow readers: stop reading for ``slow_pause_s``, read for
        ``slow_read_s``, repeat (with a small SO_RCVBUF the server's queue
        fills while paused)."""
        cfg = self.cfg
        eng = self.engine
        last = time.monotonic()
        while eng is not None and cfg.slow_bps > 0 and not self.stop.is_set():
            # A steady reader at slow_bps: credit for the time that passed (a stall of this
            # process does not make it slower), at most a second's worth held.
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for sl in list(self.slow_slots):
                eng.credit(sl, int(cfg.slow_bps * (now - last)), cfg.slow_bps)
            last = now
        while eng is not None and not self.stop.is_set():
            slots = list(self.slow_slots)
            for sl in slots:
                eng.pause(sl, True)
            await asyncio.sleep(cfg.slow_pause_s)
            for sl in slots:
                eng.pause(sl, False)
            await asyncio.sleep(cfg.slow_read_s)
        while not self.stop.is_set():
            slow = [c for c in self.clients.values() if c.tally is self.slow and c.transport]
            for c in slow:
                if not c.transport.is_closing():  # type: ignore[union-attr]
                    c.transport.pause_reading()  # type: ignore[union-attr]
            await asyncio.sleep(cfg.slow_pause_s)
            for c in slow:
                if not c.transport.is_closing():  # type: ignore[union-attr]
                    c.transport.resume_reading()  # type: ignore[union-attr]
            await asyncio.sleep(cfg.slow_read_s)

    # -- measuring -----------------------------------------------------------
    async def cmd_reset(self) -> dict[str, Any]:
        self.fast.reset()
        self.slow.reset()
        self.events.clear()
        if self.engine is not None:
            self.engine.reset()
            self.engine.stats()  # drop the histogram gathered so far
        return {"cpu": _cpu()}

    async def cmd_stats(self) -> dict[str, Any]:
        """Counters since the last reset, plus latency-histogram counts since
        the last ``stats`` call (the lat arrays are drained here)."""
        out: dict[str, Any] = {"cpu": _cpu(), "open": self.n_open(), "events": dict(self.events)}
        for name, t in (("fast", self.fast), ("slow", self.slow)):
            hist = bucketize(np.frombuffer(t.lat, dtype=np.int64)) if len(t.lat) else None
            del t.lat[:]
            out[name] = {
                "received": t.received,
                "gaps": t.gaps,
                "dups": t.dups,
                "bytes": t.bytes,
                "hist": hist.tobytes() if hist is not None else None,
            }
        out["n_fast"] = sum(1 for c in self.clients.values() if c.state == 1 and c.tally is self.fast)
        out["n_slow"] = sum(1 for c in self.clients.values() if c.state == 1 and c.tally is self.slow)
        if self.engine is not None:
            es = self.engine.stats()
            for name in ("fast", "slow"):
                e = es[name]
                o = out[name]
                for k in ("received", "gaps", "dups", "bytes"):
                    o[k] += e[k]
                if e["hist"].any():
                    h = e["hist"] + (np.frombuffer(o["hist"], dtype=np.int64) if o["hist"] else 0)
                    o["hist"] = h.tobytes()
                out["n_" + name] = e["ready"]
            for k, v in es["events"].items():
                out["events"][k] = out["events"].get(k, 0) + v
            out["open"] = out["n_fast"] + out["n_slow"]
        return out

    # -- storms and upkeep ---------------------------------------------------
    async def cmd_storm(self, pct: float, seed: int = 0) -> dict[str, Any]:
        """Close ``pct`` % of the open connections at once and reconnect them."""
        rng = random.Random(seed + self.wid)
        if self.engine is not None:
            open_ids = [cid for cid, sl in self.slot_of.items() if self.engine.state(sl) == native.S_READY]
        else:
            open_ids = [cid for cid, c in self.clients.items() if c.state == 1]
        chosen = rng.sample(open_ids, k=min(len(open_ids), round(len(open_ids) * pct / 100)))
        for cid in chosen:
            if self.engine is not None:
                sl = self.slot_of.pop(cid)
                self.slow_slots.discard(sl)
                self.engine.close(sl, 1000)
            else:
                self.clients.pop(cid).close(1000)
        t0 = time.monotonic()
        failed, times = await self._open_many(chosen)
        return {"closed": len(chosen), "reconnected": len(times), "failed": failed,
                "elapsed": time.monotonic() - t0, "times": times}

    async def cmd_heartbeat(self) -> dict[str, Any]:
        for c in self.clients.values():
            c.heartbeat()
        return {}

    async def cmd_stop(self) -> dict[str, Any]:
        await self._close_all()
        self.stop.set()
        return {"cpu": _cpu()}

    async def _close_all(self) -> None:
        if self.slow_task is not None:
            self.slow_task.cancel()
            self.slow_task = None
        if self.engine is not None:
            for sl in self.slot_of.values():
                self.engine.close(sl, 1000)
            self.slot_of.clear()
            self.slow_slots.clear()
        clients = list(self.clients.values())
        self.clients.clear()
        for c in clients:
            c.close(1000)
        if clients:
            # Bounded: give the closes a moment to go out, no more.
            await asyncio.wait([c.closed for c in clients], timeout=2.0)
            for c in clients:
                if c.transport is not None and not c.closed.done():
                    c.transport.abort()


def worker_main(pipe: Connection, wid: int, cfg: WorkerConfig) -> None:
    """Entry point of a worker process."""
    raise_nofile()
    if os.environ.get("LOADGEN_UVLOOP") == "1":  # opt-in; not a dependency
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    try:
        asyncio.run(Worker(pipe, wid, cfg).run())
    except KeyboardInterrupt:
        pass
