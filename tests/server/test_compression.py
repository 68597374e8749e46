"""permessage-deflate (RFC 7692): negotiated per client, each message
compressed once per window size however many clients get it, and plain
frames for clients that did not negotiate it."""

from __future__ import annotations

import base64
import os
from contextlib import AsyncExitStack

import pytest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from tests.server.support import RawClient, connect

SUBJECT = "odin.token.zip.update"
PAYLOADS = [
    {"small": 1},
    {"text": "compressible " * 5000},
    {"noise": base64.b64encode(os.urandom(60000)).decode()},
    {"unicode": "żółć 🙂 " * 200},
]


def _extensions(c) -> str:
    return c.ws.response.headers.get("Sec-WebSocket-Extensions", "")


async def test_deflate_clients_decode_every_frame_and_each_message_is_compressed_once(shared_node):
    before = shared_node.metric("fanout_compressions_total")
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(shared_node, max_size=2**20)) for _ in range(5)]
        for c in clients:
            assert _extensions(c).startswith("permessage-deflate"), _extensions(c)
            await c.subscribe(SUBJECT)
        for p in PAYLOADS:
            shared_node.publish(SUBJECT, p)
        for c in clients:
            got = await c.messages(len(PAYLOADS))
            assert [m["data"] for m in got] == PAYLOADS
            assert [m["seq"] for m in got] == [1, 2, 3, 4]    # each client's own prefix
    assert shared_node.metric("fanout_compressions_total") - before == len(PAYLOADS)


async def test_plain_client_gets_uncompressed_frames(shared_node):
    before = shared_node.metric("fanout_compressions_total")
    async with connect(shared_node, compression=None, max_size=2**20) as c:
        assert _extensions(c) == ""
        await c.subscribe(SUBJECT)
        raw = await RawClient.connect(shared_node.ws_port)     # asserts RSV1 is never set
        try:
            raw.send_text({"type": "subscribe", "channels": [SUBJECT]})
            assert (await raw.read_json())["type"] == "subscribed"
            for p in PAYLOADS:
                shared_node.publish(SUBJECT, p)
            assert [m["data"] for m in await c.messages(len(PAYLOADS))] == PAYLOADS
            assert [(await raw.read_json())["data"] for _ in PAYLOADS] == PAYLOADS
        finally:
            raw.close()
    assert shared_node.metric("fanout_compressions_total") == before   # nobody needed it


async def test_deflate_and_plain_clients_on_one_subject(shared_node):
    async with connect(shared_node, max_size=2**20) as z, connect(shared_node, compression=None, max_size=2**20) as p:
        await z.subscribe(SUBJECT)
        await p.subscribe(SUBJECT)
        for pl in PAYLOADS:
            shared_node.publish(SUBJECT, pl)
        a = await z.messages(len(PAYLOADS))
        b = await p.messages(len(PAYLOADS))
        assert a == b and [m["data"] for m in a] == PAYLOADS


@pytest.mark.parametrize("bits", [9, 10, 12])
async def test_client_asking_for_a_smaller_server_window_decodes(shared_node, bits):
    before = shared_node.metric("fanout_compressions_total")
    small = connect(shared_node, max_size=2**20, extensions=[ClientPerMessageDeflateFactory(server_max_window_bits=bits)])
    async with small as s, connect(shared_node, max_size=2**20) as d:
        assert f"server_max_window_bits={bits}" in _extensions(s)
        await s.subscribe(SUBJECT)
        await d.subscribe(SUBJECT)
        for p in PAYLOADS:
            shared_node.publish(SUBJECT, p)
        assert [m["data"] for m in await s.messages(len(PAYLOADS))] == PAYLOADS
        assert [m["data"] for m in await d.messages(len(PAYLOADS))] == PAYLOADS
    # Once per message and window size.
    assert shared_node.metric("fanout_compressions_total") - before == 2 * len(PAYLOADS)


async def test_window_bits_the_server_cannot_honour_fall_back_to_plain(shared_node):
    # zlib has no raw deflate with an 8-bit window: the offer is declined, not broken.
    async with connect(shared_node, extensions=[ClientPerMessageDeflateFactory(server_max_window_bits=8)]) as c:
        await c.subscribe(SUBJECT)
        shared_node.publish(SUBJECT, PAYLOADS[1])
        (m,) = await c.messages(1)
        assert m["data"] == PAYLOADS[1]


async def test_compressed_client_frames_are_read(shared_node):
    async with connect(shared_node) as c:
        # websockets compresses what it sends when deflate is negotiated.
        r = await c.request({"type": "subscribe", "channels": [SUBJECT], "id": "x" * 2000})
        assert r["type"] == "subscribed" and r["id"] == "x" * 2000


async def test_replay_over_deflate_is_the_same_text(shared_node):
    async with connect(shared_node, max_size=2**20) as c:
        await c.subscribe(SUBJECT)
        for p in PAYLOADS:
            shared_node.publish(SUBJECT, p)
        first = [await c.recv_raw() for _ in PAYLOADS]
        await c.send({"type": "replay", "from_seq": 1, "to_seq": len(PAYLOADS)})
        again = [await c.recv_raw() for _ in PAYLOADS]
        assert again == first
        assert (await c.recv())["type"] == "replay_done"
