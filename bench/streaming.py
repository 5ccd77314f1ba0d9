#!/usr/bin/env python3
"""Streaming cost: a command that writes 10 MB, run through forkd-controller buffered (one ExecResponse
at the end, 1 MiB kept per stream but all of it drained) and streamed (NDJSON events, every byte
delivered to the SDK's ``on_stdout``), interleaved in one run in one sandbox (buffered, streamed,
streamed, buffered, ...). A third form reads the same command's output straight from a child of
the engine (no daemon, no HTTP), so that the ratio splits into the guest's part and the daemon's.
Prints JSON: per-round walls, medians, streamed / buffered and engine / buffered; also the time to
the first streamed chunk.

Usage: python3 bench/streaming.py [--mb 10] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon_overhead import running_daemon  # noqa: E402

from forkd import Controller, __version__  # noqa: E402
from forkd.engine import Engine  # noqa: E402
from forkd.guest.image import build_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=10, help="megabytes the command writes")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    size = args.mb * 1_000_000
    cmd = f"head -c {size} /dev/zero | tr '\\0' a"
    eng = Engine()
    tag = f"bench-stream-{os.getpid()}"
    eng.create_snapshot(tag, image=build_image())
    work = Path(tempfile.mkdtemp(prefix="forkd-bench-"))
    rounds: dict[str, list[float]] = {"buffered": [], "streamed": [], "engine": []}
    direct = eng.spawn(tag, 1)[0].child
    assert direct is not None
    first_chunk: list[float] = []
    try:
        with running_daemon(eng.store.root, work) as (url, token), Controller(url, token, timeout=1800) as ctl, \
                ctl.spawn_sandbox(tag, timeout=600) as sb:
            sb.commands.run(cmd, timeout=600)  # warm the guest's page cache and code paths
            for i in range(args.rounds):
                order = ("buffered", "streamed", "engine")
                for mode in (order if i % 2 == 0 else order[::-1]):
                    got = [0]
                    first: list[float] = []
                    t0 = time.monotonic()
                    if mode == "engine":
                        pid = direct.start_process(["/bin/sh", "-c", cmd], timeout=600)["pid"]
                        n = sum(len(c.stdout) for c in direct.stream_process(pid))
                        rounds[mode].append(round(time.monotonic() - t0, 3))
                        if n != size:
                            raise SystemExit(f"engine: {n} bytes of {size}")
                        continue
                    if mode == "buffered":
                        r = sb.commands.run(cmd, timeout=600)
                        got[0] = len(r.stdout)
                    else:
                        def count(text: str, got: list[int] = got, first: list[float] = first,
                                  t0: float = t0) -> None:
                            if not first:
                                first.append(time.monotonic() - t0)
                            got[0] += len(text)
                        r = sb.commands.run(cmd, on_stdout=count, timeout=600)
                        if got[0] != size:
                            raise SystemExit(f"streamed {got[0]} bytes of {size}")
                        first_chunk.append(round(first[0] * 1000, 1))
                    rounds[mode].append(round(time.monotonic() - t0, 3))
                    if r.exit_code != 0:
                        raise SystemExit(f"{mode}: exit {r.exit_code}")
    finally:
        direct.kill()
        eng.delete_snapshot(tag)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    report: dict[str, Any] = {
        "benchmark": "streaming", "forkd_version": __version__, "accel": eng.accel.name, "bytes": size,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": rounds,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "streamed_over_buffered": round(med["streamed"] / med["buffered"], 3),
        "engine_streamed_over_buffered": round(med["engine"] / med["buffered"], 3),
        "streamed_first_chunk_ms_median": statistics.median(first_chunk) if first_chunk else None,
        "streamed_mb_per_s": round(size / med["streamed"] / 1e6, 1),
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
