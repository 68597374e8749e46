"""A small plain-Python model of fanout_core.Core: what the compiled core must do.

Dict-of-sets subscriptions, a deque ring per client, bytes queues. Slow but
obviously right; the compiled core is checked against it.
"""

from __future__ import annotations

import heapq
from collections import deque

from fanout.subjects import matches


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x81, n])
    elif n < 65536:
        head = bytes([0x81, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 127]) + n.to_bytes(8, "big")
    return head + payload


def data_frame(seq: int, tail: bytes) -> bytes:
    return text_frame(b'{"seq":%d,' % seq + tail)


class RefCore:
    def __init__(self, capacity: int, replay_size: int = 100) -> None:
        self.capacity = capacity
        self.replay_size = replay_size
        self.free: list[int] = []
        self.next_slot = 0
        self.subs: dict[int, set[str]] = {}
        self.seqs: dict[int, int] = {}
        self.rings: dict[int, deque[tuple[int, bytes]]] = {}
        self.out: dict[int, bytearray] = {}

    def add_client(self) -> int:
        if self.free:
            slot = heapq.heappop(self.free)
        elif self.next_slot < self.capacity:
            slot = self.next_slot
            self.next_slot += 1
        else:
            raise OverflowError("no free client slot")
        self.subs[slot] = set()
        self.seqs[slot] = 0
        self.rings[slot] = deque(maxlen=self.replay_size)
        self.out[slot] = bytearray()
        return slot

    def remove_client(self, slot: int) -> None:
        for d in (self.subs, self.seqs, self.rings, self.out):
            del d[slot]
        heapq.heappush(self.free, slot)

    def subscribe(self, slot: int, pattern: str) -> bool:
        if pattern in self.subs[slot]:
            return False
        self.subs[slot].add(pattern)
        return True

    def unsubscribe(self, slot: int, pattern: str) -> bool:
        if pattern not in self.subs[slot]:
            return False
        self.subs[slot].discard(pattern)
        return True

    def recipients(self, subject: str) -> list[int]:
        return sorted(s for s, pats in self.subs.items() if any(matches(p, subject) for p in pats))

    def publish(self, subject: str, tail: bytes) -> int:
        rec = self.recipients(subject)
        for s in rec:
            self.seqs[s] += 1
            self.rings[s].append((self.seqs[s], tail))
            self.out[s] += data_frame(self.seqs[s], tail)
        return len(rec)

    def replay(self, slot: int, a: int, b: int) -> tuple[int, tuple[int, int] | None]:
        hi = min(b, self.seqs[slot])
        held = {seq: tail for seq, tail in self.rings[slot]}
        lo = min(held) if held else self.seqs[slot] + 1
        missing = (a, min(hi, lo - 1)) if a < lo and a <= hi else None
        sent = 0
        for seq in range(max(a, lo), hi + 1):
            self.out[slot] += data_frame(seq, held[seq])
            sent += 1
        return sent, missing

    def take_dirty(self) -> dict[int, bytes]:
        got = {s: bytes(b) for s, b in self.out.items() if b}
        for s in got:
            self.out[s].clear()
        return got
