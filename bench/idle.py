#!/usr/bin/env python3
"""Idle cost benchmark: what N children cost the host while they do nothing.

Forks N children from a fresh snapshot, lets them settle, then for ``--secs`` seconds samples each
QEMU's CPU time from /proc/PID/stat (user + system, all threads) and each guest's local timer
interrupts (``LOC`` in /proc/interrupts, read through the agent before and after the window; the two
reads are the only requests made). Reports host CPU per idle child in percent of one core, guest timer
interrupts a second, the guest's clocksource and tick mode, as JSON; medians over the children.

Usage: python3 bench/idle.py [--n 10] [--secs 30] [--settle 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from forkd import __version__
from forkd.engine import Engine, clock
from forkd.guest.image import build_image

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def loc(child: Any) -> int:
    return int(child.vm.channel.call("clock_info", reply_timeout=60)["local_timer_interrupts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--secs", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after the spawn before measuring")
    ap.add_argument("--tag", default=None, help="an existing snapshot (default: create a fresh one)")
    args = ap.parse_args()
    eng = Engine()
    tag = args.tag or f"idle-{os.getpid()}"
    if args.tag is None:
        eng.create_snapshot(tag, image=build_image())
    try:
        results = eng.spawn(tag, args.n, use_pool=False)
        kids = [r.child for r in results if r.child is not None]
        try:
            report = measure(kids, args.secs, args.settle)
        finally:
            for k in kids:
                k.kill()
        report.update(benchmark="idle", forkd_version=__version__, accel=eng.accel.name, qemu=eng.qemu.version,
                      cpus=os.cpu_count(), n=args.n, ok=len(kids), snapshot=tag,
                      snapshot_clock=eng.store.open(tag).meta.guest.get("clock"))
    finally:
        if args.tag is None:
            eng.delete_snapshot(tag)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


def measure(kids: list[Any], secs: float, settle: float) -> dict[str, Any]:
    time.sleep(settle)
    info = clock.measure(kids[0].vm.channel, window_s=1.0)
    l0 = [loc(k) for k in kids]
    c0 = [cpu_s(k.pid) for k in kids]
    t0 = time.monotonic()
    time.sleep(secs)
    c1 = [cpu_s(k.pid) for k in kids]
    t1 = time.monotonic()
    l1 = [loc(k) for k in kids]
    cpu = [(b - a) / (t1 - t0) * 100 for a, b in zip(c0, c1, strict=True)]
    irq = [(b - a) / (t1 - t0) for a, b in zip(l0, l1, strict=True)]
    return {"secs": round(t1 - t0, 1),
            "host_cpu_pct_per_child": {"median": round(statistics.median(cpu), 3), "max": round(max(cpu), 3),
                                        "total_all_children": round(sum(cpu), 2)},
            "guest_timer_irq_per_s": {"median": round(statistics.median(irq), 2), "max": round(max(irq), 2)},
            "guest_clock": info.to_json()}


if __name__ == "__main__":
    main()
