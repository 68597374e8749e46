"""A wire-level delta client for the tests (PROTOCOL 1.2): keeps the base of
each subject per connection, applies ``delta`` messages with the Python
decoder, and rebuilds every payload, so a test can compare it byte for byte
with what was published (by ``stream_seq``)."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass, field
from typing import Any

from fanout.fossil import apply_delta


@dataclass
class Rebuilt:
    seq: int
    channel: str
    stream_seq: int
    kind: str            # "full" or "delta"
    payload: bytes       # the payload bytes as the client rebuilt them


@dataclass
class Rebuilder:
    """One connection's bases; :meth:`frame` takes each text frame in order."""

    bases: dict[str, bytes] = field(default_factory=dict)
    got: list[Rebuilt] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)

    def frame(self, text: str | bytes) -> dict[str, Any]:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        msg = json.loads(text)
        if msg.get("type") != "message":
            self.other.append(msg)
            if msg.get("type") == "unsubscribed":
                for ch in list(self.bases):
                    del self.bases[ch]      # it forgets them on unsubscribe
            return msg
        ch = msg["channel"]
        if "delta" in msg:
            body = apply_delta(self.bases[ch], msg["delta"].encode("utf-8"))   # raises on a wrong base
            kind = "delta"
        elif "data_b64" in msg:
            body = base64.b64decode(msg["data_b64"])
            kind = "full"
        else:
            body = text[text.index(',"data":') + 8:-1].encode("utf-8")
            kind = "full"
        self.bases[ch] = body
        self.got.append(Rebuilt(msg["seq"], ch, msg["stream_seq"], kind, body))
        return msg

    def kinds(self, channel: str | None = None) -> list[str]:
        return [r.kind for r in self.got if channel is None or r.channel == channel]

    def check(self, published: dict[int, bytes]) -> None:
        """Every rebuilt payload is the published one, byte for byte."""
        for r in self.got:
            assert r.payload == published[r.stream_seq], (r, published[r.stream_seq][:80])


def token_stream(n: int, tok: int = 0, seed: int = 0) -> list[bytes]:
    """The plan's token updates: about 25 fields, about 700 bytes; a trade
    changes about ten numeric fields."""
    rng = random.Random(seed * 1000 + tok)
    obj: dict[str, Any] = {
        "id": f"tok{tok:04d}", "symbol": f"SYM{tok}", "name": f"Token number {tok} of the odin market",
        "price": 1.2345, "price_usd": 12.5, "market_cap": 12_345_678, "volume_24h": 345_678,
        "change_1h": 0.5, "change_24h": -3.25, "holders": 1234, "trades": 56789, "liquidity": 2_345_678,
        "supply": 1_000_000_000, "decimals": 8, "creator": "bc1q" + "x" * 38, "created_at": 1764284630123,
        "image": f"https://cdn.odin.fun/t/{tok}.png", "website": "https://example.org", "twitter": "@odin",
        "telegram": "t.me/odin", "btc_liquidity": 123_456, "token_liquidity": 9_876_543,
        "last_trade_ts": 1764284630000, "bonded": False, "verified": True,
    }
    nums = [k for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("supply", "decimals", "created_at")]
    out = []
    for _ in range(n):
        for k in rng.sample(nums, 10):
            v = obj[k]
            obj[k] = round(v * rng.uniform(0.95, 1.05), 6) if isinstance(v, float) else v + rng.randrange(1, 999)
        out.append(json.dumps(obj, separators=(",", ":")).encode())
    return out
