"""WS_MAX_CONCURRENT_CATCHUPS: history fetches from JetStream run at most N at
once; a resume that cannot get a slot within WS_CATCHUP_WAIT gives the fetch up
and completes with ``complete:false`` (the client must reload state), while the
fetch holding the slot completes whole. The slow broker is real: nats-server
is stopped (SIGSTOP) while the first fetch waits for it."""

from __future__ import annotations

import json
import signal
import time

from fanout.publisher import Publisher
from tests.jetstream.test_node import start_node
from tests.server.support import connect

CH = "odin.token.limit.update"


def _health(node) -> dict:
    return json.loads(node.http("GET", "/health")[2])


async def test_second_resume_gives_up_waiting_for_a_fetch_slot(nats_server):
    node = start_node(nats_server.url, "catchuplimit", WS_HISTORY_SIZE=0, WS_MAX_CONCURRENT_CATCHUPS=1,
                      WS_CATCHUP_WAIT="0.3s")
    try:
        async with Publisher(servers=[nats_server.url], timeout=10) as pub:
            seqs = [await pub.publish(CH, json.dumps(i).encode()) for i in range(5)]
        deadline = time.monotonic() + 10
        while _health(node)["last_stream_seq"] < seqs[-1] and time.monotonic() < deadline:
            time.sleep(0.02)
        async with connect(node) as first, connect(node) as second:
            nats_server.proc.send_signal(signal.SIGSTOP)       # the broker stops answering
            try:
                await first.send({"type": "resume", "channels": [CH], "after": 0, "id": "first"})
                deadline = time.monotonic() + 5
                while _health(node)["guard"]["history_fetches"] < 1:
                    assert time.monotonic() < deadline, "the first fetch never started"
                    time.sleep(0.02)
                r = await second.request({"type": "resume", "channels": [CH], "after": 0, "id": "second"})
                assert (r["type"], r["id"], r["complete"]) == ("resumed", "second", False), r
            finally:
                nats_server.proc.send_signal(signal.SIGCONT)
            frames, r = await first.recv_until(lambda f: f["type"] == "resumed", timeout=15)
            assert r["complete"] is True
            assert [f["stream_seq"] for f in frames] == seqs
        assert node.metric("fanout_catchup_wait_timeouts_total") == 1
    finally:
        node.stop()
