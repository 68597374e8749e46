"""The parallel flush is race-free: a correctness check, not a timing.

Many clients on real socketpairs, several flush threads (``parallel_min=1``,
so every flush uses all of them), messages shared by every client's queue
and held by nothing else (``replay_size=1``: the ring keeps only the newest),
so the last references to a message are dropped by several threads at once.
Every byte must arrive exactly once and in order, the counters must add up,
and once the core is gone no message may be left allocated (a lost
reference-count decrement leaks; a doubled one frees twice and crashes or
goes negative). Small send buffers on some clients make sockets fill up
mid-flush, so the blocked path runs on the worker threads too.
"""

from __future__ import annotations

import gc
import random
import socket

import pytest

from fanout_core import Core
from fanout_core._core import live_messages
from tests.core.reference import data_frame

CLIENTS = 300
ROUNDS = 150


def _drain(sock: socket.socket, into: bytearray) -> None:
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            return
        into += chunk


@pytest.mark.parametrize("threads", [3, 8])
def test_parallel_flush_delivers_every_byte_once_and_frees_every_message(threads: int) -> None:
    rng = random.Random(threads)
    gc.collect()                # other tests' cores go now, not in the middle of the count
    before = live_messages()
    core = Core(CLIENTS, replay_size=1, queue_limit=1 << 30, flush_threads=threads, parallel_min=1)
    pairs = []
    expected: list[bytearray] = []
    got: list[bytearray] = []
    try:
        for i in range(CLIENTS):
            ours, theirs = socket.socketpair()
            theirs.setblocking(False)
            if i % 7 == 0:
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            slot = core.add_client(ours.fileno())
            assert slot == i
            core.subscribe(slot, "all")
            core.subscribe(slot, f"odd.{i % 2}")
            pairs.append((ours, theirs))
            expected.append(bytearray())
            got.append(bytearray())
        seqs = [0] * CLIENTS
        blocked_seen = 0
        sends_owed = 0          # (client, round) pairs with something to send: one sendmsg at least
        for rnd in range(ROUNDS):
            owed_before = list(seqs)
            for k in range(rng.randint(1, 6)):
                subject = "all" if k % 3 else f"odd.{rng.randint(0, 1)}"
                tail = b'"type":"message","r":%d,"k":%d,"pad":"%s"}' % (rnd, k, b"x" * rng.randint(0, 300))
                n = core.publish(subject, tail)
                for i in range(CLIENTS):
                    if subject == "all" or subject == f"odd.{i % 2}":
                        seqs[i] += 1
                        expected[i] += data_frame(seqs[i], tail)
                assert n == (CLIENTS if subject == "all" else CLIENTS // 2)
            sends_owed += sum(a != b for a, b in zip(seqs, owed_before, strict=True))
            blocked, dead = core.flush()
            assert dead is None
            for i, (_, theirs) in enumerate(pairs):
                if i % 7 or rnd % 5 == 4:        # the small-buffer ones read late, so they fill up
                    _drain(theirs, got[i])
            for slot in blocked or []:
                blocked_seen += 1
                for _ in range(10_000):            # bounded: each turn the reader empties the socket
                    r = core.flush_slot(slot)
                    _drain(pairs[slot][1], got[slot])
                    if r == 0:
                        break
                assert r == 0
        for i in range(CLIENTS):
            _drain(pairs[i][1], got[i])
            assert core.queued(i) == 0
            assert got[i] == expected[i], f"client {i}: bytes differ at {_first_diff(got[i], expected[i])}"
        total = sum(len(e) for e in expected)
        st = core.stats()
        assert st["bytes_sent"] == total == st["bytes_queued"]
        assert st["send_calls"] >= sends_owed
        assert st["send_blocked"] >= blocked_seen > 0, "no socket filled up: the blocked path was not exercised"
        assert core.flush_threads == threads
    finally:
        del core
        gc.collect()
        for a, b in pairs:
            a.close()
            b.close()
    assert live_messages() == before, "messages leaked or freed twice"


def _first_diff(a: bytes | bytearray, b: bytes | bytearray) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))

