"""Shared pieces of the load generator and the runner: subjects, histograms.

The subscription distributions live here so that the load generator (which
subscribes) and the runner (which computes how many deliveries to expect for
what the publisher sent) agree on who gets what.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass

import numpy as np

HOT_SUBJECT = "odin.token.hot.update"
WILDCARD_PATTERN = "odin.token.*.update"
DISTS = ("hot", "spread", "wildcard")


def subject_name(j: int) -> str:
    """The j-th subject of the spread/wildcard distributions."""
    return f"odin.token.s{j}.update"


@dataclass(frozen=True)
class Distribution:
    """Who subscribes to what.

    - ``hot``: every client on one subject (:data:`HOT_SUBJECT`).
    - ``spread``: ``subjects`` subjects; client ``c`` takes ``per_client``
      consecutive ones starting at ``c * per_client`` (mod ``subjects``), so
      every subject has about ``clients * per_client / subjects`` subscribers.
    - ``wildcard``: every client subscribes to :data:`WILDCARD_PATTERN`, and the
      publisher spreads over ``subjects`` subjects that all match it.
    """

    kind: str = "hot"
    subjects: int = 1000
    per_client: int = 10

    def __post_init__(self) -> None:
        if self.kind not in DISTS:
            raise ValueError(f"unknown distribution {self.kind!r}; one of {DISTS}")
        if self.subjects < 1 or self.per_client < 1:
            raise ValueError("subjects and per_client must be >= 1")

    def channels(self, cid: int) -> list[str]:
        """Patterns client ``cid`` subscribes to."""
        if self.kind == "hot":
            return [HOT_SUBJECT]
        if self.kind == "wildcard":
            return [WILDCARD_PATTERN]
        k = min(self.per_client, self.subjects)
        base = cid * k
        return [subject_name((base + j) % self.subjects) for j in range(k)]

    def publish_subjects(self) -> list[str]:
        """Subjects the publisher cycles over (round-robin)."""
        if self.kind == "hot":
            return [HOT_SUBJECT]
        return [subject_name(j) for j in range(self.subjects)]

    def subscribers_per_subject(self, client_ids: list[int] | range) -> dict[str, int]:
        """How many of ``client_ids`` receive a message on each published subject."""
        if self.kind in ("hot", "wildcard"):
            n = len(client_ids)
            return {s: n for s in self.publish_subjects()}
        counts = [0] * self.subjects
        k = min(self.per_client, self.subjects)
        for cid in client_ids:
            base = cid * k
            for j in range(k):
                counts[(base + j) % self.subjects] += 1
        return {subject_name(j): c for j, c in enumerate(counts)}


def is_slow(cid: int, share: float) -> bool:
    """Deterministically spread a ``share`` (0..1) of client ids as slow readers."""
    if share <= 0:
        return False
    # Multiplicative hash so the slow ones are spread over workers and subjects.
    return ((cid * 2654435761) % 100_000) < share * 100_000


def make_payload(t_ns: int, i: int, size: int) -> bytes:
    """A JSON publish payload of about ``size`` bytes: ``{"t":..,"i":..,"p":"xxx"}``.

    ``t`` (time.time_ns() at publish) comes first so receivers find it with
    one ``find``; ``i`` is a per-subject counter (gap checks where the server
    gives no per-client seq, i.e. NATS).
    """
    head = b'{"t":%d,"i":%d,"p":"' % (t_ns, i)
    pad = max(0, size - len(head) - 2)
    return head + b"x" * pad + b'"}'


class TokenPayloads:
    """The plan's token updates, per subject: about 25 fields, about 700 bytes,
    where each message (a trade) changes about ten numeric fields of the
    previous one. ``t`` comes first, as in :func:`make_payload`. Deterministic."""

    FIELDS = ("price", "price_usd", "market_cap", "volume_24h", "change_1h", "change_24h", "holders", "trades",
              "liquidity", "btc_liquidity", "token_liquidity", "last_trade_ts", "buys_24h", "sells_24h")

    def __init__(self, seed: int = 20) -> None:
        self.seed = seed
        self.state: dict[str, dict[str, object]] = {}

    def _new(self, subject: str) -> dict[str, object]:
        tok = subject.split(".")[2] if subject.count(".") >= 2 else subject
        obj: dict[str, object] = {
            "id": tok, "symbol": tok[:6].upper(), "name": f"Token {tok} of the odin market",
            "price": 1.2345678, "price_usd": 12.345678, "market_cap": 12_345_678, "volume_24h": 345_678,
            "change_1h": 0.5123, "change_24h": -3.2511, "holders": 1234, "trades": 56789, "liquidity": 2_345_678,
            "supply": 1_000_000_000, "decimals": 8, "creator": "bc1qxy2kgdygjrsqtzq2n0yrf2493p83kkfjhx0wlh",
            "created_at": 1764284630123, "image": f"https://cdn.odin.fun/tokens/{tok}.webp",
            "twitter": "https://x.com/odinfun", "website": f"https://odin.fun/token/{tok}",
            "description": "A community token on odin.fun, traded against Bitcoin.", "btc_liquidity": 123_456, "token_liquidity": 9_876_543,
            "last_trade_ts": 1764284630000, "buys_24h": 345, "sells_24h": 210, "bonded": False,
        }
        return obj

    def make(self, subject: str, t_ns: int, i: int, stamp: bool = True) -> bytes:
        """The next update of ``subject``; ``stamp``: lead with the load generator's ``t`` and ``i``."""
        obj = self.state.get(subject)
        if obj is None:
            obj = self.state[subject] = self._new(subject)
        h = zlib.crc32(b"%d %s %d" % (self.seed, subject.encode(), i))
        for k in range(10):
            name = self.FIELDS[(h + k * 7) % len(self.FIELDS)]
            v = obj[name]
            step = (h >> (k % 24)) % 997 + 1
            obj[name] = round(v * (1 + (step - 498) / 100_000), 7) if isinstance(v, float) else int(v) + step  # type: ignore[arg-type]
        body = json.dumps(obj, separators=(",", ":")).encode()
        return b'{"t":%d,"i":%d,' % (t_ns, i) + body[1:] if stamp else body


# --- latency histogram -----------------------------------------------------
# Log buckets, 1 % wide, from 1 us to ~25 min: percentiles are within 1 %.
H_BASE = 1.01
H_LOG = math.log(H_BASE)
H_BUCKETS = 2100


def bucketize(lat_ns: np.ndarray) -> np.ndarray:
    """Histogram counts (int64, ``H_BUCKETS``) of latencies given in ns."""
    if lat_ns.size == 0:
        return np.zeros(H_BUCKETS, dtype=np.int64)
    us = np.maximum(lat_ns, 1000).astype(np.float64) / 1000.0
    idx = np.minimum((np.log(us) / H_LOG).astype(np.int64), H_BUCKETS - 1)
    return np.bincount(idx, minlength=H_BUCKETS).astype(np.int64)


def percentile_ms(counts: np.ndarray, q: float) -> float | None:
    """The ``q`` (0..1) quantile in ms from bucket counts; None when empty."""
    total = int(counts.sum())
    if total == 0:
        return None
    cum = np.cumsum(counts)
    idx = int(np.searchsorted(cum, max(1, math.ceil(q * total))))
    return H_BASE ** (idx + 0.5) / 1000.0


def summarize_hist(counts: np.ndarray) -> dict[str, float | None]:
    return {
        "p50_ms": percentile_ms(counts, 0.50),
        "p99_ms": percentile_ms(counts, 0.99),
        "p999_ms": percentile_ms(counts, 0.999),
        "max_ms": percentile_ms(counts, 1.0),
    }
