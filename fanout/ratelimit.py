"""The one token bucket of the node (client frames, publishes, NATS intake).

A bucket holds at most ``burst`` tokens and gains ``rate`` tokens per second,
computed lazily from ``clock`` on each call (no timer, no task). It starts
full. It is not thread-safe: each bucket belongs to one event loop.

Callers that refuse work use :meth:`TokenBucket.take`; callers that wait
(the JetStream pull loop) sleep :meth:`TokenBucket.wait_time` and then take::

    while not bucket.take():
        await asyncio.sleep(bucket.wait_time())

"Unlimited" (a rate setting of 0) is the caller's decision: skip the bucket.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; starts full.

    ``rate`` must be > 0 and finite and ``burst`` >= 1 (a bucket that can never
    hold one token would refuse everything); ``ValueError`` otherwise.
    """

    __slots__ = ("rate", "burst", "_clock", "_tokens", "_at")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"token bucket rate must be a positive finite number, got {rate!r}")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError(f"token bucket burst must be a finite number >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        # max(): a clock that steps back (a fake one in tests) must not drain the bucket.
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        return self._tokens

    @property
    def tokens(self) -> float:
        """Tokens available now (fractional)."""
        return self._refill()

    def take(self, n: float = 1) -> bool:
        """Take ``n`` tokens if they are all there now; False (and take none) otherwise."""
        if self._refill() >= n:
            self._tokens -= n
            return True
        return False

    def wait_time(self, n: float = 1) -> float:
        """Seconds until ``n`` tokens will be there (0.0 when they are now).

        ``n`` above ``burst`` can never be taken at once: ``ValueError``, so a
        waiter fails loudly instead of sleeping forever.
        """
        if n > self.burst:
            raise ValueError(f"{n} tokens never fit in a bucket of burst {self.burst:g}")
        missing = n - self._refill()
        return missing / self.rate if missing > 0 else 0.0
