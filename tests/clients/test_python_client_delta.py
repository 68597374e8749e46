"""fanout.client and delta messages (PROTOCOL 1.2) against a real node: a
delta that fails its checksum is never shown; the client recovers as the
contract says (replay of that seq; if the replay cannot serve it,
unsubscribe and resume the pattern), and every subject's values arrive
complete, in order, exactly once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fanout.client import Client, Tracker
from tests.helpers.delta_check import token_stream

PATTERN = "odin.token.*.update"
S1, S2 = "odin.token.one.update", "odin.token.two.update"
FAST = {"reconnect_min": 0.05, "reconnect_max": 0.5, "request_timeout": 5.0}


def corrupt(delta: str) -> str:
    """Change one literal byte of a delta, keeping its length: only the checksum can tell."""
    i = delta.index(":", delta.index("\n")) + 1
    return delta[:i] + ("1" if delta[i] != "1" else "2") + delta[i + 1:]


class CorruptingClient(Client):
    """Corrupts the delta of data message ``seq``; with ``drop_replay`` it also
    loses the replayed copy, so the replay cannot serve it."""

    def __init__(self, *a: Any, seq: int, drop_replay: bool = False, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.target = seq
        self.drop_replay = drop_replay
        self.arrivals = 0

    async def _on_frame(self, ws, msg):  # type: ignore[override]
        if msg.get("type") == "message" and msg.get("seq") == self.target and self.arrivals < 2:
            self.arrivals += 1
            if self.arrivals == 1:
                assert "delta" in msg, msg
                msg["delta"] = corrupt(msg["delta"])
            elif self.drop_replay:
                return True
        return await super()._on_frame(ws, msg)


async def publish(node: Any, items: list[tuple[str, bytes]]) -> dict[int, tuple[str, bytes]]:
    return await asyncio.to_thread(lambda: {node.publish(s, p): (s, p) for s, p in items})


async def collect(client: Client, want: dict[str, list[bytes]], timeout: float = 15.0) -> dict[str, list[bytes]]:
    """Data per subject (as JSON bytes) until each subject has as many as wanted."""
    got: dict[str, list[bytes]] = {s: [] for s in want}
    async with asyncio.timeout(timeout):
        while any(len(got[s]) < len(want[s]) for s in want):
            m = await client.__anext__()
            got[m["channel"]].append(json.dumps(m["data"], separators=(",", ":")).encode())
    return got


def streams(n: int) -> tuple[dict[str, list[bytes]], list[tuple[str, bytes]]]:
    want = {S1: token_stream(n, 1), S2: token_stream(n, 2)}
    items = [(s, want[s][i]) for i in range(n) for s in (S1, S2)]
    return want, items


async def test_a_corrupted_delta_is_replayed_never_shown(node):
    want, items = streams(6)
    async with CorruptingClient(node.ws_url, seq=5, **FAST) as client:     # seq 5: S1's third, a delta
        await client.subscribe([PATTERN])
        await publish(node, items)
        got = await collect(client, want)
        assert got == want
        assert client.tracker.delta_failures == 1
        assert client.tracker.deltas >= 6       # after a replay the next message of each subject is full
    assert node.metric("fanout_replays_total", 'result="full"') == 1


async def test_a_corrupted_delta_that_cannot_be_replayed_is_resumed(node):
    want, items = streams(6)
    async with CorruptingClient(node.ws_url, seq=5, drop_replay=True, **FAST) as client:
        await client.subscribe([PATTERN])
        await publish(node, items)
        got = await collect(client, want)
        assert got == want                       # nothing wrong, nothing skipped, nothing twice
        assert client.tracker.delta_failures == 1
        # Live messages after the recovery still arrive, as deltas again.
        more, items2 = streams(8)
        await publish(node, items2[12:])
        got2 = await collect(client, {S1: more[S1][6:], S2: more[S2][6:]})
        assert got2 == {S1: more[S1][6:], S2: more[S2][6:]}
    assert node.metric("fanout_resumes_total", 'complete="true"') >= 1


def test_tracker_holds_everything_after_a_failed_delta_until_its_replay():
    tr = Tracker()
    base = b'{"a":1,"b":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
    full = {"seq": 1, "type": "message", "channel": "c", "stream_seq": 1, "data": json.loads(base)}
    assert tr.on_message(full, base)[0] == [full]
    bad = {"seq": 2, "type": "message", "channel": "c", "stream_seq": 2, "delta": "1\n1:x0;"}
    other = {"seq": 3, "type": "message", "channel": "d", "stream_seq": 3, "data": 1}
    assert tr.on_message(bad)[0] == []
    assert tr.refetch == [2] and "c" not in tr.bases
    assert tr.on_message(other, b"1")[0] == []           # held behind the failed one
    copy = {"seq": 2, "type": "message", "channel": "c", "stream_seq": 2, "data": {"a": 2}}
    out, _ = tr.on_message(copy, b'{"a":2}')
    assert [m["seq"] for m in out] == [2, 3]
    assert tr.bases["c"] == b'{"a":2}'
