"""The ``forkd`` CLI in local mode, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vm


def forkd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "forkd.cli", *args], capture_output=True, text=True,
                       env=os.environ.copy(), timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"forkd {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_fork_eval_json(snapshot: str) -> None:
    out = json.loads(forkd("fork", "--tag", snapshot, "-n", "2", "--eval", "numpy.zeros(5).tolist()",
                           "--json").stdout)
    assert out["summary"]["ok"] == 2
    for c in out["children"]:
        assert c["result"] == "[0.0, 0.0, 0.0, 0.0, 0.0]" and c["pss_kib"] > 0 and c["ready_ms"] > 0


def test_fork_exec_table(snapshot: str) -> None:
    p = forkd("fork", "--tag", snapshot, "-n", "1", "--exec", "uname", "-s")
    assert "Linux" in p.stdout and "1/1 ok" in p.stdout


def test_snapshot_list_info_and_bad_tag(snapshot: str) -> None:
    tags = [s["tag"] for s in json.loads(forkd("snapshot", "list", "--json").stdout)]
    assert snapshot in tags
    info = json.loads(forkd("snapshot", "info", snapshot, "--json").stdout)
    assert info["memory_mib"] == 512
    p = forkd("snapshot", "info", "../etc", check=False)
    assert p.returncode == 2 and "tag must match" in p.stderr
    p = forkd("fork", "--tag", "does-not-exist", check=False)
    assert p.returncode == 1 and "not found" in p.stderr


def test_cleanup_json(snapshot: str) -> None:
    out = json.loads(forkd("cleanup", "--json").stdout)
    assert "removed" in out and "kept_live" in out
