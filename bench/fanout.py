#!/usr/bin/env python3
"""Fan-out benchmark: fork N children and time until every one has answered ``numpy.zeros(5).tolist()``.

Measured side by side in one run, so ratios are meaningful on a noisy machine:
  * ``cold_boot``: a parent booted from the guest image until its agent is ready (the snapshot
    creation the benchmark does itself);
  * ``pool``: N children activated from N QEMUs pre-started in ``-incoming defer`` (pool filled
    before the clock starts);
  * ``cold``: N children each launched as a new QEMU process;
  * ``single``: one fork at a time from a pool of one, repeated (the latency of "a fork" on an
    otherwise idle machine).
For each mode: wall time from the first spawn until all N answered, per-child latency (restore
start -> eval answered) median / p90 / max, and PSS per child from /proc/PID/smaps_rollup with all
N alive at once. Prints JSON. Headline: cold boot / median fork latency.

Usage: python3 bench/fanout.py [--n 100] [--modes pool,cold] [--concurrency 2]
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
from forkd.engine import Child, Engine
from forkd.guest.image import build_image

EXPR = "numpy.zeros(5).tolist()"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def answer(child: Child) -> Any:
    return child.eval(EXPR, timeout=120)["value"]


def run_mode(eng: Engine, tag: str, n: int, mode: str, concurrency: int | None) -> dict[str, Any]:
    if mode == "pool":
        pool = eng.start_pool(tag, n)
        t = time.monotonic()
        if not pool.wait_full(timeout=1200):
            raise SystemExit(f"pool did not fill: {pool.stats()}")
        prefill_s = time.monotonic() - t
    t0 = time.monotonic()
    results = eng.spawn(tag, n, concurrency=concurrency, use_pool=(mode == "pool"), then=answer)
    wall = time.monotonic() - t0
    try:
        ok = [r for r in results if r.child is not None and r.then == [0.0] * 5]
        lat = [r.then_s * 1000 for r in ok if r.then_s is not None]
        pss = [r.child.memory().get("Pss", 0) / 1024 for r in ok if r.child]
        rss = [r.child.memory().get("Rss", 0) / 1024 for r in ok if r.child]
        out = {
            "mode": mode, "n": n, "ok": len(ok), "failed": n - len(ok),
            "errors": sorted({str(r.error or r.then)[:200] for r in results if r not in ok})[:5],
            "wall_s_all_answered": round(wall, 3),
            "latency_ms": {"median": round(statistics.median(lat), 1), "p90": round(pct(lat, 90), 1),
                           "max": round(max(lat), 1)} if lat else None,
            "from_pool": sum(1 for r in ok if r.child and r.child.from_pool),
            "pss_mib_per_child": {"median": round(statistics.median(pss), 2), "max": round(max(pss), 2)}
            if pss else None,
            "rss_mib_median": round(statistics.median(rss), 1) if rss else None,
        }
        if mode == "pool":
            out["pool_prefill_s"] = round(prefill_s, 2)
        return out
    finally:
        for r in results:
            if r.child is not None:
                r.child.kill()
        eng.close_pools()


def single_forks(eng: Engine, tag: str, reps: int) -> dict[str, Any]:
    """One fork at a time (pool of 1, refilled between forks): restore start -> eval answered."""
    eng.start_pool(tag, 1)
    lat = []
    try:
        for _ in range(reps):
            pool = eng.pool(tag)
            assert pool is not None and pool.wait_full(timeout=300)
            time.sleep(0.7)  # the refill is done and quiet
            (r,) = eng.spawn(tag, 1, then=answer)
            if r.child is not None:
                if r.then == [0.0] * 5 and r.then_s is not None:
                    lat.append(r.then_s * 1000)
                r.child.kill()
    finally:
        eng.close_pools()
    return {"mode": "single", "reps": reps, "ok": len(lat),
            "latency_ms": {"median": round(statistics.median(lat), 1), "p90": round(pct(lat, 90), 1),
                           "max": round(max(lat), 1)} if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--modes", default="pool,cold")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--single-reps", type=int, default=10, help="sequential single forks (0: skip)")
    args = ap.parse_args()
    eng = Engine()
    image = build_image()
    tag = f"bench-{os.getpid()}"
    t = time.monotonic()
    snap = eng.create_snapshot(tag, memory_mib=args.memory_mib, image=image)
    create_s = time.monotonic() - t
    try:
        modes = [run_mode(eng, tag, args.n, m.strip(), args.concurrency) for m in args.modes.split(",") if m]
        if args.single_reps:
            modes.append(single_forks(eng, tag, args.single_reps))
    finally:
        eng.delete_snapshot(tag)
    cold_boot_s = snap.meta.timings["boot_s"]
    report: dict[str, Any] = {
        "benchmark": "fanout", "forkd_version": __version__, "accel": eng.accel.name,
        "qemu": eng.qemu.version, "cpus": os.cpu_count(), "expr": EXPR,
        "cold_boot_s": cold_boot_s, "snapshot_create_s": round(create_s, 2),
        "snapshot_save_ms": snap.meta.timings["save_ms"], "modes": modes,
    }
    for m in modes:
        if m["latency_ms"]:
            m["cold_boot_over_fork_median"] = round(cold_boot_s * 1000 / m["latency_ms"]["median"], 1)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
