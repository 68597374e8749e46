"""Delta messages in the compiled core (PROTOCOL 1.2): the Fossil encoder
against an independent decoder (npm fossil-delta, run with node) and the
Python client's decoder, and the base rule per client, on a real Core."""

from __future__ import annotations

import json
import random
import zlib

import pytest

from fanout.fossil import DeltaError, apply_delta, checksum
from fanout.protocol import message_tail
from fanout_core import Core, _core
from tests.core.test_core import parse_frames
from tests.helpers.fossil_node import node_apply


def token(rng: random.Random, i: int) -> dict[str, object]:
    """About 25 fields, about 700 bytes: a token object of the plan."""
    return {
        "id": f"tok{i:04d}", "symbol": f"SYM{i}", "name": f"Token number {i} of the odin market",
        "price": round(rng.uniform(0.001, 5), 8), "price_usd": round(rng.uniform(0.01, 50), 6),
        "market_cap": rng.randrange(10**6, 10**9), "volume_24h": rng.randrange(10**4, 10**8),
        "change_1h": round(rng.uniform(-5, 5), 4), "change_24h": round(rng.uniform(-30, 30), 4),
        "holders": rng.randrange(100, 100000), "trades": rng.randrange(1000, 10**6),
        "liquidity": rng.randrange(10**4, 10**7), "supply": 1_000_000_000, "decimals": 8,
        "creator": "bc1q" + "x" * 38, "created_at": 1764284630123, "image": f"https://cdn.odin.fun/t/{i}.png",
        "website": "https://example.org", "twitter": "@odin", "telegram": "t.me/odin",
        "btc_liquidity": rng.randrange(10**5, 10**8), "token_liquidity": rng.randrange(10**6, 10**9),
        "last_trade_ts": 1764284630000 + rng.randrange(10**6), "bonded": False, "verified": True,
    }


def mutate(rng: random.Random, obj: dict[str, object], fields: int = 10) -> dict[str, object]:
    out = dict(obj)
    nums = [k for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k in rng.sample(nums, min(fields, len(nums))):
        v = out[k]
        out[k] = round(v * rng.uniform(0.9, 1.1), 8) if isinstance(v, float) else int(v) + rng.randrange(1, 999)
    return out


def enc(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encoder_cases() -> list[tuple[bytes, bytes]]:
    rng = random.Random(20)
    cases: list[tuple[bytes, bytes]] = [
        (b"", b""), (b"", b"abc"), (b"abc", b""), (b"short", b"shorter"), (b"x" * 16, b"x" * 17),
        (b"a" * 1000, b"a" * 1000), (b"a" * 1000, b"b" * 1000), (bytes(range(256)) * 4, bytes(range(255, -1, -1)) * 4),
    ]
    for i in range(60):
        a = token(rng, i)
        cases.append((enc(a), enc(mutate(rng, a))))
    for _ in range(40):
        src = rng.randbytes(rng.randrange(0, 3000))
        dst = bytearray(src)
        for _ in range(rng.randrange(0, 20)):
            pos = rng.randrange(0, len(dst) + 1)
            if rng.random() < 0.5 and dst:
                del dst[pos:pos + rng.randrange(1, 50)]
            else:
                dst[pos:pos] = rng.randbytes(rng.randrange(1, 50))
        cases.append((src, bytes(dst)))
    trending = [{"rank": r, "id": f"tok{r:03d}", "price": r * 1.5, "change": r % 7} for r in range(100)]
    moved = trending[:]
    moved.insert(3, moved.pop(40))
    cases.append((enc(trending), enc(moved)))
    cases.append(("é漢字🙂 prix".encode() * 40, "é漢字🙂 prix!".encode() * 40))
    cases.append((b"y" * 70000, b"y" * 35000 + b"z" + b"y" * 35000))
    return cases


def test_encoder_output_decodes_with_npm_fossil_delta_and_the_python_decoder():
    cases = encoder_cases()
    deltas = [_core._fossil_delta(s, t) for s, t in cases]
    got = node_apply(list(zip([s for s, _ in cases], deltas, strict=True)))
    for (src, dst), d, g in zip(cases, deltas, got, strict=True):
        assert g == dst, (src[:60], dst[:60], d[:80], g)
        assert apply_delta(src, d) == dst
    # Similar inputs give small deltas (a token update: about ten fields changed).
    rng = random.Random(1)
    a = token(rng, 1)
    src, dst = enc(a), enc(mutate(rng, a))
    assert len(_core._fossil_delta(src, dst)) < len(dst) / 2


def test_checksum_matches_the_decoders_and_a_corrupted_delta_fails_everywhere():
    rng = random.Random(2)
    a = token(rng, 2)
    src, dst = enc(a), enc(mutate(rng, a))
    d = _core._fossil_delta(src, dst)
    assert d.endswith(b";")
    # A literal byte changed: same length, so only the checksum can tell.
    lit = d.index(b":") + 1
    bad = d[:lit] + bytes([d[lit] ^ 0x01]) + d[lit + 1:]
    with pytest.raises(DeltaError, match="checksum"):
        apply_delta(src, bad)
    # A wrong base: copies read other bytes.
    with pytest.raises(DeltaError):
        apply_delta(src.replace(b'"', b"'"), d)
    assert isinstance(node_apply([(src, bad)])[0], str)
    for n in (0, 1, 2, 3, 4, 5, 17, 33):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert apply_delta(b"", _core._fossil_delta(b"", data)) == data
    assert checksum(b"\x01\x02\x03\x04\x05") == 0x01020304 + 0x05000000


# ------------------------------------------------------------- the core's rule
class Reader:
    """One client's side of the wire: bases per channel, deltas applied."""

    def __init__(self, wbits: int = 0) -> None:
        self.bases: dict[str, bytes] = {}
        self.kinds: list[str] = []
        self.wbits = wbits
        self.inflater = zlib.decompressobj(-wbits) if wbits else None

    def feed(self, raw: bytes) -> list[tuple[str, bytes]]:
        out = []
        for b0, payload in parse_frames(raw):
            if self.inflater is not None and b0 & 0x40:
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            text = payload.decode()
            msg = json.loads(text)
            if msg.get("type") != "message":
                continue
            ch = msg["channel"]
            if "delta" in msg:
                body = apply_delta(self.bases[ch], msg["delta"].encode())
                self.kinds.append("delta")
            else:
                body = text[text.index(',"data":') + 8:-1].encode() if "data" in msg else b""
                self.kinds.append("full")
            self.bases[ch] = body
            out.append((ch, body))
        return out


def tail_for(subject: str, n: int, payload: bytes) -> bytes:
    return message_tail(subject, n, 1764284630000 + n, payload)


def stream(n: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    obj = token(rng, seed)
    out = []
    for _ in range(n):
        obj = mutate(rng, obj)
        out.append(enc(obj))
    return out


def test_first_full_then_deltas_only_to_who_asked_and_compressed_once():
    core = Core(8, delta=[">"])
    d, plain, dz, dz2 = core.add_client(-1), core.add_client(-1), core.add_client(-1, 15), core.add_client(-1, 15)
    core.subscribe(d, "a.*", delta=True)
    core.subscribe(plain, "a.*")
    core.subscribe(dz, "a.*", delta=True)
    core.subscribe(dz2, "a.*", delta=True)
    readers = {d: Reader(), plain: Reader(), dz: Reader(15), dz2: Reader(15)}
    payloads = stream(20)
    for i, p in enumerate(payloads):
        assert core.publish("a.b", tail_for("a.b", i + 1, p)) == 4
    out = core.take_dirty()
    for slot, r in readers.items():
        assert [b for _, b in r.feed(out[slot])] == payloads
    assert readers[d].kinds == ["full"] + ["delta"] * 19
    assert readers[dz].kinds == ["full"] + ["delta"] * 19
    assert readers[plain].kinds == ["full"] * 20
    st = core.delta_stats()
    assert st["computed"] == 19
    assert st["frames_delta"] == 3 * 19 and st["frames_full"] == 3 + 20
    assert st["bytes_delta"] < st["bytes_full"]
    # Deflating clients got the first message full, then deltas: each body
    # deflated once for both of them.
    assert core.compressions == 1 + 19
    assert st["bases"] == 1 and st["seen_bytes"] == 2 * 8


def test_base_rule_cases_each_get_a_full_message():
    core = Core(8, replay_size=50, delta=[">"], throttle=True)
    c = core.add_client(-1)
    core.subscribe(c, "a.*", delta=True)
    r = Reader()
    payloads = stream(40)
    it = iter(enumerate(payloads))

    def pub(subject: str = "a.b") -> None:
        i, p = next(it)
        core.publish(subject, tail_for(subject, i + 1, p))

    def kinds() -> list[str]:
        r.kinds = []
        r.feed(core.take_dirty().get(c, b""))
        return r.kinds

    pub()
    pub()
    assert kinds() == ["full", "delta"]
    # Unsubscribe, subscribe again: the first message is full.
    core.unsubscribe(c, "a.*")
    core.subscribe(c, "a.*", delta=True)
    pub()
    pub()
    assert kinds() == ["full", "delta"]
    # A message this client did not get (throttled away): the next one is full.
    core.set_level(c, 3)
    got = [core.publish("a.b", tail_for("a.b", 100 + k, payloads[0])) for k in range(3)]
    assert got == [0, 0, 0]           # 25 % of high: the budget fills on the fourth
    core.set_level(c, 0)
    pub()
    pub()
    k = kinds()
    assert k[-2:] == ["full", "delta"]
    # Catch-up history (deliver): the next live message is full.
    core.deliver(c, tail_for("a.b", 500, payloads[1]), 2, True)
    pub()
    assert kinds() == ["full", "full"]
    # Replay: full copies; the next live one is full.
    seq = core.seq(c)
    assert core.replay(c, seq, seq)[0] == 1
    pub()
    assert kinds() == ["full", "full"]
    # Overlapping patterns: one frame per message, still deltas.
    core.subscribe(c, "a.>", delta=True)
    pub()
    assert kinds() == ["delta"]
    # Another subject keeps its own base; a subject outside the opt-in gets full.
    pub("a.c")
    pub("a.c")
    assert kinds() == ["full", "delta"]


def test_only_patterns_that_asked_and_allowed_subjects_get_deltas():
    core = Core(8, delta=["a.b", "z.>"])
    c = core.add_client(-1)
    core.subscribe(c, "a.*", delta=True)
    core.subscribe(c, "q.*")              # no delta asked here
    r = Reader()
    for subject in ("a.b", "a.c", "q.r"):
        for i, p in enumerate(stream(3, seed=len(subject))):
            core.publish(subject, tail_for(subject, i + 1, p))
    r.feed(core.take_dirty()[c])
    # a.b: allowed and asked; a.c: not in the delta channels; q.r: not asked.
    assert r.kinds == ["full", "delta", "delta"] + ["full"] * 6
    off = Core(8)                          # no delta channels: deltas off
    s = off.add_client(-1)
    off.subscribe(s, "a.*", delta=True)
    for i, p in enumerate(stream(3)):
        off.publish("a.b", tail_for("a.b", i + 1, p))
    assert off.delta_stats()["computed"] == 0


def test_binary_string_small_and_unsmaller_payloads_go_full():
    core = Core(8, delta=[">"], delta_min_bytes=64)
    c = core.add_client(-1)
    core.subscribe(c, ">", delta=True)
    r = Reader()
    big = stream(3)
    seqs = [
        ("bin.x", [b"\xff\xfe" + b"\x00" * 300, b"\xff\xfe" + b"\x00" * 301]),           # data_b64
        ("str.x", [b"plain text " * 30, b"plain text! " * 30]),                          # a JSON string data
        ("small.x", [b'{"a":1}', b'{"a":2}']),                                          # under min bytes
        ("rand.x", [enc({"r": random.Random(i).randbytes(200).hex()}) for i in range(2)]),  # nothing shared
        ("ok.x", big[:2]),
    ]
    for subject, ps in seqs:
        for i, p in enumerate(ps):
            core.publish(subject, tail_for(subject, i + 1, p))
    r.feed(core.take_dirty()[c])
    assert r.kinds == ["full"] * 9 + ["delta"]
    assert core.delta_stats()["refused_not_smaller"] >= 1


def test_a_delta_that_cuts_a_character_is_refused_as_not_utf8():
    core = Core(8, delta=[">"])
    c = core.add_client(-1)
    core.subscribe(c, ">", delta=True)
    # The only change is inside a 3-byte character shared by both: a copy up
    # to its first bytes, a literal of its last byte.
    a = ('{"t":"' + "x" * 100 + "\u20ac" + "y" * 100 + '"}').encode()
    b = ('{"t":"' + "x" * 100 + "\u20ad" + "y" * 100 + '"}').encode()
    core.publish("u.x", tail_for("u.x", 1, a))
    core.publish("u.x", tail_for("u.x", 2, b))
    r = Reader()
    assert [p for _, p in r.feed(core.take_dirty()[c])] == [a, b]
    assert r.kinds == ["full", "full"]
    assert core.delta_stats()["refused_not_utf8"] == 1


def test_conflated_frame_and_replay_stay_consistent():
    before = _core.live_messages()
    core = Core(8, replay_size=16, queue_limit=1, hard_limit=1 << 20, delta=[">"], throttle=True, conflate=["p.*"])
    c = core.add_client(-1)
    core.subscribe(c, "p.*", delta=True)
    ps = stream(4)
    core.publish("p.x", tail_for("p.x", 1, ps[0]))
    core.publish("p.x", tail_for("p.x", 2, ps[1]))       # queued as a delta
    core.set_level(c, 1)
    core.publish("p.x", tail_for("p.x", 3, ps[2]))       # replaces it, full
    r = Reader()
    assert [p for _, p in r.feed(core.take_dirty()[c])] == [ps[0], ps[2]]
    assert r.kinds == ["full", "full"]
    assert core.replay(c, 2, 2)[0] == 1
    again = Reader()
    assert [p for _, p in again.feed(core.take_dirty()[c])] == [ps[2]]   # what that seq carried
    core.set_level(c, 0)
    core.publish("p.x", tail_for("p.x", 4, ps[3]))
    assert [p for _, p in r.feed(core.take_dirty()[c])] == [ps[3]]
    core.remove_client(c)
    del core
    assert _core.live_messages() == before       # the replaced delta's full message is not leaked


def test_no_message_leaks_with_deltas():
    before = _core.live_messages()
    core = Core(4, replay_size=4, delta=[">"])
    c = core.add_client(-1, 12)
    core.subscribe(c, "a.*", delta=True)
    for i, p in enumerate(stream(30)):
        core.publish("a.b", tail_for("a.b", i + 1, p))
        if i % 7 == 0:
            core.take_dirty()
    core.publish_batch(["a.b", "a.c", "a.b"], [tail_for("a.b", 50, b'{"x":1}')] * 3, [2, 2, 2])
    core.remove_client(c)
    del core
    assert _core.live_messages() == before


def test_route_cache_reset_between_batches_keeps_deltas_right():
    # The smallest cache (one batch's worth); 40 subjects a batch: the cache
    # is dropped before every batch after the first (never in the middle of one).
    core = Core(4, max_routes=64, delta=[">"])
    c = core.add_client(-1)
    core.subscribe(c, "a.*", delta=True)
    r = Reader()
    subjects = [f"a.s{j}" for j in range(40)]
    ps = {s: stream(4, seed=i + 1) for i, s in enumerate(subjects)}
    sent = []
    for i in range(4):
        batch = [(s, ps[s][i]) for s in subjects]
        core.publish_batch([s for s, _ in batch], [tail_for(s, i + 1, p) for s, p in batch], [2] * len(batch))
        sent += [p for _, p in batch]
    # Every reset drops the routes and their bases: full messages, never a wrong base.
    assert [p for _, p in r.feed(core.take_dirty()[c])] == sent
    assert r.kinds == ["full"] * len(sent)


def test_several_messages_of_a_subject_in_one_batch_chain_deltas():
    core = Core(8, delta=[">"], throttle=True)
    c, slow = core.add_client(-1), core.add_client(-1)
    for s in (c, slow):
        core.subscribe(s, "a.*", delta=True)
    ps = stream(12)
    core.publish_batch(["a.b"] * 6, [tail_for("a.b", i + 1, p) for i, p in enumerate(ps[:6])], [2] * 6)
    r = Reader()
    assert [p for _, p in r.feed(core.take_dirty()[c])] == ps[:6]
    assert r.kinds == ["full"] + ["delta"] * 5
    # A client that drops some of a batch (throttled) gets a full message after each gap.
    core.set_level(slow, 2)
    core.publish_batch(["a.b"] * 6, [tail_for("a.b", i + 7, p) for i, p in enumerate(ps[6:])], [2] * 6)
    out = core.take_dirty()
    assert [p for _, p in r.feed(out[c])] == ps[6:]
    assert r.kinds[6:] == ["delta"] * 6
    rs = Reader()
    got = rs.feed(out[slow])
    assert 0 < len(got) < 6 and rs.kinds[0] == "full"
    published = {p: i for i, p in enumerate(ps)}
    for (_, p), kind, prev in zip(got, rs.kinds, [None, *got[:-1]], strict=True):
        if kind == "delta":                      # only right after the message before it
            assert prev is not None and published[p] == published[prev[1]] + 1


def test_turning_deltas_off_and_on_again_starts_full():
    core = Core(4, delta=[">"])
    c = core.add_client(-1)
    core.subscribe(c, "a.*", delta=True)
    ps = stream(6)
    r = Reader()
    for i in range(2):
        core.publish("a.b", tail_for("a.b", i + 1, ps[i]))
    core.subscribe(c, "a.*", delta=False)      # the same pattern again, without deltas
    core.publish("a.b", tail_for("a.b", 3, ps[2]))
    core.subscribe(c, "a.*", delta=True)
    for i in (3, 4, 5):
        core.publish("a.b", tail_for("a.b", i + 1, ps[i]))
    assert [p for _, p in r.feed(core.take_dirty()[c])] == ps
    assert r.kinds == ["full", "delta", "full", "full", "delta", "delta"]


def test_a_subject_with_one_delta_subscriber_costs_a_few_bytes():
    # Issue 19's rule for the delta sets too: at 10,000 slots a bitset is
    # 1,256 bytes; one delta subscriber costs a few array entries.
    core = Core(10_000, delta=[">"])
    slots = [core.add_client(-1) for _ in range(3)]
    ps = stream(3)
    for j in range(100):
        s = f"t.s{j}"
        core.subscribe(slots[j % 3], s, delta=True)
        for i in range(3):
            core.publish(s, tail_for(s, i + 1, ps[i]))
    core.discard_queued()
    st = core.delta_stats()
    assert st["computed"] == 200 and st["bases"] == 100
    # Per subject: the pattern's and the route's recipient and opt-in sets and
    # the two "sent" sets, arrays of 4 slots each.
    assert st["seen_bytes"] == 100 * 2 * 16
    assert core.set_bytes == 100 * 6 * 16
    # Deltas still flow: the third message of a subject went as a delta.
    assert st["frames_delta"] == 200


def test_delta_sets_follow_their_subscribers_and_empty_when_they_leave():
    core = Core(10_000, delta=[">"])
    words = (10_000 + 63) // 64
    ps = stream(40)
    n = 0
    # 300 clients come and go on one subject, 20 at a time: the sent sets
    # never collect the departed ones (they stay arrays of the live ones).
    live: list[int] = []
    for _rnd in range(15):
        for _ in range(20):
            c = core.add_client(-1)
            core.subscribe(c, "t.x", delta=True)
            live.append(c)
        n += 1
        core.publish("t.x", tail_for("t.x", n, ps[n % 40]))
        n += 1
        core.publish("t.x", tail_for("t.x", n, ps[n % 40]))
        core.discard_queued()
        # Arrays of the live subscribers (at most 90 here), not bitsets.
        assert core.delta_stats()["seen_bytes"] <= 2 * 4 * 2 * len(live) < 2 * words * 8
        for c in live[:15]:
            core.remove_client(c)
        live = live[15:]
    # Dense: every live client on a second subject (over sparse_max) makes bitsets, then arrays again.
    many = [core.add_client(-1) for _ in range(core.sparse_max + 10)]
    for c in many:
        core.subscribe(c, "t.y", delta=True)
    for _ in range(2):
        n += 1
        core.publish("t.y", tail_for("t.y", n, ps[n % 40]))
    core.discard_queued()
    assert core.delta_stats()["seen_bytes"] >= 2 * words * 8
    assert core.delta_stats()["frames_delta"] >= len(many)
    for c in many + live:
        core.remove_client(c)
    assert core.set_bytes == 0 and core.route_count == 0
    assert core.delta_stats()["seen_bytes"] == 0 and core.delta_stats()["bases"] == 0
