"""Connection limit: over WS_MAX_CONNECTIONS the handshake gets HTTP 503 with
Retry-After, and a freed slot is usable again."""

from __future__ import annotations

import pytest
from websockets.exceptions import InvalidStatus

from tests.server.support import RawClient, connect, wait_metric


async def test_over_the_connection_limit_gets_503_with_retry_after(node_factory):
    node = node_factory(WS_MAX_CONNECTIONS=2)
    async with connect(node) as a, connect(node) as b:
        await a.heartbeat()
        await b.heartbeat()
        assert node.metric("ws_connections") == 2
        for _ in range(3):
            with pytest.raises(InvalidStatus) as err:
                async with connect(node):
                    pass
            response = err.value.response
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) > 0
            assert b"connection limit" in response.body
        # The two that are in still work.
        await a.subscribe("odin.token.lim.x")
        node.publish("odin.token.lim.x", "still served")
        (m,) = await a.messages(1)
        assert m["data"] == "still served"
    assert node.metric("fanout_connections_rejected_total", 'reason="connection_limit"') == 3
    # Both slots are free again (the client's close returns after the server's).
    async with connect(node) as a, connect(node) as b:
        await a.heartbeat()
        await b.heartbeat()


async def test_slot_is_reused_after_a_disconnect(node_factory):
    node = node_factory(WS_MAX_CONNECTIONS=1)
    for i in range(5):
        async with connect(node) as c:
            # Nothing of the slot's previous owner: no replay ring...
            r = await c.request({"type": "replay", "from_seq": 1, "to_seq": 10})
            assert r["type"] == "replay_done", r
            # ...and no subscriptions: earlier clients' subjects do not arrive.
            await c.subscribe(f"odin.token.reuse{i}.x")
            for j in range(i):
                node.publish(f"odin.token.reuse{j}.x", {"old": j})
            node.publish(f"odin.token.reuse{i}.x", {"i": i})
            (m,) = await c.messages(1)
            assert m["seq"] == 1 and m["data"] == {"i": i}
    # A client that just drops its socket frees the slot too.
    raw = await RawClient.connect(node.ws_port)
    raw.writer.transport.abort()
    await wait_metric(node, "ws_connections", pred=lambda v: v == 0)   # the node logs nothing for this
    async with connect(node) as c:
        await c.heartbeat()
    assert node.metric("fanout_connections_accepted_total") == 7
    assert node.metric("fanout_connections_rejected_total", 'reason="connection_limit"') == 0


def test_connection_limit_above_the_file_limit_refuses_to_start():
    import subprocess
    import sys

    from tests.helpers.node import NodeProcess

    env = NodeProcess({"WS_MAX_CONNECTIONS": "1000000"}).env
    proc = subprocess.run([sys.executable, "-c",
                           "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096));"
                           "import sys; sys.argv=['fanout','serve']; from fanout.cli import main; main()"],
                          env=env, capture_output=True, timeout=20)
    assert proc.returncode != 0
    assert b"WS_MAX_CONNECTIONS=1000000" in proc.stderr and b"ulimit -n" in proc.stderr
