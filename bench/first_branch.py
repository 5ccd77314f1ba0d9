#!/usr/bin/env python3
"""Is a child's first BRANCH slower than its second? The original forkd's ``prewarm`` spawn option
existed because there it was (cold EPT and page cache: 2-9x). For each of ``--children`` fresh
children: dirty ``--dirty-mib`` of memory, branch (the first), dirty as much again, branch (the
second); pause and total time of each, in one run, the pair taken back to back per child. Prints JSON
with per-child numbers, medians and second / first.

Usage: python3 bench/first_branch.py [--children 6] [--dirty-mib 5] [--mode delta]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from forkd import __version__
from forkd.engine import Engine
from forkd.guest.image import build_image

DIRTY = "globals().setdefault('_ballast', []).append(bytearray(os.urandom({n})))"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--children", type=int, default=6)
    ap.add_argument("--dirty-mib", type=float, default=5.0)
    ap.add_argument("--mode", choices=["delta", "flat"], default="delta")
    args = ap.parse_args()
    eng = Engine()
    tag = f"bench-first-branch-{os.getpid()}"
    eng.create_snapshot(tag, image=build_image())
    n = int(args.dirty_mib * (1 << 20))
    rows: list[dict[str, Any]] = []
    made: list[str] = []
    try:
        for i in range(args.children):
            (r,) = eng.spawn(tag, 1, use_pool=False)
            if r.child is None:
                raise SystemExit(f"spawn failed: {r.error}")
            child = r.child
            try:
                row: dict[str, Any] = {"child": i}
                for which in ("first", "second"):
                    child.run_code(DIRTY.format(n=n), timeout=300)
                    btag = f"{tag}-{i}-{which}"
                    res = eng.branch(child, btag, args.mode)
                    made.append(btag)
                    row[which] = {"pause_ms": round(res.pause_ms, 2), "total_ms": round(res.total_ms, 1),
                                  "dirty_mib": round(res.dirty_bytes / (1 << 20), 2)}
                rows.append(row)
                print(f"[first-branch] child {i}: {row}", file=sys.stderr, flush=True)
            finally:
                child.kill()
    finally:
        for t in reversed(made):
            eng.delete_snapshot(t)
        eng.delete_snapshot(tag)

    def med(which: str, key: str) -> float:
        return round(statistics.median(r[which][key] for r in rows), 2)
    summary = {k: {"first": med("first", k), "second": med("second", k),
                   "second_over_first": round(med("second", k) / med("first", k), 3)}
               for k in ("pause_ms", "total_ms")}
    json.dump({"benchmark": "first_branch", "forkd_version": __version__, "accel": eng.accel.name,
               "mode": args.mode, "dirty_mib": args.dirty_mib, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "children": rows, "summary": summary}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
