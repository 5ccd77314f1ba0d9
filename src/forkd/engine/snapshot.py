"""Snapshots on disk: ``<root>/<tag>/{memory.bin, vmstate, snapshot.json}``.

A snapshot is written into a staging directory and renamed into place only once every file is
complete and fsynced, so a crash never leaves a directory that looks like a valid snapshot.
"""

from __future__ import annotations

import builtins
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkd import __version__
from forkd.engine import disk as disks
from forkd.engine.accel import choose_accel
from forkd.engine.qemu import MachineSpec, QemuBinary, default_accel_opts, default_devices
from forkd.engine.specguard import MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, MIN_VCPUS
from forkd.engine.verify import remember_verified, verify_sha256
from forkd.errors import (
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    ValidationError,
)
from forkd.fsutil import allocated_bytes, atomic_write_json, fsync_dir, fsync_file, pid_alive, sha256_file
from forkd.paths import image_root, snapshot_root, validate_tag

FORMAT = 1
META_NAME = "snapshot.json"
MEMORY_NAME = "memory.bin"
VMSTATE_NAME = "vmstate"

Progress = Callable[[str], None]


@dataclass
class SnapshotMeta:
    """The contents of ``snapshot.json``."""

    tag: str
    created_at: float
    spec: MachineSpec
    qemu: dict[str, str]
    accel_reason: str
    host_cpu: str
    image: dict[str, str]
    guest: dict[str, Any]
    files: dict[str, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    parent: str | None = None
    forkd_version: str = __version__
    format: int = FORMAT
    kind: str = "root"  # root | flat | delta
    memory_source: str | None = None  # delta: the snapshot whose memory.bin its children map
    depends_sha256: str | None = None  # delta: sha256 of that memory.bin
    branch: dict[str, Any] = field(default_factory=dict)  # how a branch was made (pause, dirty bytes, ...)
    # an image-based snapshot's root disk: {"image", "size_bytes", "base_sha256", "layers": [tags, this one
    # last], "layer_sha256": [...]} (see engine/disk.py); empty for an initramfs-only guest
    disk: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "tag": self.tag, "created_at": self.created_at,
            "forkd_version": self.forkd_version, "machine": self.spec.to_json(), "qemu": self.qemu,
            "accel_reason": self.accel_reason, "host_cpu": self.host_cpu, "image": self.image,
            "guest": self.guest, "files": self.files, "timings": self.timings, "parent": self.parent,
            "kind": self.kind, "memory_source": self.memory_source, "depends_sha256": self.depends_sha256,
            "branch": self.branch, **({"disk": self.disk} if self.disk else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SnapshotMeta:
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported snapshot format {d.get('format')!r} (this forkd reads {FORMAT})")
        return cls(
            tag=str(d["tag"]), created_at=float(d["created_at"]), spec=MachineSpec.from_json(d["machine"]),
            qemu=dict(d["qemu"]), accel_reason=str(d.get("accel_reason", "")),
            host_cpu=str(d.get("host_cpu", "")), image=dict(d.get("image", {})), guest=dict(d.get("guest", {})),
            files={k: dict(v) for k, v in d["files"].items()}, timings=dict(d.get("timings", {})),
            parent=d.get("parent"), forkd_version=str(d.get("forkd_version", "")), format=int(d["format"]),
            kind=str(d.get("kind", "root")), memory_source=d.get("memory_source"),
            depends_sha256=d.get("depends_sha256"), branch=dict(d.get("branch") or {}),
            disk=disks.check_record(d["disk"], str(d["tag"])) if d.get("disk") else {},
        )


@dataclass
class Snapshot:
    """A snapshot directory and its metadata. ``memory`` is the RAM file its children map: its own
    ``memory.bin``, or (a delta branch) that of the snapshot it depends on."""

    path: Path
    meta: SnapshotMeta
    memory_file: Path | None = None

    @property
    def tag(self) -> str:
        return self.meta.tag

    @property
    def memory(self) -> Path:
        return self.memory_file or self.path / MEMORY_NAME

    @property
    def memory_owner(self) -> str:
        """Tag of the snapshot whose memory.bin this one's children map."""
        return self.meta.memory_source or self.tag

    @property
    def vmstate(self) -> Path:
        return self.path / VMSTATE_NAME

    def disk_chain(self) -> disks.DiskChain | None:
        """The read-only layers of this snapshot's root disk (None: the guest has no disk)."""
        d = self.meta.disk
        if not d:
            return None
        root = self.path.parent
        base = image_root() / str(d["image"]) / disks.ROOTFS_NAME
        # the size comes from the (hash-checked) file system, never from snapshot.json alone: it sizes every
        # new layer and the QEMU's RLIMIT_FSIZE
        try:
            size = base.stat().st_size
        except OSError:
            size = int(d["size_bytes"])  # check_disk refuses the missing base
        return disks.DiskChain(base, tuple(root / t / disks.LAYER_NAME for t in d["layers"]), size)

    def check_disk(self) -> None:
        """The image's file system and every layer present and unchanged (sha256, remembered per file)."""
        chain = self.disk_chain()
        if chain is None:
            return
        d = self.meta.disk
        name = self.meta.image.get("name") or d["image"]
        if not chain.base.is_file():
            raise SnapshotInvalidError(
                f"snapshot {self.tag} was made from image {name} ({d['image']}), which is not here ({chain.base}): "
                f"rebuild it (forkd image build) or re-create the snapshot")
        verify_sha256(chain.base, str(d.get("base_sha256")),
                      f"snapshot {self.tag}: the file system of image {name} ({d['image']}) has changed since; it")
        if chain.size_bytes != d["size_bytes"]:
            raise SnapshotInvalidError(f"snapshot {self.tag}: {META_NAME} records a disk of {d['size_bytes']} bytes, "
                                       f"but the file system of image {name} has {chain.size_bytes}")
        hashes = d.get("layer_sha256") or []
        if len(hashes) != len(chain.layers):
            raise SnapshotInvalidError(f"snapshot {self.tag}: {META_NAME} records {len(hashes)} disk layer hashes "
                                       f"for {len(chain.layers)} layers")
        for tag, layer, digest in zip(d["layers"], chain.layers, hashes, strict=True):
            if not layer.is_file():
                raise SnapshotInvalidError(f"snapshot {self.tag}: the disk layer of snapshot {tag} is missing "
                                           f"({layer})")
            verify_sha256(layer, str(digest), f"snapshot {self.tag}: the disk layer of snapshot {tag}")
            disks.check_qcow2(layer, f"snapshot {self.tag}: the disk layer of snapshot {tag}")

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (what ``forkd snapshot info`` prints)."""
        own = self.path / MEMORY_NAME
        mem_alloc = allocated_bytes(own) if own.exists() else 0
        return {
            "tag": self.tag, "path": str(self.path), "created_at": self.meta.created_at,
            "memory_mib": self.meta.spec.memory_mib, "vcpus": self.meta.spec.vcpus,
            "accel": self.meta.spec.accel, "cpu": self.meta.spec.cpu, "machine": self.meta.spec.machine,
            "qemu_version": self.meta.qemu.get("version"), "image_id": self.meta.image.get("id"),
            "guest": self.meta.guest, "vmstate_bytes": self.meta.files[VMSTATE_NAME]["size"],
            "memory_bytes": self.meta.spec.memory_mib << 20, "memory_allocated_bytes": mem_alloc,
            "timings": self.meta.timings, "parent": self.meta.parent, "kind": self.meta.kind,
            "memory_source": self.meta.memory_source, "branch": self.meta.branch,
        }

    def check_restorable(self, qemu: QemuBinary, accel: str, host_cpu: str) -> None:
        """Fail at once, naming the problem, if this snapshot cannot be restored here."""
        m = self.meta
        try:
            m.spec.check()  # it goes into QEMU's argv: only what this forkd version writes
        except SnapshotInvalidError as e:
            raise SnapshotInvalidError(f"snapshot {self.tag}: {e}") from e
        problems = []
        if m.qemu.get("version") != qemu.version:
            problems.append(f"it was made with QEMU {m.qemu.get('version')}, this host has QEMU {qemu.version}")
        if m.spec.accel != accel:
            problems.append(f"it was made with accelerator {m.spec.accel}, this host uses {accel}")
        if m.spec.accel == "kvm" and m.host_cpu and host_cpu and m.host_cpu != host_cpu:
            problems.append(f"it was made on CPU {m.host_cpu!r} with -cpu host, this CPU is {host_cpu!r}")
        if problems:
            raise SnapshotInvalidError(f"snapshot {self.tag} cannot be restored here: " + "; ".join(problems)
                                       + f". Re-create it on this host (forkd snapshot create --tag {self.tag}).")
        self.check_files()

    def check_files(self) -> None:
        """Every file present with its recorded size and sha256; a delta's memory source too."""
        names = [VMSTATE_NAME] + ([] if self.meta.kind == "delta" else [MEMORY_NAME])
        for name in names:
            rec = self.meta.files.get(name)
            p = self.path / name
            if rec is None:
                raise SnapshotInvalidError(f"snapshot {self.tag}: {META_NAME} records no {name}")
            try:
                size = p.stat().st_size
            except FileNotFoundError as e:
                raise SnapshotInvalidError(f"snapshot {self.tag}: {name} is missing ({p})") from e
            if size != rec["size"]:
                raise SnapshotInvalidError(
                    f"snapshot {self.tag}: {name} is {size} bytes, {META_NAME} records {rec['size']} "
                    "(truncated or replaced)")
        for name in names:
            verify_sha256(self.path / name, self.meta.files[name]["sha256"], f"snapshot {self.tag}")
        if self.meta.kind == "delta":
            if not self.meta.depends_sha256 or self.memory_file is None:
                raise SnapshotInvalidError(f"snapshot {self.tag}: {META_NAME} records no memory source")
            verify_sha256(self.memory_file, self.meta.depends_sha256,
                          f"snapshot {self.tag} depends on {self.meta.memory_source}'s memory.bin, which")
        self.check_disk()


def host_cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def validate_machine(memory_mib: int, vcpus: int) -> None:
    if (isinstance(memory_mib, bool) or not isinstance(memory_mib, int)
            or not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB):
        raise ValidationError(
            f"memory_mib must be an integer in {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}; got {memory_mib!r}")
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not MIN_VCPUS <= vcpus <= MAX_VCPUS:
        raise ValidationError(f"vcpus must be an integer in {MIN_VCPUS}..{MAX_VCPUS}; got {vcpus!r}")


def make_spec(memory_mib: int = 512, vcpus: int = 1, accel: str | None = None,
              kernel_cmdline: str = "", disk: bool = False) -> tuple[MachineSpec, str]:
    """The machine a new snapshot gets, and why that accelerator.

    Under TCG the emulated PIT, left running in its reset mode, wakes QEMU 36 times a second in every
    idle child (measured: 1 % host CPU per idle clone). The guest needs it only to calibrate its TSC,
    which ``tsc_early_khz`` on the kernel command line makes unnecessary; then the PIT is left out.
    """
    validate_machine(memory_mib, vcpus)
    choice = choose_accel(accel)
    opts = MachineSpec.machine_opts
    # the guest's timer is then the local APIC in TSC-deadline mode, which needs no calibration either
    deadline_timer = choice.cpu_model.split(",")[0] == "max" or "+tsc-deadline" in choice.cpu_model
    if choice.name == "tcg" and "tsc_early_khz=" in kernel_cmdline and deadline_timer:
        opts += ",pit=off"
    spec = MachineSpec(memory_mib=memory_mib, vcpus=vcpus, accel=choice.name, machine_opts=opts,
                       accel_opts=default_accel_opts(choice.name), cpu=choice.cpu_model,
                       devices=(*default_devices(), disks.DISK_DEVICE) if disk else default_devices())
    return spec, choice.reason


def seal(directory: Path) -> None:
    """Make a snapshot's files its owner's only: no VM uid can open them (QEMU opens them before it
    drops root; QEMU before 8.2 opens the memory file read-write, so the owner keeps write).
    Done before the directory is published."""
    for p in directory.iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o600)
    os.chmod(directory, 0o700)


class SnapshotStore:
    """The snapshot root directory: list, open, stage, publish and delete snapshots."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else snapshot_root()

    def path(self, tag: str) -> Path:
        return self.root / validate_tag(tag)

    def exists(self, tag: str) -> bool:
        return self.path(tag).exists()

    def open(self, tag: str) -> Snapshot:
        """The snapshot ``tag``: SnapshotNotFoundError if absent, SnapshotInvalidError if its metadata is bad."""
        p = self.path(tag)
        if not p.is_dir():
            raise SnapshotNotFoundError(f"snapshot {tag} not found in {self.root}")
        try:
            meta = SnapshotMeta.from_json(json.loads((p / META_NAME).read_text()))
        except FileNotFoundError as e:
            raise SnapshotInvalidError(f"snapshot {tag}: {META_NAME} is missing ({p})") from e
        except SnapshotInvalidError as e:  # a machine spec this forkd version would not write
            raise SnapshotInvalidError(f"snapshot {tag}: {e}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise SnapshotInvalidError(f"snapshot {tag}: {META_NAME} is corrupt: {e}") from e
        if meta.tag != tag:
            raise SnapshotInvalidError(f"snapshot {tag}: {META_NAME} says its tag is {meta.tag!r}")
        memory_file = None
        if meta.kind == "delta":
            if not meta.memory_source:
                raise SnapshotInvalidError(f"snapshot {tag}: a delta branch without a memory source")
            memory_file = self.path(meta.memory_source) / MEMORY_NAME
            if not memory_file.exists():
                raise SnapshotInvalidError(f"snapshot {tag} depends on snapshot {meta.memory_source}, whose "
                                           f"memory.bin is missing ({memory_file})")
        return Snapshot(p, meta, memory_file)

    def list(self) -> list[tuple[str, Snapshot | None, str | None]]:
        """Every snapshot directory as (tag, snapshot or None, error or None), sorted by tag."""
        out: list[tuple[str, Snapshot | None, str | None]] = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                out.append((d.name, self.open(d.name), None))
            except (SnapshotInvalidError, ValidationError) as e:
                out.append((d.name, None, str(e)))
        return out

    def using_image(self, image_id: str) -> builtins.list[str]:
        """Tags of the snapshots made from image ``image_id``."""
        return [t for t, snap, _ in self.list() if snap is not None
                and (snap.meta.image.get("id") == image_id or (snap.meta.disk or {}).get("image") == image_id)]

    def stage(self, tag: str) -> Path:
        """A fresh staging directory for snapshot ``tag`` (published later with ``publish``)."""
        validate_tag(tag)
        if self.exists(tag):
            raise SnapshotExistsError(f"snapshot {tag} already exists; delete it first (forkd snapshot rm {tag})")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
        return staging

    def scratch(self, purpose: str) -> Path:
        """A fresh private directory in the store for a transient file (a pack being sent or received);
        named as staging is, so that a crash leaves nothing ``sweep_staging`` keeps."""
        self.root.mkdir(parents=True, exist_ok=True)
        d = self.root / f".staging-{purpose}.{secrets.token_hex(4)}-{os.getpid()}-{secrets.token_hex(4)}"
        d.mkdir(mode=0o700)
        return d

    def publish(self, staging: Path, meta: SnapshotMeta) -> Snapshot:
        """Hash and fsync the staged files, write snapshot.json, then rename the directory into place."""
        seal(staging)
        names = [n for n in (VMSTATE_NAME, MEMORY_NAME, disks.LAYER_NAME) if (staging / n).exists()]
        for name in names:
            p = staging / name
            fsync_file(p)
            digest = sha256_file(p)
            meta.files[name] = {"size": p.stat().st_size, "sha256": digest}
        if meta.disk:
            if disks.LAYER_NAME not in names:
                raise SnapshotInvalidError(f"snapshot {meta.tag}: its disk layer was not written")
            meta.disk["layer_sha256"] = [*meta.disk.get("layer_sha256", [])[:len(meta.disk["layers"]) - 1],
                                         meta.files[disks.LAYER_NAME]["sha256"]]
        atomic_write_json(staging / META_NAME, meta.to_json(), mode=0o600)
        fsync_dir(staging)
        final = self.path(meta.tag)
        try:
            os.rename(staging, final)  # fails if the target exists and is not empty
        except OSError as e:
            raise SnapshotExistsError(f"snapshot {meta.tag} appeared while it was being created: {e}") from e
        fsync_dir(self.root)
        for name in names:
            remember_verified(final / name, meta.files[name]["sha256"])
        return self.open(meta.tag)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def delete(self, tag: str) -> None:
        """Remove snapshot ``tag`` (renamed away first, so it disappears atomically)."""
        p = self.path(tag)
        if not p.exists():
            raise SnapshotNotFoundError(f"snapshot {tag} not found in {self.root}")
        trash = self.root / f".deleting-{tag}-{secrets.token_hex(4)}"
        os.rename(p, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def sweep_staging(self) -> builtins.list[Path]:
        """Remove staging/deleting leftovers of crashed operations (never those of a live process)."""
        removed: builtins.list[Path] = []
        if not self.root.is_dir():
            return removed
        for d in self.root.iterdir():
            if d.name.startswith(".staging-"):
                parts = d.name.rsplit("-", 2)
                pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
                if pid and pid_alive(pid):
                    continue
            elif not d.name.startswith(".deleting-"):
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        return removed
