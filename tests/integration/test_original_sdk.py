"""The original forkd's Python SDK (``forkd`` 0.5.3 from PyPI, unmodified, in a virtual environment of
its own: it has our import name) against our daemon: spawn, eval, exec, ping, branch, spawn from the
branch, kill. ``make compat-venv`` (part of ``make deps``) creates the environment."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import Daemon

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("FORKD_COMPAT_PYTHON", ROOT / ".venv-compat" / "bin" / "python"))

SCRIPT = textwrap.dedent('''
    import json, sys
    import forkd
    from forkd import Controller, ControllerError
    assert "site-packages" in forkd.__file__, forkd.__file__   # the PyPI package, not ours
    url, token, tag = sys.argv[1:4]
    c = Controller(base_url=url, token=token, timeout=600)
    out = {"version": forkd.__version__}
    kids = c.spawn_sandboxes(tag, n=2)
    out["spawned"] = kids
    a, b = kids[0]["id"], kids[1]["id"]
    out["ids_listed"] = sorted(s["id"] for s in c.list_sandboxes() if s["id"] in (a, b))
    out["get"] = c.get_sandbox(a)
    out["eval"] = c.eval_code(a, "numpy.zeros(3).tolist()")
    out["eval_error"] = c.eval_code(a, "1/0")
    out["exec"] = c.exec_command(a, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout_secs=60)
    out["ping"] = c.ping_sandbox(a)
    c.exec_command(a, ["sh", "-c", "echo branched > /tmp/mark"])
    br = c.branch_sandbox(a, tag="orig-sdk-branch", mode="diff")
    out["branch"] = br
    (g,) = c.spawn_sandboxes(br["tag"], n=1)
    out["grandchild_file"] = c.exec_command(g["id"], ["cat", "/tmp/mark"])["stdout"]
    out["snapshots"] = [s["tag"] for s in c.list_snapshots()]
    for sid in (a, b, g["id"]):
        c.kill_sandbox(sid)
    try:
        c.get_sandbox(a)
    except ControllerError as e:
        out["after_kill"] = e.status
    c.delete_snapshot(br["tag"])
    print(json.dumps(out))
''')


def test_original_python_sdk_against_our_daemon(daemon: Daemon, snapshot: str) -> None:
    assert PYTHON.exists(), f"{PYTHON} is missing: run `make compat-venv` (the original SDK's own venv)"
    proc = subprocess.run([str(PYTHON), "-I", "-c", SCRIPT, daemon.url, daemon.token, snapshot],
                          capture_output=True, text=True, timeout=1800, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["version"].startswith("0.5")
    kids = out["spawned"]
    assert len(kids) == 2 and all(k["id"].startswith("sb-") and k["snapshot_tag"] == snapshot for k in kids)
    assert all(isinstance(k["pid"], int) and isinstance(k["created_at_unix"], int) for k in kids)
    assert out["ids_listed"] == sorted(k["id"] for k in kids)
    assert out["get"]["id"] == kids[0]["id"] and "memory_limit_mib" in out["get"]
    assert out["eval"]["result"] == "[0.0, 0.0, 0.0]" and out["eval"]["error"] is None
    assert out["eval"]["exit_code"] == 0
    assert out["eval_error"]["exit_code"] == 1 and out["eval_error"]["error"].startswith("ZeroDivisionError")
    assert out["exec"] == {**out["exec"], "stdout": "out\n", "stderr": "err\n", "exit_code": 3}
    assert out["ping"]["pong"] is True and out["ping"]["numpy_version"]
    assert out["branch"]["tag"] == "orig-sdk-branch" and out["branch"]["branched_from"] == kids[0]["id"]
    assert out["branch"]["pause_ms"] is not None and out["branch"]["status"] == "ready"
    assert out["grandchild_file"] == "branched\n"
    assert "orig-sdk-branch" in out["snapshots"]
    assert out["after_kill"] == 404
