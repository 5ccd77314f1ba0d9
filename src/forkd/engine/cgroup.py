"""Per-VM cgroups: memory (guest RAM + QEMU's overhead), pids and an optional CPU quota, under one
``forkd`` subtree. cgroup v2 where its controllers are usable, else the v1 hierarchies (hybrid hosts:
memory, pids and cpu each have their own).

The QEMU process joins its cgroups in the forked child before exec (``procs_files``), so nothing it does
escapes them. A VM over its memory limit is killed by the kernel's OOM killer; its siblings are in
cgroups of their own and go on. ``oom_killed()`` tells afterwards that this is how it ended.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from forkd.errors import ValidationError

V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/memory")
V1_PIDS = Path("/sys/fs/cgroup/pids")
V1_CPU = Path("/sys/fs/cgroup/cpu")
PARENT = "forkd"
#: What a VM may use beyond its guest RAM when no limit is asked for: QEMU's own heap, TCG's
#: translation cache, page tables.
QEMU_OVERHEAD_MIB = 256
PIDS_MAX = 128  # QEMU's threads; it cannot fork (its seccomp filter denies spawning)
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Cgroup:
    """One VM's cgroup (``path``: the memory one; ``extra``: v1's pids and cpu directories)."""

    version: int
    path: Path
    extra: tuple[Path, ...] = field(default_factory=tuple)

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join every controller."""
        return [str(p / "cgroup.procs") for p in (self.path, *self.extra)]

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
        """rmdir the cgroups once their processes are gone (the kernel refuses while any remain)."""
        deadline = time.monotonic() + timeout
        for d in (*self.extra, self.path):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
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


def _enable_v2_controllers(parent: Path) -> None:
    """Make memory, pids and cpu available to the children of ``parent`` (and to ``parent`` itself)."""
    for d in (V2_ROOT, parent):
        ctl = d / "cgroup.subtree_control"
        have = ctl.read_text().split()
        avail = (d / "cgroup.controllers").read_text().split()
        for c in ("memory", "pids", "cpu"):
            if c not in have and c in avail:
                with contextlib.suppress(OSError):  # cpu may be refused next to real-time threads
                    ctl.write_text(f"+{c}")


def _write(path: Path, value: str, required: bool) -> None:
    try:
        path.write_text(value)
    except OSError:
        if required:
            raise


def create(vm_id: str, limit_mib: int | None, *, guest_mib: int | None = None,
           cpu_limit: float | None = None, pids_max: int = PIDS_MAX) -> Cgroup | None:
    """Cgroups for ``vm_id``: memory capped at ``limit_mib`` MiB (default: ``guest_mib`` + QEMU's
    overhead; swap cannot bypass it), ``pids_max`` tasks, ``cpu_limit`` CPUs (None: no quota).

    None when the host has no memory controller and nothing was asked for explicitly; a ValidationError
    when a limit was asked for and cannot be enforced.
    """
    version = detect()
    if version is None:
        if limit_mib is not None or cpu_limit is not None:
            raise ValidationError("memory_limit_mib/cpu_limit: no usable cgroup memory controller on this host "
                                  "(cgroup v2 'memory' in /sys/fs/cgroup/cgroup.controllers, or v1 "
                                  "/sys/fs/cgroup/memory); run forkd doctor")
        return None
    mib = limit_mib if limit_mib is not None else (guest_mib or 0) + QEMU_OVERHEAD_MIB
    limit = str(mib << 20)
    parent = parent_dir(version)
    parent.mkdir(exist_ok=True)
    path = parent / vm_id
    path.mkdir(exist_ok=True)
    cg = Cgroup(version, path)
    try:
        if version == 2:
            _enable_v2_controllers(parent)
            (path / "memory.max").write_text(limit)
            _write(path / "memory.swap.max", "0", False)
            _write(path / "pids.max", str(pids_max), False)
            if cpu_limit is not None:
                (path / "cpu.max").write_text(f"{int(cpu_limit * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        else:
            (path / "memory.limit_in_bytes").write_text(limit)
            _write(path / "memory.memsw.limit_in_bytes", limit, False)
            extra = []
            if (V1_PIDS / "pids.max").exists() or V1_PIDS.is_dir():
                d = V1_PIDS / PARENT / vm_id
                d.mkdir(parents=True, exist_ok=True)
                extra.append(d)
                cg = Cgroup(version, path, tuple(extra))
                (d / "pids.max").write_text(str(pids_max))
            if cpu_limit is not None:
                d = V1_CPU / PARENT / vm_id
                d.mkdir(parents=True, exist_ok=True)
                extra.append(d)
                cg = Cgroup(version, path, tuple(extra))
                (d / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (d / "cpu.cfs_quota_us").write_text(str(int(cpu_limit * CPU_PERIOD_US)))
    except OSError:
        cg.remove(timeout=0)
        raise
    return cg


def _v1_extra(vm_id: str) -> tuple[Path, ...]:
    return tuple(d for d in (V1_PIDS / PARENT / vm_id, V1_CPU / PARENT / vm_id) if d.is_dir())


def find(vm_id: str) -> Cgroup | None:
    """The cgroup of ``vm_id`` if one exists (v2 first)."""
    for version in (2, 1):
        p = parent_dir(version) / vm_id
        if p.is_dir():
            return Cgroup(version, p, _v1_extra(vm_id) if version == 1 else ())
    return None


def leftovers() -> list[Cgroup]:
    """Every per-VM cgroup under the forkd parents."""
    out = []
    for version in (2, 1):
        parent = parent_dir(version)
        if parent.is_dir():
            out += [Cgroup(version, d, _v1_extra(d.name) if version == 1 else ()) for d in parent.iterdir()
                    if d.is_dir()]
    return out
