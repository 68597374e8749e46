"""fanout.protocol and fanout.subjects at the input boundary, in process (no node)."""

from __future__ import annotations

import json
import time

import pytest

from fanout.codes import ErrorCode
from fanout.protocol import (
    MAX_DEPTH,
    Heartbeat,
    Refresh,
    RequestError,
    Resume,
    Subscribe,
    Unsubscribe,
    message_tail,
    parse_request,
)
from fanout.subjects import overlaps, subject_error, valid_pattern, valid_subject


def bad(frame: str | bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(frame)
    assert info.value.code is ErrorCode.BAD_REQUEST
    return info.value


# ---------------------------------------------------------- lone surrogates
LONE = ["odin.\ud800.x", "\udfff", "odin.token.\ud83d", "a" * 300 + "\ud800"]


@pytest.mark.parametrize("channel", LONE, ids=repr)
@pytest.mark.parametrize("wildcards", [True, False])
def test_a_lone_surrogate_is_an_invalid_channel_not_an_exception(channel, wildcards):
    problem = subject_error(channel, wildcards=wildcards)
    assert problem and ("bad token" in problem or "longer" in problem)
    assert not valid_pattern(channel) and not valid_subject(channel)


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "resume"])
def test_requests_with_a_lone_surrogate_channel_parse_and_then_fail_validation(kind):
    # The frame as a browser sends it: the escape survives JSON.stringify.
    frame = '{"type":"' + kind + '","channels":["odin.\\ud800.x","odin.ok"],"after":0}'
    req = parse_request(frame)
    assert isinstance(req, Subscribe | Unsubscribe | Resume)
    assert [subject_error(c, wildcards=True) is None for c in req.channels] == [False, True]


def test_utf8_encoded_surrogates_are_refused():
    err = bad(b'{"type":"heartbeat","x":"\xed\xa0\x80"}')
    assert "UTF-8" in err.message


def test_invalid_utf8_is_a_bad_request():
    assert "UTF-8" in bad(b'{"type":"heartbeat","x":"\xff"}').message


def test_valid_utf8_bytes_are_fine():
    assert isinstance(parse_request('{"type":"heartbeat","x":"é€😀"}'.encode()), Heartbeat)


# ------------------------------------------------------------------ nesting
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_deep_nesting_is_a_bad_request(depth):
    err = bad("[" * depth + "]" * depth)
    assert "deeper" in err.message


def test_deep_nesting_inside_an_object_field_is_a_bad_request():
    frame = '{"type":"heartbeat","x":' + "[" * 1000 + "]" * 1000 + "}"   # ~2 KB
    assert len(frame) < 2100
    bad(frame)
    bad(frame.encode())


def test_nesting_at_the_limit_is_parsed():
    frame = '{"type":"heartbeat","x":' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    assert isinstance(parse_request(frame), Heartbeat)


@pytest.mark.parametrize("inside", ["[" * 500, "{" * 500, '\\"' + "[" * 500, "\\\\" * 3 + "[[[["])
def test_brackets_inside_strings_do_not_count(inside):
    frame = json.dumps({"type": "heartbeat", "x": inside, "y": [[1], [2]] * 40})
    assert isinstance(parse_request(frame), Heartbeat)


def test_an_escaped_quote_does_not_end_the_string_for_the_depth_check():
    # After \" the string goes on, so the brackets that follow are inside it.
    frame = '{"type":"heartbeat","x":"\\"' + "[" * 100 + '"}'
    assert isinstance(parse_request(frame), Heartbeat)
    # After \\ the string ends, so these brackets are real (and too deep).
    frame = '{"type":"heartbeat","x":"\\\\",' + '"y":' + "[" * 100 + "]" * 100 + "}"
    bad(frame)


def test_the_depth_check_is_linear_on_hostile_frames():
    hostile = ['"\\"' * 20_000 + "[" * 40, "[]" * 32_000, '"' + "[" * 64_000, "[" * 65_000]
    for frame in hostile:
        t = time.perf_counter()
        with pytest.raises(RequestError):
            parse_request(frame)
        assert time.perf_counter() - t < 0.1, frame[:20]


# ---------------------------------------------------- protocol 1.1 shapes
def test_subscribe_snapshot_defaults_to_false():
    req = parse_request('{"type":"subscribe","channels":["a.b"],"id":3}')
    assert req == Subscribe(["a.b"], 3, False)


def test_subscribe_snapshot_true():
    req = parse_request('{"type":"subscribe","channels":["a.*"],"snapshot":true}')
    assert isinstance(req, Subscribe) and req.snapshot is True


@pytest.mark.parametrize("value", ["1", '"true"', "null", "[]", "{}"])
def test_subscribe_snapshot_must_be_a_bool(value):
    err = bad('{"type":"subscribe","channels":["a.b"],"id":"x","snapshot":' + value + "}")
    assert "snapshot" in err.message and err.req_id == "x"


def test_refresh():
    assert parse_request('{"type":"refresh","token":"a.b.c","id":9}') == Refresh("a.b.c", 9)


@pytest.mark.parametrize("body", ['"token":""', '"token":5', '"token":null', '"tok":"x"'])
def test_refresh_needs_a_token_string(body):
    err = bad('{"type":"refresh",' + body + ',"id":1}')
    assert "token" in err.message and err.req_id == 1


# ------------------------------------------------------------ message_tail
def frame_of(tail: bytes) -> dict:
    return json.loads(b'{"seq":1,' + tail)


def test_message_tail_of_a_normal_subject_is_unchanged():
    tail = message_tail("odin.token.abc.update", 7, 123, b'{"p":1}')
    assert tail == b'"type":"message","channel":"odin.token.abc.update","stream_seq":7,"ts":123,"data":{"p":1}}'


@pytest.mark.parametrize("subject", ['odin.token."x', "odin.token.\\", 'a"b\\c', "odin.\x00\x1f.x",
                                     "odin.é.x", "odin.\ud800.x", '","seq":999,"x":"'])
def test_message_tail_escapes_any_subject_into_valid_json(subject):
    msg = frame_of(message_tail(subject, 5, 6, b"[1]"))
    assert msg == {"seq": 1, "type": "message", "channel": subject, "stream_seq": 5, "ts": 6, "data": [1]}


def test_subscribe_and_resume_take_delta():
    assert parse_request('{"type":"subscribe","channels":["a.b"]}').delta is None
    req = parse_request('{"type":"subscribe","channels":["a.b"],"delta":"fossil"}')
    assert isinstance(req, Subscribe) and req.delta == "fossil"
    res = parse_request('{"type":"resume","channels":["a.b"],"after":3,"delta":"fossil"}')
    assert isinstance(res, Resume) and res.delta == "fossil" and res.after == 3
    # Another format name is accepted (and gets full messages); a non-string is refused.
    assert parse_request('{"type":"subscribe","channels":["a.b"],"delta":"xdelta"}').delta == "xdelta"
    with pytest.raises(RequestError) as exc:
        parse_request('{"type":"subscribe","channels":["a.b"],"delta":true}')
    assert exc.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(("a", "b", "both"), [
    (">", "odin.token.x.update", True), ("odin.token.*.update", "odin.token.x.update", True),
    ("odin.token.*.update", "odin.global.>", False), ("odin.*.x", "odin.token.*", True),
    ("a.b", "a.b.c", False), ("a.>", "a", False), ("a.*", "a.>", True), ("*.b", "a.*", True),
])
def test_patterns_overlap(a, b, both):
    assert overlaps(a, b) is both and overlaps(b, a) is both
