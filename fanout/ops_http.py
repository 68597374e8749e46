"""A small HTTP/1.1 server for the ops port (/health, /ready, /metrics, /publish).

None of our dependencies serves HTTP requests with bodies on asyncio
(websockets' parser takes GET only), so this is the minimum: request line,
headers, a Content-Length body, keep-alive. Limits: 8 KiB of headers, bodies
up to ``max_body`` bytes (413 above), no chunked uploads (411).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .log import event

__all__ = ["HttpRequest", "HttpResponse", "serve"]

REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
           429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]   # lower-case names
    body: bytes
    peer: str


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def _read_request(reader: asyncio.StreamReader, peer: str, max_body: int) -> HttpRequest | HttpResponse | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        return HttpResponse(431, b'{"error":"headers too large"}')
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return HttpResponse(400, b'{"error":"bad request line"}')
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return HttpResponse(400, b'{"error":"bad header line"}')
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "transfer-encoding" in headers:
        return HttpResponse(411, b'{"error":"send a Content-Length body"}')
    if "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            return HttpResponse(400, b'{"error":"bad Content-Length"}')
        if n < 0:
            return HttpResponse(400, b'{"error":"bad Content-Length"}')
        if n > max_body:
            return HttpResponse(413, b'{"error":"body too large"}')
        try:
            body = await reader.readexactly(n)
        except asyncio.IncompleteReadError:
            return None
    return HttpRequest(parts[0], parts[1], headers, body, peer)


async def serve(host: str, port: int, handler: Handler, max_body: int = 1 << 20) -> asyncio.Server:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) else str(peername)
        try:
            while True:
                req = await _read_request(reader, peer, max_body)
                if req is None:
                    break
                if isinstance(req, HttpResponse):
                    resp, keep = req, False
                else:
                    try:
                        resp = await handler(req)
                    except Exception:
                        event(logging.ERROR, "ops handler failed", path=req.path, exc_info=True)
                        resp = HttpResponse(500, b'{"error":"internal error"}')
                    keep = req.headers.get("connection", "").lower() != "close"
                head = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}",
                        f"Content-Type: {resp.content_type}", f"Content-Length: {len(resp.body)}"]
                head += [f"{k}: {v}" for k, v in resp.headers.items()]
                if not keep:
                    head.append("Connection: close")
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + resp.body)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_client, host, port, limit=8192, reuse_address=True)
