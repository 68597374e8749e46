"""Completeness per subject with JetStream (real nats-server, real node): a
resume is complete when none of *its* subjects lost a message after
``after``, however far the stream's retention moved; a subject that did lose
some is incomplete; a subject the node's memory still answers for costs no
read from the stream; and after a restart the node warms its memory from the
stream once, so resumes from before the restart read nothing themselves."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import websockets

from fanout.publisher import Publisher
from tests.jetstream.test_node import recv_json, start_node, subscribe
from tests.server.support import wait_metric

QUIET = "odin.token.quiet.update"
BUSY = "odin.token.busy.update"


async def publish(url: str, subject: str, n: int) -> list[int]:
    async with Publisher(servers=[url], timeout=10) as pub:
        return [await pub.publish(subject, json.dumps({"i": i}).encode()) for i in range(n)]


async def resume(url: str, channels: list[str], after: int, epoch: str) -> tuple[list[int], dict[str, Any]]:
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "resume", "channels": channels, "after": after, "epoch": epoch}))
        got: list[int] = []
        while True:
            m = await recv_json(ws)
            if m["type"] != "message":
                return got, m
            got.append(m["stream_seq"])


async def test_quiet_subject_resumes_complete_after_retention_passed_it_busy_one_does_not(nats_server):
    node = start_node(nats_server.url, "a", JS_STREAM_MAX_AGE="1s")
    try:
        async with websockets.connect(node.ws_url) as ws:
            epoch = (await subscribe(ws, [QUIET]))["epoch"]
            (q1,) = await publish(nats_server.url, QUIET, 1)
            assert (await recv_json(ws))["stream_seq"] == q1
        after = q1                                     # the client's position; then it is away
        await publish(nats_server.url, BUSY, 3)
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            for _ in range(100):                       # bounded: until retention dropped everything
                if (await js.stream_info("T")).state.messages == 0:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("retention never expired")
        finally:
            await nc.close()
        b4, b5 = await publish(nats_server.url, BUSY, 2)
        await wait_metric(node, "fanout_last_stream_seq", "", lambda v: v >= b5, timeout=10)
        # The stream and the node's memory both moved past ``after``: the old rule
        # (retention reaches back to after + 1) said incomplete for everyone.
        got, done = await resume(node.ws_url, [QUIET], after, epoch)
        assert (got, done["type"], done["complete"]) == ([], "resumed", True), done
        got, done = await resume(node.ws_url, [BUSY], after, epoch)
        assert (got, done["complete"]) == ([b4, b5], False), done   # it lost 3 messages after ``after``
        got, done = await resume(node.ws_url, [QUIET, BUSY], after, epoch)
        assert (got, done["complete"]) == ([b4, b5], False)
        got, done = await resume(node.ws_url, ["odin.token.*.update"], b4 - 1, epoch)
        assert (got, done["complete"]) == ([b4, b5], True)          # nothing lost after b4 - 1
        assert node.metric("fanout_resumes_total", 'complete="true"') == 2
    finally:
        node.stop()


async def test_a_subject_memory_still_answers_for_reads_nothing_from_the_stream(nats_server):
    node = start_node(nats_server.url, "b", WS_HISTORY_SIZE=10)
    try:
        async with websockets.connect(node.ws_url) as ws:
            sub = await subscribe(ws, [QUIET, BUSY])
        after, epoch = sub["stream_seq"], sub["epoch"]
        (q1,) = await publish(nats_server.url, QUIET, 1)
        busy = await publish(nats_server.url, BUSY, 30)    # memory (10) lost q1 and most of these
        await wait_metric(node, "fanout_last_stream_seq", "", lambda v: v >= busy[-1], timeout=10)
        got, done = await resume(node.ws_url, [QUIET], q1, epoch)
        assert (got, done["complete"]) == ([], True)
        assert node.metric("fanout_catchup_fetches_total") == 0      # no read from the stream
        # A subject whose messages memory lost reads only its missing part from the stream.
        got, done = await resume(node.ws_url, [QUIET, BUSY], after, epoch)
        assert (got, done["complete"]) == ([q1, *busy], True)
        assert node.metric("fanout_catchup_fetches_total") == 1
        assert node.metric("fanout_catchup_messages_total", 'source="stream"') == 1 + 20
        assert node.metric("fanout_catchup_messages_total", 'source="memory"') == 10
    finally:
        node.stop()


async def test_after_a_restart_resumes_from_before_it_come_from_warmed_memory(nats_server):
    node = start_node(nats_server.url, "c")
    try:
        async with websockets.connect(node.ws_url) as ws:
            epoch = (await subscribe(ws, [QUIET, BUSY]))["epoch"]
            before = await publish(nats_server.url, BUSY, 5)
            assert [(await recv_json(ws))["stream_seq"] for _ in before] == before
    finally:
        assert node.stop() == 0
    missed = await publish(nats_server.url, QUIET, 3)        # while the node is down
    node = start_node(nats_server.url, "c")
    try:
        await asyncio.to_thread(node.wait_log, lambda e: e.get("msg") == "JetStream resume memory warmed", 15)
        await wait_metric(node, "fanout_last_stream_seq", "", lambda v: v >= missed[-1], timeout=10)
        # A client that had seen only the first message before the restart: its resume
        # reaches back before this process's first message, yet reads nothing from the stream.
        got, done = await resume(node.ws_url, [QUIET, BUSY], before[0], epoch)
        assert (got, done["complete"]) == ([*before[1:], *missed], True)
        assert node.metric("fanout_catchup_fetches_total") == 0
    finally:
        node.stop()
