"""The TypeScript SDK (``typescript/``) against a real daemon: ``node --test`` runs its compiled tests
(``typescript/test/*.test.ts``: spawn 2, eval, a streamed command and a streamed run_code whose first
chunk arrives before they end, background processes, a binary file round trip, branch, set the
lifetime, kill, a wrong token's 401, a missing sandbox's 404) with FORKD_URL, FORKD_TOKEN and FORKD_TAG
pointing at the session's daemon and snapshot. ``make ts`` (part of ``make deps``) installs and builds it;
this test builds it again when the sources are newer than the build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Daemon

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
TS = ROOT / "typescript"
TESTS = ("unit.test.js", "daemon.test.js")


def newest(paths: list[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def build() -> None:
    """``npm ci`` when node_modules is missing, ``npm run build`` when dist is older than the sources."""
    npm = shutil.which("npm")
    assert npm, "npm is missing: run `make ts` (it installs Node.js and npm when they are missing)"
    if not (TS / "node_modules" / ".bin" / "tsc").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TS, check=True, timeout=900)
    sources = [*TS.glob("src/*.ts"), *TS.glob("test/*.ts"), TS / "tsconfig.json", TS / "package.json"]
    built = [TS / "dist" / "test" / name for name in TESTS]
    if not all(p.exists() for p in built) or newest(sources) > min(p.stat().st_mtime for p in built):
        subprocess.run([npm, "run", "build"], cwd=TS, check=True, timeout=900)


@pytest.mark.timeout(3600)
def test_typescript_sdk_against_our_daemon(daemon: Daemon, snapshot: str) -> None:
    build()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "FORKD_URL": daemon.url,
           "FORKD_TOKEN": daemon.token, "FORKD_TAG": snapshot}
    t0 = time.monotonic()
    proc = subprocess.run(["node", "--test", "--test-reporter=spec",
                           *(str(TS / "dist" / "test" / name) for name in TESTS)],
                          cwd=TS, env=env, capture_output=True, text=True, timeout=3000)
    out = proc.stdout + proc.stderr
    print(out[-20000:])
    print(f"node --test took {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, f"node --test exited {proc.returncode}:\n{out[-12000:]}"
    assert "# fail 0" in out or "ℹ fail 0" in out, out[-3000:]


def test_the_documented_example_runs(daemon: Daemon, snapshot: str) -> None:
    """docs/typescript.md's runnable example, as written (its snapshot tag replaced by the session's),
    importing the package by its name (``@forkd/sdk``: a file inside the package resolves it)."""
    build()
    doc = (ROOT / "docs" / "typescript.md").read_text()
    section = doc.split("## A runnable example", 1)[1]
    code = section.split("```js\n", 1)[1].split("```", 1)[0]
    assert '"pyagent"' in code
    script = TS / "dist" / "docs-example.mjs"
    script.write_text(code.replace('"pyagent"', json.dumps(snapshot)))
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "FORKD_URL": daemon.url,
           "FORKD_TOKEN": daemon.token}
    proc = subprocess.run(["node", str(script)], cwd=TS, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "[ 0, 0, 0, 0, 0 ]" in out and "stdout: 3" in out and "exit 0 after" in out, out
    assert "raised ZeroDivisionError" in out and "Uint8Array(4) [ 0, 1, 2, 255 ]" in out, out
    assert "x in the child: 42" in out, out
