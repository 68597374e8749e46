"""The gap fill when the stream cannot be read for a while: after a failover
the stream may be electing its leader, and its reads time out for seconds.
Real nats-server and broker; deliveries are lost on the wire with a proxy (as
in test_faults), and the broker's stream reads are made to fail as told."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fanout.brokers.jetstream import JetStreamBroker, consumer_name
from fanout.brokers.jetstream import consumer as consumer_mod

from .support import HookRecorder, RecordingSink, TcpProxy, nats_conn, publish_retrying, running_broker, wait_until

SUBJECT = "odin.token.a.update"


def failing_reads(broker: JetStreamBroker, fail: int | None) -> dict[str, int]:
    """The broker's stream reads raise TimeoutError ``fail`` times (None: until ``state["fail"]`` is changed)."""
    reader = broker._reader
    real = reader.read_range
    state = {"calls": 0, "fail": 10**9 if fail is None else fail}

    async def read_range(patterns: list[str] | None, after: int, upto: int) -> Any:
        state["calls"] += 1
        if state["calls"] <= state["fail"]:
            raise TimeoutError("nats: timeout")
        return await real(patterns, after, upto)

    reader.read_range = read_range  # type: ignore[method-assign]
    return state


@dataclass
class Lossy:
    js: Any
    sink: RecordingSink
    hook: HookRecorder
    reads: dict[str, int]      # failing_reads' state

    async def publish(self, start: int, stop: int) -> None:
        for i in range(start, stop):
            await publish_retrying(self.js, SUBJECT, b"%d" % i, f"m{i}")

    def setups(self) -> int:
        """Times the broker was ready: its first set-up, each reconnect and each set-up again."""
        return sum(1 for e, f in self.hook.events if e == "ready" and f.get("ready"))


@contextlib.asynccontextmanager
async def lossy_broker(nats_server: Any, make_cfg: Any, fail: int | None) -> AsyncIterator[Lossy]:
    """A broker behind a proxy, its stream reads failing as :func:`failing_reads` is told:
    messages 0..99 delivered, then 100..149 sent by the server into a held link, which is cut."""
    proxy = await TcpProxy(nats_server.port).start()
    sink, hook = RecordingSink(), HookRecorder()
    cfg = make_cfg(proxy.url)
    try:
        async with running_broker(cfg, sink, hook=hook, reconnect_time_wait=0.1) as broker, \
                nats_conn(nats_server.url) as nc:
            js = nc.jetstream()
            lossy = Lossy(js, sink, hook, failing_reads(broker, fail))
            for i in range(100):
                await js.publish(SUBJECT, b"%d" % i)
            await sink.wait_count(100)
            proxy.hold()
            for i in range(100, 150):
                await js.publish(SUBJECT, b"%d" % i)

            async def delivered() -> bool:
                ci = await js.consumer_info("T", consumer_name(cfg))
                return ci.delivered.stream_seq == 150

            await wait_until(delivered, timeout=5, what="the server to deliver into the proxy")
            proxy.cut()
            yield lossy
    finally:
        await proxy.close()


def assert_exactly_once_in_order(sink: RecordingSink, n: int) -> None:
    assert sink.duplicates == 0
    assert [int(m.payload) for m in sink.messages] == list(range(n))


async def test_a_gap_fill_that_fails_for_a_while_is_retried_and_loses_nothing(nats_server, make_cfg, monkeypatch):
    monkeypatch.setattr(consumer_mod, "GAP_RETRY_MIN", 0.05)
    async with lossy_broker(nats_server, make_cfg, 3) as b:
        t = time.monotonic()
        await b.publish(150, 200)
        await b.sink.wait_count(200, timeout=15)
        took = time.monotonic() - t
    assert_exactly_once_in_order(b.sink, 200)
    assert b.reads["calls"] >= 4                  # three failures, then the read that filled the gap
    assert b.hook.total("gap_filled") >= 50
    assert took < 10                              # not after the consumer's 30 s ack wait
    assert sum(1 for e, f in b.hook.events if e == "error" and f.get("kind") == "gap") >= 3


async def test_a_gap_fill_that_keeps_failing_sets_the_consumer_up_again_and_loses_nothing(
        nats_server, make_cfg, monkeypatch):
    # Past GAP_RETRY_FOR the broker sets the consumer up again; the message that
    # found the gap was neither dispatched nor acked, and once reads work again
    # the next delivery finds the same gap and fills it.
    monkeypatch.setattr(consumer_mod, "GAP_RETRY_MIN", 0.05)
    monkeypatch.setattr(consumer_mod, "GAP_RETRY_FOR", 0.3)
    async with lossy_broker(nats_server, make_cfg, None) as b:
        before = b.setups()
        await b.publish(150, 160)
        await wait_until(lambda: b.setups() > before + 1, timeout=10, what="the consumer set up again")
        assert len(b.sink.messages) == 100        # nothing past the gap while it cannot be filled
        b.reads["fail"] = 0                       # the stream can be read again
        await b.publish(160, 200)
        await b.sink.wait_count(200, timeout=15)
    assert_exactly_once_in_order(b.sink, 200)
