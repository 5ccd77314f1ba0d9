#!/usr/bin/env python3
"""Recipe image benchmark: a pandas image (``forkd image build --name bench-pandas --pip pandas``) side by
side with the built-in default image, in one run so the ratios are meaningful on a noisy machine.

  * ``build``: the recipe image built cold (``force=True``; which caches were warm is recorded: the
    .debs in ``deb_cache_dir()`` and pip's http cache), per build step, then built again without
    ``force`` (found by its inputs, not rebuilt; still resolves the apt packages); the default
    image's cached lookup too;
  * ``snapshots``: ``create_snapshot`` of each image, 512 MiB: the pandas image warmed with
    ``import pandas``, the default one with ``import numpy``;
  * ``fanout``: for each snapshot and mode (``pool``, ``cold``, as in bench/fanout.py, whose
    ``run_mode`` does the measuring): wall time from the first spawn until all N children answered
    ``numpy.zeros(5).tolist()``, per-child latency (restore start -> eval answered) and PSS per child
    with all N alive. Default and pandas run interleaved, the order flipped every pair and every
    round (pool: default, pandas; cold: pandas, default; the next round the other way round),
    ``--rounds`` times; ``summary`` has the medians over rounds and pandas / default;
  * ``idle``: one child of each snapshot left alone (bench/idle.py's ``measure``): the guest's
    clocksource (should stay tsc), its timer interrupts a second and the host CPU it costs.
Prints JSON (progress goes to stderr). The snapshots are deleted at the end; the image is kept.

The recipe is ``pip=["pandas"]`` (``--apt`` adds packages). forkd's base image now includes libstdc++6,
which numpy's and pandas' wheels need; the recorded run passed ``--apt libstdc++6`` before it did.

Usage: python3 bench/images.py [--n 100] [--rounds 1] [--modes pool,cold] [--apt libstdc++6]
       [--out bench/results/...json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fanout import EXPR, fanout_stats, med, ratio, run_mode, warm_up
from idle import measure as idle_measure

from forkd import __version__
from forkd.engine import Engine
from forkd.guest.image import build_image, deb_cache_dir
from forkd.guest.recipe import Recipe, build_recipe, recipe_inputs

IMAGE_NAME = "bench-pandas"
WARM = {"default": "import numpy", "pandas": "import pandas"}
VERSIONS_EXPR = ("{m: getattr(__import__('sys').modules.get(m), '__version__', None) "
                 "for m in ('numpy', 'pandas')} | {'python': __import__('sys').version.split()[0]}")


def say(msg: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tree_bytes(p: Path) -> int:
    total = 0
    if p.is_dir():
        for dirpath, _dirs, files in os.walk(p):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def pip(*args: str) -> str:
    """The host pip that builds the guest's wheels (forkd runs ``python3 -m pip`` from PATH)."""
    proc = subprocess.run([shutil.which("python3") or "python3", "-m", "pip", *args], capture_output=True,
                          text=True, timeout=60, check=False)
    return proc.stdout.strip()


def pip_cache_state() -> dict[str, Any]:
    d = Path(pip("cache", "dir") or os.path.expanduser("~/.cache/pip"))
    http = sum(tree_bytes(d / sub) for sub in ("http", "http-v2"))
    return {"dir": str(d), "exists": d.is_dir(), "http_cache_bytes": http, "wheels_bytes": tree_bytes(d / "wheels"),
            "disabled_by_env": os.environ.get("PIP_NO_CACHE_DIR") not in (None, "", "0", "false", "off")}


def cache_state(recipe: Recipe) -> dict[str, Any]:
    """Which of the cold build's downloads are already on this machine."""
    boot = build_image()
    _inputs, resolved = recipe_inputs(recipe, boot)
    cache = deb_cache_dir()
    missing = [f"{p}={v}" for p, v in resolved
               if not (cache / f"{p}_{v.replace(':', '%3a')}.deb").is_file()]  # rootfs.download_debs' names
    pipc = pip_cache_state()
    return {"debs": {"dir": str(cache), "packages": len(resolved), "cached": len(resolved) - len(missing),
                     "missing": missing[:20], "warm": not missing},
            "pip": {**pipc, "warm": pipc["exists"] and pipc["http_cache_bytes"] > 0 and not pipc["disabled_by_env"]},
            "pip_config": [line for line in pip("config", "list").splitlines() if line.strip()]}


def build(recipe: Recipe) -> dict[str, Any]:
    before = cache_state(recipe)
    marks: list[tuple[str, float]] = []
    say(f"building image {recipe.name} cold (force=True); caches: debs {before['debs']['cached']}/"
        f"{before['debs']['packages']}, pip http cache {before['pip']['http_cache_bytes'] >> 20} MiB")
    t0 = time.monotonic()
    info = build_recipe(recipe, force=True, progress=lambda step, _d, _t: marks.append((step, time.monotonic())))
    cold_s = time.monotonic() - t0
    steps: dict[str, float] = {"boot image": round(marks[0][1] - t0, 3)} if marks else {}
    for (step, t), (_next, t_next) in zip(marks, marks[1:], strict=False):
        steps[step] = round(t_next - t, 3)
    say(f"cold build {cold_s:.1f} s; again without force")
    t = time.monotonic()
    again = build_recipe(recipe)
    cached_s = time.monotonic() - t
    pip_after = pip_cache_state()
    rootfs = info.rootfs
    return {
        "recipe": recipe.to_json(), "cold_s": round(cold_s, 2), "cold_steps_s": steps,
        "cached_s": round(cached_s, 3), "cached_same_image": again.image_id == info.image_id,
        "caches_before_cold": before,
        "pip_http_cache_grew_bytes": pip_after["http_cache_bytes"] - before["pip"]["http_cache_bytes"],
        "image": {"id": info.image_id, "size_bytes": info.size_bytes, "disk_mib": info.disk_mib,
                  "python": info.python, "apt": info.inputs.get("apt", "").split(),
                  "rootfs_allocated_bytes": rootfs.stat().st_blocks * 512 if rootfs else None},
    }


def create(eng: Engine, tag: str, which: str, memory_mib: int) -> dict[str, Any]:
    say(f"creating snapshot {tag} ({which})")
    t = time.monotonic()
    snap = eng.create_snapshot(tag, memory_mib=memory_mib, warm_code=WARM[which],
                               image_name=IMAGE_NAME if which == "pandas" else None)
    create_s = time.monotonic() - t
    say(f"snapshot {tag}: {create_s:.1f} s")
    return {"tag": tag, "image": snap.meta.image, "warm_code": WARM[which], "create_s": round(create_s, 2),
            "timings": snap.meta.timings, "guest": snap.meta.guest, "disk": bool(snap.meta.disk),
            "snapshot_bytes": tree_bytes(snap.path)}


def idle_check(eng: Engine, tag: str) -> dict[str, Any]:
    """One child left alone: clocksource, timer interrupts, host CPU (bench/idle.py), and its versions."""
    results = eng.spawn(tag, 1, use_pool=False)
    kids = [r.child for r in results if r.child is not None]
    if not kids:
        return {"error": results[0].error}
    try:
        versions = kids[0].eval(VERSIONS_EXPR, timeout=120)["value"]
        return {**idle_measure(kids, secs=10.0, settle=3.0), "versions": versions}
    finally:
        for k in kids:
            k.kill()


def summarize(runs: list[dict[str, Any]], snaps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        per: dict[str, dict[str, float | None]] = {}
        for which in ("default", "pandas"):
            rs = [r for r in runs if r["mode"] == mode and r["image"] == which]
            per[which] = fanout_stats(rs)
            if mode == "pool":
                per[which]["pool_prefill_s"] = med([r["pool_prefill_s"] for r in rs if "pool_prefill_s" in r])
        out[mode] = {**per, "pandas_over_default": {k: ratio(per["pandas"][k], per["default"][k])
                                                    for k in per["default"] if k != "failed_total"}}
    d, p = snaps["default"], snaps["pandas"]
    out["snapshot_create_s"] = {"default": d["create_s"], "pandas": p["create_s"],
                                "pandas_over_default": ratio(p["create_s"], d["create_s"])}
    out["boot_s"] = {"default": d["timings"].get("boot_s"), "pandas": p["timings"].get("boot_s"),
                     "pandas_over_default": ratio(p["timings"].get("boot_s"), d["timings"].get("boot_s"))}
    out["warm_s"] = {"default": d["timings"].get("warm_s"), "pandas": p["timings"].get("warm_s")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="children per fan-out")
    ap.add_argument("--rounds", type=int, default=1, help="fan-outs of each snapshot and mode")
    ap.add_argument("--modes", default="pool,cold", help="fan-out modes of bench/fanout.py (pool, cold)")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--apt", default="", help="apt packages added to the recipe, comma-separated (libstdc++6: "
                    "numpy's wheels link it and a pip-only image lacks it)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    t_start = time.monotonic()
    eng = Engine()
    t = time.monotonic()
    default_image = build_image()
    default_lookup_s = time.monotonic() - t
    apt = [a.strip() for a in args.apt.split(",") if a.strip()]
    built = build(Recipe(name=IMAGE_NAME, apt=apt, pip=["pandas"]))
    built["default_image"] = {"id": default_image.image_id, "cached_call_s": round(default_lookup_s, 3),
                              "size_bytes": default_image.size_bytes}
    tags = {"default": f"bench-img-{os.getpid()}-default", "pandas": f"bench-img-{os.getpid()}-pandas"}
    snaps: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    idle: dict[str, Any] = {}
    try:
        for which in ("default", "pandas"):
            snaps[which] = create(eng, tags[which], which, args.memory_mib)
        for which in ("default", "pandas"):
            say(f"warming the page cache: {min(10, args.n)} forks of {which}")
            warm_up(eng, tags[which], min(10, args.n))
        for rnd in range(args.rounds):
            for mi, mode in enumerate(modes):
                # the order flips every pair, and every round: no mode always measures the same image first
                for which in (("default", "pandas") if (rnd + mi) % 2 == 0 else ("pandas", "default")):
                    say(f"round {rnd + 1}/{args.rounds}: {mode} x{args.n} of {which}")
                    r = run_mode(eng, tags[which], args.n, mode, args.concurrency)
                    runs.append({"image": which, "round": rnd, "order": len(runs), **r})
                    say(f"  all answered after {r['wall_s_all_answered']} s, ok {r['ok']}/{args.n}, "
                        f"latency {r['latency_ms']}, PSS {r['pss_mib_per_child']}")
        for which in ("default", "pandas"):
            say(f"idle check ({which})")
            idle[which] = idle_check(eng, tags[which])
    finally:
        eng.close_pools()
        for tag in tags.values():
            if eng.store.exists(tag):
                eng.delete_snapshot(tag)
    report: dict[str, Any] = {
        "benchmark": "images", "forkd_version": __version__, "accel": eng.accel.name, "qemu": eng.qemu.version,
        "cpus": os.cpu_count(), "n": args.n, "rounds": args.rounds, "modes": modes, "memory_mib": args.memory_mib,
        "expr": EXPR, "build": built, "snapshots": snaps, "summary": summarize(runs, snaps) if runs else None,
        "idle": idle, "runs": runs, "total_s": round(time.monotonic() - t_start, 1),
    }
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
