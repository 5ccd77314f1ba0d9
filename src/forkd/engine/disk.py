"""A sandbox's root disk: the image's read-only file system, then copy-on-write qcow2 layers.

The chain a child sees, oldest first::

    <image>/rootfs.ext4   raw, read-only, one file shared by every VM through the host's page cache
    <snap>/disk.qcow2     the parent's writes (boot, warm-up), frozen when the snapshot was saved
    <branch>/disk.qcow2   a branched child's writes up to its BRANCH pause (one per branch level)
    <child>/disk.qcow2    this child's own writes, on the host's disk, gone with the child

Every layer is named on QEMU's command line (``-blockdev`` in JSON, so no path is parsed as options);
the backing file names written inside the qcow2 headers are never used. QEMU opens all of them before
it drops root, so inside the jail it needs no file system access for its disk. At a BRANCH pause the
running child is switched to a fresh top layer (``blockdev-snapshot``, handed over as a file
descriptor), and its previous top becomes the branch snapshot's layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from forkd import paths
from forkd.errors import SnapshotInvalidError, ValidationError, VMError

LAYER_NAME = "disk.qcow2"
ROOT_NODE = "root"
DISK_DEVICE = f"virtio-blk-device,drive={ROOT_NODE}"
ROOTFS_NAME = "rootfs.ext4"
#: what a qcow2 file may hold beyond its virtual size (metadata: L2 tables, refcounts)
QCOW2_SLACK = 64 << 20
INSTALL_HINT = "apt-get install -y qemu-utils"


@dataclass(frozen=True)
class DiskChain:
    """The read-only part of a VM's root disk: the image's file system and the qcow2 layers over it."""

    base: Path
    layers: tuple[Path, ...]
    size_bytes: int

    def with_layer(self, layer: Path) -> DiskChain:
        return DiskChain(self.base, (*self.layers, layer), self.size_bytes)

    def blockdev_args(self, top: Path) -> list[str]:
        """``-blockdev`` options for the chain with the writable layer ``top`` as node ``root``."""
        nodes: list[dict[str, object]] = [{
            "driver": "raw", "node-name": "d0", "read-only": True,
            "file": {"driver": "file", "filename": str(self.base), "read-only": True}}]
        for i, layer in enumerate(self.layers, start=1):
            nodes.append({"driver": "qcow2", "node-name": f"d{i}", "read-only": True, "backing": f"d{i - 1}",
                          "file": {"driver": "file", "filename": str(layer), "read-only": True}})
        nodes.append({"driver": "qcow2", "node-name": ROOT_NODE, "backing": f"d{len(self.layers)}",
                      "discard": "unmap", "file": {"driver": "file", "filename": str(top)}})
        args: list[str] = []
        for node in nodes:
            args += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        return args


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise VMError(f"qemu-img not found (it makes the disk layers of image-based sandboxes); {INSTALL_HINT}")
    return path


def _template(size_bytes: int) -> Path:
    """An empty qcow2 of ``size_bytes`` with no backing file, made once and copied for every layer."""
    d = paths.cache_dir() / "overlays"
    p = d / f"empty-{size_bytes}.qcow2"
    if p.is_file():
        return p
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{p.name}.tmp-{os.getpid()}"
    try:
        proc = subprocess.run([qemu_img(), "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                               str(tmp), str(size_bytes)], capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise VMError(f"qemu-img create failed: {proc.stderr.strip()[:500]}")
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return p


def new_layer(dst: Path, size_bytes: int) -> Path:
    """Create ``dst``: an empty writable layer (qcow2, mode 0600) for a disk of ``size_bytes``."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(_template(size_bytes), "rb") as src:
            os.sendfile(fd, src.fileno(), 0, os.fstat(src.fileno()).st_size)
    except BaseException:
        os.close(fd)
        dst.unlink(missing_ok=True)
        raise
    os.close(fd)
    return dst


def fsize_limit(size_bytes: int) -> int:
    """RLIMIT_FSIZE for a QEMU with this disk: its top layer may hold the whole disk, no more."""
    return size_bytes + QCOW2_SLACK


def check_record(disk: object, tag: str) -> dict[str, object]:
    """The ``disk`` record of a snapshot.json, checked (it names files QEMU will open)."""
    if not isinstance(disk, dict):
        raise SnapshotInvalidError(f"snapshot {tag}: snapshot.json: disk must be an object")
    size, layers, image = disk.get("size_bytes"), disk.get("layers"), disk.get("image")
    if not isinstance(size, int) or isinstance(size, bool) or not (64 << 20) <= size <= (1 << 44):
        raise SnapshotInvalidError(f"snapshot {tag}: snapshot.json: disk.size_bytes must be an integer in "
                                   "64 MiB..16 TiB")
    if not isinstance(image, str) or not image.isalnum() or len(image) > 64:
        raise SnapshotInvalidError(f"snapshot {tag}: snapshot.json: disk.image must be an image id")
    if not isinstance(layers, list) or not 1 <= len(layers) <= 64 or not all(isinstance(t, str) for t in layers):
        raise SnapshotInvalidError(f"snapshot {tag}: snapshot.json: disk.layers must be a list of 1..64 snapshot tags")
    if layers[-1] != tag:
        raise SnapshotInvalidError(f"snapshot {tag}: snapshot.json: disk.layers must end with the snapshot itself")
    for t in layers:
        try:
            paths.validate_tag(t, "disk.layers")
        except ValidationError as e:
            raise SnapshotInvalidError(f"snapshot {tag}: snapshot.json: {e}") from None
    return disk


QCOW2_MAGIC = b"QFI\xfb"
_INCOMPAT_OK = 0b1001  # dirty (bit 0) and compression type (bit 3); never corrupt or an external data file
_EXT_DATA_FILE, _EXT_ENCRYPTION = 0x44415441, 0x0537BE77


def check_qcow2(path: Path, what: str) -> None:
    """Refuse a qcow2 layer whose header could make QEMU open another file or decrypt: a layer from a pack
    or a tampered snapshot directory is parsed by QEMU while it is still root. Allowed: version 3,
    unencrypted, no internal snapshots, no external data file (header feature or extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(104)
            if len(head) < 104 or head[:4] != QCOW2_MAGIC:
                raise SnapshotInvalidError(f"{what}: {path.name} is not a qcow2 file")
            cluster_bits, = struct.unpack_from(">I", head, 20)
            if not 9 <= cluster_bits <= 21:
                raise SnapshotInvalidError(f"{what}: {path.name} has cluster_bits {cluster_bits} (QEMU takes 9..21)")
            # the header extensions fill (at most) the first cluster: read all of it
            head += f.read((1 << cluster_bits) - 104)
    except OSError as e:
        raise SnapshotInvalidError(f"{what}: cannot read {path}: {e}") from e
    version, = struct.unpack_from(">I", head, 4)
    crypt, = struct.unpack_from(">I", head, 32)
    nb_snapshots, = struct.unpack_from(">I", head, 60)
    incompat, _compat, autoclear = struct.unpack_from(">QQQ", head, 72)
    header_length, = struct.unpack_from(">I", head, 100)
    problems = []
    if version != 3:
        problems.append(f"version {version} (forkd writes 3)")
    if crypt:
        problems.append("encryption")
    if nb_snapshots:
        problems.append("internal snapshots")
    if incompat & ~_INCOMPAT_OK:
        problems.append(f"incompatible features {incompat:#x}")
    if autoclear & 0b10:
        problems.append("a raw external data file")
    off = header_length if 104 <= header_length <= 1024 else len(head)
    if off == len(head):
        problems.append(f"header length {header_length}")
    ended = False
    while off + 8 <= len(head):
        ext, length = struct.unpack_from(">II", head, off)
        if ext == 0:
            ended = True
            break
        if ext in (_EXT_DATA_FILE, _EXT_ENCRYPTION):
            problems.append("an external data file" if ext == _EXT_DATA_FILE else "an encryption header")
        off += 8 + (length + 7) // 8 * 8
    if not ended and off != len(head):
        problems.append("header extensions that do not end in the first cluster")
    if problems:
        raise SnapshotInvalidError(f"{what}: {path.name} is a qcow2 layer forkd does not write ({', '.join(problems)})"
                                   " (a pack or snapshot directory may have been tampered with)")
