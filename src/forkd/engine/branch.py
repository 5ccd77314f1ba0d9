"""BRANCH: snapshot a running child without stopping it for long, so it can be forked again.

The pagemap branch (see docs/branch.md): ``stop``; ``xen-save-devices-state`` writes the device state;
the child's own copy-on-write pages of guest RAM are found through ``/proc/PID/pagemap`` and copied out
of ``/proc/PID/mem``; ``cont``. The pause covers only those steps. Then, with the child running again:

* **delta**: a vmstate made of the base's RAM sections, one RAM section with the copied pages, and the
  child's devices. Its children map the *base's* memory.bin, so the base's pool serves them too.
* **flat**: a new memory.bin (a reflink of the base where the filesystem supports it, else a sparse
  copy) with the pages written in, and a vmstate like a root's. It is a base of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkd.engine import disk as disks
from forkd.engine import jail, pagemap, qstream
from forkd.engine.child import Child
from forkd.engine.snapshot import MEMORY_NAME, VMSTATE_NAME, Snapshot, SnapshotMeta, SnapshotStore
from forkd.engine.vm import VMProcess
from forkd.errors import ChannelClosedError, ForkdError, SnapshotError, ValidationError, VMError

MODES = ("auto", "delta", "flat")
AUTO_DELTA_MAX_BYTES = 32 << 20  # auto: a delta up to this many dirty bytes, flat above
FICLONE = 0x40049409


@dataclass
class BranchResult:
    snapshot: Snapshot
    mode: str
    pause_ms: float
    total_ms: float
    dirty_bytes: int
    bytes_written: int

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.snapshot.tag, "mode": self.mode, "pause_ms": round(self.pause_ms, 2),
                "total_ms": round(self.total_ms, 1), "dirty_bytes": self.dirty_bytes,
                "bytes_written": self.bytes_written}


def reflink_or_copy(src: Path, dst: Path, size: int) -> None:
    """``dst`` = ``src``: FICLONE where the filesystem shares extents (XFS, btrfs), else a sparse copy
    (only the data extents are copied; holes stay holes)."""
    fi = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.ioctl(fo, FICLONE, fi)
            return
        except OSError:
            pass
        os.ftruncate(fo, size)
        off = 0
        while off < size:
            try:
                data = os.lseek(fi, off, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole is left
            hole = min(os.lseek(fi, data, os.SEEK_HOLE), size)
            n, pos = hole - data, data
            while n > 0:
                try:
                    c = os.copy_file_range(fi, fo, n, pos, pos)
                except OSError:
                    c = os.pwrite(fo, os.pread(fi, min(n, 16 << 20), pos), pos)
                if c <= 0:
                    raise OSError("copy made no progress")
                pos += c
                n -= c
            off = hole
    finally:
        os.close(fi)
        os.close(fo)


def write_pages(path: Path, runs: list[tuple[int, memoryview]]) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    written = 0
    try:
        for page0, buf in runs:
            written += os.pwrite(fd, buf, page0 * pagemap.PAGE)
    finally:
        os.close(fd)
    return written


def save_devices(vm: VMProcess, devfile: Path) -> None:
    """QEMU writes its device state to a file it opens by name: inside a jail, to a file we hand it
    there, which then moves to ``devfile`` (owned by root again)."""
    root, uid = vm.meta.get("jail"), vm.meta.get("uid")
    if not root or not isinstance(uid, int):
        vm.qmp.execute("xen-save-devices-state", {"filename": str(devfile), "live": False}, timeout=60)
        return
    name = f"devstate-{secrets.token_hex(4)}"
    handed = jail.hand_file(Path(root), name, uid)
    try:
        vm.qmp.execute("xen-save-devices-state", {"filename": f"/{name}", "live": False}, timeout=60)
        os.chown(handed, 0, 0)
        os.chmod(handed, 0o600)
        shutil.move(handed, devfile)
    finally:
        with contextlib.suppress(FileNotFoundError):
            handed.unlink()


def switch_disk_layer(vm: VMProcess, base: Snapshot) -> Path:
    """While the VM is stopped: put a fresh, empty top layer over its disk (``blockdev-snapshot``, the
    file handed over as an fd: a jailed QEMU cannot open paths). Returns the layer it wrote until now,
    which it never writes again: a copy of it becomes the branch's layer."""
    old_top = Path(str(vm.meta["disk_top"]))
    old_node = str(vm.meta.get("disk_node") or disks.ROOT_NODE)
    chain = base.disk_chain()
    assert chain is not None
    size = chain.size_bytes
    new_top = disks.new_layer(old_top.with_name(f"disk-{secrets.token_hex(4)}.qcow2"), size)
    node = f"top-{secrets.token_hex(4)}"
    fd = os.open(new_top, os.O_RDWR | os.O_CLOEXEC)
    try:
        fdset = vm.qmp.execute("add-fd", {}, fds=[fd], timeout=30)["fdset-id"]
    finally:
        os.close(fd)
    vm.qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": node, "backing": None,
                                    "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"}}, timeout=30)
    vm.qmp.execute("blockdev-snapshot", {"node": old_node, "overlay": node}, timeout=30)
    vm.meta.update(disk_top=str(new_top), disk_node=node, disk_layers=int(vm.meta.get("disk_layers", 0)) + 1)
    vm.save_meta()
    return old_top


def capture(child: Child, base: Snapshot, devfile: Path) -> tuple[list[tuple[int, memoryview]], mmap.mmap, float]:
    """The pause: stop, save devices, find and copy the child's own pages, cont. Returns the pages,
    the buffer holding them, and the pause in seconds. The child is always resumed."""
    vm = child.vm
    size = base.meta.spec.memory_mib << 20
    try:
        vaddr = pagemap.ram_mapping(child.pid, base.memory, size)
        estimate = sum(e - s for s, e in pagemap.dirty_runs(child.pid, vaddr, size // pagemap.PAGE))
    except (OSError, LookupError) as e:
        raise VMError(f"sandbox {child.id}: cannot inspect its memory (is it still running?): {e}") from e
    buf = pagemap.prefaulted(int(estimate * pagemap.PAGE * 1.25) + (8 << 20))
    t0 = time.monotonic()
    old_layer = None
    vm.qmp.execute("stop", timeout=30)
    try:
        save_devices(vm, devfile)
        if vm.meta.get("disk_top"):
            old_layer = switch_disk_layer(vm, base)
        runs = pagemap.dirty_runs(child.pid, vaddr, size // pagemap.PAGE)
        need = sum(e - s for s, e in runs) * pagemap.PAGE
        if need > len(buf):
            buf = pagemap.prefaulted(need)
        pages = pagemap.read_runs(child.pid, vaddr, runs, buf)
    finally:
        with contextlib.suppress(ForkdError):
            vm.qmp.execute("cont", timeout=30)
        pause = time.monotonic() - t0
    if old_layer is not None:  # a copy (a reflink where the file system can): the child keeps the file open
        reflink_or_copy(old_layer, devfile.parent / disks.LAYER_NAME, old_layer.stat().st_size)
    return pages, buf, pause


def branch(store: SnapshotStore, child: Child, source: Snapshot, tag: str, mode: str = "auto") -> BranchResult:
    """Snapshot the running ``child`` (forked from ``source``) as ``tag``; the child keeps running."""
    if mode not in MODES:
        raise ValidationError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    base = source if source.meta.kind != "delta" else store.open(source.memory_owner)
    if not child.alive():
        raise VMError(f"sandbox {child.id} is not running ({child.vm.exit_status()})")
    if source.meta.disk and child.vm.meta.get("disk_node"):
        # its top layer now holds only the writes since its first branch: a second branch would need that
        # branch in its chain (not recorded yet); fork from the first branch and branch the new child
        raise ValidationError(f"sandbox {child.id} has a disk and was branched already; fork a sandbox from that "
                              "branch and branch it instead")
    t_start = time.monotonic()
    staging = store.stage(tag)
    ok = False
    try:
        try:
            pages, buf, pause = capture(child, base, staging / "devices.state")
        except (VMError, ChannelClosedError, OSError) as e:
            status = None
            for _ in range(100):  # a killed QEMU takes a few ms to be reaped after its threads exit
                if (status := child.vm.exit_status()) is not None:
                    break
                time.sleep(0.01)
            why = f"it exited ({status})" if status else str(e)
            raise SnapshotError(f"branch of sandbox {child.id} failed: {why}; no snapshot was written") from e
        dirty = sum(len(v) for _, v in pages)
        chosen = mode if mode != "auto" else ("delta" if dirty <= AUTO_DELTA_MAX_BYTES else "flat")
        root = qstream.parse_root(base.vmstate.read_bytes())
        devices = qstream.device_part((staging / "devices.state").read_bytes())
        (staging / "devices.state").unlink()
        written = 0
        if chosen == "delta":
            data = qstream.splice(root, devices, qstream.ram_part(root.ram_section_id, pages))
        else:
            reflink_or_copy(base.memory, staging / MEMORY_NAME, base.meta.spec.memory_mib << 20)
            written += write_pages(staging / MEMORY_NAME, pages)
            data = qstream.splice(root, devices)
        (staging / VMSTATE_NAME).write_bytes(data)
        written += len(data)
        del pages
        buf.close()
        meta = SnapshotMeta(
            tag=tag, created_at=time.time(), spec=source.meta.spec, qemu=source.meta.qemu,
            accel_reason=source.meta.accel_reason, host_cpu=source.meta.host_cpu, image=source.meta.image,
            guest=source.meta.guest, files={}, parent=source.tag, kind=chosen,
            memory_source=base.tag if chosen == "delta" else None,
            depends_sha256=base.meta.files[MEMORY_NAME]["sha256"] if chosen == "delta" else None,
            branch={"sandbox": child.id, "mode_requested": mode, "pause_ms": round(pause * 1000, 2),
                    "dirty_bytes": dirty},
            disk={**source.meta.disk, "layers": [*source.meta.disk["layers"], tag],
                  "layer_sha256": list(source.meta.disk["layer_sha256"])} if source.meta.disk else {})
        snap = store.publish(staging, meta)
        ok = True
    finally:
        if not ok:
            store.discard(staging)
    total = time.monotonic() - t_start
    return BranchResult(snap, chosen, pause * 1000, total * 1000, dirty, written)
