"""Sweeping what dead VMs left behind: work dirs whose QEMU is gone, and staging leftovers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from forkd.engine import cgroup
from forkd.engine.snapshot import SnapshotStore
from forkd.engine.vm import META, WorkDir, process_matches

# A work dir without vm.json is being created right now, unless it is older than this.
GRACE_S = 120.0


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    kept_live: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)  # orphaned QEMUs: "<pid> <vm id>: why"

    def to_json(self) -> dict[str, list[str]]:
        return {"removed": self.removed, "kept_live": self.kept_live, "killed": self.killed}


@dataclass(frozen=True)
class Orphan:
    """A QEMU that forkd started (its ``-name`` says so) whose work dir is gone: nobody can reach it."""

    pid: int
    vm_id: str
    log: str

    def __str__(self) -> str:
        return f"{self.pid} {self.vm_id}: its work dir is gone ({self.log})"


def _pidns(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def orphans() -> list[Orphan]:
    """Every forkd QEMU on this host whose work dir no longer exists, whichever run dir it had.

    A VM's stdout is its work dir's ``qemu.log``; when the work dir was removed while QEMU ran (a
    controller that died between the two), that file has no links left. A QEMU in another
    PID namespace belongs to a forkd in a container, whose work dirs this process cannot see: never
    an orphan of ours."""
    out = []
    own_pidns = _pidns("self")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if not args or not os.path.basename(args[0]).startswith(b"qemu-system"):
                continue
            if own_pidns is not None and _pidns(proc.name) != own_pidns:
                continue
            name = next((b.decode() for a, b in zip(args, args[1:], strict=False) if a == b"-name"), "")
            if not name.startswith("forkd-"):
                continue
            log = os.readlink(proc / "fd" / "1")
            # by the file itself, not its path: a path read from another mount namespace (a systemd
            # unit's private mounts, kept by a QEMU across the daemon's restart) may not resolve here
            links = os.stat(proc / "fd" / "1").st_nlink
        except (OSError, UnicodeDecodeError):
            continue
        if "/qemu.log" in log and links == 0:
            out.append(Orphan(int(proc.name), name.removeprefix("forkd-"), log))
    return out


def kill_orphans(dry_run: bool = False) -> list[str]:
    """Kill (SIGKILL) every orphaned forkd QEMU; returns what was (or would be) killed."""
    found = orphans()
    if not dry_run:
        for o in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(o.pid, signal.SIGKILL)
    return [str(o) for o in found]


def sweep_cgroups(run_dir: Path, dry_run: bool = False) -> list[str]:
    """Remove per-child memory cgroups whose child is gone (never a live child's)."""
    removed = []
    for cg in cgroup.leftovers():
        meta = WorkDir(run_dir / cg.path.name).read_meta()
        if meta and process_matches(int(meta.get("pid", 0)), str(meta.get("id", ""))):
            continue
        if (cg.path / "cgroup.procs").exists() and (cg.path / "cgroup.procs").read_text().strip():
            continue  # some process (not one of ours in this run dir) is still in it
        if not dry_run:
            cg.remove(timeout=1)
        removed.append(str(cg.path))
    return removed


def sweep(run_dir: Path, store: SnapshotStore | None = None, dry_run: bool = False) -> CleanupReport:
    """Remove work dirs whose VM process is gone (never a live one's) and crashed snapshot staging dirs."""
    rep = CleanupReport()
    if run_dir.is_dir():
        now = time.time()
        for d in sorted(run_dir.iterdir()):
            if not d.is_dir():
                continue
            meta = WorkDir(d).read_meta()
            if meta is None:
                if (d / META).exists() or now - d.stat().st_mtime < GRACE_S:
                    continue
            elif process_matches(int(meta.get("pid", 0)), str(meta.get("id", ""))):
                rep.kept_live.append(str(d))
                continue
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
            rep.removed.append(str(d))
    rep.killed = kill_orphans(dry_run)
    rep.removed += sweep_cgroups(run_dir, dry_run)
    if store is not None:
        if dry_run:
            rep.removed += [str(p) for p in store.root.glob(".staging-*")]
        else:
            rep.removed += [str(p) for p in store.sweep_staging()]
    return rep
