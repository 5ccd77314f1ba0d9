#!/usr/bin/env python3
"""E2B's SDK against forkd's own, side by side in one run: the latency of ``commands.run("echo hi")``
and of ``run_code("1+1")`` in one sandbox each, through ``forkd-controller serve --e2b-bind`` with the
official ``e2b``/``e2b-code-interpreter`` SDKs (their venv, ``make e2b-venv``) and through forkd's
Python SDK on the REST API, alternating rounds. Prints JSON: per-call latencies (ms), medians and
e2b / forkd.

Usage: python3 bench/e2b_latency.py [--calls 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon_overhead import free_port, running_daemon  # noqa: E402

from forkd import Controller, __version__  # noqa: E402
from forkd.engine import Engine  # noqa: E402
from forkd.guest.image import build_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
E2B_PYTHON = Path(os.environ.get("FORKD_E2B_PYTHON", ROOT / ".venv-e2b" / "bin" / "python"))

E2B_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from e2b import Sandbox
    from e2b_code_interpreter import Sandbox as CodeSandbox
    tag, calls = sys.argv[1], int(sys.argv[2])
    out = {"commands_run_ms": [], "run_code_ms": []}
    with Sandbox.create(template=tag, timeout=600) as sb:
        sb.commands.run("echo warm")
        for _ in range(calls):
            t = time.perf_counter()
            sb.commands.run("echo hi")
            out["commands_run_ms"].append((time.perf_counter() - t) * 1000)
    ci = CodeSandbox.create(template=tag, timeout=600)
    try:
        ci.run_code("0")
        for _ in range(calls):
            t = time.perf_counter()
            ci.run_code("1+1")
            out["run_code_ms"].append((time.perf_counter() - t) * 1000)
    finally:
        ci.kill()
    print(json.dumps(out))
''')


def forkd_round(ctl: Controller, tag: str, calls: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"commands_run_ms": [], "run_code_ms": []}
    with ctl.spawn_sandbox(tag, timeout=600) as sb:
        sb.commands.run("echo warm")
        for _ in range(calls):
            t = time.perf_counter()
            sb.commands.run("echo hi")
            out["commands_run_ms"].append((time.perf_counter() - t) * 1000)
    with ctl.spawn_sandbox(tag, timeout=600) as sb:
        sb.run_code("0")
        for _ in range(calls):
            t = time.perf_counter()
            sb.run_code("1+1")
            out["run_code_ms"].append((time.perf_counter() - t) * 1000)
    return out


def e2b_round(e2b_url: str, token: str, tag: str, calls: int) -> dict[str, list[float]]:
    env = {"PATH": os.environ["PATH"], "E2B_API_URL": e2b_url, "E2B_SANDBOX_URL": e2b_url, "E2B_API_KEY": token}
    p = subprocess.run([str(E2B_PYTHON), "-I", "-c", E2B_SCRIPT, tag, str(calls)], capture_output=True, text=True,
                       env=env, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"the e2b SDK failed: {p.stderr[-2000:]}")
    return dict(json.loads(p.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20, help="calls per operation per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not E2B_PYTHON.exists():
        raise SystemExit(f"{E2B_PYTHON} is missing: run `make e2b-venv`")
    eng = Engine()
    tag = f"bench-e2b-{os.getpid()}"
    eng.create_snapshot(tag, image=build_image())
    work = Path(tempfile.mkdtemp(prefix="forkd-bench-"))
    e2b_port = free_port()
    samples: dict[str, dict[str, list[float]]] = {"e2b": {}, "forkd": {}}
    try:
        with running_daemon(eng.store.root, work, ("--e2b-bind", f"127.0.0.1:{e2b_port}")) as (url, token), \
                Controller(url, token, timeout=1800) as ctl:
            for i in range(args.rounds):
                order = ("e2b", "forkd") if i % 2 == 0 else ("forkd", "e2b")
                for who in order:
                    got = (e2b_round(f"http://127.0.0.1:{e2b_port}", token, tag, args.calls) if who == "e2b"
                           else forkd_round(ctl, tag, args.calls))
                    for k, v in got.items():
                        samples[who].setdefault(k, []).extend(round(x, 2) for x in v)
    finally:
        eng.delete_snapshot(tag)
    med = {who: {k: round(statistics.median(v), 2) for k, v in ops.items()} for who, ops in samples.items()}
    report: dict[str, Any] = {
        "benchmark": "e2b_latency", "forkd_version": __version__, "accel": eng.accel.name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "calls_per_round": args.calls, "rounds": args.rounds,
        "median_ms": med, "e2b_over_forkd": {k: round(med["e2b"][k] / med["forkd"][k], 3) for k in med["forkd"]},
        "samples_ms": samples,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
