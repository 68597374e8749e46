"""Client frames in, control replies and data-message bodies out (Sans-I/O).

:func:`parse_request` turns one text frame into a typed request or raises
:class:`RequestError` with the PROTOCOL.md error code; nothing here touches a
socket. :func:`message_tail` builds the shared part of a data message once per
published message: the compiled core prepends each client's ``{"seq":N,``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from .codes import ErrorCode

__all__ = [
    "RequestError", "Subscribe", "Unsubscribe", "Replay", "Resume", "Heartbeat",
    "Request", "parse_request", "reply", "error_reply", "message_tail", "encode_data",
]

MAX_CHANNELS_PER_REQUEST = 1000
MAX_SEQ = 2**64 - 1   # seqs and JetStream stream sequences are uint64 (the core takes them as such)


class RequestError(Exception):
    def __init__(self, code: ErrorCode, message: str, req_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


@dataclass(slots=True)
class Subscribe:
    channels: list[str]
    id: Any = None


@dataclass(slots=True)
class Unsubscribe:
    channels: list[str]
    id: Any = None


@dataclass(slots=True)
class Replay:
    from_seq: int
    to_seq: int
    id: Any = None


@dataclass(slots=True)
class Resume:
    channels: list[str]
    after: int
    epoch: str | None = None
    id: Any = None


@dataclass(slots=True)
class Heartbeat:
    id: Any = None


Request = Subscribe | Unsubscribe | Replay | Resume | Heartbeat


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _channels(obj: dict[str, Any], req_id: Any) -> list[str]:
    ch = obj.get("channels")
    if not isinstance(ch, list) or not ch:
        raise RequestError(ErrorCode.BAD_REQUEST, "'channels' must be a non-empty list of strings", req_id)
    if len(ch) > MAX_CHANNELS_PER_REQUEST:
        raise RequestError(ErrorCode.BAD_REQUEST, f"at most {MAX_CHANNELS_PER_REQUEST} channels per request", req_id)
    if not all(isinstance(c, str) for c in ch):
        raise RequestError(ErrorCode.BAD_REQUEST, "'channels' must be a non-empty list of strings", req_id)
    return list(dict.fromkeys(ch))  # drop repeats, keep order


def _seq(obj: dict[str, Any], name: str, req_id: Any) -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SEQ:
        raise RequestError(ErrorCode.BAD_REQUEST, f"'{name}' must be a non-negative integer below 2**64", req_id)
    return v


def parse_request(text: str | bytes) -> Request:
    """One client frame -> request; :class:`RequestError` (bad_request) when malformed."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(ErrorCode.BAD_REQUEST, f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    req_id = obj.get("id")
    if req_id is not None and not (isinstance(req_id, str) or _is_int(req_id)):
        raise RequestError(ErrorCode.BAD_REQUEST, "'id' must be a string or an integer")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise RequestError(ErrorCode.BAD_REQUEST, "'type' must be a string", req_id)
    if kind == "subscribe":
        return Subscribe(_channels(obj, req_id), req_id)
    if kind == "unsubscribe":
        return Unsubscribe(_channels(obj, req_id), req_id)
    if kind == "replay":
        a, b = _seq(obj, "from_seq", req_id), _seq(obj, "to_seq", req_id)
        if a < 1 or b < a:
            raise RequestError(ErrorCode.BAD_REQUEST, "need 1 <= from_seq <= to_seq", req_id)
        return Replay(a, b, req_id)
    if kind == "resume":
        epoch = obj.get("epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise RequestError(ErrorCode.BAD_REQUEST, "'epoch' must be a string", req_id)
        return Resume(_channels(obj, req_id), _seq(obj, "after", req_id), epoch, req_id)
    if kind == "heartbeat":
        return Heartbeat(req_id)
    raise RequestError(ErrorCode.BAD_REQUEST, f"unknown type {kind!r}", req_id)


def reply(kind: str, req_id: Any = None, **fields: Any) -> bytes:
    """A control reply as compact JSON bytes, echoing ``id`` when the request had one."""
    obj: dict[str, Any] = {"type": kind}
    if req_id is not None:
        obj["id"] = req_id
    obj.update(fields)
    return json.dumps(obj, separators=(",", ":")).encode()


def error_reply(code: ErrorCode, message: str, req_id: Any = None, **fields: Any) -> bytes:
    return reply("error", req_id, code=str(code), message=message, **fields)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def encode_data(payload: bytes) -> bytes:
    """``"data":...`` for a payload: verbatim when it is UTF-8 JSON (RFC 8259),
    a JSON string of its text otherwise, or ``"data_b64":"..."`` when not UTF-8."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return b'"data_b64":"' + base64.b64encode(payload) + b'"'
    try:
        json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return b'"data":' + json.dumps(text).encode()
    return b'"data":' + payload.strip(b" \t\r\n")


def message_tail(subject: str, stream_seq: int, ts_ms: int, payload: bytes) -> bytes:
    """Everything of a data message after the per-client ``{"seq":N,`` prefix."""
    return (b'"type":"message","channel":"%s","stream_seq":%d,"ts":%d,' % (subject.encode(), stream_seq, ts_ms)
            + encode_data(payload) + b"}")
