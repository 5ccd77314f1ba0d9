#!/usr/bin/env python3
"""Multi-controller fan-out on one host: K forkd-controller processes, each with its own port, state
and snapshot root, stand in for K nodes.

Measures (1) a snapshot created on the first and pulled by each other one (``POST /v1/snapshots/pull``:
the source packs, the pack crosses loopback, the target verifies and registers it), (2) planning a
spread spawn (``GET /v1/capacity`` on every controller), and (3) a spawn of N through one controller
against the same N spread over all K by MultiController, interleaved round by round, children killed
between rounds. On one host the K controllers share its CPUs, so (3) shows the client's overhead, not
scale-out. Prints JSON.

Usage: python3 bench/multi_controller.py [--n 60] [--rounds 3] [--controllers 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from forkd import __version__
from forkd.guest.image import build_image
from forkd.sdk import Controller, MultiController

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_overhead import free_port  # noqa: E402


@contextlib.contextmanager
def controllers(work: Path, k: int) -> Iterator[tuple[list[str], str]]:
    """K daemons on free loopback ports sharing one token: (urls, token)."""
    token = secrets.token_hex(24)
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(k):
            d = work / f"node{i + 1}"
            (d / "snapshots").mkdir(parents=True)
            (d / "token").write_text(token)
            (d / "token").chmod(0o600)
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "forkd.daemon", "serve", "--bind", f"127.0.0.1:{port}",
                 "--state", str(d / "state.json"), "--audit-log", str(d / "audit.log"), "--token-file",
                 str(d / "token"), "--snapshot-root", str(d / "snapshots"), "--node-name", f"node{i + 1}",
                 "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{url} did not become healthy")
                time.sleep(0.1)
        yield urls, token
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--controllers", type=int, default=3)
    args = ap.parse_args()
    build_image()
    work = Path(tempfile.mkdtemp(prefix="forkd-bench-multi-"))
    tag = "bench-multi"
    report: dict[str, Any] = {"benchmark": "multi_controller", "forkd_version": __version__, "n": args.n,
                              "controllers": args.controllers}
    try:
        with controllers(work, args.controllers) as (urls, token), \
                MultiController(urls, token, timeout=1800) as multi:
            first = multi.controllers[0]
            t0 = time.monotonic()
            first.create_snapshot(tag)
            report["snapshot_create_s"] = round(time.monotonic() - t0, 2)
            report["accel"] = first.version().accelerator
            pulls = []
            for c in multi.controllers[1:]:
                t0 = time.monotonic()
                r = c.pull_snapshot(f"{urls[0]}/v1/snapshots/{tag}/pack", token=token)
                pulls.append({"seconds": round(time.monotonic() - t0, 2), "pack_bytes": r.bytes,
                              "unpack_s": r.seconds})
            report["pull"] = pulls
            plans: list[float] = []
            rounds: dict[str, list[float]] = {"one_controller": [], "spread": []}
            with Controller(urls[0], token, timeout=1800) as one:
                for _ in range(args.rounds):
                    t0 = time.monotonic()
                    sbs = one.spawn_sandboxes(tag, args.n)
                    rounds["one_controller"].append(round(time.monotonic() - t0, 3))
                    for sb in sbs:
                        sb.kill()
                    t0 = time.monotonic()
                    plan = multi.plan_spawn(args.n, tag)
                    plans.append(round((time.monotonic() - t0) * 1000, 1))
                    spread = multi.spawn_sandboxes(tag, args.n, plan=plan)
                    rounds["spread"].append(round(time.monotonic() - t0, 3))
                    report["spread_counts"] = plan.counts
                    multi.kill_sandboxes([sb.id for sb in spread])
            med = {k: statistics.median(v) for k, v in rounds.items()}
            report.update(rounds=rounds, median_s={k: round(v, 3) for k, v in med.items()},
                          spread_over_one=round(med["spread"] / med["one_controller"], 3),
                          plan_ms_median=statistics.median(plans))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
