"""fanout.ratelimit.TokenBucket against a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
import math

import pytest

from fanout.ratelimit import TokenBucket


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_starts_full_and_refuses_past_the_burst():
    clock = FakeClock()
    b = TokenBucket(rate=10, burst=3, clock=clock)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    assert b.tokens == pytest.approx(0.0)


def test_refills_at_rate_and_caps_at_burst():
    clock = FakeClock()
    b = TokenBucket(rate=4, burst=3, clock=clock)   # steps of 1/8 s are exact in binary
    for _ in range(3):
        assert b.take()
    clock.t += 0.125                     # half a token
    assert not b.take()
    clock.t += 0.125                     # one whole token now
    assert b.take()
    assert not b.take()
    clock.t += 3600                      # idle for an hour: still only the burst
    assert b.tokens == pytest.approx(3.0)
    assert [b.take() for _ in range(4)] == [True, True, True, False]


def test_a_refused_take_takes_nothing():
    clock = FakeClock()
    b = TokenBucket(rate=1, burst=5, clock=clock)
    assert b.take(4)
    assert not b.take(2)                 # only 1 there: refused whole
    assert b.tokens == pytest.approx(1.0)
    assert b.take(1)


def test_sustained_rate_matches_the_setting():
    clock = FakeClock()
    b = TokenBucket(rate=20, burst=40, clock=clock)
    taken = 0
    for _ in range(10_000):              # 10 s of attempts every millisecond
        clock.t += 0.001
        taken += b.take()
    assert taken == pytest.approx(40 + 20 * 10, abs=1)


def test_wait_time_says_when_the_next_token_comes():
    clock = FakeClock()
    b = TokenBucket(rate=4, burst=1, clock=clock)
    assert b.wait_time() == 0.0
    assert b.take()
    assert b.wait_time() == pytest.approx(0.25)
    clock.t += 0.1
    assert b.wait_time() == pytest.approx(0.15)
    clock.t += 0.15
    assert b.wait_time() == 0.0 and b.take()


def test_wait_time_for_more_than_the_burst_is_an_error():
    b = TokenBucket(rate=4, burst=2, clock=FakeClock())
    with pytest.raises(ValueError, match="burst"):
        b.wait_time(3)
    assert not b.take(3)


def test_a_clock_stepping_back_does_not_drain_or_fill():
    clock = FakeClock()
    b = TokenBucket(rate=10, burst=2, clock=clock)
    assert b.take()
    clock.t -= 50
    assert b.tokens == pytest.approx(1.0)


@pytest.mark.parametrize("rate,burst", [(0, 1), (-1, 1), (math.inf, 1), (math.nan, 1), (1, 0.5), (1, math.inf)])
def test_bad_settings_are_refused(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, clock=FakeClock())


async def test_async_waiter_pattern_paces_to_the_rate():
    """The JetStream intake's loop: sleep wait_time(), then take. With the
    event loop's own clock the waiter takes 1 + rate*T tokens in T seconds."""
    loop = asyncio.get_running_loop()
    b = TokenBucket(rate=200, burst=1, clock=loop.time)
    start = loop.time()
    for _ in range(21):
        while not b.take():
            await asyncio.sleep(b.wait_time())
    elapsed = loop.time() - start
    assert 0.095 <= elapsed < 1.0        # 20 refills at 200/s = 0.1 s (1 was banked)
