#!/usr/bin/env python3
"""Daemon overhead: spawning N children through forkd-controller (HTTP) vs through the engine directly.

Both paths restore the same snapshot with the same engine code, interleaved round by round in one run
(engine, daemon, engine, daemon, ...), each round timed from the request until all N children are up
(the daemon's answer arrives only after every child answered its agent's ``fresh`` step). Children are
killed between rounds. Prints JSON with per-round walls, medians and the ratio daemon / engine.

Usage: python3 bench/daemon_overhead.py [--n 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
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
from forkd.engine import Engine
from forkd.guest.image import build_image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_daemon(root: Path, work: Path, extra_args: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """A forkd-controller serving the snapshots in ``root`` on a free loopback port: (url, token). The
    token looks like an E2B key (``e2b_`` + hex), so that E2B's SDKs accept it too."""
    token = "e2b_" + secrets.token_hex(20)
    tf = work / "token"
    tf.write_text(token)
    tf.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "forkd.daemon", "serve", "--bind", f"127.0.0.1:{port}",
                             "--state", str(work / "state.json"), "--audit-log", str(work / "audit.log"),
                             "--token-file", str(tf), "--snapshot-root", str(root), "--log-level", "warning",
                             *extra_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("forkd-controller did not become healthy")
        yield url, token
    finally:
        proc.terminate()
        proc.wait(60)


def engine_round(eng: Engine, tag: str, n: int) -> float:
    t0 = time.monotonic()
    results = eng.spawn(tag, n, use_pool=False)
    wall = time.monotonic() - t0
    bad = [r.error for r in results if r.child is None]
    for r in results:
        if r.child is not None:
            r.child.kill()
    if bad:
        raise SystemExit(f"engine spawn failed: {bad[:3]}")
    return wall


def daemon_round(c: httpx.Client, tag: str, n: int) -> float:
    t0 = time.monotonic()
    r = c.post("/v1/sandboxes", json={"snapshot_tag": tag, "n": n})
    wall = time.monotonic() - t0
    r.raise_for_status()
    entries = r.json()
    for e in entries:
        if e["sandbox"]:
            c.delete(f"/v1/sandboxes/{e['sandbox']['id']}")
    bad = [e["error"] for e in entries if not e["sandbox"]]
    if bad:
        raise SystemExit(f"daemon spawn failed: {bad[:3]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    eng = Engine()
    tag = f"bench-daemon-{os.getpid()}"
    eng.create_snapshot(tag, image=build_image())
    work = Path(tempfile.mkdtemp(prefix="forkd-bench-"))
    rounds: dict[str, list[float]] = {"engine": [], "daemon": []}
    try:
        with running_daemon(eng.store.root, work) as (url, token), \
                httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=1800) as c:
            for _ in range(args.rounds):
                rounds["engine"].append(round(engine_round(eng, tag, args.n), 3))
                rounds["daemon"].append(round(daemon_round(c, tag, args.n), 3))
    finally:
        eng.delete_snapshot(tag)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    report: dict[str, Any] = {
        "benchmark": "daemon_overhead", "forkd_version": __version__, "accel": eng.accel.name, "n": args.n,
        "rounds": rounds, "median_s": {k: round(v, 3) for k, v in med.items()},
        "daemon_over_engine": round(med["daemon"] / med["engine"], 3),
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
