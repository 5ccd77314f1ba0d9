#!/usr/bin/env python3
"""A/B fan-out of two existing snapshots, interleaved in one run so the ratio means something on a noisy
machine: for instance the default image before and after a change (create ``a`` with the old code, ``b``
with the new, same FORKD_SNAPSHOT_ROOT).

Each round runs every mode (bench/fanout.py's ``run_mode``: wall time until all N answered
``numpy.zeros(5).tolist()``, per-child latency, PSS per child with all N alive) for ``a`` and ``b``, the
order flipped every round; then one idle child of each (bench/idle.py's ``measure``: clocksource, timer
interrupts a second, host CPU). ``summary`` holds the medians over rounds and b / a. Prints JSON.

Usage: python3 bench/ab_snapshots.py --a TAG --b TAG [--n 100] [--rounds 2] [--modes pool,cold]
       [--out bench/results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fanout import fanout_stats, ratio, run_mode  # noqa: E402
from idle import measure as idle_measure  # noqa: E402

from forkd import __version__  # noqa: E402
from forkd.engine import Engine  # noqa: E402


def say(msg: str) -> None:
    print(f"[ab] {msg}", file=sys.stderr, flush=True)


def idle_one(eng: Engine, tag: str) -> dict[str, Any]:
    results = eng.spawn(tag, 1, use_pool=False)
    kids = [r.child for r in results if r.child is not None]
    if not kids:
        return {"error": str(results[0].error)}
    try:
        return idle_measure(kids, secs=10.0, settle=3.0)
    finally:
        for k in kids:
            k.kill()


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        per: dict[str, dict[str, float | None]] = {}
        for which in ("a", "b"):
            rs = [r for r in runs if r["mode"] == mode and r["which"] == which]
            per[which] = fanout_stats(rs)
        out[mode] = {**per, "b_over_a": {k: ratio(per["b"][k], per["a"][k]) for k in per["a"] if k != "failed_total"}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="snapshot tag A (the baseline)")
    ap.add_argument("--b", required=True, help="snapshot tag B")
    ap.add_argument("--n", type=int, default=100, help="children per fan-out")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="pool,cold")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    args = ap.parse_args()
    eng = Engine()
    tags = {"a": args.a, "b": args.b}
    snaps = {w: eng.store.open(t) for w, t in tags.items()}
    runs = []
    for rnd in range(args.rounds):
        order = ["a", "b"] if rnd % 2 == 0 else ["b", "a"]
        for mode in args.modes.split(","):
            for which in order:
                say(f"round {rnd + 1}: {mode} {which} ({tags[which]}) N={args.n}")
                r = run_mode(eng, tags[which], args.n, mode, args.concurrency)
                runs.append({**r, "which": which, "round": rnd + 1})
                time.sleep(3)
    idle = {w: idle_one(eng, t) for w, t in tags.items()}
    out = {
        "bench": "ab_snapshots", "forkd": __version__, "host_cpus": os.cpu_count(), "n": args.n,
        "rounds": args.rounds, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "snapshots": {w: {"tag": s.tag, "image": s.meta.image, "timings": s.meta.timings, "guest": s.meta.guest}
                      for w, s in snaps.items()},
        "runs": runs, "idle": idle, "summary": summarize(runs),
    }
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
