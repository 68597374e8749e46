"""Core memory per subject: 20,000 subjects with 1 to 5 subscribers each, at
``WS_MAX_CONNECTIONS=10000`` (issue 19, item 2).

Each measurement runs in a fresh process (RSS is a process figure): build a
core for 10,000 clients, attach them, then subscribe 20,000 exact subjects
(1 to 5 random clients each) plus a few wildcard patterns, and resolve every
subject's route once (what its first publish does). Reported: the RSS growth
from the subscriptions and routes (C sets and Python objects together), and the core's own ``set_bytes`` gauge
where the build has it.

    python -m benchmarks.core_mem [--subjects 20000] [--baseline /path/to/old/tree] [--json out.json]

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


def measure(subjects: int, capacity: int, seed: int = 1) -> dict[str, float]:
    from fanout_core import Core

    rnd = random.Random(seed)
    core = Core(capacity, replay_size=100)
    slots = [core.add_client(-1) for _ in range(capacity)]
    names = [f"odin.token.t{i}.update" for i in range(subjects)]
    plan = [(name, rnd.sample(slots, rnd.randint(1, 5))) for name in names]
    wild = ["odin.token.*.update", "odin.>", "odin.token.t1*.update"]
    gc.collect()
    r0 = _rss()
    for name, who in plan:
        for s in who:
            core.subscribe(s, name)
    for i, p in enumerate(wild):
        core.subscribe(slots[i], p)
    for name in names:
        core.recipients(name)           # builds the route, as a first publish does
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
    return out


def _child(path: str | None, subjects: int, capacity: int) -> dict[str, float]:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--subjects", str(subjects),
                          "--capacity", str(capacity)], env=env, capture_output=True, text=True, timeout=600,
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
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.subjects, args.capacity)))
        return
    rows = {"this": _child(None, args.subjects, args.capacity)}
    if args.baseline:
        rows["baseline"] = _child(args.baseline, args.subjects, args.capacity)
    for k, r in rows.items():
        print(f"{k:9s} {r['subjects']} subjects, {r['subscriptions']} subscriptions: RSS +{r['rss_bytes'] / 2**20:6.1f} MiB "
              f"({r['rss_per_subject']:7.1f} B/subject), sets {r.get('set_bytes', '-')} B")
    if args.baseline:
        ratio = rows["baseline"]["rss_bytes"] / max(1, rows["this"]["rss_bytes"])
        rows["ratio"] = {"rss": round(ratio, 2)}
        print(f"baseline / this: {ratio:.2f}x less memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
