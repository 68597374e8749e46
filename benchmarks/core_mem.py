"""Core memory per subject: 20,000 subjects with 1 to 5 subscribers each, at
``WS_MAX_CONNECTIONS=10000`` (issue 19, item 2).

Each measurement runs in a fresh process (RSS is a process figure): build a
core for 10,000 clients, attach them, then subscribe 20,000 exact subjects
(1 to 5 random clients each) plus a few wildcard patterns, and resolve every
subject's route once (what its first publish does). Reported: the RSS growth
from the subscriptions and routes (C sets and Python objects together), and the core's own ``set_bytes`` gauge
where the build has it.

    python -m benchmarks.core_mem [--subjects 20000] [--baseline /path/to/old/tree] [--json out.json] [--delta]

``--delta``: every subscription asks for Fossil deltas (as both clients do by
default) and every subject gets two messages (its first delta, so the
subject keeps its base and the sets of who was sent it); reported besides:
``seen_bytes`` (those sets) and ``message_bytes`` (messages the rings and
queues hold, the same in every build: subtract it when comparing RSS).

``--baseline`` runs the same measurement against another checkout's built
core (``PYTHONPATH`` pointed there, e.g. a ``git worktree`` of the commit
before the change) in the same run, and prints the ratio.
Target: at least 4x less than the bitset-per-subject core.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(subjects: int, capacity: int, seed: int = 1, delta: bool = False) -> dict[str, float]:
    from fanout.protocol import message_tail
    from fanout_core import Core

    rnd = random.Random(seed)
    core = Core(capacity, replay_size=100, delta=[">"]) if delta else Core(capacity, replay_size=100)
    slots = [core.add_client(-1) for _ in range(capacity)]
    names = [f"odin.token.t{i}.update" for i in range(subjects)]
    plan = [(name, rnd.sample(slots, rnd.randint(1, 5))) for name in names]
    wild = ["odin.token.*.update", "odin.>", "odin.token.t1*.update"]
    gc.collect()
    r0 = _rss()
    for name, who in plan:
        for s in who:
            if delta:
                core.subscribe(s, name, delta=True)
            else:
                core.subscribe(s, name)
    for i, p in enumerate(wild):
        core.subscribe(slots[i], p)
    for name in names:
        if delta:
            for n in (1, 2):            # a base, then a delta against it
                payload = b'{"price":%d,"volume":%d,"name":"%s","padding":"%s"}' % (n, n * 7, name.encode(), b"x" * 100)
                core.publish(name, message_tail(name, n, 1764284630000 + n, payload))
            core.discard_queued()
        else:
            core.recipients(name)       # builds the route, as a first publish does
    gc.collect()
    r1 = _rss()
    st = core.stats()
    out = {
        "subjects": subjects,
        "capacity": capacity,
        "subscriptions": sum(len(w) for _, w in plan),
        "rss_bytes": r1 - r0,
        "rss_per_subject": round((r1 - r0) / subjects, 1),
        "patterns": st["patterns"],
        "routes": st["routes"],
    }
    if "set_bytes" in st:
        out["set_bytes"] = st["set_bytes"]
    if delta:
        ds = core.delta_stats()
        out["seen_bytes"] = ds["seen_bytes"]
        out["deltas"] = ds["computed"]
        out["message_bytes"] = st.get("message_bytes", 0)
    return out


def _child(path: str | None, subjects: int, capacity: int, delta: bool = False) -> dict[str, float]:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--subjects", str(subjects),
                          "--capacity", str(capacity)] + (["--delta"] if delta else []), env=env, capture_output=True, text=True, timeout=600,
                         cwd=path or os.getcwd())
    if res.returncode:
        raise SystemExit(res.stderr)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=20000)
    ap.add_argument("--capacity", type=int, default=10000)
    ap.add_argument("--baseline", default="", help="another tree with a built core, measured the same way")
    ap.add_argument("--json", default="")
    ap.add_argument("--delta", action="store_true", help="subscriptions ask for deltas; two messages per subject")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.subjects, args.capacity, delta=args.delta)))
        return
    rows = {"this": _child(None, args.subjects, args.capacity, args.delta)}
    if args.baseline:
        rows["baseline"] = _child(args.baseline, args.subjects, args.capacity, args.delta)
    for k, r in rows.items():
        print(f"{k:9s} {r['subjects']} subjects, {r['subscriptions']} subscriptions: RSS +{r['rss_bytes'] / 2**20:6.1f} MiB "
              f"({r['rss_per_subject']:7.1f} B/subject), sets {r.get('set_bytes', '-')} B"
              + (f", delta seen sets {r['seen_bytes']} B, messages held {r['message_bytes']} B" if "seen_bytes" in r else ""))
    if args.baseline:
        ratio = rows["baseline"]["rss_bytes"] / max(1, rows["this"]["rss_bytes"])
        rows["ratio"] = {"rss": round(ratio, 2)}
        print(f"baseline / this: {ratio:.2f}x less memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
