"""PROTOCOL.md's client table and data message format, against a real node.

Absence of a delivery is proven with a sentinel: messages leave in dispatch
order, so whatever did not arrive before a later marker was not sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from tests.server.support import apublish, connect, sentinel

SENTINEL = "odin.global.sentinel"


# ------------------------------------------------------------------ subscribe
@pytest.mark.parametrize("req_id", ["req-1", 42, 0])
async def test_subscribe_reply_lists_accepted_channels_epoch_and_echoes_id(shared_node, req_id):
    async with connect(shared_node) as c:
        r = await c.request({"type": "subscribe", "id": req_id,
                             "channels": ["odin.token.abc.update", "odin.token.*.update", "odin.global.>"]})
        assert r == {"type": "subscribed", "id": req_id,
                     "channels": ["odin.token.abc.update", "odin.token.*.update", "odin.global.>"],
                     "epoch": r["epoch"], "stream_seq": r["stream_seq"]}
        assert type(r["id"]) is type(req_id)
        _, _, body = shared_node.http("GET", "/health")
        assert r["epoch"] and r["epoch"] == json.loads(body)["epoch"]


async def test_reply_without_id_has_no_id(shared_node):
    async with connect(shared_node) as c:
        r = await c.request({"type": "subscribe", "channels": ["odin.token.noid.x"]})
        assert r["type"] == "subscribed" and "id" not in r


async def test_star_matches_exactly_one_token(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.*.star", SENTINEL)
        yes = [shared_node.publish("odin.token.a.star", {"n": 1})]
        shared_node.publish("odin.token.a.b.star", {"n": 2})     # two tokens where * takes one
        shared_node.publish("odin.token.a.other", {"n": 3})
        shared_node.publish("odin.token.star", {"n": 4})         # no token for *
        yes.append(shared_node.publish("odin.token.b.star", {"n": 5}))
        got = await sentinel(shared_node, c)
        assert [(m["channel"], m["stream_seq"]) for m in got] == [("odin.token.a.star", yes[0]),
                                                                  ("odin.token.b.star", yes[1])]


async def test_gt_matches_one_or_more_trailing_tokens(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.gt.>", SENTINEL)
        shared_node.publish("odin.token.gt", {"n": 0})           # > needs at least one token
        shared_node.publish("odin.token.other.x", {"n": 1})
        shared_node.publish("odin.token.gt.a", {"n": 2})
        shared_node.publish("odin.token.gt.a.b.c", {"n": 3})
        got = await sentinel(shared_node, c)
        assert [m["channel"] for m in got] == ["odin.token.gt.a", "odin.token.gt.a.b.c"]
        assert [m["data"] for m in got] == [{"n": 2}, {"n": 3}]


async def test_overlapping_patterns_deliver_once(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.ovl.update", "odin.token.*.update", "odin.token.>", "odin.token.ovl.*", SENTINEL)
        s = shared_node.publish("odin.token.ovl.update", {"once": True})
        got = await sentinel(shared_node, c)
        assert [(m["stream_seq"], m["seq"]) for m in got] == [(s, 1)]


async def test_subscribing_twice_is_idempotent(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.twice.x", SENTINEL)
        r = await c.subscribe("odin.token.twice.x", "odin.token.twice.x")
        assert r["channels"] == ["odin.token.twice.x"]
        shared_node.publish("odin.token.twice.x", "once")
        got = await sentinel(shared_node, c)
        assert [m["data"] for m in got] == ["once"]


# ---------------------------------------------------------------- unsubscribe
async def test_unsubscribe_stops_delivery(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.unsub.a", "odin.token.unsub.b", SENTINEL)
        shared_node.publish("odin.token.unsub.a", "1")
        (m,) = await c.messages(1)
        assert m["data"] == 1
        r = await c.request({"type": "unsubscribe", "channels": ["odin.token.unsub.a"], "id": "u1"})
        assert r == {"type": "unsubscribed", "id": "u1", "channels": ["odin.token.unsub.a"]}
        shared_node.publish("odin.token.unsub.a", "2")
        shared_node.publish("odin.token.unsub.b", "3")
        got = await sentinel(shared_node, c)
        assert [(m["channel"], m["data"], m["seq"]) for m in got] == [("odin.token.unsub.b", 3, 2)]


async def test_subscription_changes_apply_to_subjects_already_routed(shared_node):
    ch = "odin.token.route.x"
    got_a: list = []
    got_b: list = []

    async def control(c, kind: str, *channels: str, into: list) -> None:
        # Messages may come before the reply: keep them.
        await c.send({"type": kind, "channels": list(channels)})
        before, _ = await c.recv_until(lambda f: f["type"] == kind + "d")
        into += before

    async with connect(shared_node) as a, connect(shared_node) as b:
        await control(a, "subscribe", ch, SENTINEL, into=got_a)
        await control(b, "subscribe", SENTINEL, into=got_b)
        shared_node.publish(ch, "1")                               # the subject's recipients are now known
        await control(b, "subscribe", "odin.token.*.x", into=got_b)   # a wildcard added later
        shared_node.publish(ch, "2")
        await control(a, "unsubscribe", ch, into=got_a)
        shared_node.publish(ch, "3")
        await control(a, "subscribe", ch, into=got_a)              # and back
        shared_node.publish(ch, "4")
        got_a += await sentinel(shared_node, a)
        got_b += await sentinel(shared_node, b)
    assert [m["data"] for m in got_a if m.get("channel") == ch] == [1, 2, 4]
    assert [m["data"] for m in got_b if m.get("channel") == ch] == [2, 3, 4]


async def test_unsubscribe_one_of_overlapping_patterns_keeps_the_other(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.keep.x", "odin.token.keep.*", SENTINEL)
        await c.request({"type": "unsubscribe", "channels": ["odin.token.keep.x"]})
        shared_node.publish("odin.token.keep.x", "still")
        got = await sentinel(shared_node, c)
        assert [m["data"] for m in got] == ["still"]


async def test_unsubscribe_of_a_pattern_never_subscribed_is_answered(shared_node):
    async with connect(shared_node) as c:
        r = await c.request({"type": "unsubscribe", "channels": ["odin.token.never.x"], "id": 5})
        assert r["type"] == "unsubscribed" and r["id"] == 5
        await c.heartbeat()


# -------------------------------------------------------------- data messages
async def test_data_message_fields_seq_and_stream_seq(shared_node):
    ch = "odin.token.fmt.update"
    async with connect(shared_node) as a, connect(shared_node) as b:
        await a.subscribe(ch)
        before = time.time() * 1000
        first = [shared_node.publish(ch, {"i": i}) for i in range(3)]
        await b.subscribe(ch)
        second = [shared_node.publish(ch, {"i": i}) for i in range(3, 6)]
        after = time.time() * 1000
        got_a = await a.messages(6)
        got_b = await b.messages(3)
        for m in got_a + got_b:
            assert set(m) == {"seq", "type", "channel", "stream_seq", "ts", "data"}, m
            assert m["type"] == "message" and m["channel"] == ch
            assert isinstance(m["ts"], int) and before - 1 <= m["ts"] <= after + 1
        assert [m["seq"] for m in got_a] == [1, 2, 3, 4, 5, 6]
        assert [m["seq"] for m in got_b] == [1, 2, 3]          # per connection
        assert [m["stream_seq"] for m in got_a] == first + second
        assert [m["stream_seq"] for m in got_b] == second
        assert first + second == sorted(set(first + second))
        assert [m["data"] for m in got_a] == [{"i": i} for i in range(6)]


async def test_seq_key_comes_first_on_the_wire(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.wire.x")
        shared_node.publish("odin.token.wire.x", "{}")
        raw = await c.recv_raw()
        assert raw.startswith('{"seq":1,"type":"message",'), raw


@pytest.mark.parametrize("payload", [
    # JSON is embedded byte for byte: 2.50, the spaces and the raw UTF-8 survive.
    '{"b": [1, 2.50, "x"], "u": "\u00e9", "raw": "é"}'.encode(),
    b"42",
    b'"just a string"',
    b"[true,null]",
])
async def test_json_payload_is_embedded_verbatim(shared_node, payload):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.verbatim.x")
        shared_node.publish("odin.token.verbatim.x", payload)
        raw = await c.recv_raw()
        assert isinstance(raw, str)
        assert raw.endswith(',"data":' + payload.decode() + "}"), raw
        assert json.loads(raw)["data"] == json.loads(payload)


@pytest.mark.parametrize("payload", ["hello wörld", "{not json", "NaN", "", "1 2"])
async def test_non_json_utf8_payload_comes_as_a_json_string(shared_node, payload):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.text.x")
        status, _, body = shared_node.http("POST", "/publish/odin.token.text.x", payload.encode())
        assert status == 202, body
        (m,) = await c.messages(1)
        assert m["data"] == payload and "data_b64" not in m


async def test_non_utf8_payload_comes_as_data_b64(shared_node):
    payload = b"\xff\xfe\x00binary\x80"
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.bin.x")
        shared_node.publish("odin.token.bin.x", payload)
        (m,) = await c.messages(1)
        assert "data" not in m
        assert base64.b64decode(m["data_b64"]) == payload


@pytest.mark.parametrize("priority", ["low", "medium", "high", "critical", "CRITICAL"])
async def test_priority_header_is_accepted_and_delivered(shared_node, priority):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.prio.x")
        shared_node.publish("odin.token.prio.x", {"p": priority}, priority=priority)
        (m,) = await c.messages(1)
        assert m["data"] == {"p": priority}


async def test_bad_priority_is_refused_with_400(shared_node):
    before = shared_node.metric("fanout_publish_rejected_total", 'reason="bad_priority"')
    status, _, body = shared_node.http("POST", "/publish/odin.token.prio.x", b"{}", {"Fanout-Priority": "urgent"})
    assert status == 400
    reply = json.loads(body)
    assert reply["error"] == "bad_priority" and "urgent" in reply["message"]
    assert shared_node.metric("fanout_publish_rejected_total", 'reason="bad_priority"') == before + 1


# --------------------------------------------------------------------- replay
async def test_replay_resends_the_same_frames(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.replay.x")
        for i in range(5):
            shared_node.publish("odin.token.replay.x", {"i": i, "pad": "x" * i})
        first = [await c.recv_raw() for _ in range(5)]
        await c.send({"type": "replay", "from_seq": 2, "to_seq": 4, "id": "r"})
        again = [await c.recv_raw() for _ in range(3)]
        done = await c.recv()
        assert again == first[1:4]
        assert [json.loads(t)["seq"] for t in again] == [2, 3, 4]
        assert done == {"type": "replay_done", "id": "r", "from_seq": 2, "to_seq": 4, "missing": None}
        # A replay does not consume seqs: the next live message is 6.
        shared_node.publish("odin.token.replay.x", "next")
        (m,) = await c.messages(1)
        assert m["seq"] == 6


async def test_replay_of_seqs_never_sent_reports_nothing_sent(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.replay.none")
        shared_node.publish("odin.token.replay.none", "1")
        await c.messages(1)
        r = await c.request({"type": "replay", "from_seq": 5, "to_seq": 9})
        assert r["type"] == "replay_done" and (r["from_seq"], r["to_seq"]) == (5, 9)
        await c.heartbeat()


async def test_replay_up_to_the_largest_seq(shared_node):
    async with connect(shared_node) as c:
        await c.subscribe("odin.token.replay.big")
        shared_node.publish("odin.token.replay.big", "1")
        await c.messages(1)
        await c.send({"type": "replay", "from_seq": 1, "to_seq": 2**64 - 1})
        (m,) = await c.messages(1)
        r = await c.recv()
        assert m["seq"] == 1 and r["type"] == "replay_done" and r["to_seq"] == 2**64 - 1


async def test_replay_older_than_the_buffer_reports_missing(node_factory):
    node = node_factory(WS_REPLAY_BUFFER=5)
    async with connect(node) as c:
        await c.subscribe("odin.token.ring.x")
        for i in range(8):
            node.publish("odin.token.ring.x", {"i": i})
        first = [await c.recv_raw() for _ in range(8)]
        await c.send({"type": "replay", "from_seq": 1, "to_seq": 8})
        texts = [await c.recv_raw() for _ in range(5)]
        done = await c.recv()
        assert texts == first[3:]
        assert done == {"type": "replay_done", "from_seq": 1, "to_seq": 8, "missing": [1, 3]}
    assert node.metric("fanout_replays_total", 'result="partial"') == 1


# --------------------------------------------------------------------- resume
async def test_resume_delivers_after_then_live_without_gap_or_duplicate(shared_node):
    ch = "odin.token.resume.update"
    seqs = [shared_node.publish(ch, {"i": i}) for i in range(3)]
    after = seqs[0]
    started = asyncio.Event()

    async def publisher() -> None:
        for i in range(3, 40):
            seqs.append(await apublish(shared_node, ch, {"i": i}))
            if i == 8:
                started.set()

    async with connect(shared_node) as c:
        epoch = (await c.subscribe(SENTINEL))["epoch"]
        task = asyncio.create_task(publisher())
        await started.wait()        # resume while messages keep coming
        await c.send({"type": "resume", "channels": [ch], "after": after, "epoch": epoch, "id": 9})
        await task
        frames = await sentinel(shared_node, c)
    kinds = [f["type"] for f in frames]
    assert kinds.count("resumed") == 1, kinds
    cut = kinds.index("resumed")
    assert frames[cut] == {"type": "resumed", "id": 9, "channels": [ch], "epoch": epoch, "complete": True,
                           "stream_seq": frames[cut]["stream_seq"]}
    msgs = [f for f in frames if f["type"] == "message"]
    assert [m["stream_seq"] for m in msgs] == [s for s in seqs if s > after]
    assert [m["data"]["i"] for m in msgs] == list(range(1, 40))
    assert [m["seq"] for m in msgs] == list(range(1, len(msgs) + 1))
    assert cut >= 2   # at least what was published before the resume came first


async def test_resume_without_epoch_is_complete(shared_node):
    ch = "odin.token.resume.noepoch"
    seqs = [shared_node.publish(ch, str(i)) for i in range(3)]
    async with connect(shared_node) as c:
        await c.send({"type": "resume", "channels": [ch], "after": seqs[1]})
        (m,) = await c.messages(1)
        r = await c.recv()
        assert m["stream_seq"] == seqs[2] and m["seq"] == 1
        assert r["type"] == "resumed" and r["complete"] is True and r["channels"] == [ch]


async def test_resume_with_another_epoch_is_incomplete_and_then_live(shared_node):
    ch = "odin.token.resume.epoch"
    shared_node.publish(ch, "old")
    async with connect(shared_node) as c:
        await c.subscribe(SENTINEL)
        r = await c.request({"type": "resume", "channels": [ch], "after": 0, "epoch": "e-not-this-one"})
        assert r["type"] == "resumed" and r["complete"] is False
        assert r["channels"] == [ch] and r["epoch"] != "e-not-this-one"
        s = shared_node.publish(ch, "live")
        got = await sentinel(shared_node, c)
        assert [(m["stream_seq"], m["data"]) for m in got] == [(s, "live")]


async def test_resume_with_wildcards_delivers_matching_subjects_in_stream_order(shared_node):
    async with connect(shared_node) as c:
        after = shared_node.publish("odin.token.a.wres", "before")
        want = []
        for i in range(4):
            want.append(shared_node.publish("odin.token.a.wres", f"a{i}"))
            shared_node.publish("odin.token.a.other", f"x{i}")
            want.append(shared_node.publish("odin.token.b.wres", f"b{i}"))
        await c.send({"type": "resume", "channels": ["odin.token.*.wres"], "after": after})
        frames, r = await c.recv_until(lambda f: f["type"] == "resumed")
        assert r["complete"] is True and r["channels"] == ["odin.token.*.wres"]
        assert [f["stream_seq"] for f in frames] == want
        assert {f["channel"] for f in frames} == {"odin.token.a.wres", "odin.token.b.wres"}


async def test_resume_skips_what_a_live_subscription_already_delivered(shared_node):
    ch = "odin.token.resume.dup"
    async with connect(shared_node) as c:
        await c.subscribe(ch, SENTINEL)
        after = shared_node.publish(ch, "0")
        s1 = shared_node.publish(ch, "1")
        await c.messages(2)
        await c.send({"type": "resume", "channels": [ch], "after": after})
        frames = await sentinel(shared_node, c)
        assert [f["type"] for f in frames] == ["resumed"], (frames, s1)


async def test_resume_beyond_retention_is_incomplete(node_factory):
    node = node_factory(WS_HISTORY_SIZE=3)
    ch = "odin.token.short.x"
    seqs = [node.publish(ch, str(i)) for i in range(6)]
    async with connect(node) as c:
        # What is still retained is delivered, and complete:false says the rest is gone.
        await c.send({"type": "resume", "channels": [ch], "after": seqs[0]})
        frames, r = await c.recv_until(lambda f: f["type"] == "resumed")
        assert r["complete"] is False
        assert [f["stream_seq"] for f in frames] == seqs[3:]
        seqs.append(node.publish(ch, "live"))
        (m,) = await c.messages(1)
        assert m["data"] == "live"
    async with connect(node) as c:
        await c.send({"type": "resume", "channels": [ch], "after": seqs[3]})
        frames, r = await c.recv_until(lambda f: f["type"] == "resumed")
        assert r["complete"] is True
        assert [f["stream_seq"] for f in frames] == seqs[4:]   # the last three, "live" included
    assert node.metric("fanout_resumes_total", 'complete="false"') == 1
    assert node.metric("fanout_resumes_total", 'complete="true"') == 1


# ------------------------------------------------------------------ heartbeat
@pytest.mark.parametrize("req_id", [None, "hb", 7])
async def test_heartbeat_ack_has_server_time(shared_node, req_id):
    async with connect(shared_node) as c:
        before = int(time.time() * 1000)
        r = await c.request({"type": "heartbeat"} | ({"id": req_id} if req_id is not None else {}))
        after = int(time.time() * 1000)
        assert r["type"] == "heartbeat_ack" and before - 1 <= r["ts"] <= after + 1
        assert r.get("id") == req_id
