"""Client frames in, control replies and data-message bodies out (Sans-I/O).

:func:`parse_request` turns one text frame into a typed request or raises
:class:`RequestError` with the PROTOCOL.md error code; nothing here touches a
socket. :func:`message_tail` builds the shared part of a data message once per
published message: the compiled core prepends each client's ``{"seq":N,``.

Limits of a request (beyond the frame size the session enforces): strict
UTF-8, JSON nested at most :data:`MAX_DEPTH` levels (checked before parsing,
so a 2 KB ``[[[[...`` costs no recursion), at most
:data:`MAX_CHANNELS_PER_REQUEST` channels.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from itertools import accumulate
from json.encoder import encode_basestring_ascii
from typing import Any

from .codes import ErrorCode

__all__ = [
    "RequestError", "Subscribe", "Unsubscribe", "Replay", "Resume", "Heartbeat", "Refresh",
    "Request", "parse_request", "reply", "error_reply", "message_tail", "encode_data",
]

MAX_CHANNELS_PER_REQUEST = 1000
MAX_SEQ = 2**64 - 1   # seqs and JetStream stream sequences are uint64 (the core takes them as such)
MAX_DEPTH = 32        # JSON nesting; every valid request needs 2


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
    snapshot: bool = False   # PROTOCOL 1.1: newest retained message per matching subject first
    delta: str | None = None  # PROTOCOL 1.2: "fossil" asks for delta messages


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
    delta: str | None = None  # PROTOCOL 1.2, as in Subscribe


@dataclass(slots=True)
class Heartbeat:
    id: Any = None


@dataclass(slots=True)
class Refresh:
    """PROTOCOL 1.1: a new JWT for the same ``sub`` (checked by the caller, not here)."""
    token: str
    id: Any = None


Request = Subscribe | Unsubscribe | Replay | Resume | Heartbeat | Refresh


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


def _delta(obj: dict[str, Any], req_id: Any) -> str | None:
    """``delta`` of subscribe/resume: a format name (only "fossil" is known;
    another one gets full messages, and no ``delta`` in the reply)."""
    v = obj.get("delta")
    if v is not None and not isinstance(v, str):
        raise RequestError(ErrorCode.BAD_REQUEST, "'delta' must be a string (\"fossil\")", req_id)
    return v


def _seq(obj: dict[str, Any], name: str, req_id: Any) -> int:
    v = obj.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SEQ:
        raise RequestError(ErrorCode.BAD_REQUEST, f"'{name}' must be a non-negative integer below 2**64", req_id)
    return v


# Strings are cut out once the escapes that matter (\\ and \") are gone, so
# the pattern cannot backtrack: every pass is linear even on hostile input.
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _too_deep(text: str) -> bool:
    """True when ``text`` nests brackets deeper than :data:`MAX_DEPTH` outside strings.

    Cheap on every real request (fewer brackets than the limit: one count);
    otherwise strings are cut out and the running depth is summed in C
    (regex, ``accumulate``, ``max``), linear in the frame size.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    # Dropping backslash pairs left to right, then backslash-quote, pairs
    # backslashes the way a JSON string does; other escapes hold no quote or bracket.
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", unescaped))
    return bool(brackets) and max(accumulate(map(_STEP.__getitem__, brackets))) > MAX_DEPTH


def parse_request(text: str | bytes) -> Request:
    """One client frame -> request; :class:`RequestError` (bad_request) when malformed.

    Bytes must be strict UTF-8 (no encoded surrogates): a client library's
    text frame always is, so anything else is refused, not guessed at.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, f"frame is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    if _too_deep(text):
        raise RequestError(ErrorCode.BAD_REQUEST, f"frame nests JSON deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text)
    except RecursionError:   # not reachable past _too_deep; kept so no depth can ever close with 1011
        raise RequestError(ErrorCode.BAD_REQUEST, f"frame nests JSON deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
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
        snapshot = obj.get("snapshot", False)
        if not isinstance(snapshot, bool):
            raise RequestError(ErrorCode.BAD_REQUEST, "'snapshot' must be true or false", req_id)
        return Subscribe(_channels(obj, req_id), req_id, snapshot, _delta(obj, req_id))
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
        return Resume(_channels(obj, req_id), _seq(obj, "after", req_id), epoch, req_id, _delta(obj, req_id))
    if kind == "heartbeat":
        return Heartbeat(req_id)
    if kind == "refresh":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise RequestError(ErrorCode.BAD_REQUEST, "'token' must be a non-empty string", req_id)
        return Refresh(token, req_id)
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
    """Everything of a data message after the per-client ``{"seq":N,`` prefix.

    The subject is JSON-escaped (ASCII, ``\\uXXXX`` for the rest): ingest
    should refuse subjects outside the channel syntax, but NATS allows ``"``
    and ``\\`` in subjects, and one unescaped would break the frame for every
    subscriber. One C call per message (~0.1 us), not per client.
    """
    return (b'"type":"message","channel":%s,"stream_seq":%d,"ts":%d,'
            % (encode_basestring_ascii(subject).encode("ascii"), stream_seq, ts_ms)
            + encode_data(payload) + b"}")
