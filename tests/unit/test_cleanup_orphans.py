"""cleanup.orphans: a forkd QEMU whose work dir is gone is an orphan, unless it lives in another PID
namespace (a forkd in a container, whose work dirs this process cannot see)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from forkd.engine import cleanup

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")


def _fake_qemu(tmp_path: Path, name: str, *prefix: str) -> subprocess.Popen[bytes]:
    """A process named like a forkd QEMU (argv[0] qemu-system-x86_64, -name forkd-NAME) whose stdout
    is a qemu.log in a work dir that is then removed."""
    wd = tmp_path / name
    wd.mkdir()
    with open(wd / "qemu.log", "wb") as log:
        proc = subprocess.Popen([*prefix, "bash", "-c", "exec -a qemu-system-x86_64 python3 -c "
                                 f"'import time; time.sleep(120)' -name forkd-{name}"], stdout=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _named(f"forkd-{name}"):
        time.sleep(0.05)
    shutil.rmtree(wd)
    return proc


def _named(name: str) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and name.encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return False


def test_an_orphan_in_our_pid_namespace_is_found_and_one_in_another_is_not(tmp_path: Path) -> None:
    ours = _fake_qemu(tmp_path, "sb-test-ours")
    theirs = _fake_qemu(tmp_path, "sb-test-theirs", "unshare", "--pid", "--fork", "--kill-child")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "sb-test-ours" not in {o.vm_id for o in cleanup.orphans()}:
            time.sleep(0.05)
        found = {o.vm_id for o in cleanup.orphans()}
        assert "sb-test-ours" in found
        assert "sb-test-theirs" not in found
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait(timeout=30)
