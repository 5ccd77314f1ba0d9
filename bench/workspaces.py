#!/usr/bin/env python3
"""Workspace benchmark: suspend and resume wall time and the state's size on disk, against the
sandbox's dirty memory, through a real daemon and the SDK.

Starts a private ``forkd-controller`` (loopback, temporary state and snapshot root; jailed when run as
root, else ``--insecure-no-jail``) and creates a snapshot in it, unless ``--url`` names a daemon (then
``--tag`` must exist there). For each dirty size (default ~5 MiB and ~100 MiB): one workspace,
dirtied with ``D=bytearray(os.urandom(N))`` (which dirties ~2N: the random bytes and their copy), then
``--reps`` suspend/resume cycles. The first suspend copies the whole dirty set; a later one only what
the resumed sandbox wrote since (a flat state stays the memory its successors map; a delta is carried
again whole). Reported per size: the dirty bytes each suspend measured, the branch mode chosen,
suspend and resume wall time (the SDK call; median of the later cycles, and the first separately)
and the state's bytes on disk (``state_bytes``: blocks of the snapshots of its own the state needs).

Usage: python3 bench/workspaces.py [--sizes 5,100] [--reps 4] [--mode delta|auto|flat] [--url U --token T --tag T]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
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
from forkd.sdk import Controller

MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_daemon(mode: str) -> Iterator[tuple[str, Path]]:
    d = Path(tempfile.mkdtemp(prefix="forkd-bench-ws-"))
    port = free_port()
    args = [sys.executable, "-m", "forkd.daemon", "serve", "--bind", f"127.0.0.1:{port}",
            "--state", str(d / "state.json"), "--audit-log", str(d / "audit.log"),
            "--snapshot-root", str(d / "snapshots"), "--workspace-mode", mode]
    if os.geteuid() != 0:
        args.append("--insecure-no-jail")
    with open(d / "daemon.log", "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"forkd-controller exited: see {d / 'daemon.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("forkd-controller did not become healthy")
            time.sleep(0.2)
        yield url, d
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        # the daemon leaves sandboxes running on purpose; the benchmark's go with its directory
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    if str(d).encode() in (p / "cmdline").read_bytes():
                        os.kill(int(p.name), 9)
        shutil.rmtree(d, ignore_errors=True)


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 1) if xs else None


def one_size(ctl: Controller, tag: str, mib: float, reps: int) -> dict[str, Any]:
    name = f"bench-{int(mib)}mib-{os.getpid()}"
    ws = ctl.create_workspace(name, tag, network="none", timeout=600)
    try:
        sb = ws.sandbox()
        n = max(64 << 10, int((mib - 0.5) / 2.04 * MIB) // 4096 * 4096)
        sb.run_code(f"import os\nD = bytearray(os.urandom({n}))", timeout=600)
        cycles = []
        for _ in range(reps):
            t0 = time.monotonic()
            info = ws.suspend()
            t1 = time.monotonic()
            sb = ws.resume()
            t2 = time.monotonic()
            assert sb.eval("len(D)") == n
            ls = info.last_suspend or {}
            cycles.append({"suspend_ms": round((t1 - t0) * 1000, 1), "resume_ms": round((t2 - t1) * 1000, 1),
                           "dirty_mib": round(int(ls.get("dirty_bytes") or 0) / MIB, 2), "mode": ls.get("mode"),
                           "branch_pause_ms": ls.get("pause_ms"), "state_mib": round(info.state_bytes / MIB, 2),
                           "depth": info.depth, "links": len(info.links)})
        later = cycles[1:]
        return {
            "target_dirty_mib": mib, "allocated_mib": round(n / MIB, 2),
            "first": cycles[0],
            "later_median": {"suspend_ms": med([c["suspend_ms"] for c in later]),
                             "resume_ms": med([c["resume_ms"] for c in later]),
                             "dirty_mib": med([c["dirty_mib"] for c in later]),
                             "state_mib": med([c["state_mib"] for c in later])} if later else None,
            "all_median": {"suspend_ms": med([c["suspend_ms"] for c in cycles]),
                           "resume_ms": med([c["resume_ms"] for c in cycles])},
            "cycles": cycles,
        }
    finally:
        ws.delete()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5,100", help="dirty MiB, comma-separated")
    ap.add_argument("--reps", type=int, default=4, help="suspend/resume cycles per size")
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--mode", default="delta", choices=["delta", "auto", "flat"],
                    help="the private daemon's --workspace-mode")
    ap.add_argument("--url", default=None, help="use this daemon (else a private one)")
    ap.add_argument("--token", default=os.environ.get("FORKD_TOKEN"))
    ap.add_argument("--tag", default=None, help="snapshot to use with --url")
    a = ap.parse_args()
    sizes = [float(s) for s in a.sizes.split(",") if s]
    with contextlib.ExitStack() as stack:
        if a.url:
            url, tag, boot_s = a.url, a.tag, None
            if not tag:
                raise SystemExit("--url needs --tag")
        else:
            url, _ = stack.enter_context(private_daemon(a.mode))
            tag = "bench-ws"
        ctl = stack.enter_context(Controller(url, a.token, timeout=1200))
        if not a.url:
            t0 = time.monotonic()
            ctl.create_snapshot(tag, memory_mib=a.memory_mib)
            boot_s = round(time.monotonic() - t0, 1)
        v = ctl.version()
        results = [one_size(ctl, tag, mib, a.reps) for mib in sizes]
    print(json.dumps({"bench": "workspaces", "forkd": __version__, "accelerator": v.accelerator,
                      "cpus": os.cpu_count(), "memory_mib": a.memory_mib, "snapshot_create_s": boot_s,
                      "workspace_mode": None if a.url else a.mode,
                      "reps": a.reps, "sizes": results}, indent=2))


if __name__ == "__main__":
    main()
