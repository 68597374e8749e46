"""One load-generator connection: an asyncio BufferedProtocol with an inlined
WebSocket frame parser, speaking either fanout's protocol or NATS over
WebSocket.

Why it looks like this: the load generator has to cost less CPU per message
than the server it measures, so the receive path avoids everything that
allocates or calls per message:

- every connection of a worker process reads into one shared buffer (only the
  tail of an incomplete frame is copied out and back);
- one ``time.time_ns()`` per read, not per message;
- a fanout data frame is never JSON-decoded: ``seq`` and the publish
  timestamp ``data.t`` are cut out with ``find`` (the server writes ``seq``
  first and embeds the payload verbatim, PROTOCOL.md);
- latencies go to a shared ``array('q')`` that the worker folds into a
  histogram once a second.

Control frames (``subscribed``, ``error``, ``throttle_update``), compressed or
fragmented frames, and NATS protocol lines take the slower general path.
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections import Counter
from time import time_ns
from typing import TYPE_CHECKING

from .wsclient import (
    DEFLATE_TAIL,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Deflate,
    HandshakeError,
    Url,
    client_frame,
    close_payload,
    handshake_request,
    parse_handshake_response,
)

if TYPE_CHECKING:
    from array import array

# The shared receive buffer of this process (see module docstring). Grown,
# never shrunk, when a single frame does not fit.
_SHARED = bytearray(1 << 20)
_SHARED_MV = memoryview(_SHARED)
MAX_FRAME = 64 << 20

HANDSHAKE, OPEN, CLOSED = 0, 1, 2
SEQ_PREFIX = b'{"seq":'
T_KEY = b'"t":'
I_KEY = b'"i":'


def _grow_shared(need: int) -> None:
    global _SHARED, _SHARED_MV
    size = len(_SHARED)
    while size < need:
        size *= 2
    _SHARED = bytearray(size)
    _SHARED_MV = memoryview(_SHARED)


class Tally:
    """Counters shared by the connections of one class (fast or slow readers)
    of one worker. Latencies (ns) are appended to ``lat``; the worker drains
    it into a histogram."""

    __slots__ = ("received", "gaps", "dups", "lat", "bytes")

    def __init__(self, lat: array[int]) -> None:
        self.lat = lat
        self.received = 0
        self.gaps = 0
        self.dups = 0
        self.bytes = 0

    def reset(self) -> None:
        self.received = self.gaps = self.dups = self.bytes = 0
        del self.lat[:]


class Client(asyncio.BufferedProtocol):
    """A load-generator WebSocket client (see module docstring).

    ``ready`` resolves once the server has confirmed the subscriptions
    (fanout: the ``subscribed`` reply; NATS: the PONG after CONNECT/SUB/PING),
    or fails with the reason the connection could not get there.
    """

    def __init__(
        self,
        url: Url,
        channels: list[str],
        *,
        nats: bool,
        deflate: bool,
        tally: Tally,
        events: Counter[str],
    ) -> None:
        self.url = url
        self.channels = channels
        self.nats = nats
        self.offer_deflate = deflate
        self.tally = tally
        self.events = events  # close codes, errors, throttle levels (rare events)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.pending = b""
        self.plen = 0
        self.accept = b""
        self.deflate: Deflate | None = None
        self.inflater: zlib._Decompress | None = None
        self.frag: list[bytes] | None = None
        self.frag_op = 0
        self.frag_comp = False
        self.next_seq = 1  # fanout: the seq expected next
        self.last_i: dict[bytes, int] = {}  # NATS: last payload counter per subject
        self.nbuf = bytearray()  # NATS: protocol bytes not parsed yet
        self.close_code: int | None = None
        self.sent_close = False

    # -- asyncio protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        req, self.accept = handshake_request(self.url, self.offer_deflate)
        transport.write(req)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        p = self.pending
        if p:
            n = len(p)
            if n + 65536 > len(_SHARED):
                _grow_shared(n + 65536)
            _SHARED[:n] = p
            self.plen = n  # ``pending`` stays until buffer_updated: recv may fail
            return _SHARED_MV[n:]
        self.plen = 0
        return _SHARED_MV

    def buffer_updated(self, nbytes: int) -> None:
        buf = _SHARED
        end = self.plen + nbytes
        if self.state == OPEN:
            pos = self._frames(buf, 0, end)
        else:
            pos = self._handshake(buf, end)
        if pos < end:
            if end - pos > MAX_FRAME:
                self._fail("frame_too_big")
                return
            self.pending = bytes(buf[pos:end])
        else:
            self.pending = b""

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        if not self.ready.done():
            code = self.close_code
            self.ready.set_exception(
                ConnectionError(f"closed before ready (code {code})" if code else "closed before ready")
            )
        if not self.closed.done():
            self.closed.set_result(None)

    # -- handshake ---------------------------------------------------------
    def _handshake(self, buf: bytearray, end: int) -> int:
        h = buf.find(b"\r\n\r\n", 0, end)
        if h < 0:
            if end > 65536:
                self._fail("handshake_too_big")
                return end
            return 0
        try:
            self.deflate = parse_handshake_response(bytes(buf[:h]), self.accept)
        except HandshakeError as e:
            self.events[f"http_{e.status}"] += 1
            if not self.ready.done():
                self.ready.set_exception(e)
            self.transport.abort()  # type: ignore[union-attr]
            return end
        if self.deflate is not None:
            self.inflater = self.deflate.new_inflater()
        self.state = OPEN
        if self.nats:
            cmds = [
                b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"echo":false,'
                b'"headers":false,"no_responders":false,"lang":"bench","version":"0"}\r\n'
            ]
            cmds += [b"SUB %s %d\r\n" % (c.encode(), i + 1) for i, c in enumerate(self.channels)]
            cmds.append(b"PING\r\n")
            self.transport.write(client_frame(OP_BINARY, b"".join(cmds)))  # type: ignore[union-attr]
        elif self.channels:
            msg = json.dumps({"type": "subscribe", "channels": self.channels, "id": 1}).encode()
            self.transport.write(client_frame(OP_TEXT, msg))  # type: ignore[union-attr]
        else:
            self.ready.set_result(None)
        return self._frames(buf, h + 4, end)

    # -- frames (hot path) -------------------------------------------------
    def _frames(self, buf: bytearray, pos: int, end: int) -> int:
        now = time_ns()
        tally = self.tally
        lat_append = tally.lat.append
        nats = self.nats
        while end - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1]
            if ln < 126:
                s = pos + 2
            elif ln == 126:
                if end - pos < 4:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                s = pos + 4
            elif ln == 127:
                if end - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                s = pos + 10
            else:
                self._fail("masked_server_frame")
                return end
            e = s + ln
            if e > end:
                break
            pos = e
            if b0 == 0x81 and not nats and buf.startswith(SEQ_PREFIX, s):
                # Uncompressed fanout data frame: the common case, inlined.
                c = buf.find(b",", s + 7, e)
                seq = int(buf[s + 7 : c])
                exp = self.next_seq
                if seq == exp:
                    self.next_seq = seq + 1
                    tally.received += 1
                elif seq > exp:
                    tally.gaps += seq - exp
                    self.next_seq = seq + 1
                    tally.received += 1
                else:
                    tally.dups += 1
                tally.bytes += ln
                d = buf.find(T_KEY, c, e)
                if d > 0:
                    d += 4
                    k = buf.find(b",", d, e)
                    lat_append(now - int(buf[d:k]))
            else:
                self._frame(b0, buf, s, e, now)
                if self.state == CLOSED:
                    return end
        return pos

    def _frame(self, b0: int, buf: bytearray, s: int, e: int, now: int) -> None:
        """Every frame but an uncompressed, unfragmented fanout data frame."""
        op = b0 & 0x0F
        fin = b0 & 0x80
        if op >= 8:
            self._control(op, bytes(buf[s:e]))
            return
        if op == OP_CONT:
            if self.frag is None:
                self._fail("unexpected_continuation")
                return
            self.frag.append(bytes(buf[s:e]))
            if not fin:
                return
            data = b"".join(self.frag)
            op, comp = self.frag_op, self.frag_comp
            self.frag = None
        else:
            comp = bool(b0 & 0x40)
            if not fin:
                self.frag = [bytes(buf[s:e])]
                self.frag_op, self.frag_comp = op, comp
                return
            data = bytes(buf[s:e])
        if comp:
            if self.inflater is None:
                self._fail("unnegotiated_rsv1")
                return
            try:
                data = self.inflater.decompress(data + DEFLATE_TAIL)
            except zlib.error:
                self._fail("inflate_error")
                return
            if self.deflate is not None and self.deflate.server_no_context_takeover:
                self.inflater = self.deflate.new_inflater()
        if self.nats:
            self._nats(data, now)
        else:
            self._message(data, now)

    def _message(self, b: bytes, now: int) -> None:
        """A complete fanout text message (general path)."""
        tally = self.tally
        if b.startswith(SEQ_PREFIX):
            c = b.find(b",", 7)
            seq = int(b[7:c])
            exp = self.next_seq
            if seq >= exp:
                tally.gaps += seq - exp
                self.next_seq = seq + 1
                tally.received += 1
            else:
                tally.dups += 1
            tally.bytes += len(b)
            d = b.find(T_KEY, c)
            if d > 0:
                k = b.find(b",", d + 4)
                tally.lat.append(now - int(b[d + 4 : k]))
            return
        try:
            msg = json.loads(b)
        except ValueError:
            self.events["bad_json"] += 1
            return
        typ = msg.get("type") if isinstance(msg, dict) else None
        if typ == "message":  # a data message whose keys came in another order
            seq = msg.get("seq", 0)
            if seq >= self.next_seq:
                tally.gaps += seq - self.next_seq
                self.next_seq = seq + 1
                tally.received += 1
            else:
                tally.dups += 1
            data = msg.get("data")
            if isinstance(data, dict) and isinstance(data.get("t"), int):
                tally.lat.append(now - data["t"])
        elif typ == "subscribed":
            if not self.ready.done():
                self.ready.set_result(None)
        elif typ == "error":
            self.events[f"error_{msg.get('code')}"] += 1
        elif typ == "throttle_update":
            self.events[f"throttle_level_{msg.get('level')}"] += 1
        elif typ == "heartbeat_ack":
            pass
        else:
            self.events[f"other_{typ}"] += 1

    def _nats(self, data: bytes, now: int) -> None:
        """NATS protocol bytes carried in binary frames (lines may be split
        across frames, so a buffer of unparsed bytes is kept)."""
        nb = self.nbuf
        if nb:
            nb += data
            b: bytes | bytearray = nb
        else:
            b = data
        n = len(b)
        p = 0
        tally = self.tally
        while p < n:
            nl = b.find(b"\r\n", p)
            if nl < 0:
                break
            if b.startswith(b"MSG ", p):
                hdr = b[p + 4 : nl].split()
                size = int(hdr[-1])
                ps = nl + 2
                pe = ps + size
                if pe + 2 > n:
                    break
                p = pe + 2
                d = b.find(T_KEY, ps, pe)
                if d < 0:
                    tally.received += 1
                    continue
                k = b.find(b",", d + 4, pe)
                tally.lat.append(now - int(b[d + 4 : k]))
                d = b.find(I_KEY, k, pe)
                k2 = b.find(b",", d + 4, pe)
                i = int(b[d + 4 : k2])
                subj = bytes(hdr[0])
                last = self.last_i.get(subj)
                if last is None or i > last:
                    if last is not None and i > last + 1:
                        tally.gaps += i - last - 1
                    self.last_i[subj] = i
                    tally.received += 1
                else:
                    tally.dups += 1
                tally.bytes += size
            elif b.startswith(b"PING", p):
                self.transport.write(client_frame(OP_BINARY, b"PONG\r\n"))  # type: ignore[union-attr]
                p = nl + 2
            elif b.startswith(b"PONG", p):
                if not self.ready.done():
                    self.ready.set_result(None)
                p = nl + 2
            elif b.startswith(b"-ERR", p):
                self.events["nats_" + bytes(b[p:nl]).decode("latin-1", "replace")[:60]] += 1
                p = nl + 2
            else:  # INFO, +OK
                p = nl + 2
        if p >= n:
            if nb:
                nb.clear()
        elif nb:
            del nb[:p]
        else:
            nb += b[p:]

    def _control(self, op: int, payload: bytes) -> None:
        if op == OP_PING:
            self.transport.write(client_frame(OP_PONG, payload))  # type: ignore[union-attr]
        elif op == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.close_code = code
            self.events[f"close_{code}"] += 1
            if not self.sent_close:
                self.sent_close = True
                self.transport.write(client_frame(OP_CLOSE, payload[:2]))  # type: ignore[union-attr]
            self.state = CLOSED
            self.transport.close()  # type: ignore[union-attr]
        elif op != OP_PONG:
            self._fail("bad_opcode")

    # -- actions -----------------------------------------------------------
    def _fail(self, reason: str) -> None:
        self.events[f"protocol_{reason}"] += 1
        self.state = CLOSED
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abort()

    def close(self, code: int = 1000) -> None:
        """Start a clean close (close frame, then drop the TCP connection
        without waiting for the server's answer: a reconnect storm does not
        wait either)."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.state == OPEN and not self.sent_close:
            self.sent_close = True
            self.transport.write(client_frame(OP_CLOSE, close_payload(code)))
        self.state = CLOSED
        self.transport.close()

    def heartbeat(self) -> None:
        if self.state == OPEN and self.transport is not None and not self.nats:
            self.transport.write(client_frame(OP_TEXT, b'{"type":"heartbeat"}'))


# Re-exported for callers that need the opcode names.
__all__ = ["Client", "Tally", "OP_TEXT", "OP_BINARY"]
