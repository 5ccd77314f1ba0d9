#!/usr/bin/env python3
"""Where a child's CPU goes from spawn to first answer: per step, and (with ``--perf``) by part of QEMU.

One fork at a time from a pool of one, the two kinds of pool member interleaved in one run:
  * ``warm`` (the default pool): the member loaded the snapshot and answered a ``fresh`` and an
    ``eval`` before it was taken (``restore.warm_member``);
  * ``deferred``: the member waits in ``-incoming defer`` and loads the state when taken.
For each fork: wall time and the child QEMU's CPU time (``/proc/PID/stat``, utime + stime) for the
spawn (state load if deferred + ``fresh``), the first ``numpy.zeros(5).tolist()``, and a second
``eval("1")``; and what warming cost the member before it was taken. With ``--perf``, ``perf record``
(``-e cpu-clock``) follows the member from just before the spawn to after the second eval, and the
samples are grouped by what they are: translating guest code (TCG), running translated guest code,
the execution loop, softmmu, devices, host kernel (page faults, other), malloc/glib. Prints JSON.

Usage: python3 bench/first_contact.py [--reps 8] [--perf]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from forkd import __version__
from forkd.engine import Engine
from forkd.guest.image import build_image

TICK = os.sysconf("SC_CLK_TCK")
TRANSLATE = ("tcg", "tb_gen", "tb_", "translator", "gen_", "disas", "liveness", "plugin_gen", "decode",
             "x86_", "i386_tr")


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


class Symbols:
    """QEMU's exported symbols, to place the samples perf leaves unnamed (static functions) by their
    neighbours: QEMU's TCG code (tcg.c, optimize.c, translate.c) is mostly static."""

    def __init__(self, binary: str) -> None:
        out = subprocess.run(["nm", "-D", "--defined-only", binary], capture_output=True, text=True).stdout
        pairs = sorted((int(a, 16), n) for a, _, n in (ln.split() for ln in out.splitlines() if ln.count(" ") == 2))
        self.addrs = [a for a, _ in pairs]
        self.names = [n for _, n in pairs]

    def near(self, addr: int) -> str:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0:
            return ""
        name = self.names[i]
        # a static function right after an unrelated exported one: the next name tells better
        if not name.startswith(TRANSLATE) and i + 1 < len(self.names) and self.names[i + 1].startswith(TRANSLATE):
            return self.names[i + 1]
        return name


def kind(dso: str, sym: str, syms: Symbols) -> str:
    if dso.startswith("[JIT]"):
        return "guest code running (translated blocks)"
    if dso == "[kernel.kallsyms]":
        if re.search(r"fault|clear_page|copy_mc|page|pte|lru|folio|alloc|mm_|rmap|zap|charge", sym):
            return "host kernel: page faults, zeroing, copy-on-write"
        return "host kernel: syscalls, scheduling, timers"
    if dso.startswith("qemu-system"):
        if sym.startswith("0x"):
            sym = syms.near(int(sym, 16))
        if sym.startswith(TRANSLATE):
            return "QEMU: translating guest code (TCG)"
        if re.match(r"(cpu_|curr_cflags|helper_lookup|qht)", sym):
            return "QEMU: execution loop and block lookup"
        if re.search(r"helper_|tlb_|mmu|address_space|memory_region|flatview|qemu_ram", sym):
            return "QEMU: softmmu (guest memory, TLB fills)"
        return "QEMU: devices, main loop, other"
    if "glib" in dso or "libc" in dso:
        return "glib/libc (malloc, hash tables)"
    return f"other: {dso}"


def perf_groups(data: Path, syms: Symbols) -> dict[str, float]:
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "-g", "none",
                          "-q", "--percent-limit", "0"], capture_output=True, text=True).stdout
    groups: dict[str, float] = collections.defaultdict(float)
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+(?: tid \d+)?)\s+\[.\]\s+(.*)", line)
        if m:
            groups[kind(m.group(2), m.group(3).strip(), syms)] += float(m.group(1))
    return dict(groups)


def one_fork(eng: Engine, tag: str, warm: bool, perf_out: Path | None) -> dict[str, Any]:
    pool = eng.start_pool(tag, 1, warm=warm)
    t = time.monotonic()
    if not pool.wait_full(timeout=600):
        raise SystemExit(f"pool did not fill: {pool.stats()}")
    fill_s = time.monotonic() - t
    time.sleep(1.0)  # the member is idle before the clock starts
    vm = pool._ready[0]
    warm_cpu = cpu_ms(vm.pid)
    perf = None
    if perf_out is not None:
        perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-p", str(vm.pid),
                                 "-o", str(perf_out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    c0, t0 = cpu_ms(vm.pid), time.monotonic()
    (r,) = eng.spawn(tag, 1)
    if r.child is None:
        raise SystemExit(f"spawn failed: {r.error}")
    child = r.child
    c1, t1 = cpu_ms(vm.pid), time.monotonic()
    assert child.eval("numpy.zeros(5).tolist()")["value"] == [0.0] * 5
    c2, t2 = cpu_ms(vm.pid), time.monotonic()
    child.eval("1")
    c3, t3 = cpu_ms(vm.pid), time.monotonic()
    if perf is not None:
        perf.send_signal(2)
        perf.wait(timeout=60)
    child.kill()
    eng.close_pools()
    return {"pool_fill_s": round(fill_s, 3), "member_cpu_ms_before_take": warm_cpu,
            "spawn_ms": round((t1 - t0) * 1000, 1), "spawn_cpu_ms": c1 - c0,
            "first_numpy_eval_ms": round((t2 - t1) * 1000, 1), "first_numpy_eval_cpu_ms": c2 - c1,
            "second_eval_ms": round((t3 - t2) * 1000, 1), "second_eval_cpu_ms": c3 - c2,
            "first_answer_ms": round((t2 - t0) * 1000, 1)}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--perf", action="store_true", help="profile each fork with perf record (linux-perf)")
    args = ap.parse_args()
    if args.perf and not shutil.which("perf"):
        raise SystemExit("--perf needs perf (apt-get install linux-perf)")
    eng = Engine()
    tag = f"bench-fc-{os.getpid()}"
    eng.create_snapshot(tag, memory_mib=512, image=build_image())
    syms = Symbols(str(eng.qemu.path)) if args.perf else None
    runs: dict[str, list[dict[str, Any]]] = {"warm": [], "deferred": []}
    groups: dict[str, list[dict[str, float]]] = {"warm": [], "deferred": []}
    scratch = Path(tempfile.mkdtemp(prefix="forkd-perf-"))
    try:
        one_fork(eng, tag, True, None)  # page cache and host warm-up, not measured
        for i in range(args.reps):
            for name in (("warm", "deferred") if i % 2 == 0 else ("deferred", "warm")):
                data = scratch / f"{name}-{i}.data" if args.perf else None
                runs[name].append(one_fork(eng, tag, name == "warm", data))
                if data is not None and syms is not None:
                    groups[name].append(perf_groups(data, syms))
    finally:
        eng.close_pools()
        eng.delete_snapshot(tag)
        shutil.rmtree(scratch, ignore_errors=True)
    report: dict[str, Any] = {
        "benchmark": "first_contact", "forkd_version": __version__, "accel": eng.accel.name,
        "qemu": eng.qemu.version, "cpus": os.cpu_count(), "reps": args.reps,
        "median": {name: summary(rs) for name, rs in runs.items()},
        "runs": runs,
    }
    w, d = report["median"]["warm"], report["median"]["deferred"]
    report["ratio_first_answer_warm_over_deferred"] = round(w["first_answer_ms"] / d["first_answer_ms"], 3)
    if args.perf:
        report["perf_percent_median"] = {
            name: {k: round(statistics.median(g.get(k, 0.0) for g in gs), 1)
                   for k in sorted({k for g in gs for k in g})} for name, gs in groups.items() if gs}
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
