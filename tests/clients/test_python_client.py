"""fanout.client against a real node: delivery, gaps, reconnect + resume, callbacks.

Faults are injected at the edges: the client's TCP connection is aborted
(``transport.abort()``: no close frame, like a dropped network), live frames
are dropped in a subclass hook to make a seq gap, and reconnects are gated on
an event so messages can be published while the client is away.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from fanout.auth import sign
from fanout.client import AuthError, Client, SubscribeError, Tracker

CH = "odin.token.abc.update"
FAST = {"reconnect_min": 0.05, "reconnect_max": 0.5, "request_timeout": 5.0}


async def take(client: Client, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next n data messages (bounded by a timeout, not a sleep)."""
    async def run() -> list[dict[str, Any]]:
        return [await client.__anext__() for _ in range(n)]
    return await asyncio.wait_for(run(), timeout)


async def publish(node, n: int, start: int = 0, channel: str = CH) -> list[int]:
    return await asyncio.to_thread(lambda: [node.publish(channel, {"i": i}) for i in range(start, start + n)])


class GatedClient(Client):
    """Reconnects only when ``gate`` is set, so the test controls the outage."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gate = asyncio.Event()
        self.gate.set()
        self.opens = 0

    async def _open(self):  # type: ignore[override]
        self.opens += 1
        if self.opens > 1:
            await self.gate.wait()
        return await super()._open()

    def kill(self) -> None:
        """Drop the TCP connection with no close frame, like a lost network."""
        assert self.connection is not None
        self.connection.transport.abort()


class DroppingClient(GatedClient):
    """Loses the live copy of the data messages whose seq is in ``drop`` (replayed copies pass)."""

    def __init__(self, *a: Any, drop: set[int], **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.drop = set(drop)

    async def _on_frame(self, ws, msg):  # type: ignore[override]
        if msg.get("type") == "message" and msg.get("seq") in self.drop:
            self.drop.discard(msg["seq"])
            return True
        return await super()._on_frame(ws, msg)


class Recorder:
    """Callbacks that record what they saw, with an event per kind to await."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.events: dict[str, asyncio.Event] = {}

    def kw(self) -> dict[str, Any]:
        return {f"on_{k}": self._make(k) for k in ("resumed", "throttle", "missing", "error", "connect", "disconnect")}

    def _make(self, kind: str):
        def fn(*args: Any) -> None:
            self.seen.append((kind, args[0] if len(args) == 1 else args))
            self.event(kind).set()
        return fn

    def event(self, kind: str) -> asyncio.Event:
        return self.events.setdefault(kind, asyncio.Event())

    def of(self, kind: str) -> list[Any]:
        return [v for k, v in self.seen if k == kind]


async def consume_until(client: Client, pred, timeout: float = 10.0) -> None:
    """Iterate (so callbacks run) until pred() holds."""
    async def run() -> None:
        while not pred():
            try:
                await asyncio.wait_for(client.__anext__(), 0.2)
            except TimeoutError:
                pass
    await asyncio.wait_for(run(), timeout)


# ------------------------------------------------------------------ delivery
async def test_subscribe_receive_heartbeat(node):
    async with Client(node.ws_url, **FAST) as client:
        assert await client.subscribe([CH, "odin.global.>"]) == [CH, "odin.global.>"]
        assert client.channels == [CH, "odin.global.>"]
        assert client.epoch
        seqs = await publish(node, 5)
        got = await take(client, 5)
        assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
        assert [m["stream_seq"] for m in got] == seqs
        assert [m["data"] for m in got] == [{"i": i} for i in range(5)]
        assert client.last_stream_seq == seqs[-1]
        ts = await client.heartbeat()
        assert abs(ts - time.time() * 1000) < 60_000


async def test_subscribe_refused_channel(node):
    async with Client(node.ws_url, **FAST) as client:
        with pytest.raises(SubscribeError) as info:
            await client.subscribe([CH, "odin..bad"])
        assert info.value.accepted == [CH]
        assert info.value.refused == ["odin..bad"]
        assert info.value.code == "invalid_channel"
        assert client.channels == [CH]


async def test_auth_token(node_factory):
    node = node_factory(WS_AUTH_SECRET="s3cret")
    with pytest.raises(AuthError):
        async with Client(node.ws_url, token="not-a-jwt"):
            pass
    token = sign({"sub": "u1", "exp": time.time() + 60, "channels": ["odin.token.>"]}, "s3cret")
    async with Client(node.ws_url, token=token, **FAST) as client:
        assert await client.subscribe([CH]) == [CH]
        with pytest.raises(SubscribeError) as info:
            await client.subscribe(["odin.global.trending"])
        assert info.value.code == "forbidden"


# ---------------------------------------------------------- reconnect/resume
async def test_reconnect_while_publishing_exactly_once(node):
    """The TCP connection dies mid-stream while a publisher keeps going: every message once, in order."""
    rec = Recorder()
    n = 300
    async with GatedClient(node.ws_url, **FAST, **rec.kw()) as client:
        await client.subscribe([CH])
        pub = asyncio.create_task(publish(node, n))
        got = await take(client, 50)
        client.kill()
        got += await take(client, n - 50, timeout=20)
        await pub
        assert [m["data"]["i"] for m in got] == list(range(n))
        ss = [m["stream_seq"] for m in got]
        assert ss == sorted(set(ss))
        assert client.reconnects == 1
        assert [r["complete"] for r in rec.of("resumed")] == [True]
        assert rec.of("missing") == [] and client.missing == []


async def test_outage_is_resumed_exactly_once(node):
    """Messages published while the client is away come after the resume, none twice."""
    rec = Recorder()
    async with GatedClient(node.ws_url, **FAST, **rec.kw()) as client:
        await client.subscribe([CH, "odin.global.trending"])
        await publish(node, 10)
        got = await take(client, 10)
        client.gate.clear()
        client.kill()
        await publish(node, 10, start=10)
        await publish(node, 2, start=100, channel="odin.global.trending")
        client.gate.set()
        got += await take(client, 12)
        await publish(node, 5, start=20)
        got += await take(client, 5)
        assert [m["data"]["i"] for m in got] == [*range(20), 100, 101, *range(20, 25)]
        assert [m["seq"] for m in got[10:]] == list(range(1, 18))   # seqs restart on the new connection
        assert [r["complete"] for r in rec.of("resumed")] == [True]
        assert [k for k, _ in rec.seen] == ["connect", "disconnect", "resumed", "connect"]


async def test_epoch_change_reports_incomplete_and_resets_position(node_factory):
    """The node restarts (new epoch, stream_seq from 1 again): complete false, then new messages flow."""
    rec = Recorder()
    first = node_factory()
    async with Client(first.ws_url, **FAST, **rec.kw()) as client:
        await client.subscribe([CH])
        await publish(first, 3)
        await take(client, 3)
        old_epoch = client.epoch
        await asyncio.to_thread(first.stop)
        second = node_factory(WS_PORT=str(first.ws_port))
        await consume_until(client, lambda: rec.of("resumed"))
        (resumed,) = rec.of("resumed")
        assert resumed["complete"] is False and resumed["reason"] == "epoch_changed"
        assert client.epoch != old_epoch and client.last_stream_seq == 0
        seqs = await publish(second, 3, start=3)
        got = await take(client, 3)
        assert [m["stream_seq"] for m in got] == seqs == [1, 2, 3]
        assert [m["data"]["i"] for m in got] == [3, 4, 5]


async def test_retention_exceeded_reports_incomplete(node_factory):
    node = node_factory(WS_HISTORY_SIZE="2")
    rec = Recorder()
    async with GatedClient(node.ws_url, **FAST, **rec.kw()) as client:
        await client.subscribe([CH])
        await publish(node, 1)
        await take(client, 1)
        client.gate.clear()
        client.kill()
        await publish(node, 5, start=1)       # more than the node retains
        client.gate.set()
        await consume_until(client, lambda: rec.of("resumed"))
        assert rec.of("resumed")[0]["complete"] is False
        assert rec.of("resumed")[0]["reason"] == "retention"
        await publish(node, 1, start=6)
        assert [m["data"]["i"] for m in await take(client, 1)] == [6]


async def test_quiet_channel_resumes_from_its_subscribe_position(node):
    """No message since subscribing: `subscribed` carried the stream position, so
    the reconnect still resumes exactly (complete true) and misses nothing."""
    rec = Recorder()
    async with GatedClient(node.ws_url, **FAST, **rec.kw()) as client:
        await client.subscribe([CH])
        client.kill()
        await consume_until(client, lambda: rec.of("resumed"))
        resumed = rec.of("resumed")[0]
        assert resumed["complete"] is True and resumed["channels"] == [CH], resumed
        await publish(node, 2)
        assert [m["data"]["i"] for m in await take(client, 2)] == [0, 1]


# ------------------------------------------------------------------ gaps
async def test_gap_is_replayed_in_order(node):
    async with DroppingClient(node.ws_url, drop={3, 7, 8}, **FAST) as client:
        await client.subscribe([CH])
        await publish(node, 10)
        got = await take(client, 10)
        assert [m["seq"] for m in got] == list(range(1, 11))
        assert [m["data"]["i"] for m in got] == list(range(10))
        assert client.missing == []
    assert node.metric("fanout_replays_total", 'result="full"') == 2


async def test_gap_beyond_replay_buffer_reports_missing(node_factory):
    node = node_factory(WS_REPLAY_BUFFER="2")
    rec = Recorder()
    async with DroppingClient(node.ws_url, drop={2, 3, 4, 5}, **FAST, **rec.kw()) as client:
        await client.subscribe([CH])
        await publish(node, 6)          # seq 6 shows the gap; the node still holds 5 and 6
        got = await take(client, 3)
        await publish(node, 1, start=6)
        got += await take(client, 1)
        assert [m["seq"] for m in got] == [1, 5, 6, 7]
        assert client.missing == [(2, 4)]
        assert rec.of("missing") == [(2, 4)]


async def test_manual_replay_returns_copies(node):
    async with Client(node.ws_url, **FAST) as client:
        await client.subscribe([CH])
        await publish(node, 4)
        got = await take(client, 4)
        copies, missing = await client.replay(2, 3)
        assert copies == got[1:3] and missing is None
        await publish(node, 1, start=4)
        assert [m["seq"] for m in await take(client, 1)] == [5]   # the copies were not delivered again


# ------------------------------------------------- throttle (scripted node)
async def test_throttle_and_error_callbacks_in_order():
    """The node sends throttle_update only when it throttles; a scripted server sends one on cue."""
    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            req = json.loads(raw)
            if req["type"] == "subscribe":
                await ws.send(json.dumps({"type": "subscribed", "id": req["id"], "channels": req["channels"],
                                          "epoch": "e-1"}))
                for frame in (
                    {"seq": 1, "type": "message", "channel": CH, "stream_seq": 10, "ts": 1, "data": 1},
                    {"type": "throttle_update", "level": 2, "rate_percent": 50,
                     "message": "Your connection is slow. Receiving 50% of updates."},
                    {"type": "error", "code": "rate_limited", "message": "slow down"},
                    {"seq": 2, "type": "message", "channel": CH, "stream_seq": 12, "ts": 2, "data": 2},
                ):
                    await ws.send(json.dumps(frame))

    rec = Recorder()
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Client(f"ws://127.0.0.1:{port}/ws", **FAST, **rec.kw()) as client:
            await client.subscribe([CH])
            assert (await client.__anext__())["data"] == 1
            assert [k for k, _ in rec.seen] == ["connect"]      # callbacks run in stream order
            assert (await client.__anext__())["data"] == 2
            assert [k for k, _ in rec.seen] == ["connect", "throttle", "error"]
            assert rec.of("throttle")[0]["rate_percent"] == 50
            assert client.throttle is not None and client.throttle["level"] == 2
            assert rec.of("error")[0]["code"] == "rate_limited"


# ------------------------------------------------------------ Sans-I/O core
def _m(seq: int, ss: int) -> dict[str, Any]:
    return {"type": "message", "seq": seq, "stream_seq": ss}


def test_tracker_holds_back_behind_gap_and_skips_lost():
    t = Tracker()
    assert t.on_message(_m(1, 10)) == ([_m(1, 10)], None)
    assert t.on_message(_m(4, 13)) == ([], (2, 3))
    assert t.on_message(_m(5, 14)) == ([], None)
    assert t.on_message(_m(3, 12)) == ([], None)          # replayed 3; 2 is still missing
    out, lost = t.on_replay_done(2, 3)
    assert lost == [(2, 2)] and [m["seq"] for m in out] == [3, 4, 5]
    assert t.position == 14


def test_tracker_dedupes_by_stream_seq_and_resets_on_epoch():
    t = Tracker()
    t.set_epoch("a")
    t.on_message(_m(1, 10))
    t.new_connection()
    assert t.on_message(_m(1, 10)) == ([], None)          # a resume's copy of what we had
    assert t.duplicates == 1
    assert t.on_message(_m(2, 11))[0] == [_m(2, 11)]
    assert t.set_epoch("b") is True and t.position == 0
    assert t.on_message(_m(3, 1))[0] == [_m(3, 1)]


async def test_silent_connection_is_replaced_after_missed_heartbeat():
    """A node that stops answering (half-open TCP) is detected by the heartbeat and replaced."""
    connections: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(ws)
        async for raw in ws:
            req = json.loads(raw)
            if req["type"] == "heartbeat" and len(connections) > 1:
                await ws.send(json.dumps({"type": "heartbeat_ack", "id": req["id"], "ts": 1}))
            # the first connection swallows everything, like a dead peer

    rec = Recorder()
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Client(f"ws://127.0.0.1:{port}/ws", heartbeat_interval=0.1, heartbeat_timeout=0.2,
                          **FAST, **rec.kw()) as client:
            await consume_until(client, lambda: client.reconnects == 1)
            assert len(connections) == 2
            assert await client.heartbeat() == 1
            assert [k for k, _ in rec.seen] == ["connect", "disconnect", "connect"]


async def test_token_callable_and_channel_refused_on_resume(node_factory):
    """A fresh token per connect; a channel the new token no longer allows is dropped and reported."""
    node = node_factory(WS_AUTH_SECRET="s3cret")
    grants = [["odin.>"], ["odin.token.>"]]
    issued: list[list[str]] = []

    async def token() -> str:
        chans = grants[min(len(issued), 1)]
        issued.append(chans)
        return sign({"sub": "u1", "exp": time.time() + 60, "channels": chans}, "s3cret")

    rec = Recorder()
    async with GatedClient(node.ws_url, token=token, **FAST, **rec.kw()) as client:
        await client.subscribe([CH, "odin.global.trending"])
        await publish(node, 1)
        await publish(node, 1, start=1, channel="odin.global.trending")
        await take(client, 2)
        client.kill()
        await consume_until(client, lambda: rec.of("resumed"))
        assert issued == grants
        assert rec.of("error")[0]["code"] == "forbidden" and rec.of("error")[0]["channel"] == "odin.global.trending"
        assert rec.of("resumed")[0]["channels"] == [CH] and rec.of("resumed")[0]["complete"] is True
        assert client.channels == [CH]
        await publish(node, 1, start=2, channel="odin.global.trending")
        await publish(node, 1, start=3)
        assert [m["data"]["i"] for m in await take(client, 1)] == [3]


# ------------------------------------------------------- 1.1 client semantics
async def test_subscriptions_are_reference_counted(node):
    async with Client(node.ws_url, **FAST) as client:
        assert await client.subscribe([CH]) == [CH]
        assert await client.subscribe([CH]) == [CH]        # held: not sent again
        await client.unsubscribe([CH])                      # one holder left: the node keeps sending
        assert client.channels == [CH]
        await publish(node, 1)
        assert [m["data"] for m in await take(client, 1)] == [{"i": 0}]
        await client.unsubscribe([CH])
        assert client.channels == []
        await client.subscribe(["odin.global.trending"])
        await publish(node, 1, start=1)
        await publish(node, 1, start=2, channel="odin.global.trending")
        assert [m["data"] for m in await take(client, 1)] == [{"i": 2}]     # CH is gone on the node


async def test_snapshot_with_nothing_retained_then_live(node):
    async with Client(node.ws_url, **FAST) as client:
        assert await client.subscribe([CH], snapshot=True) == [CH]
        seqs = await publish(node, 1, start=1)
        got = await take(client, 1)
        assert got[0]["stream_seq"] == seqs[0] and "snapshot" not in got[0]


def _jwt(exp: float) -> str:
    import base64
    body = base64.urlsafe_b64encode(json.dumps({"sub": "u", "exp": int(exp)}).encode()).decode().rstrip("=")
    return f"e30.{body}.sig"


class Scripted:
    """A scripted server for what today's node does not send (1.1 notices, snapshot, refresh)."""

    def __init__(self, on_frame) -> None:
        self.on_frame = on_frame
        self.connections: list[ServerConnection] = []
        self.frames: list[dict[str, Any]] = []
        self.connected_at: list[float] = []

    async def handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        self.connected_at.append(time.monotonic())
        try:
            async for raw in ws:
                req = json.loads(raw)
                self.frames.append(req)
                if req["type"] in ("subscribe", "resume"):
                    reply = {"type": "subscribed" if req["type"] == "subscribe" else "resumed", "id": req["id"],
                             "channels": req["channels"], "epoch": "e-1", "stream_seq": 0, "complete": True}
                    await self.on_frame(self, ws, req, reply)
                    await ws.send(json.dumps(reply))
                    await self.on_frame(self, ws, {**req, "type": "after_" + req["type"]}, None)
                else:
                    await self.on_frame(self, ws, req, None)
        except Exception:       # the client went away
            pass


async def test_snapshot_messages_are_delivered_and_not_deduped():
    async def on_frame(srv, ws, req, reply):
        if req["type"] == "subscribe" and req.get("snapshot"):
            await ws.send(json.dumps({"seq": 2, "type": "message", "channel": "odin.global.trending",
                                      "stream_seq": 3, "ts": 1, "data": {"top": 1}}))
            reply["snapshot"] = 1
        elif req["type"] == "after_subscribe" and not req.get("snapshot"):
            await ws.send(json.dumps({"seq": 1, "type": "message", "channel": CH, "stream_seq": 9, "ts": 1,
                                      "data": {"i": 0}}))

    srv = Scripted(on_frame)
    async with serve(srv.handler, "127.0.0.1", 0) as server, \
            Client(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", **FAST) as client:
        await client.subscribe([CH])
        assert (await take(client, 1))[0]["stream_seq"] == 9
        await client.subscribe(["odin.global.trending"], snapshot=True)
        snap = (await take(client, 1))[0]
        assert snap["snapshot"] is True and snap["stream_seq"] == 3      # older than 9, yet delivered
        assert client.last_stream_seq == 9 and client.tracker.duplicates == 0
        assert srv.frames[1]["snapshot"] is True


async def test_token_provider_refreshes_before_exp():
    async def on_frame(srv, ws, req, reply):
        if req["type"] == "refresh":
            await ws.send(json.dumps({"type": "refreshed", "id": req["id"], "exp": 4_000_000_000}))

    tokens = [_jwt(time.time() + 2.5), _jwt(4_000_000_000)]
    rec = Recorder()
    srv = Scripted(on_frame)
    async with serve(srv.handler, "127.0.0.1", 0) as server, \
            Client(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", token=lambda: tokens.pop(0),
                   refresh_before=1.0, on_refreshed=rec._make("refreshed"), **FAST) as client:
        await consume_until(client, lambda: rec.of("refreshed"), timeout=10)
        assert rec.of("refreshed") == [4_000_000_000]
        assert [f["token"] for f in srv.frames if f["type"] == "refresh"] == [_jwt(4_000_000_000)]
        assert len(srv.connections) == 1


async def test_drain_hint_sets_the_reconnect_delay():
    async def on_frame(srv, ws, req, reply):
        if req["type"] == "after_subscribe" and len(srv.connections) == 1:
            await ws.send(json.dumps({"type": "reconnect", "reason": "drain", "after_ms": 400}))
            await ws.close(1001, "draining")

    rec = Recorder()
    srv = Scripted(on_frame)
    async with serve(srv.handler, "127.0.0.1", 0) as server, \
            Client(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", on_drain=rec._make("drain"),
                   on_resumed=rec._make("resumed"), reconnect_min=0.01, reconnect_max=0.05,
                   request_timeout=5.0) as client:
        await client.subscribe([CH])
        await consume_until(client, lambda: rec.of("resumed"), timeout=10)
        assert rec.of("drain")[0]["after_ms"] == 400
        assert srv.connected_at[1] - srv.connected_at[0] >= 0.4       # not the 50 ms backoff cap
        assert [f["type"] for f in srv.frames] == ["subscribe", "resume"]


async def test_4001_with_token_provider_reconnects_with_a_fresh_token():
    async def on_frame(srv, ws, req, reply):
        if req["type"] == "after_subscribe" and len(srv.connections) == 1:
            await ws.close(4001, "token expired")

    tokens = iter(["t1", "t2"])
    rec = Recorder()
    srv = Scripted(on_frame)
    async with serve(srv.handler, "127.0.0.1", 0) as server, \
            Client(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", token=lambda: next(tokens),
                   **rec.kw(), **FAST) as client:
        await client.subscribe([CH])
        await consume_until(client, lambda: rec.of("resumed"), timeout=10)
        auths = [c.request.headers["Authorization"] for c in srv.connections if c.request]
        assert auths == ["Bearer t1", "Bearer t2"]


async def test_4001_with_a_fixed_token_is_fatal():
    async def on_frame(srv, ws, req, reply):
        if req["type"] == "after_subscribe":
            await ws.close(4001, "token expired")

    srv = Scripted(on_frame)
    async with serve(srv.handler, "127.0.0.1", 0) as server, \
            Client(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws", token="fixed", **FAST) as client:
        await client.subscribe([CH])
        with pytest.raises(AuthError):
            await take(client, 1)
        assert len(srv.connections) == 1
