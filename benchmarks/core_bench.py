"""Match-and-enqueue alone: the compiled core against a plain-Python dict-of-sets
implementation of the same work, in the same run.

The same work means: find the recipients of a subject (exact and wildcard
patterns, cached per subject), and for each one take the next seq, remember the
message in its replay ring, and append its framed bytes to its output queue.
Queues are dropped (not written) every batch: sockets are not part of this.

    python -m benchmarks.core_bench [--clients 10000] [--subjects 1000] [--json out.json]

Target (issue 2): >= 10 M deliveries/s on one core, >= 50x the Python version.
``publish_batch`` is what the node uses (every message accepted in one loop
turn is matched together); ``publish`` is one message at a time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque

from fanout_core import Core


class PyFanout:
    """What a Python team would write: dict of sets, per-client objects."""

    def __init__(self, replay: int) -> None:
        self.exact: dict[str, set[int]] = {}
        self.wild: dict[str, tuple[list[str], set[int]]] = {}
        self.cache: dict[str, set[int]] = {}
        self.seq: dict[int, int] = {}
        self.ring: dict[int, deque] = {}
        self.out: dict[int, bytearray] = {}
        self.replay = replay

    def add(self, c: int) -> None:
        self.seq[c] = 0
        self.ring[c] = deque(maxlen=self.replay)
        self.out[c] = bytearray()

    def subscribe(self, c: int, pattern: str) -> None:
        toks = pattern.split(".")
        if "*" in toks or ">" in toks:
            self.wild.setdefault(pattern, (toks, set()))[1].add(c)
        else:
            self.exact.setdefault(pattern, set()).add(c)
        self.cache.clear()

    @staticmethod
    def _match(p: list[str], s: list[str]) -> bool:
        for i, t in enumerate(p):
            if t == ">":
                return len(s) > i
            if i >= len(s) or (t != "*" and t != s[i]):
                return False
        return len(p) == len(s)

    def recipients(self, subject: str) -> set[int]:
        r = self.cache.get(subject)
        if r is None:
            r = set(self.exact.get(subject, ()))
            st = subject.split(".")
            for toks, members in self.wild.values():
                if self._match(toks, st):
                    r |= members
            self.cache[subject] = r
        return r

    def publish(self, subject: str, tail: bytes) -> int:
        n = 0
        for c in self.recipients(subject):
            s = self.seq[c] + 1
            self.seq[c] = s
            self.ring[c].append(tail)
            payload = b'{"seq":%d,' % s + tail
            ln = len(payload)
            head = bytes((0x81, ln)) if ln < 126 else bytes((0x81, 126)) + ln.to_bytes(2, "big")
            self.out[c] += head + payload
            n += 1
        return n

    def drop_queues(self) -> None:
        for b in self.out.values():
            b.clear()


def workload(clients: int, subjects: int, seed: int = 1):
    rnd = random.Random(seed)
    names = [f"odin.token.t{i}.update" for i in range(subjects)]
    subs: list[list[str]] = []
    for _ in range(clients):
        pats = rnd.sample(names, 3)
        r = rnd.random()
        if r < 0.10:
            pats.append("odin.token.*.update")
        elif r < 0.15:
            pats.append("odin.>")
        subs.append(pats)
    return names, subs


def run_core(clients: int, names: list[str], subs: list[list[str]], msgs: int, tail: bytes, hot: bool,
             batch: int = 1) -> tuple[float, int]:
    core = Core(clients, replay_size=100, queue_limit=1 << 30)
    for c in range(clients):
        slot = core.add_client(-1)
        for p in (["odin.token.hot.update"] if hot else subs[c]):
            core.subscribe(slot, p)
    order = ["odin.token.hot.update"] * msgs if hot else [names[i % len(names)] for i in range(msgs)]
    for s in order[:len(names)]:
        core.publish(s, tail)  # warm the route cache
    core.discard_queued()
    n = 0
    t0 = time.process_time()
    if batch > 1:
        tails, prios = [tail] * batch, [2] * batch
        for i in range(0, len(order), batch):
            n += core.publish_batch(order[i:i + batch], tails[:len(order[i:i + batch])], prios[:len(order[i:i + batch])])
            core.discard_queued()
    else:
        for i, s in enumerate(order):
            n += core.publish(s, tail)
            if i % 16 == 15:
                core.discard_queued()
    dt = time.process_time() - t0
    return dt, n


def run_python(clients: int, names: list[str], subs: list[list[str]], msgs: int, tail: bytes, hot: bool) -> tuple[float, int]:
    py = PyFanout(100)
    for c in range(clients):
        py.add(c)
        for p in (["odin.token.hot.update"] if hot else subs[c]):
            py.subscribe(c, p)
    order = ["odin.token.hot.update"] * msgs if hot else [names[i % len(names)] for i in range(msgs)]
    for s in order[:len(names)]:
        py.recipients(s)
    n = 0
    t0 = time.process_time()
    for i, s in enumerate(order):
        n += py.publish(s, tail)
        if i % 16 == 15:
            py.drop_queues()
    dt = time.process_time() - t0
    return dt, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--msgs", type=int, default=4000, help="messages for the core (python gets 1/20)")
    ap.add_argument("--payload", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    tail = b'"type":"message","channel":"odin.token.t1.update","stream_seq":1,"ts":1,"data":{"p":"' + b"x" * max(0, args.payload - 80) + b'"}}'
    names, subs = workload(args.clients, args.subjects)
    results = {}
    for hot in (False, True):
        label = "hot subject" if hot else f"{args.subjects} subjects (exact + wildcard)"
        msgs = args.msgs if not hot else max(64, args.msgs // 16)
        pdt, pn = run_python(args.clients, names, subs, max(10, msgs // 20), tail, hot)
        p_rate = pn / pdt
        row = {"python_deliveries_per_s": round(p_rate)}
        for mode, batch in (("publish", 1), ("publish_batch", 64)):
            best = 0.0
            for _ in range(args.repeat):   # best of N: the machine is shared and noisy
                cdt, cn = run_core(args.clients, names, subs, msgs, tail, hot, batch)
                best = max(best, cn / cdt)
            row[f"core_{mode}_deliveries_per_s"] = round(best)
            row[f"core_{mode}_ratio"] = round(best / p_rate, 1)
            print(f"{label:34s} core {mode:13s} {best / 1e6:6.2f} M/s ({1e9 / best:5.1f} ns each)   "
                  f"python {p_rate / 1e6:5.3f} M/s   ratio {best / p_rate:5.1f}x")
        results[label] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clients": args.clients, "subjects": args.subjects, "payload": args.payload, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
