"""The ops port's HTTP/1.1 handling (fanout/ops_http.py, h11 underneath), over
raw sockets against real node processes: framing, keep-alive, malformed
heads, Expect, HEAD, chunked bodies, the body limit, the timeouts, the
connection bound and slowloris.

Timeout tests run on a node whose ops_http constants are set before it starts
(``TunedNode``); they are module constants, not settings.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers.node import NodeProcess
from tests.server.support import TIMEOUT, connect

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


class TunedNode(NodeProcess):
    """A node process with some fanout.ops_http constants overridden (a test
    cannot wait out the real 10 s / 30 s timeouts)."""

    def __init__(self, **constants: float) -> None:
        super().__init__()
        self.constants = constants

    def command(self) -> list[str]:
        code = "import fanout.ops_http as h\n"
        code += "".join(f"h.{k} = {v!r}\n" for k, v in self.constants.items())
        code += "from fanout.cli import main\nmain()\n"
        return [sys.executable, "-c", code, "serve", *self.args]


@pytest.fixture(scope="module")
def quick_node() -> Iterator[NodeProcess]:
    """Timeouts of about a second."""
    n = TunedNode(HEADER_TIMEOUT=1.0, IDLE_TIMEOUT=1.0, BODY_TIMEOUT=1.0).start()
    try:
        yield n
    finally:
        assert n.stop() == 0


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Http:
    """One raw TCP connection to the ops port; every read is bounded by TIMEOUT."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Http:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, head_only: bool = False, timeout: float = TIMEOUT) -> Reply:
        """The next response: status line, headers, and a Content-Length body
        (none when ``head_only``, as for HEAD)."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            first, *lines = head.decode("latin-1").split("\r\n")
            version, status, reason = first.split(" ", 2)
            assert version == "HTTP/1.1", first
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
            body = b""
            if not head_only and "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            return Reply(int(status), reason, headers, body)

    async def closed(self, timeout: float = TIMEOUT) -> bytes:
        """Everything the server sends until it closes (a reset counts as closed)."""
        out = b""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:
                    return out
                if not data:
                    return out
                out += data

    def close(self) -> None:
        self.writer.close()


async def exchange(port: int, data: bytes, head_only: bool = False) -> Reply:
    c = await Http.open(port)
    try:
        await c.send(data)
        return await c.reply(head_only)
    finally:
        c.close()


def post(subject: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST /publish/{subject} HTTP/1.1", "Host: x", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# ------------------------------------------------------------------ keep-alive
async def test_http10_request_is_answered_then_closed(shared_node):
    c = await Http.open(shared_node.health_port)
    try:
        await c.send(b"GET /health HTTP/1.0\r\n\r\n")
        r = await c.reply()
        assert r.status == 200 and r.json()["status"] == "ok"
        assert r.headers.get("connection") == "close"
        assert await c.closed() == b""
    finally:
        c.close()


async def test_connection_close_is_honoured(shared_node):
    c = await Http.open(shared_node.health_port)
    try:
        await c.send(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await c.reply()).status == 200
        assert await c.closed() == b""
    finally:
        c.close()


async def test_pipelined_requests_get_answers_in_order_on_one_connection(shared_node):
    c = await Http.open(shared_node.health_port)
    try:
        await c.send(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + HEALTH + b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second, third = [await c.reply() for _ in range(3)]
        assert (first.status, second.status, third.status) == (404, 200, 200)
        assert second.json()["status"] == "ok" and third.json() == {"ready": True}
        await c.send(HEALTH)   # still open
        assert (await c.reply()).status == 200
    finally:
        c.close()


# ------------------------------------------------------------ malformed heads
async def test_differing_content_lengths_are_refused(shared_node):
    r = await exchange(shared_node.health_port,
                       post("odin.token.cl.a", b"{}", "Content-Length: 2", "Content-Length: 3"))
    assert r.status == 400 and r.json()["error"] == "bad_request"
    assert r.headers["connection"] == "close"


async def test_repeated_equal_content_lengths_are_one(shared_node):
    r = await exchange(shared_node.health_port,
                       post("odin.token.cl.b", b"{}", "Content-Length: 2", "Content-Length: 2"))
    assert r.status == 202, r


@pytest.mark.parametrize("value", ["+2", "0_2", "-0", "2 2", "0x2", "", "2,3"])
async def test_non_digit_content_length_is_refused(shared_node, value):
    r = await exchange(shared_node.health_port, post("odin.token.cl.c", b"{}", f"Content-Length: {value}"))
    assert r.status == 400 and r.json()["error"] == "bad_request", (value, r)


async def test_whitespace_before_the_colon_is_refused(shared_node):
    r = await exchange(shared_node.health_port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Thing : 1\r\n\r\n")
    assert r.status == 400, r


async def test_an_obs_fold_line_is_never_a_header_of_its_own(shared_node):
    # h11 folds the continuation into X-Note's value. Were it read as a header,
    # the bogus priority would be refused with bad_priority.
    r = await exchange(shared_node.health_port,
                       post("odin.token.fold.a", b"{}", "X-Note: a", " Fanout-Priority: bogus"))
    assert r.status in (202, 400), r
    assert r.json().get("error") != "bad_priority", r


async def test_a_fold_before_any_header_is_refused(shared_node):
    r = await exchange(shared_node.health_port, b"GET /health HTTP/1.1\r\n Host: x\r\n\r\n")
    assert r.status == 400, r


async def test_a_request_with_bare_lf_line_ends_is_answered(shared_node):
    r = await exchange(shared_node.health_port, b"GET /health HTTP/1.1\nHost: x\n\n")
    assert r.status in (200, 400), r
    if r.status == 200:
        assert r.json()["status"] == "ok"


async def test_http11_without_host_is_refused(shared_node):
    r = await exchange(shared_node.health_port, b"GET /health HTTP/1.1\r\n\r\n")
    assert r.status == 400, r


async def test_an_unknown_transfer_coding_gets_501(shared_node):
    r = await exchange(shared_node.health_port, post("odin.token.te.a", b"", "Transfer-Encoding: gzip"))
    assert r.status == 501, r


async def test_an_oversize_head_gets_431(shared_node):
    r = await exchange(shared_node.health_port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000)
    assert r.status == 431, r


async def test_content_length_with_transfer_encoding_is_refused_and_the_hidden_request_never_runs(shared_node):
    # CL.TE smuggling: a proxy framing by Content-Length forwards all of this as
    # one request; framed by Transfer-Encoding, the body ends at "0" and the
    # POST after it would be a second request of its own.
    subject = "odin.token.smuggle.a"
    hidden = post(subject, b'{"smuggled":true}')
    body = b"0\r\n\r\n" + hidden
    async with connect(shared_node) as ws:
        await ws.subscribe(subject)
        c = await Http.open(shared_node.health_port)
        try:
            await c.send(post("odin.token.smuggle.b", body, f"Content-Length: {len(body)}",
                              "Transfer-Encoding: chunked"))
            r = await c.reply()
            assert r.status == 400 and r.json()["error"] == "bad_request", r
            assert r.headers["connection"] == "close"
            assert await c.closed() == b"", "a second response: the hidden request ran"
        finally:
            c.close()
        # Had the hidden POST run, its message would come before this marker.
        marker = await exchange(shared_node.health_port, post(subject, b'{"marker":1}'))
        assert marker.status == 202, marker
        (m,) = await ws.messages(1)
        assert m["data"] == {"marker": 1}, m


@pytest.mark.parametrize("version", [b"2.0", b"1.2", b"0.9", b"3.0"])
async def test_an_http_version_other_than_1_0_and_1_1_gets_505_and_a_close(shared_node, version):
    c = await Http.open(shared_node.health_port)
    try:
        await c.send(b"GET /health HTTP/%s\r\nHost: x\r\n\r\n" % version + HEALTH)
        r = await c.reply()
        assert r.status == 505 and r.json()["error"] == "http_version_not_supported", (version, r)
        assert r.headers["connection"] == "close"
        assert await c.closed() == b"", "the pipelined request after it was answered"
    finally:
        c.close()


async def test_bad_chunk_framing_is_refused(shared_node):
    r = await exchange(shared_node.health_port,
                       post("odin.token.te.b", b"zz\r\nhello\r\n0\r\n\r\n", "Transfer-Encoding: chunked"))
    assert r.status == 400, r


# ------------------------------------------------------------ Expect and HEAD
async def test_expect_100_continue_is_answered_before_the_body(shared_node):
    c = await Http.open(shared_node.health_port)
    try:
        body = b'{"expect":1}'
        await c.send(post("odin.token.exp.a", b"", "Expect: 100-continue", f"Content-Length: {len(body)}"))
        # Waits for the interim answer alone: the body is not sent until it comes.
        interim = await c.reply(head_only=True)
        assert (interim.status, interim.reason) == (100, "Continue"), interim
        await c.send(body)
        final = await c.reply()
        assert final.status == 202 and final.json()["subject"] == "odin.token.exp.a", final
    finally:
        c.close()


async def test_expect_100_continue_with_an_oversize_body_gets_413_at_once(shared_node):
    c = await Http.open(shared_node.health_port)
    try:
        await c.send(post("odin.token.exp.b", b"", "Expect: 100-continue", f"Content-Length: {(1 << 20) + 1}"))
        r = await c.reply()
        assert r.status == 413 and r.json()["error"] == "too_large", r
        assert await c.closed() == b""
    finally:
        c.close()


@pytest.mark.parametrize("path", ["/health", "/nope", "/metrics"])
async def test_head_sends_the_get_headers_and_no_body(shared_node, path):
    get = await exchange(shared_node.health_port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    c = await Http.open(shared_node.health_port)
    try:
        await c.send(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + HEALTH)
        head = await c.reply(head_only=True)
        assert head.status == get.status and head.headers["content-type"] == get.headers["content-type"]
        length = int(head.headers["content-length"])
        if path == "/nope":
            assert length == len(get.body)
        else:   # /health and /metrics change between two requests; the length is still the body's
            assert length > 0
        # The next bytes on the connection are the next response, not a body.
        after = await c.reply()
        assert after.status == 200 and after.json()["status"] == "ok"
    finally:
        c.close()


async def test_a_refused_head_request_gets_headers_only(shared_node):
    c = await Http.open(shared_node.health_port)
    try:
        await c.send(b"HEAD /publish/odin.token.h.a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
        r = await c.reply(head_only=True)
        assert r.status == 413 and int(r.headers["content-length"]) > 0, r
        assert await c.closed() == b""   # and no body before the close
    finally:
        c.close()


# ------------------------------------------------------------------ bodies
async def test_a_chunked_publish_is_accepted_and_delivered(shared_node):
    async with connect(shared_node) as ws:
        await ws.subscribe("odin.token.chunked.a")
        r = await exchange(shared_node.health_port,
                           post("odin.token.chunked.a", chunked(b'{"k":', b'"chunk', b'ed"}'),
                                "Transfer-Encoding: chunked"))
        assert r.status == 202, r
        (m,) = await ws.messages(1)
        assert m["data"] == {"k": "chunked"} and m["stream_seq"] == r.json()["stream_seq"]


async def test_a_chunked_body_at_the_limit_is_accepted(shared_node):
    payload = b'"' + b"x" * ((1 << 20) - 2) + b'"'
    parts = [payload[i:i + 65536] for i in range(0, len(payload), 65536)]
    r = await exchange(shared_node.health_port,
                       post("odin.token.chunked.b", chunked(*parts), "Transfer-Encoding: chunked"))
    assert r.status == 202, r


async def test_an_endless_chunked_body_gets_413_and_is_not_read_forever(shared_node):
    # A plain blocking socket, written from a thread while this side reads: with
    # an asyncio transport, the write side's EPIPE could close the transport
    # before the 413 already received was read (a race in the client, not the node).
    import socket as socketlib

    sock = socketlib.create_connection(("127.0.0.1", shared_node.health_port), timeout=TIMEOUT)
    chunk = b"%x\r\n%s\r\n" % (65536, b"y" * 65536)
    sent = 0
    cut_off = threading.Event()

    def feed() -> None:
        # Bounded: at most 64 MiB, the server must stop it long before.
        nonlocal sent
        try:
            for _ in range(1024):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            cut_off.set()

    def read_head() -> bytes:
        """The response: its head, then its Content-Length body."""
        got = b""
        while b"\r\n\r\n" not in got:
            data = sock.recv(65536)
            if not data:
                return got
            got += data
        head, _, body = got.partition(b"\r\n\r\n")
        length = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n")
                       if ln.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
        return head + b"\r\n\r\n" + body

    try:
        sock.sendall(post("odin.token.chunked.c", b"", "Transfer-Encoding: chunked"))
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        head = await asyncio.to_thread(read_head)
        first, _, rest = head.partition(b"\r\n")
        assert first.split(b" ")[1] == b"413", head[:200]
        assert b"too_large" in rest and b"connection: close" in rest.lower()
        await asyncio.to_thread(feeder.join, TIMEOUT)
        assert cut_off.is_set(), f"the server read all {sent} bytes"
    finally:
        sock.close()
    assert (await exchange(shared_node.health_port, HEALTH)).status == 200


# ------------------------------------------------------------------ timeouts
async def test_a_trickling_head_is_cut_at_the_header_timeout(quick_node):
    c = await Http.open(quick_node.health_port)
    try:
        start = time.monotonic()
        await c.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        got = b""
        # One byte per 0.1 s: the connection is never silent, the head never ends.
        for _ in range(100):
            try:
                await c.send(b"a")
            except ConnectionError:
                break
            try:
                data = await asyncio.wait_for(c.reader.read(4096), 0.1)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            got += data
            if not data:
                break
        elapsed = time.monotonic() - start
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert 0.9 <= elapsed < TIMEOUT, elapsed
    finally:
        c.close()


async def test_a_silent_new_connection_is_closed_at_the_header_timeout(quick_node):
    c = await Http.open(quick_node.health_port)
    try:
        start = time.monotonic()
        rest = await c.closed()
        assert rest == b"" or rest.startswith(b"HTTP/1.1 408 "), rest
        assert time.monotonic() - start >= 0.9
    finally:
        c.close()


async def test_an_idle_keep_alive_connection_is_closed(quick_node):
    c = await Http.open(quick_node.health_port)
    try:
        await c.send(HEALTH)
        assert (await c.reply()).status == 200
        start = time.monotonic()
        assert await c.closed() == b""   # idle: closed without a word
        assert time.monotonic() - start >= 0.9
    finally:
        c.close()


async def test_a_stalled_body_gets_408(quick_node):
    c = await Http.open(quick_node.health_port)
    try:
        await c.send(post("odin.token.stall.a", b"{}", "Content-Length: 10"))
        r = await c.reply()
        assert r.status == 408 and r.json()["error"] == "timeout", r
        assert await c.closed() == b""
    finally:
        c.close()


# --------------------------------------------------- slowloris and the bound
async def _health_latencies(port: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = await exchange(port, HEALTH)
        out.append(time.perf_counter() - start)
        assert r.status == 200 and r.json()["status"] == "ok"
    return out


async def test_slowloris_does_not_delay_health(shared_node):
    port = shared_node.health_port
    baseline = statistics.median(await _health_latencies(port, 10))
    slow = [await Http.open(port) for _ in range(50)]
    stop = asyncio.Event()

    async def trickle() -> None:
        # Bounded: 200 rounds of one byte per connection, well inside the 10 s header timeout.
        for c in slow:
            c.writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for _ in range(200):
            for c in slow:
                c.writer.write(b"a")
            try:
                await asyncio.wait_for(stop.wait(), 0.02)
                return
            except TimeoutError:
                pass

    trickler = asyncio.create_task(trickle())
    try:
        during = statistics.median(await _health_latencies(port, 10))
        assert not trickler.done(), "the slow connections stopped trickling before the measurement ended"
        assert not any(c.reader.at_eof() for c in slow), "slow connections were dropped, not outlasted"
        # Generous: a stalled port would take seconds; a loaded box adds milliseconds.
        assert during < max(50 * baseline, 0.5), (baseline, during)
    finally:
        stop.set()
        await trickler
        for c in slow:
            c.close()


async def test_at_the_connection_bound_the_longest_waiting_connection_is_evicted():
    node = TunedNode(MAX_CONNECTIONS=8).start()
    slow: list[Http] = []
    try:
        for _ in range(20):
            c = await Http.open(node.health_port)
            await c.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(c)
        r = await exchange(node.health_port, HEALTH)
        assert r.status == 200 and r.json()["status"] == "ok"
        # 20 waiting + the /health one through a bound of 8: the 13 oldest are evicted.
        pending = {asyncio.create_task(c.closed()): i for i, c in enumerate(slow)}
        gone: list[int] = []
        async with asyncio.timeout(TIMEOUT):
            while len(gone) < 13:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    gone.append(pending.pop(t))
        assert sorted(gone) == list(range(13)), gone
        assert all(not t.done() for t in pending)   # the newest are still open
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for c in slow:
            c.close()
        assert node.stop() == 0


async def test_a_keep_alive_connection_open_at_shutdown_ends_without_an_error_log():
    """A scraper's idle keep-alive connection when the node stops: its handler
    is cancelled with the loop and must end quietly (on Python 3.11 the stream
    protocol's done-callback logged the CancelledError as an asyncio error,
    seen at the end of every soak)."""
    node = NodeProcess().start()
    c = await Http.open(node.health_port)
    try:
        await c.send(HEALTH)
        assert (await c.reply()).status == 200
        assert node.stop() == 0
    finally:
        c.close()
    errors = [d for d in node.log_after_exit() if d.get("level") in ("error", "critical", "raw")]
    assert errors == []
