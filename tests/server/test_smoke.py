"""Happy path through a real node: subscribe, publish over HTTP, receive in order."""

import json

import websockets


async def test_subscribe_publish_receive(node):
    async with websockets.connect(node.ws_url) as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": ["odin.token.abc.update"], "id": 7}))
        sub = json.loads(await ws.recv())
        assert sub["type"] == "subscribed" and sub["id"] == 7 and sub["channels"] == ["odin.token.abc.update"]
        assert sub["epoch"]
        seqs = [node.publish("odin.token.abc.update", {"i": i}) for i in range(5)]
        got = [json.loads(await ws.recv()) for _ in range(5)]
        assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
        assert [m["stream_seq"] for m in got] == seqs
        assert [m["data"] for m in got] == [{"i": i} for i in range(5)]
        assert all(m["channel"] == "odin.token.abc.update" and m["type"] == "message" for m in got)
