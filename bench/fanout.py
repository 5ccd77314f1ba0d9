#!/usr/bin/env python3
"""Fan-out benchmark: fork N children and time until every one has answered ``numpy.zeros(5).tolist()``.

Measured side by side in one run, so ratios are meaningful on a noisy machine:
  * ``cold_boot``: a parent booted from the guest image until its agent is ready (the snapshot
    creation the benchmark does itself);
  * ``pool``: N children taken from a pool of N filled before the clock starts: warm members (the
    default: the snapshot loaded and the agent's first requests answered ahead, ``restore.warm_member``)
    or, with ``--pool-warm off``, QEMUs waiting in ``-incoming defer`` that load the state when taken
    (mode ``pool-deferred``; ``--pool-warm both`` runs both, interleaved); ``pool_prefill_s`` is what
    filling the pool took;
  * ``cold``: N children each launched as a new QEMU process;
  * ``single``: one fork at a time from a pool of one, repeated (the latency of "a fork" on an
    otherwise idle machine).
For each mode: wall time from the first spawn until all N answered, per-child latency (restore
start -> eval answered) median / p90 / max, and PSS per child from /proc/PID/smaps_rollup with all
N alive at once. Prints JSON. Headline: cold boot / median fork latency.

Each mode runs with the jail on and, with ``--jail both``, off too, interleaved; ``jail_cost`` gives
the ratios. ``--n 10,50,100,200,500`` runs the scale curve and ``--png`` draws it.

Usage: python3 bench/fanout.py [--n 100 | --n 10,50,100,200,500] [--modes pool,cold] [--jail both]
       [--png bench/results/fanout-curve.png]
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
from forkd.engine import Child, Engine, jail
from forkd.guest.image import build_image

EXPR = "numpy.zeros(5).tolist()"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def answer(child: Child) -> Any:
    return child.eval(EXPR, timeout=120)["value"]


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def fanout_stats(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians over several run_mode results of one configuration (and the failures, summed)."""
    return {
        "wall_s_all_answered": med([r["wall_s_all_answered"] for r in runs]),
        "latency_ms_median": med([r["latency_ms"]["median"] for r in runs if r["latency_ms"]]),
        "pss_mib_per_child_median": med([r["pss_mib_per_child"]["median"] for r in runs if r["pss_mib_per_child"]]),
        "failed_total": sum(r["failed"] for r in runs),
    }


def run_mode(eng: Engine, tag: str, n: int, mode: str, concurrency: int | None,
             warm: bool = True) -> dict[str, Any]:
    if mode == "pool":
        pool = eng.start_pool(tag, n, warm=warm)
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
            "mode": mode if warm or mode != "pool" else "pool-deferred", "n": n, "ok": len(ok), "failed": n - len(ok),
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
            out["warm"] = warm
        return out
    finally:
        for r in results:
            if r.child is not None:
                r.child.kill()
        eng.close_pools()


def single_forks(eng: Engine, tag: str, reps: int, warm: bool = True) -> dict[str, Any]:
    """One fork at a time (pool of 1, refilled between forks): restore start -> eval answered."""
    eng.start_pool(tag, 1, warm=warm)
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
    return {"mode": "single" if warm else "single-deferred", "warm": warm, "reps": reps, "ok": len(lat),
            "latency_ms": {"median": round(statistics.median(lat), 1), "p90": round(pct(lat, 90), 1),
                           "max": round(max(lat), 1)} if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="100", help="children per fan-out; a list (10,50,100,200,500) draws a curve")
    ap.add_argument("--modes", default="pool,cold")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--single-reps", type=int, default=10, help="sequential single forks (0: skip)")
    ap.add_argument("--jail", choices=["on", "off", "both"], default="on",
                    help="jailed QEMUs (the default), unjailed, or both side by side in this run")
    ap.add_argument("--pool-warm", choices=["on", "off", "both"], default="on",
                    help="pool members warm (the default), waiting for state, or both side by side")
    ap.add_argument("--png", default=None, help="draw wall time and PSS per child against N to this file")
    args = ap.parse_args()
    ns = [int(x) for x in str(args.n).split(",") if x.strip()]
    jails = {"on": [True], "off": [False], "both": [True, False]}[args.jail]
    warms = {"on": [True], "off": [False], "both": [True, False]}[args.pool_warm]
    eng = Engine()
    image = build_image()
    tag = f"bench-{os.getpid()}"
    t = time.monotonic()
    snap = eng.create_snapshot(tag, memory_mib=args.memory_mib, image=image)
    create_s = time.monotonic() - t
    modes: list[dict[str, Any]] = []
    try:
        warm_up(eng, tag)
        k = 0
        for n in ns:
            for m in [m.strip() for m in args.modes.split(",") if m.strip()]:
                # interleaved, the order flipped every time: neither setting always goes first
                combos = [(j, w) for j in jails for w in (warms if m == "pool" else [True])]
                for jailed, warm in (combos if k % 2 == 0 else combos[::-1]):
                    jail.configure(jailed)
                    modes.append({**run_mode(eng, tag, n, m, args.concurrency, warm), "jail": jailed})
                k += 1
        if args.single_reps:
            for jailed in jails:
                for warm in warms:
                    jail.configure(jailed)
                    modes.append({**single_forks(eng, tag, args.single_reps, warm), "jail": jailed})
    finally:
        jail.configure(None)
        eng.delete_snapshot(tag)
    cold_boot_s = snap.meta.timings["boot_s"]
    report: dict[str, Any] = {
        "benchmark": "fanout", "forkd_version": __version__, "accel": eng.accel.name,
        "qemu": eng.qemu.version, "cpus": os.cpu_count(), "expr": EXPR,
        "cold_boot_s": cold_boot_s, "snapshot_create_s": round(create_s, 2),
        "snapshot_save_ms": snap.meta.timings["save_ms"], "guest_clock": snap.meta.guest.get("clock"),
        "modes": modes, "jail_cost": jail_cost(modes),
    }
    for m in modes:
        if m["latency_ms"]:
            m["cold_boot_over_fork_median"] = round(cold_boot_s * 1000 / m["latency_ms"]["median"], 1)
    if args.png:
        draw(modes, args.png)
        report["png"] = args.png
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


def warm_up(eng: Engine, tag: str, n: int = 10) -> None:
    """Fork and kill a few children first: the snapshot's pages are then in the page cache for every
    measured run alike, not only for the ones that happen to come later."""
    for r in eng.spawn(tag, n, use_pool=False, then=answer):
        if r.child is not None:
            r.child.kill()


def jail_cost(modes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jailed / unjailed wall time for each (mode, N) measured both ways in this run."""
    out = []
    by = {(m["mode"], m.get("n"), m["jail"]): m for m in modes if "wall_s_all_answered" in m}
    for (mode, n, jailed), m in by.items():
        other = by.get((mode, n, False))
        if jailed and other and other["wall_s_all_answered"]:
            out.append({"mode": mode, "n": n, "jailed_s": m["wall_s_all_answered"],
                        "unjailed_s": other["wall_s_all_answered"],
                        "ratio": round(m["wall_s_all_answered"] / other["wall_s_all_answered"], 3)})
    return out


def draw(modes: list[dict[str, Any]], path: str) -> None:
    """Wall time until all answered, and PSS per child, against N (one line per mode and jail)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for m in modes:
        if "wall_s_all_answered" in m:
            series.setdefault(f"{m['mode']}{'' if m['jail'] else ' (unjailed)'}", []).append(m)
    for name, pts in series.items():
        pts.sort(key=lambda m: m["n"])
        xs = [m["n"] for m in pts]
        ax1.plot(xs, [m["wall_s_all_answered"] for m in pts], marker="o", label=name)
        ax2.plot(xs, [(m["pss_mib_per_child"] or {}).get("median", 0) for m in pts], marker="o", label=name)
    ax1.set(xlabel="children (N)", ylabel="seconds until all answered", title="fan-out wall time")
    ax2.set(xlabel="children (N)", ylabel="MiB", title="PSS per child (all N alive)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
