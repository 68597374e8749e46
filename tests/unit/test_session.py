"""A session alone: a real hub and Core, the client on the other end of a
socketpair speaking WebSocket through websockets' Sans-I/O client, and a fake
clock. Covers the state machine, admission, requests, the rate limit and the
closes the session owns."""

from __future__ import annotations

import asyncio
import socket

import pytest
from websockets.frames import Opcode

from fanout import session as session_mod
from fanout.session import State
from tests.helpers.inproc import Host, WsPeer, drain_loop, pair, until

CH = "odin.token.a.update"


async def open_session(host: Host, **hs: str) -> tuple[object, WsPeer]:
    server, client = pair()
    s = host.session(server)
    peer = WsPeer(client)
    peer.handshake(hs or None)
    await until(lambda: peer.response is not None, peer)
    return s, peer


@pytest.fixture
async def host() -> Host:
    h = Host(WS_CONTROL_RATE=2, WS_CONTROL_BURST=3, WS_CONTROL_STRIKES=2)
    await h.start()
    return h


async def test_handshake_opens_and_registers(host):
    s, peer = await open_session(host)
    assert peer.response.status_code == 101
    assert s.state is State.OPEN and s.slot is not None
    assert host.opened_ids == [s.id]


async def test_admission_refusal_answers_503_with_retry_after_and_closes(host):
    host.refusal = (503, "draining", "Service Unavailable: draining\n", 5)
    s, peer = await open_session(host)
    assert peer.response.status_code == 503
    assert peer.response.headers["Retry-After"] == "5"
    assert s.state is State.CLOSED and host.closed_ids == [s.id] and host.opened_ids == []


async def test_wrong_path_is_404(host):
    server, client = pair()
    s = host.session(server)
    peer = WsPeer(client, "/nope")
    peer.handshake()
    await until(lambda: peer.response is not None, peer)
    assert peer.response.status_code == 404
    assert s.state is State.CLOSED


async def test_handshake_timeout_uses_the_loop_timer(host):
    host.cfg = host.cfg.__class__(**{**{f: getattr(host.cfg, f) for f in host.cfg.__dataclass_fields__},
                                     "ws_handshake_timeout": 0.01})
    server, _client = pair()
    s = host.session(server)
    await until(lambda: s.state is State.CLOSED, turns=10_000)


async def test_subscribe_publish_receive(host):
    s, peer = await open_session(host)
    peer.send({"type": "subscribe", "channels": [CH], "id": 1})
    (r,) = await until(lambda: peer.texts() or None, peer)
    assert r["type"] == "subscribed" and r["channels"] == [CH] and r["id"] == 1
    host.publish(CH, '{"p":1}')
    (m,) = await until(lambda: peer.texts() or None, peer)
    assert (m["seq"], m["channel"], m["data"]) == (1, CH, {"p": 1})


async def test_rate_limit_with_the_fake_clock(host):
    s, peer = await open_session(host)
    for _ in range(4):
        peer.send({"type": "heartbeat"})
    got = await until(lambda: (lambda t: t if len(t) == 4 else None)(peer.texts()), peer)
    assert [g["type"] for g in got] == ["heartbeat_ack"] * 3 + ["error"]
    assert got[3]["code"] == "rate_limited"
    host.clock.advance(1.0)                 # 2 tokens back
    peer.send({"type": "heartbeat"})
    (r,) = await until(lambda: peer.texts() or None, peer)
    assert r["type"] == "heartbeat_ack"
    # Pongs cost tokens too: the second strike closes with 1008.
    for _ in range(5):
        peer.send_frame(Opcode.PONG, b"x")
    await until(lambda: peer.close_code() is not None, peer)
    assert peer.close_code() == 1008
    assert s.state in (State.DRAINING, State.CLOSED)


async def test_close_handshake_runs_the_state_machine(host):
    s, peer = await open_session(host)
    s.close(1001, "bye")
    assert s.state is State.DRAINING
    await until(lambda: peer.close_code() is not None, peer)
    assert peer.close_code() == 1001
    # The client's close reply went back in pump(); the session then drains and ends.
    await until(lambda: s.state is State.CLOSED, peer)
    assert host.closed_ids == [s.id]
    await until(lambda: peer.eof, peer)


async def test_nothing_is_sent_after_the_close_frame(host):
    s, peer = await open_session(host)
    s.close(1001, "bye")
    s.send(b'{"type":"late"}')              # e.g. a reply computed after the close
    await until(lambda: peer.close_code() is not None, peer)
    assert peer.texts() == []


async def test_invalid_utf8_closes_with_1007(host):
    s, peer = await open_session(host)
    peer.send_frame(Opcode.TEXT, b'{"type":"heartbeat","x":"\xed\xa0\x80"}')
    await until(lambda: peer.close_code() is not None, peer)
    assert peer.close_code() == 1007


async def test_a_socket_that_fills_is_watched_for_writability(host):
    server, client = pair(rcvbuf=4096)
    s = host.session(server)
    peer = WsPeer(client)
    peer.handshake()
    await until(lambda: peer.response is not None, peer)
    peer.send({"type": "subscribe", "channels": [CH]})
    await until(lambda: peer.texts() or None, peer)
    for _ in range(30):
        host.publish(CH, '{"pad":"' + "x" * 2000 + '"}')
    await drain_loop()
    assert s._writing is True               # the core reported it blocked
    got: list[dict] = []
    await until(lambda: (got.extend(peer.texts()), len(got) == 30)[1], peer, turns=5000)
    assert [g["seq"] for g in got] == list(range(1, 31))
    await until(lambda: s._writing is False, peer)


async def test_resume_holds_later_requests_until_it_is_done(host):
    for i in range(5):
        host.publish(CH, str(i))
    s, peer = await open_session(host)
    peer.send({"type": "resume", "channels": [CH], "after": 0, "id": "r"})
    peer.send({"type": "heartbeat", "id": "h"})
    got: list[dict] = []
    await until(lambda: (got.extend(peer.texts()), len(got) == 7)[1], peer)
    assert [g.get("stream_seq") for g in got[:5]] == [1, 2, 3, 4, 5]
    assert got[5]["type"] == "resumed" and got[5]["complete"] is True
    assert got[6]["type"] == "heartbeat_ack"


async def test_abort_detaches_and_frees_the_slot(host):
    s, peer = await open_session(host)
    slot = s.slot
    peer.sock.close()
    await until(lambda: s.state is State.CLOSED, turns=100)
    assert host.hub.open_count == 0
    s2, _ = await open_session(host)
    assert s2.slot == slot


async def flooder_closed(host: Host) -> tuple[object, WsPeer]:
    """A session closed with 1008 for flooding; its client end is still open."""
    s, peer = await open_session(host)
    for _ in range(6):
        peer.send({"type": "heartbeat"})
    await until(lambda: peer.close_code() is not None, peer)
    assert peer.close_code() == 1008
    await until(lambda: s.state is State.CLOSED, peer)
    return s, peer


async def test_a_flooder_is_read_until_its_fin_before_the_socket_closes(host):
    # Closing with its bytes unread would reset the connection, and a reset
    # discards what the kernel has not sent yet: our close frame included.
    s, peer = await flooder_closed(host)
    assert host.closed_ids == [s.id] and host.hub.open_count == 0
    for _ in range(50):
        peer.send_frame(Opcode.TEXT, b'{"type":"heartbeat"}')
    await drain_loop()
    assert s.sock.fileno() != -1            # still reading (and dropping)
    peer.sock.shutdown(socket.SHUT_WR)
    await until(lambda: s.sock.fileno() == -1, turns=1000)


async def test_lingering_is_bounded_in_time_and_bytes(host, monkeypatch):
    monkeypatch.setattr(session_mod, "LINGER_TIMEOUT", 0.01)
    s, _peer = await flooder_closed(host)
    async with asyncio.timeout(5):
        while s.sock.fileno() != -1:
            await asyncio.sleep(0.005)
    monkeypatch.setattr(session_mod, "LINGER_TIMEOUT", 60.0)   # now only the byte bound can end it
    monkeypatch.setattr(session_mod, "LINGER_BYTES", 4096)
    s, peer = await flooder_closed(host)
    for _ in range(10):
        peer.send_frame(Opcode.TEXT, b'{"pad":"' + b"x" * 1000 + b'"}')
    await until(lambda: s.sock.fileno() == -1, turns=1000)


async def test_a_completed_close_handshake_closes_the_socket_at_once(host):
    s, peer = await open_session(host)
    s.close(1001, "bye")
    await until(lambda: s.state is State.CLOSED, peer)
    assert s.sock.fileno() == -1
