"""Paced catch-up with JetStream history: the node's memory holds only the last
few messages, so a resume reads most of its history from the stream, and a
reader with a 4 KiB receive buffer still gets all of it (ten times its queue
limit), then ``complete:true``, then live messages with no gap or duplicate."""

from __future__ import annotations

import json

from fanout.publisher import Publisher
from tests.jetstream.test_node import start_node
from tests.server.support import RawClient, wait_metric
from tests.server.test_catchup import PAYLOAD, QUEUE, read_until

CH = "odin.token.big.update"
N = 400


async def test_resume_from_jetstream_history_is_paced_and_complete(nats_server):
    node = start_node(nats_server.url, "catchup", WS_CLIENT_QUEUE_BYTES=QUEUE, WS_HISTORY_SIZE=10)
    try:
        raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
        raw.send_text({"type": "subscribe", "channels": [CH]})
        _, sub = await read_until(raw, "subscribed")
        raw.close()
        async with Publisher(servers=[nats_server.url], timeout=10) as pub:
            seqs = [await pub.publish(CH, PAYLOAD.encode()) for _ in range(N)]
        # Once the node has dispatched them all, its memory (the last 10) no
        # longer reaches back: the history has to come from the stream.
        await wait_metric(node, "fanout_last_stream_seq", "", lambda v: v >= seqs[-1], timeout=10)
        raw = await RawClient.connect(node.ws_port, rcvbuf=4096)
        try:
            raw.send_text({"type": "resume", "channels": [CH], "after": sub["stream_seq"], "epoch": sub["epoch"]})
            frames, done = await read_until(raw, "resumed")
            assert done["complete"] is True
            assert [f["stream_seq"] for f in frames] == seqs
            assert [f["seq"] for f in frames] == list(range(1, N + 1))
            async with Publisher(servers=[nats_server.url], timeout=10) as pub:
                live = await pub.publish(CH, json.dumps("live").encode())
            m = await raw.read_json(timeout=10)
            assert (m["stream_seq"], m["seq"], m["data"]) == (live, N + 1, "live")
        finally:
            raw.close()
        assert node.metric("fanout_connections_closed_total", 'code="1008"') == 0
        assert node.metric("fanout_catchup_messages_total", 'source="stream"') >= N - 10
    finally:
        node.stop()
