"""fanout.publisher against a real nats-server."""

from __future__ import annotations

import asyncio

import pytest

from fanout.publisher import Publisher, build_headers, priority_name, publish

from .support import nats_conn

SUBJECTS = ["odin.token.>", "odin.global.>"]


def test_headers_and_priority_names():
    assert build_headers("HIGH", None) == {"Fanout-Priority": "high"}
    assert build_headers(0, "abc") == {"Fanout-Priority": "low", "Nats-Msg-Id": "abc"}
    assert priority_name(3) == "critical"
    for bad in ("urgent", 7, True, None):
        with pytest.raises(ValueError):
            priority_name(bad)


@pytest.mark.asyncio
async def test_publisher_sets_headers_waits_for_ack_and_dedupes(nats_server):
    async with nats_conn(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=SUBJECTS)
        async with Publisher(nats_server.url, stream="T") as pub:
            assert await pub.publish("odin.token.abc.update", b'{"p":1}', priority="critical", msg_id="a1") == 1
            assert await pub.publish("odin.token.abc.update", b'{"p":1}', msg_id="a1") == 1  # duplicate
            assert await pub.publish("odin.global.trending", "text", priority="low") == 2
            with pytest.raises(ValueError, match="invalid subject"):
                await pub.publish("odin.token.*.update", b"x")
            with pytest.raises(ValueError, match="priority"):
                await pub.publish("odin.token.a.update", b"x", priority="urgent")
        m1 = await js.get_msg("T", 1)
        assert m1.data == b'{"p":1}' and m1.headers["Fanout-Priority"] == "critical"
        assert m1.headers["Nats-Msg-Id"] == "a1"
        m2 = await js.get_msg("T", 2)
        assert m2.subject == "odin.global.trending" and m2.headers["Fanout-Priority"] == "low"
        assert (await js.stream_info("T")).state.messages == 2


@pytest.mark.asyncio
async def test_one_off_publish(nats_server):
    async with nats_conn(nats_server.url) as nc:
        await nc.jetstream().add_stream(name="T", subjects=SUBJECTS)
    seq = await publish("odin.token.x.update", b"1", servers=f"{nats_server.url}", priority="medium")
    assert seq == 1


@pytest.mark.asyncio
async def test_unreachable_or_refused_fails_fast_with_the_reason(nats_server_factory):
    down = nats_server_factory(start=False)
    with pytest.raises(ConnectionError, match="cannot connect"):
        await publish("odin.token.x.update", b"1", servers=down.url, connect_wait=1.0)
    guarded = nats_server_factory(user="u", password="p")
    with pytest.raises(ConnectionError, match="Authorization Violation"):
        await publish("odin.token.x.update", b"1", servers=guarded.url, user="u", password="bad", connect_wait=1.0)


@pytest.mark.asyncio
async def test_from_config(nats_server, make_cfg):
    cfg = make_cfg(nats_server.url)
    async with nats_conn(nats_server.url) as nc:
        await nc.jetstream().add_stream(name="T", subjects=SUBJECTS)
        await nc.jetstream().add_stream(name="OTHER", subjects=["other.>"])
    async with Publisher.from_config(cfg) as pub:
        assert pub.stream == "T"
        assert await pub.publish("odin.token.a.update", b"x") == 1
        with pytest.raises(Exception):  # noqa: B017 - lands in another stream: refused
            await pub.publish("other.a", b"x")


@pytest.mark.asyncio
async def test_publish_waits_for_the_stream_to_appear(nats_server):
    """No responders (no stream leader yet, as in an election) is retried within the timeout."""
    async with nats_conn(nats_server.url) as nc, Publisher(nats_server.url, timeout=5.0) as pub:
        task = asyncio.create_task(pub.publish("odin.token.a.update", b"x", msg_id="late-1"))
        await asyncio.sleep(0.3)  # the publisher is retrying meanwhile
        assert not task.done()
        await nc.jetstream().add_stream(name="T", subjects=SUBJECTS)
        assert await asyncio.wait_for(task, 5) == 1
    with pytest.raises(Exception):  # noqa: B017 - no stream for it at all: fails after the timeout
        await publish("nothing.here", b"x", servers=nats_server.url, timeout=0.5)
