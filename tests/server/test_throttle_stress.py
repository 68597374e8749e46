"""Stress: 200 readers at random speeds from 5 % to 100 % of one stream (100
msg/s of 2 KB, a quarter critical), at the default throttle settings (queue
limit and recovery time lowered), against a real node. The heaviest level
needs about 44 % of the stream's bytes (every critical message and a quarter
of the rest): no reader at 55 % or more (1.25 times that) may be closed; every reader sees no
seq gap; once the stream stops and they read freely, every reader still open
is back at level 0 within the recovery steps (one level per recovery time).

12 s of stream, not the issue's 20: with the set-up and the recovery it fits
the 30 s test limit on a loaded 2-core machine."""

from __future__ import annotations

import random
import time

from tests.helpers.paced import ByteReader, Pacer, Stream
from tests.server.test_throttle import ENV, wait_for

CH = "odin.token.stress.update"
READERS = 200
SECONDS = 12
RECOVERY = 1.0                     # WS_THROTTLE_RECOVERY_SECONDS in ENV
HEAVIEST = 0.25 + 0.75 * 0.25      # share of the stream at level 3 (25 % of the non-critical)


def test_200_readers_at_random_speeds(node_factory):
    node = node_factory(**ENV)
    rng = random.Random(18)
    paces = [0.05 + 0.95 * rng.random() for _ in range(READERS)]
    readers = [ByteReader(node.ws_port, [CH], None) for _ in paces]
    deadline = time.monotonic() + 15
    for r in readers:
        while not r.replies:
            assert time.monotonic() < deadline, "subscribe"
            r.pump(1 << 16)
    for r, p in zip(readers, paces, strict=True):
        r.pace = p
    stream = Stream(node.health_port, 100, 2000, [CH])
    t0 = time.monotonic()
    pacer = Pacer(readers, stream, tick=0.05, parse=False)
    try:
        wait_for(lambda: len(stream.published) >= 100 * SECONDS, SECONDS + 5, "the stream")
    finally:
        stream.finish()
        pacer.full = True                  # the stream stopped: everyone reads what is left
    took = time.monotonic() - t0
    last = node.publish(CH, {"end": True}, "critical")        # reaches every reader still open

    def parsed(pred):
        def check():
            for r in readers:
                r.parse()
            return pred()
        return check
    try:
        wait_for(parsed(lambda: all(r.closed or (r.messages and r.messages[-1]["stream_seq"] == last)
                                    for r in readers)), 8, "every open reader's last message")
        t_stop = time.monotonic()
        opened = [r for r in readers if r.close_code is None]
        # Back at level 0: one step down per recovery time, and the notice after it.
        wait_for(parsed(lambda: all(r.closed or r.level == 0 for r in readers)), 3 * RECOVERY + 2, "level 0")
        back = time.monotonic() - t_stop
    finally:
        pacer.finish()
        for r in readers:
            r.parse()
            r.close()
    closed = sorted(round(p, 2) for r, p in zip(readers, paces, strict=True) if r.close_code == 1008)
    detail = [(round(p, 2), [n["level"] for n in r.notices], len(r.messages)) for r, p in zip(readers, paces, strict=True)
              if r.close_code == 1008 and p >= 0.5]
    # None with a quarter more than the heaviest level needs. Between 44 % and 55 % a reader's
    # margin is a few KB per 2 s window, less than one stall of this process's pacer thread
    # (200 sockets, the GIL shared with the publisher) costs it: at 50 % one was closed about
    # one run in three on the loaded 2-core box.
    assert all(p < 0.55 for p in closed), (closed, detail)
    assert all(r.close_code in (None, 1008) for r in readers)
    for r in readers:
        assert [m["seq"] for m in r.messages] == list(range(1, len(r.messages) + 1))   # no seq gap
        levels = [n["level"] for n in r.notices]
        assert all(abs(a - b) == 1 for a, b in zip([0] + levels, levels, strict=False)), levels
    throttled = [r for r in readers if r.notices]
    assert len(throttled) > 20 and len(opened) > READERS // 2
    # Below 44 % the heaviest level cannot help: throttled, and the slowest closed.
    assert all(r.notices for r, p in zip(readers, paces, strict=True) if p < 0.3)
    assert all(r.close_code == 1008 for r, p in zip(readers, paces, strict=True) if p < 0.1)
    print(f"published {len(stream.published)} in {took:.1f} s; closed {len(closed)} (paces {closed}); "
          f"throttled {len(throttled)}; every open one at level 0 {back:.1f} s after it read the last message")
