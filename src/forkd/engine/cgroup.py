"""Per-child memory limits: cgroup v2 ``memory.max`` under a ``forkd`` cgroup, or the v1 memory
controller where v2 has none (hybrid hosts).

A child over its limit is killed by the kernel's OOM killer; its siblings are in cgroups of their
own and go on. ``oom_killed()`` tells afterwards that this is how it ended.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from forkd.errors import ValidationError

V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/memory")
PARENT = "forkd"


@dataclass(frozen=True)
class Cgroup:
    """One child's memory cgroup."""

    version: int
    path: Path

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer killed a process of this cgroup."""
        try:
            if self.version == 2:
                text = (self.path / "memory.events").read_text()
            else:
                text = (self.path / "memory.oom_control").read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        return False

    def usage_bytes(self) -> int | None:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self, timeout: float = 5.0) -> None:
        """rmdir the cgroup once its processes are gone (the kernel refuses while any remain)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)


def detect() -> int | None:
    """2 if cgroup v2 has a usable memory controller, 1 for the v1 fallback, None if neither."""
    try:
        if "memory" in (V2_ROOT / "cgroup.controllers").read_text().split():
            return 2
    except OSError:
        pass
    if (V1_ROOT / "memory.limit_in_bytes").exists() and os.access(V1_ROOT, os.W_OK):
        return 1
    return None


def parent_dir(version: int) -> Path:
    return (V2_ROOT if version == 2 else V1_ROOT) / PARENT


def _enable_v2_controller(parent: Path) -> None:
    """Make ``memory`` available to the children of ``parent`` (and to ``parent`` itself)."""
    for d in (V2_ROOT, parent):
        ctl = d / "cgroup.subtree_control"
        if "memory" not in ctl.read_text().split():
            ctl.write_text("+memory")


def create(child_id: str, limit_mib: int) -> Cgroup:
    """A memory cgroup for ``child_id`` limited to ``limit_mib`` MiB (swap not allowed to bypass it)."""
    version = detect()
    if version is None:
        raise ValidationError("memory_limit_mib: no usable cgroup memory controller on this host (cgroup v2 "
                              "'memory' in /sys/fs/cgroup/cgroup.controllers, or v1 /sys/fs/cgroup/memory); "
                              "run forkd doctor")
    parent = parent_dir(version)
    parent.mkdir(exist_ok=True)
    limit = str(limit_mib << 20)
    path = parent / child_id
    path.mkdir(exist_ok=True)
    cg = Cgroup(version, path)
    try:
        if version == 2:
            _enable_v2_controller(parent)
            (path / "memory.max").write_text(limit)
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(limit)
            with contextlib.suppress(OSError):
                (path / "memory.memsw.limit_in_bytes").write_text(limit)
    except OSError:
        cg.remove(timeout=0)
        raise
    return cg


def attach(cg: Cgroup, pid: int) -> None:
    (cg.path / "cgroup.procs").write_text(str(pid))


def find(child_id: str) -> Cgroup | None:
    """The cgroup of ``child_id`` if one exists (v2 first)."""
    for version in (2, 1):
        p = parent_dir(version) / child_id
        if p.is_dir():
            return Cgroup(version, p)
    return None


def leftovers() -> list[Cgroup]:
    """Every per-child cgroup under the forkd parents."""
    out = []
    for version in (2, 1):
        parent = parent_dir(version)
        if parent.is_dir():
            out += [Cgroup(version, d) for d in parent.iterdir() if d.is_dir()]
    return out
