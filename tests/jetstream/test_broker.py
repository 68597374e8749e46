"""JetStreamBroker against a real nats-server: stream, consumption, history, epoch, rate."""

from __future__ import annotations

import time

import pytest
from nats.js import api

from fanout.brokers.base import PRIORITIES, UNSET_PRIORITY
from fanout.brokers.jetstream import JetStreamBroker, StreamConfigConflict, consumer_name

from .support import HookRecorder, RecordingSink, nats_conn, running_broker, wait_until

pytestmark = pytest.mark.asyncio


async def test_stream_created_with_config(nats_server, make_cfg):
    cfg = make_cfg(nats_server.url, JS_STREAM_MAX_AGE="45s", JS_STREAM_MAX_MSGS=1234,
                   JS_STREAM_MAX_BYTES=987654, JS_STREAM_STORAGE="memory")
    sink = RecordingSink()
    async with running_broker(cfg, sink) as broker:
        assert broker.ready
        assert broker.epoch and sink.epochs == [broker.epoch]
        async with nats_conn(nats_server.url) as nc:
            info = await nc.jetstream().stream_info("T")
            ci = await nc.jetstream().consumer_info("T", "ws-server-node1")
        c = info.config
        assert sorted(c.subjects) == ["odin.global.>", "odin.token.>"]
        assert c.max_age == pytest.approx(45.0)
        assert (c.max_msgs, c.max_bytes) == (1234, 987654)
        assert c.storage == api.StorageType.MEMORY and c.num_replicas == 1
        assert ci.config.ack_policy == api.AckPolicy.EXPLICIT
        assert ci.config.inactive_threshold == pytest.approx(300.0)
        st = broker.status()
        assert st["connected"] and st["stream"] == "T" and st["consumer"] == "ws-server-node1"
        assert st["server"] == nats_server.url


async def test_existing_stream_is_updated(nats_server, make_cfg):
    async with nats_conn(nats_server.url) as nc:
        await nc.jetstream().add_stream(name="T", subjects=["odin.token.>"], max_msgs=10, max_age=60)
        cfg = make_cfg(nats_server.url, JS_STREAM_MAX_MSGS=500, JS_STREAM_MAX_AGE="30s")
        async with running_broker(cfg):
            c = (await nc.jetstream().stream_info("T")).config
        assert c.max_msgs == 500 and c.max_age == pytest.approx(30.0)
        assert sorted(c.subjects) == ["odin.global.>", "odin.token.>"]


async def test_conflicting_storage_names_the_field(nats_server, make_cfg):
    async with nats_conn(nats_server.url) as nc:
        await nc.jetstream().add_stream(name="T", subjects=["odin.token.>", "odin.global.>"],
                                        storage=api.StorageType.MEMORY)
    broker = JetStreamBroker(make_cfg(nats_server.url, JS_STREAM_STORAGE="file"))
    with pytest.raises(StreamConfigConflict, match="JS_STREAM_STORAGE") as err:
        await broker.start(RecordingSink())
    assert "storage" in str(err.value)
    assert not broker.ready


async def test_replicas_refused_on_single_server_names_the_field(nats_server, make_cfg):
    async with nats_conn(nats_server.url) as nc:
        await nc.jetstream().add_stream(name="T", subjects=["odin.token.>", "odin.global.>"])
    broker = JetStreamBroker(make_cfg(nats_server.url, JS_STREAM_REPLICAS=3))
    with pytest.raises(StreamConfigConflict, match="JS_STREAM_REPLICAS") as err:
        await broker.start(RecordingSink())
    # The fields NATS can change were changed; only the refused one is named.
    assert "JS_STREAM_MAX_AGE" not in str(err.value)
    async with nats_conn(nats_server.url) as nc:
        c = (await nc.jetstream().stream_info("T")).config
    assert c.max_msgs == 100000 and c.num_replicas == 1


async def test_manage_false_uses_existing_stream_as_is(nats_server, make_cfg):
    async with nats_conn(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["odin.token.>"], storage=api.StorageType.MEMORY, max_msgs=77)
        sink = RecordingSink()
        cfg = make_cfg(nats_server.url, JS_STREAM_MANAGE="false", JS_STREAM_STORAGE="file")
        async with running_broker(cfg, sink) as broker:
            assert broker.ready
            await js.publish("odin.token.a.update", b"1")
            await sink.wait_count(1)
            c = (await js.stream_info("T")).config
        assert c.storage == api.StorageType.MEMORY and c.max_msgs == 77 and c.subjects == ["odin.token.>"]


async def test_consumes_everything_in_order_with_priorities(nats_server, make_cfg):
    hook = HookRecorder()
    sink = RecordingSink()
    async with running_broker(make_cfg(nats_server.url), sink, hook=hook) as broker:
        async with nats_conn(nats_server.url) as nc:
            js = nc.jetstream()
            for i in range(300):
                prio = ["low", "medium", "high", "critical"][i % 4]
                await js.publish_async(f"odin.token.t{i % 7}.update", b'{"i":%d}' % i,
                                       headers={"Fanout-Priority": prio})
            await js.publish_async_completed()
            await js.publish("odin.global.trending", b"no header")
            seq = await broker.publish("odin.token.x.update", b"via broker", PRIORITIES["critical"], "id-1")
            assert seq == 302
            assert await broker.publish("odin.token.x.update", b"again", msg_id="id-1") == 302  # deduped
            await sink.wait_count(302)
            ci = await js.consumer_info("T", "ws-server-node1")
            await wait_until(lambda: hook.total("acked") >= 302, what="acks reported")
        assert sink.seqs == list(range(1, 303))
        assert sink.duplicates == 0
        for i, m in enumerate(sink.messages[:300]):
            assert m.subject == f"odin.token.t{i % 7}.update" and m.payload == b'{"i":%d}' % i
            assert m.priority == i % 4
            assert abs(m.ts_ms - time.time() * 1000) < 60_000
        assert sink.messages[300].priority == UNSET_PRIORITY  # no header: the hub's WS_PRIORITY_RULES decide
        assert sink.messages[301].payload == b"via broker" and sink.messages[301].priority == 3
    assert hook.total("fetched") >= 302 and "connected" in hook.names() and "duplicate" in hook.names()
    assert ci.num_ack_pending == 0 or ci.ack_floor.stream_seq >= 290


async def test_two_nodes_each_receive_every_message(nats_server, make_cfg):
    a, b = RecordingSink(), RecordingSink()
    async with running_broker(make_cfg(nats_server.url, FANOUT_NODE_ID="node-a"), a), \
            running_broker(make_cfg(nats_server.url, FANOUT_NODE_ID="node-b.example.com"), b) as bb:
        assert bb.consumer == "ws-server-node-b_example_com"
        async with nats_conn(nats_server.url) as nc:
            js = nc.jetstream()
            for i in range(200):
                await js.publish_async(f"odin.token.t{i % 5}.update", b"%d" % i)
            await js.publish_async_completed()
        await a.wait_count(200)
        await b.wait_count(200)
    assert a.seqs == b.seqs == list(range(1, 201))


async def test_restart_resumes_from_ack_floor(nats_server, make_cfg):
    cfg = make_cfg(nats_server.url)
    async with nats_conn(nats_server.url) as nc:
        js = nc.jetstream()
        first = RecordingSink()
        async with running_broker(cfg, first):
            for i in range(100):
                await js.publish_async("odin.token.a.update", b"%d" % i)
            await js.publish_async_completed()
            await first.wait_count(100)
        ci = await js.consumer_info("T", consumer_name(cfg))
        assert ci.ack_floor.stream_seq == 100
        for i in range(100, 150):
            await js.publish("odin.token.a.update", b"%d" % i)
        second = RecordingSink()  # a fresh hub: its dedupe floor is 0
        async with running_broker(cfg, second):
            await second.wait_count(50)
            for i in range(150, 160):
                await js.publish("odin.token.a.update", b"%d" % i)
            await second.wait_count(60)
        assert second.seqs == list(range(101, 161))
        assert [m.payload for m in second.messages] == [b"%d" % i for i in range(100, 160)]


async def test_restart_with_unacked_deliveries_loses_nothing(nats_server, make_cfg):
    """Deliveries that never got acked (node died mid-batch) come first, in order, on restart."""
    cfg = make_cfg(nats_server.url)
    async with nats_conn(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["odin.token.>", "odin.global.>"])
        for i in range(40):
            await js.publish("odin.token.a.update", b"%d" % i)
        # A crashed node: its durable got 40 deliveries and acked the first 10.
        await js.add_consumer("T", api.ConsumerConfig(durable_name=consumer_name(cfg),
                                                      ack_policy=api.AckPolicy.EXPLICIT))
        psub = await js.pull_subscribe_bind(consumer_name(cfg), stream="T")
        msgs = await psub.fetch(40, timeout=2)
        assert len(msgs) == 40
        for m in msgs[:10]:
            await m.ack()
        await nc.flush()
        await psub.unsubscribe()
        for i in range(40, 50):
            await js.publish("odin.token.a.update", b"%d" % i)
        sink = RecordingSink()
        async with running_broker(cfg, sink):
            await sink.wait_count(40, timeout=10)
        assert sink.seqs == list(range(11, 51))


async def test_history_with_wildcards(nats_server, make_cfg):
    subjects = ["odin.token.a.update", "odin.token.b.update", "odin.global.trending", "odin.token.a.trade"]
    sink = RecordingSink()
    async with running_broker(make_cfg(nats_server.url), sink) as broker:
        for i in range(400):
            await broker.publish(subjects[i % 4], b"%d" % i)
        await sink.wait_count(400)

        h = await broker.history(["odin.token.*.update", "odin.global.>"], 100, 300)
        assert h.complete
        want = [m for m in sink.messages if 100 < m.stream_seq <= 300 and not m.subject.endswith("trade")]
        assert [(m.stream_seq, m.subject, m.payload) for m in h.messages] == \
            [(m.stream_seq, m.subject, m.payload) for m in want]

        h = await broker.history(["odin.token.a.*"], 0, 400)  # from the start
        assert h.complete and [m.stream_seq for m in h.messages] == [s for s in range(1, 401) if s % 4 in (1, 0)]

        # Overlapping patterns: each message once, in order.
        h = await broker.history(["odin.>", "odin.token.>", "odin.token.a.update"], 390, 400)
        assert [m.stream_seq for m in h.messages] == list(range(391, 401))
        # Patterns that only partly overlap (NATS refuses them together): filtered here.
        h = await broker.history(["odin.token.a.*", "odin.token.*.update"], 0, 12)
        assert [m.subject for m in h.messages] == [subjects[(s - 1) % 4] for s in range(1, 13)
                                                   if (s - 1) % 4 in (0, 1, 3)]
        # Nothing in the stream matches; an empty range.
        assert (await broker.history(["other.>"], 0, 400)).messages == []
        assert (await broker.history(["odin.>"], 400, 400)).messages == []


async def test_history_thousands_of_messages_is_fast(nats_server, make_cfg):
    sink = RecordingSink()
    async with running_broker(make_cfg(nats_server.url), sink) as broker:
        async with nats_conn(nats_server.url) as nc:
            js = nc.jetstream()
            for i in range(5000):
                await js.publish_async(f"odin.token.t{i % 10}.update", b"x" * 50)
            await js.publish_async_completed()
        await sink.wait_count(5000, timeout=20)
        t = time.perf_counter()
        h = await broker.history(["odin.token.>"], 1000, 5000)
        took = time.perf_counter() - t
        assert [m.stream_seq for m in h.messages] == list(range(1001, 5001)) and h.complete
        assert took < 2.0, took


async def test_retention_expired_history_is_incomplete(nats_server, make_cfg):
    sink = RecordingSink()
    async with running_broker(make_cfg(nats_server.url, JS_STREAM_MAX_AGE="1s"), sink) as broker:
        for i in range(5):
            await broker.publish("odin.token.a.update", b"%d" % i)
        await sink.wait_count(5)
        async with nats_conn(nats_server.url) as nc:
            js = nc.jetstream()

            async def expired() -> bool:
                return (await js.stream_info("T")).state.first_seq > 5

            await wait_until(expired, timeout=15, interval=0.1, what="messages to expire")
        for i in range(5, 8):
            await broker.publish("odin.token.a.update", b"%d" % i)
        await sink.wait_count(8)
        h = await broker.history(["odin.token.>"], 2, 8)
        assert not h.complete and [m.stream_seq for m in h.messages] == [6, 7, 8]
        h = await broker.history(["odin.token.>"], 5, 8)
        assert h.complete and [m.stream_seq for m in h.messages] == [6, 7, 8]
        assert not (await broker.history(["odin.token.>"], 0, 8)).complete


async def test_epoch_changes_when_stream_recreated(nats_server, make_cfg):
    sink = RecordingSink()
    async with running_broker(make_cfg(nats_server.url), sink) as broker:
        for i in range(20):
            await broker.publish("odin.token.a.update", b"old%d" % i)
        await sink.wait_count(20)
        first = broker.epoch
        async with nats_conn(nats_server.url) as nc:
            js = nc.jetstream()
            await js.delete_stream("T")
            # The broker notices (its consumer went with the stream) and, as
            # it manages the stream, creates it again: a new incarnation.
            await sink.wait_for(lambda: len(sink.epochs) == 2, timeout=15, what="new epoch")
            assert await broker.wait_ready(10)
            for i in range(5):
                await js.publish("odin.token.a.update", b"new%d" % i)
        await sink.wait_count(25)
        assert broker.epoch != first and sink.epochs == [first, broker.epoch]
        assert sink.seqs[20:] == [1, 2, 3, 4, 5]
        assert [m.payload for m in sink.messages[20:]] == [b"new%d" % i for i in range(5)]


async def test_max_nats_rate_holds(nats_server, make_cfg):
    async with nats_conn(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["odin.token.>", "odin.global.>"])
        for i in range(300):
            await js.publish_async("odin.token.a.update", b"%d" % i)
        await js.publish_async_completed()
    sink = RecordingSink()
    hook = HookRecorder()
    t = time.monotonic()
    async with running_broker(make_cfg(nats_server.url, WS_MAX_NATS_RATE=200), sink, hook=hook):
        await sink.wait_count(300, timeout=10)
        took = time.monotonic() - t
    assert 1.2 <= took < 4.0, took
    assert sink.seqs == list(range(1, 301))
    assert "rate_wait" in hook.names()
