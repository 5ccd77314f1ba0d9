"""CLI commands against a daemon that is not there: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("argv", [["sandbox", "list"], ["sandbox", "ping", "sb-0000000000000000"]])
def test_unreachable_daemon_is_one_line(tmp_path: Path, argv: list[str]) -> None:
    sock = tmp_path / "nothing.sock"
    proc = subprocess.run([sys.executable, "-m", "forkd.cli", argv[0], "--url", f"unix:{sock}", *argv[1:]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach forkd-controller"), proc.stderr
    assert "Traceback" not in proc.stderr
