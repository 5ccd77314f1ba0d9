"""The recipe image inside a pack of an image-based snapshot (``.image/`` in the archive).

A snapshot with a root disk needs its image's file system on the unpacking host; the pack carries the
whole image (kernel, initramfs, ``rootfs.ext4``, ``image.json``), so the other host can fork from it and
also create new snapshots from it. ``.image`` cannot be a snapshot tag (tags have no dot).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from forkd.engine import disk as disks
from forkd.errors import ForkdError
from forkd.fsutil import atomic_write_json, fsync_dir, fsync_file, sha256_file
from forkd.paths import image_root

IMAGE_DIR = ".image"
IMAGE_JSON = "image.json"
IMAGE_FILES = (IMAGE_JSON, "vmlinuz", "initramfs.cpio", disks.ROOTFS_NAME)  # archive order
MAX_IMAGE_JSON = 1 << 20


class PackImageError(ForkdError):
    """The image of a pack is missing, inconsistent or conflicts with one here."""


def image_records(image_id: str, base_sha256: str) -> list[tuple[dict[str, Any], Path]]:
    """(manifest record, file) of each image file to pack; the file system's hash is the recorded one."""
    d = image_root() / image_id
    out = []
    for name in IMAGE_FILES:
        p = d / name
        if not p.is_file():
            raise PackImageError(f"image {image_id} is incomplete here ({p} is missing): it cannot be packed; "
                                 "rebuild it (forkd image build --name ...)")
        digest = base_sha256 if name == disks.ROOTFS_NAME else sha256_file(p)
        out.append(({"path": f"{IMAGE_DIR}/{name}", "size": p.stat().st_size, "sha256": digest}, p))
    return out


def local_state(image_id: str, rootfs_sha256: str) -> str:
    """"reuse" if the image is here with that file system, "new" if it is not here; PackImageError if an
    image of that id is here with other content."""
    d = image_root() / image_id
    if not d.exists():
        return "new"
    try:
        local = json.loads((d / IMAGE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise PackImageError(f"image {image_id} is here but unreadable ({e}); remove {d} and unpack again") from e
    if local.get("rootfs_sha256") != rootfs_sha256 or not (d / disks.ROOTFS_NAME).is_file():
        raise PackImageError(f"image {image_id} is here with another file system than the pack's; remove {d} "
                             "(forkd image rm) and unpack again")
    return "reuse"


def check_staged(staging: Path, image_id: str, entries: dict[str, Any]) -> dict[str, Any]:
    """The staged ``image.json``, checked against the manifest: same id, the file system it records is
    the one in the pack."""
    raw = (staging / IMAGE_JSON).read_bytes()[:MAX_IMAGE_JSON]
    try:
        d = json.loads(raw)
        ok = isinstance(d, dict) and d.get("image_id") == image_id and d.get("rootfs") == disks.ROOTFS_NAME
    except ValueError:
        ok = False
    if not ok:
        raise PackImageError(f"corrupt archive: {IMAGE_DIR}/{IMAGE_JSON} does not describe image {image_id} "
                             f"with a {disks.ROOTFS_NAME}")
    if d.get("rootfs_sha256") != entries[f"{IMAGE_DIR}/{disks.ROOTFS_NAME}"].sha256:
        raise PackImageError(f"corrupt archive: {IMAGE_DIR}/{IMAGE_JSON} records another file system hash than "
                             "the manifest")
    if d.get("kernel", "vmlinuz") != "vmlinuz" or d.get("initramfs", "initramfs.cpio") != "initramfs.cpio":
        raise PackImageError(f"corrupt archive: {IMAGE_DIR}/{IMAGE_JSON} names unexpected boot files")
    return d


def publish(staging: Path, image_id: str, record: dict[str, Any]) -> bool:
    """Rename the staged image into the image root (unless one appeared meanwhile). True if it did.
    Its ``image.json`` is rewritten with ``origin: pack``: an imported image is never taken for a build
    of the same id (as a recipe's cache, or as the boot image)."""
    final = image_root() / image_id
    atomic_write_json(staging / IMAGE_JSON, {**record, "origin": "pack"}, mode=0o644)
    for p in staging.iterdir():
        os.chmod(p, 0o600 if p.name == disks.ROOTFS_NAME else 0o644)
        fsync_file(p)
    fsync_dir(staging)
    try:
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return False
    fsync_dir(final.parent)
    return True
