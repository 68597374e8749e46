"""Subjects from NATS that are not valid channels never reach a client (real nats-server, real node).

NATS accepts ``"`` and ``\\`` in subjects and the stream's ``odin.token.>``
matches them; the node pastes the subject into JSON. Such a message must be
acked, dropped, counted and logged (rate-limited), live and in history.
"""

from __future__ import annotations

import json

import websockets

from fanout.brokers.jetstream.consumer import SubjectGuard, parse_ack
from tests.helpers.node import NodeProcess

from .support import RecordingSink, nats_conn, running_broker, wait_until
from .test_node import recv_json, subscribe

BAD = ['odin.token.a"b.update', "odin.token.a\\b.update", "odin.token.\u00e9.update"]


def test_parse_ack_both_forms_and_junk():
    assert parse_ack("$JS.ACK.T.c.1.5.7.1700000000000000000.3") == (1, 5, 7, 1700000000000000000, 3)
    assert parse_ack("$JS.ACK.dom.hash.T.c.2.9.11.1700000000000000000.0.tok") == (2, 9, 11, 1700000000000000000, 0)
    assert parse_ack("$JS.ACK.T.c.x.5.7.1.3") is None and parse_ack("$JS.ACK.T") is None


def test_guard_counts_every_bad_subject_and_logs_rate_limited(caplog):
    events: list[tuple[str, dict]] = []
    guard = SubjectGuard(lambda e, **f: events.append((e, f)), "T")
    with caplog.at_level("WARNING", logger="fanout.jetstream"):
        assert guard.ok("odin.token.a.update", 1)
        for i in range(100):
            assert not guard.ok(BAD[i % len(BAD)], i)
    assert guard.rejected == 100 and len(events) == 100
    assert all(e == ("ingest_rejected", {"reason": "bad_subject", "n": 1}) for e in events)
    assert len([r for r in caplog.records if "invalid subject" in r.getMessage()]) == 1


async def test_bad_subjects_are_acked_and_dropped_by_the_broker(nats_server, make_cfg):
    events: list[str] = []
    sink = RecordingSink()
    async with nats_conn(nats_server.url) as nc:
        async with running_broker(make_cfg(nats_server.url), sink, hook=lambda e, **f: events.append(e)) as broker:
            js = nc.jetstream()
            for s in ("odin.token.ok.update", *BAD, "odin.token.ok2.update"):
                await js.publish(s, b"{}")
            await sink.wait_count(2)
            assert [m.subject for m in sink.messages] == ["odin.token.ok.update", "odin.token.ok2.update"]
            assert sink.seqs == [1, 5] and events.count("ingest_rejected") == len(BAD)
            # History (resume, gap fill) leaves them out too.
            hist = await broker.history(["odin.token.>"], 0, 5)
            assert [m.stream_seq for m in hist.messages] == [1, 5] and hist.complete
            # All acked: nothing is redelivered.
            ci = await js.consumer_info("T", broker.consumer)
            await wait_until(lambda: broker.status()["ingest_rejected"] >= len(BAD))
            assert ci.num_ack_pending == 0 and ci.ack_floor.stream_seq == 5


async def test_subscribers_get_only_valid_json_and_the_bad_message_is_counted(nats_server):
    n = NodeProcess({"NATS_URL": nats_server.url, "JS_STREAM_NAME": "T", "FANOUT_NODE_ID": "g"}).start()
    try:
        async with websockets.connect(n.ws_url) as ws, nats_conn(nats_server.url) as nc:
            await subscribe(ws, ["odin.token.>"])
            js = nc.jetstream()
            await js.publish("odin.token.a.update", b'{"i":1}')
            for s in BAD:
                await js.publish(s, b'{"i":"bad"}')
            await js.publish("odin.token.b.update", b'{"i":2}')
            frames = [await ws.recv() for _ in range(2)]
            got = [json.loads(f) for f in frames]  # each one parses: valid JSON
            assert [(m["channel"], m["data"]["i"]) for m in got] == [("odin.token.a.update", 1),
                                                                      ("odin.token.b.update", 2)]
            assert [m["seq"] for m in got] == [1, 2]  # no seq was spent on the dropped ones
            # A resume from the start gets the same two, nothing else.
            await ws.send(json.dumps({"type": "resume", "channels": ["odin.token.>"], "after": 0,
                                      "epoch": got[0].get("epoch") or (await _epoch(n))}))
            replies = []
            while not replies or replies[-1].get("type") != "resumed":
                replies.append(await recv_json(ws))
            assert all(r.get("data", {}).get("i") != "bad" for r in replies)
        assert n.metric("fanout_ingest_rejected_total", 'reason="bad_subject"') == len(BAD)
        warned = [ln for ln in n.lines if ln.get("msg", "").startswith("message with an invalid subject")]
        assert len(warned) == 1 and warned[0]["subject"] == BAD[0]
        _, _, body = n.http("GET", "/health")
        assert json.loads(body)["ingest_rejected"] == len(BAD)
    finally:
        n.stop()


async def _epoch(n: NodeProcess) -> str:
    _, _, body = n.http("GET", "/health")
    return json.loads(body)["epoch"]
