"""Portable snapshots: a snapshot and the chain it depends on packed into one ``.tar.zst`` file, and
unpacked elsewhere.

A pack is a tar stream compressed with zstd (one frame with a content checksum). Its first member is
``manifest.json``::

    {"forkd_pack_version": 1, "forkd_version": "...", "created_at": 1700000000.0, "tag": "py2",
     "files": [{"path": "py/snapshot.json", "size": ..., "sha256": "..."}, ...], "chain": ["py", "py2"]}

``chain`` lists the snapshot directories the pack holds, root first, the packed snapshot (``tag``) last:
its ancestors, so that the pack is self-contained. Each link's files follow under ``<link>/``
(``snapshot.json``, ``vmstate``, and ``memory.bin`` unless the link is a delta, which maps the
memory.bin of an earlier link; never dotfiles). Memory images are tarred as regular files: zstd makes
their zero runs cheap, and unpack writes them back sparse.

Unpacking never trusts the archive: members are read one by one from the stream into one staging
directory per link, each must be a regular file listed in the manifest, each file's size and sha256
are checked while it is written, every link's snapshot.json must agree with the manifest and with the
chain (parents, memory sources and their hashes), and the links are registered (renamed into place,
root first) only once everything agrees. A link already here with the same files is reused. Before
anything is written the pack must fit: at most MAX_CHAIN snapshots, MAX_UNPACK_BYTES of files, and room
for them (at full size) on the snapshot root's filesystem with FREE_MARGIN_BYTES to spare; every
snapshot.json's machine spec must be one this forkd version writes (``specguard``).
Host compatibility (QEMU version, accelerator) is checked at restore time; unpack only warns.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from forkd import __version__
from forkd.engine import disk as disks
from forkd.engine import packimage
from forkd.engine.chain import MAX_DEPTH, ancestors
from forkd.engine.snapshot import MEMORY_NAME, META_NAME, VMSTATE_NAME, Snapshot, SnapshotMeta, SnapshotStore, seal
from forkd.engine.specguard import MAX_MEMORY_MIB
from forkd.engine.verify import remember_verified, verify_sha256
from forkd.errors import (
    ForkdError,
    PackError,
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    ValidationError,
)
from forkd.fsutil import atomic_write_json, fsync_dir
from forkd.paths import image_root, validate_tag

log = logging.getLogger(__name__)

PACK_VERSION = 1
MANIFEST_NAME = "manifest.json"
# in archive order (a delta has no memory.bin; only an image-based snapshot has a disk layer)
SNAPSHOT_FILES = (META_NAME, VMSTATE_NAME, MEMORY_NAME, disks.LAYER_NAME)
KINDS = ("root", "flat", "delta")
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_META_BYTES = 16 << 20
MAX_EXT_HEADER_BYTES = 64 << 10  # pax / GNU long-name headers
MAX_CHAIN = MAX_DEPTH + 1  # snapshots in a pack: the deepest chain ``ancestors`` follows, and its leaf
# uncompressed bytes in a pack: twice the largest snapshot this forkd makes (memory.bin, vmstate, metadata)
MAX_UNPACK_BYTES = 2 * (MAX_MEMORY_MIB << 20)
FREE_MARGIN_BYTES = 1 << 30  # left free on the snapshot root's filesystem after an unpack
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_EXT_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                     tarfile.GNUTYPE_LONGLINK)
MIN_LEVEL, MAX_LEVEL = 1, 22
SPARSE_BLOCK = 4096
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_IMAGE_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_MAX_BLOCK = 128 << 10

ByteProgress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------- pack


class _HashingReader:
    """Reads a file for tarfile in chunks of at most CHUNK bytes, hashing and counting what it reads."""

    def __init__(self, f: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.on_bytes = on_bytes

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(CHUNK if n is None or n < 0 else min(n, CHUNK))
        self.h.update(b)
        self.on_bytes(len(b))
        return b


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = int(mtime)
    ti.type = tarfile.REGTYPE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _own_files(meta: SnapshotMeta) -> tuple[str, ...]:
    """The files a snapshot directory holds besides snapshot.json: a delta has no memory.bin of its own,
    an image-based snapshot has its disk layer."""
    files = (VMSTATE_NAME,) if meta.kind == "delta" else (VMSTATE_NAME, MEMORY_NAME)
    return (*files, disks.LAYER_NAME) if meta.disk else files


@dataclass
class _PackLink:
    snap: Snapshot
    meta_bytes: bytes
    records: list[dict[str, Any]]  # snapshot.json first, then the files of _own_files, in archive order


def _pack_links(store: SnapshotStore, tag: str) -> list[_PackLink]:
    """``tag`` and everything it depends on, root first, each checked against its snapshot.json and the
    chain checked for self-containment (what unpack will require)."""
    chain = [*ancestors(store, tag), tag]
    snaps: list[Snapshot] = []
    for t in chain:
        try:
            snaps.append(store.open(t))
        except (SnapshotNotFoundError, SnapshotInvalidError) as e:
            if t == tag:
                raise
            raise PackError(f"snapshot {tag} depends on {t}, which cannot be packed ({e}); a pack must hold the "
                            f"whole chain: write a parentless copy with forkd snapshot compact {tag} --to NEW "
                            "and pack that") from e
    first = snaps[0].meta
    if first.parent is not None:
        raise PackError(f"snapshot {tag} depends on {first.parent}, which cannot be packed: it is missing or "
                        "invalid here, and a pack must hold the whole chain; write a parentless copy with "
                        f"forkd snapshot compact {tag} --to NEW and pack that")
    memory_sha: dict[str, str] = {}  # links with a memory.bin of their own
    links: list[_PackLink] = []
    for i, snap in enumerate(snaps):
        t, m = snap.tag, snap.meta
        if m.kind not in KINDS:
            raise PackError(f"snapshot {t} is of kind {m.kind!r}; this forkd packs {', '.join(KINDS)}")
        if m.disk and m.disk.get("layers") != chain[:i + 1]:
            raise PackError(f"snapshot {t}: its disk layers ({m.disk.get('layers')}) are not its chain "
                            f"({' -> '.join(chain[:i + 1])})")
        if m.kind == "delta":
            src = m.memory_source
            if src not in memory_sha:
                raise PackError(f"snapshot {t} maps the memory.bin of {src}, which is not one of its ancestors "
                                f"({' -> '.join(chain[:i])})")
            if m.depends_sha256 != memory_sha[src]:
                raise PackError(f"snapshot {t} depends on a memory.bin of {src} with sha256 "
                                f"{str(m.depends_sha256)[:16]}..., {src}'s {META_NAME} records "
                                f"{memory_sha[src][:16]}...")
        snap.check_files()  # a delta's memory source too
        meta_bytes = (snap.path / META_NAME).read_bytes()
        try:
            meta_now = SnapshotMeta.from_json(json.loads(meta_bytes))
        except (ValueError, KeyError, TypeError, SnapshotInvalidError) as e:
            raise PackError(f"snapshot {t}: {META_NAME} changed while it was being packed: {e}") from e
        if meta_now.to_json() != m.to_json():
            raise PackError(f"snapshot {t}: {META_NAME} changed while it was being packed; try again")
        records: list[dict[str, Any]] = [
            {"path": f"{t}/{META_NAME}", "size": len(meta_bytes), "sha256": hashlib.sha256(meta_bytes).hexdigest()}]
        for name in _own_files(m):
            rec = m.files[name]
            records.append({"path": f"{t}/{name}", "size": int(rec["size"]), "sha256": str(rec["sha256"])})
        if m.kind != "delta":
            memory_sha[t] = str(m.files[MEMORY_NAME]["sha256"])
        links.append(_PackLink(snap, meta_bytes, records))
    return links


def _add_file(tar: tarfile.TarFile, rec: dict[str, Any], src: Path, advance: Callable[[int], None],
              what: str) -> None:
    """Stream ``src`` into the archive as ``rec["path"]``, failing if it is not the size and sha256 that
    ``rec`` (written to the manifest already) says."""
    name = src.name
    with open(src, "rb") as sf:
        st = os.fstat(sf.fileno())
        if st.st_size != rec["size"]:
            raise PackError(f"{what}: {name} changed size while it was being packed")
        reader = _HashingReader(sf, advance)
        try:
            tar.addfile(_tarinfo(rec["path"], rec["size"], st.st_mtime), cast(IO[bytes], reader))
        except OSError as e:
            if "unexpected end of data" not in str(e):
                raise
            raise PackError(f"{what}: {name} shrank while it was being packed") from e
    if reader.h.hexdigest() != rec["sha256"]:
        raise PackError(f"{what}: {name} changed while it was being packed (its sha256 no longer matches "
                        "what was recorded)")


def pack(store: SnapshotStore, tag: str, out: Path, *, progress: ByteProgress | None = None, level: int = 3,
         force: bool = False) -> dict[str, Any]:
    """Write snapshot ``tag`` and every snapshot it depends on to ``out`` (a ``.tar.zst``); return what
    was written.

    The chain is ``tag``'s ancestors and ``tag``, root first; each link's files go under ``<link>/``
    (a delta has no memory.bin: it maps that of an earlier link). Every link's files are checked against
    its ``snapshot.json`` first (memory.bin through the verified-hash cache), so the manifest can be
    written before the files; each file is hashed again while it is streamed in, and a file that changed
    meanwhile fails the pack. Nothing is held in memory beyond 1 MiB chunks. The archive is written to
    ``<out>.partial`` and renamed; an existing ``out`` is only replaced with ``force``.
    ``progress(done, total)`` counts uncompressed file bytes. The result has ``chain`` (root first),
    ``bytes_in`` (uncompressed file bytes), ``bytes_out`` (archive size) and ``ratio`` (in / out).
    """
    if not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValidationError(f"level must be an integer in {MIN_LEVEL}..{MAX_LEVEL}; got {level!r}")
    out = Path(out)
    if out.is_dir():
        raise PackError(f"{out} is a directory; give the path of the .tar.zst file to write")
    if out.exists() and not force:
        raise PackError(f"{out} already exists; use --force to overwrite it")
    t0 = time.monotonic()
    links = _pack_links(store, tag)
    chain = [link.snap.tag for link in links]
    disk = links[-1].snap.meta.disk
    try:
        image_files = packimage.image_records(str(disk["image"]), str(disk["base_sha256"])) if disk else []
    except packimage.PackImageError as e:
        raise PackError(str(e)) from e
    records = [rec for rec, _ in image_files] + [rec for link in links for rec in link.records]
    created_at = time.time()
    manifest = {"forkd_pack_version": PACK_VERSION, "forkd_version": __version__, "created_at": created_at,
                "tag": tag, "files": records, "chain": chain, **({"image": disk["image"]} if disk else {})}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()

    total = sum(r["size"] for r in records)
    if total > MAX_UNPACK_BYTES:
        raise PackError(f"snapshot {tag} and its chain add up to {total} bytes; a pack holds at most "
                        f"{MAX_UNPACK_BYTES} ({MAX_UNPACK_BYTES >> 30} GiB), which is all unpack accepts")
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and n:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    partial = out.with_name(out.name + ".partial")
    cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
    try:
        with open(partial, "wb") as f:
            with cctx.stream_writer(f, closefd=False) as zw, \
                    tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK,  # type: ignore[call-overload]
                                 copybufsize=CHUNK) as tar:
                tar.addfile(_tarinfo(MANIFEST_NAME, len(manifest_bytes), created_at), io.BytesIO(manifest_bytes))
                for rec, src in image_files:
                    _add_file(tar, rec, src, advance, f"image {disk['image']}")
                for link in links:
                    t = link.snap.tag
                    tar.addfile(_tarinfo(link.records[0]["path"], len(link.meta_bytes), created_at),
                                io.BytesIO(link.meta_bytes))
                    advance(len(link.meta_bytes))
                    for rec, name in zip(link.records[1:], _own_files(link.snap.meta), strict=True):
                        _add_file(tar, rec, link.snap.path / name, advance, f"snapshot {t}")
            f.flush()
            os.fsync(f.fileno())
        if not force and out.exists():
            raise PackError(f"{out} appeared while the pack was being written; use --force to overwrite it")
        os.replace(partial, out)
    except BaseException as e:
        with contextlib.suppress(OSError):
            partial.unlink()
        if isinstance(e, OSError):
            raise PackError(f"cannot write {out}: {e}") from e
        raise
    fsync_dir(out.parent)
    bytes_out = out.stat().st_size
    return {"tag": tag, "path": str(out), "chain": chain, "files": records, "level": level,
            "bytes_in": total, "bytes_out": bytes_out, "ratio": round(total / bytes_out, 2) if bytes_out else 0.0,
            "seconds": round(time.monotonic() - t0, 3)}


# -------------------------------------------------------------------------------------------- unpack


def _truncated(what: str) -> PackError:
    return PackError(f"truncated or corrupt archive: {what}")


def check_zstd_frames(f: IO[bytes], size: int) -> None:
    """Walk the zstd frames of a file by their block headers: PackError unless the file is one or more
    complete frames (last block flagged, content checksum present if announced) ending exactly at EOF.
    The decompressor itself stops silently at a truncated end, so this is what detects a cut file."""
    pos = frames = 0
    while pos < size:
        f.seek(pos)
        head = f.read(18)
        if len(head) < 4:
            raise _truncated(f"{size - pos} stray bytes at offset {pos}")
        magic = int.from_bytes(head[:4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
            if len(head) < 8:
                raise _truncated(f"skippable frame cut at offset {pos}")
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        if magic != _ZSTD_MAGIC:
            raise _truncated(f"no zstd frame at offset {pos} (not a .tar.zst?)")
        try:
            hsize = zstandard.frame_header_size(head)
            has_checksum = zstandard.get_frame_parameters(head).has_checksum
        except zstandard.ZstdError as e:
            raise _truncated(f"bad zstd frame header at offset {pos}: {e}") from e
        pos += hsize
        while True:
            f.seek(pos)
            bh = f.read(3)
            if len(bh) < 3:
                raise _truncated(f"zstd frame cut at offset {pos}")
            v = int.from_bytes(bh, "little")
            last, btype, bsize = v & 1, (v >> 1) & 3, v >> 3
            if btype == 3 or bsize > _ZSTD_MAX_BLOCK:
                raise _truncated(f"bad zstd block header at offset {pos}")
            pos += 3 + (1 if btype == 1 else bsize)
            if pos > size:
                raise _truncated(f"zstd block at offset {pos} runs past the end of the file")
            if last:
                break
        pos += 4 if has_checksum else 0
        if pos > size:
            raise _truncated("zstd frame checksum missing at the end of the file")
        frames += 1
    if frames == 0:
        raise _truncated("no zstd frame (empty file)")


class _SourceReader:
    """The compressed archive, counted for the progress callback."""

    def __init__(self, f: IO[bytes], total: int, progress: ByteProgress | None) -> None:
        self.f, self.total, self.progress, self.done = f, total, progress, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(CHUNK if n is None or n < 0 else n)
        self.done += len(b)
        if self.progress is not None and b:
            self.progress(min(self.done, self.total), self.total)
        return b


class _LimitedReader:
    """The decompressed tar stream: zstd errors become PackError, and no more than ``limit`` bytes come
    out (a small archive must not expand without bound, e.g. through a huge pax header)."""

    def __init__(self, r: Any, limit: int) -> None:
        self.r, self.limit, self.pos = r, limit, 0

    def read(self, n: int = -1) -> bytes:
        try:
            b: bytes = self.r.read(CHUNK if n is None or n < 0 else n)
        except zstandard.ZstdError as e:
            raise _truncated(str(e)) from e
        self.pos += len(b)
        if self.pos > self.limit:
            raise PackError(f"corrupt archive: it expands beyond the {self.limit} bytes its manifest allows")
        return b


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses a pax or GNU long-name header larger than MAX_EXT_HEADER_BYTES before tarfile reads it
    into memory.

    Both constructors are guarded: tarfile's own reading goes through ``frombuf`` in older Pythons and
    through ``_frombuf`` in those with the 2024 header-parsing fixes (3.12.5+, 3.13, and Debian 12's
    3.11.2-6+deb12u9), which bypass an override of ``frombuf`` alone."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _GuardedTarInfo:
        return cls._guard(super().frombuf(buf, encoding, errors))

    @classmethod
    def _frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str, **kw: Any) -> _GuardedTarInfo:
        parent = super()._frombuf  # type: ignore[misc]  # only called by the Pythons that have it
        return cls._guard(parent(buf, encoding, errors, **kw))

    @staticmethod
    def _guard(obj: Any) -> Any:
        if obj.type in _EXT_HEADER_TYPES and obj.size > MAX_EXT_HEADER_BYTES:
            raise PackError(f"corrupt archive: a {obj.size}-byte extended tar header (at most {MAX_EXT_HEADER_BYTES})")
        return obj


@dataclass
class _Entry:
    path: str
    dir: str
    name: str
    size: int
    sha256: str


def _parse_manifest(data: bytes) -> tuple[str, list[str], dict[str, _Entry], str | None]:
    """(tag, chain, entries by path, image id or None) of a manifest, or PackError naming what is wrong."""
    try:
        m = json.loads(data)
    except ValueError as e:
        raise PackError(f"corrupt archive: {MANIFEST_NAME} is not JSON: {e}") from e
    if not isinstance(m, dict):
        raise PackError(f"corrupt archive: {MANIFEST_NAME} is not a JSON object")
    version = m.get("forkd_pack_version")
    if version != PACK_VERSION:
        raise PackError(f"unsupported pack version {version!r} (this forkd {__version__} reads version "
                        f"{PACK_VERSION}); unpack it with the forkd that made it"
                        + (f" ({m.get('forkd_version')})" if m.get("forkd_version") else ""))
    chain, tag, files = m.get("chain"), m.get("tag"), m.get("files")
    try:
        if not isinstance(chain, list) or not chain:
            raise PackError(f"corrupt archive: {MANIFEST_NAME} has no chain")
        if len(chain) > MAX_CHAIN:
            raise PackError(f"refused archive: its chain holds {len(chain)} snapshots; this forkd unpacks at most "
                            f"{MAX_CHAIN} (a snapshot and at most {MAX_DEPTH} ancestors)")
        for t in chain:
            validate_tag(t, "chain entry")
        validate_tag(tag, "manifest tag")
    except ValidationError as e:
        raise PackError(f"corrupt archive: {MANIFEST_NAME}: {e}") from e
    if len(set(chain)) != len(chain) or chain[-1] != tag:
        raise PackError(f"corrupt archive: {MANIFEST_NAME}: chain {chain!r} does not end with its tag {tag!r}")
    if not isinstance(files, list):
        raise PackError(f"corrupt archive: {MANIFEST_NAME} has no file list")
    image = m.get("image")
    if image is not None and (not isinstance(image, str) or not _IMAGE_ID_RE.fullmatch(image)):
        raise PackError(f"corrupt archive: {MANIFEST_NAME}: bad image id {image!r}")
    entries: dict[str, _Entry] = {}
    for rec in files:
        if not isinstance(rec, dict):
            raise PackError(f"corrupt archive: {MANIFEST_NAME}: file entry {rec!r} is not an object")
        path, size, digest = rec.get("path"), rec.get("size"), rec.get("sha256")
        parts = path.split("/") if isinstance(path, str) else []
        image_file = image is not None and len(parts) == 2 and parts[0] == packimage.IMAGE_DIR \
            and parts[1] in packimage.IMAGE_FILES
        if not isinstance(path, str) or len(parts) != 2 or not image_file and (
                parts[0] not in chain or parts[1] not in SNAPSHOT_FILES):
            raise PackError(f"corrupt archive: {MANIFEST_NAME} lists an unexpected path {path!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise PackError(f"corrupt archive: {MANIFEST_NAME}: bad size {size!r} for {path}")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise PackError(f"corrupt archive: {MANIFEST_NAME}: bad sha256 {digest!r} for {path}")
        if path in entries:
            raise PackError(f"corrupt archive: {MANIFEST_NAME} lists {path} twice")
        if parts[1] == META_NAME and size > MAX_META_BYTES:
            raise PackError(f"corrupt archive: {path} is {size} bytes (at most {MAX_META_BYTES})")
        entries[path] = _Entry(path, parts[0], parts[1], size, digest)
    for t in chain:  # memory.bin depends on the link's kind: _check_meta
        missing = [n for n in (META_NAME, VMSTATE_NAME) if f"{t}/{n}" not in entries]
        if missing:
            raise PackError(f"corrupt archive: {MANIFEST_NAME} lists no {', '.join(missing)} for {t}, "
                            "a snapshot of its chain")
    if image is not None:
        missing = [n for n in packimage.IMAGE_FILES if f"{packimage.IMAGE_DIR}/{n}" not in entries]
        if missing:
            raise PackError(f"corrupt archive: {MANIFEST_NAME} lists no {', '.join(missing)} for image {image}")
    total = sum(e.size for e in entries.values())
    if total > MAX_UNPACK_BYTES:
        raise PackError(f"refused archive: its files add up to {total} bytes; this forkd unpacks at most "
                        f"{MAX_UNPACK_BYTES} ({MAX_UNPACK_BYTES >> 30} GiB)")
    return tag, chain, entries, image


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _check_room(store: SnapshotStore, entries: dict[str, _Entry], links: list[str]) -> None:
    """PackError unless the files of ``links`` (the ones to be written; at their full size, as if they had
    no holes) fit on the snapshot root's filesystem with FREE_MARGIN_BYTES to spare."""
    need = sum(e.size for e in entries.values() if e.dir in links)
    if need == 0:  # every link is already here: nothing to write
        return
    try:
        free = free_bytes(store.root)
    except OSError as e:
        raise PackError(f"cannot tell the free space of {store.root}: {e.strerror or e}") from e
    if need + FREE_MARGIN_BYTES > free:
        raise PackError(f"not enough disk space to unpack: its files need up to {need} bytes, {store.root} has "
                        f"{free} free and {FREE_MARGIN_BYTES} must stay free; free some space or unpack elsewhere "
                        "(FORKD_SNAPSHOT_ROOT)")


def _check_member(ti: tarfile.TarInfo, entries: dict[str, _Entry], seen: set[str]) -> _Entry:
    name = ti.name
    parts = name.split("/")
    if name.startswith("/") or os.path.isabs(name):
        raise PackError(f"unsafe archive: member {name!r} has an absolute path")
    if ".." in parts or "\\" in name:
        raise PackError(f"unsafe archive: member {name!r} escapes the target directory ('..')")
    if ti.issym() or ti.islnk():
        kind = "symlink" if ti.issym() else "hardlink"
        raise PackError(f"unsafe archive: member {name!r} is a {kind} (to {ti.linkname!r})")
    if ti.ischr() or ti.isblk() or ti.isfifo():
        raise PackError(f"unsafe archive: member {name!r} is a device or FIFO")
    if ti.type not in _REGULAR or ti.sparse is not None:
        raise PackError(f"unsafe archive: member {name!r} is not a regular file (type {ti.type!r})")
    entry = entries.get(name)
    if entry is None:
        raise PackError(f"corrupt archive: member {name!r} is not in the manifest")
    if name in seen:
        raise PackError(f"corrupt archive: member {name!r} appears twice")
    if ti.size != entry.size:
        raise PackError(f"corrupt archive: {name} is {ti.size} bytes, the manifest records {entry.size}")
    return entry


def _extract(src: IO[bytes], dest: Path | None, entry: _Entry) -> None:
    """Copy one member's bytes to ``dest`` (new file), leaving all-zero 4 KiB blocks as holes; check the
    size and sha256 against the manifest. ``dest`` None: only check them (a link already here)."""
    h = hashlib.sha256()
    n = 0
    with open(dest, "xb") if dest is not None else contextlib.nullcontext() as f:
        while True:
            b = src.read(CHUNK)
            if not b:
                break
            n += len(b)
            if n > entry.size:  # tarfile bounds a member by its header; never write past the manifest either
                raise PackError(f"corrupt archive: {entry.path} runs past the {entry.size} bytes the manifest records")
            h.update(b)
            if f is None:
                continue
            if b == _ZERO_CHUNK:
                f.seek(len(b), os.SEEK_CUR)
                continue
            start = 0  # start of the pending run of non-zero blocks
            for i in range(0, len(b), SPARSE_BLOCK):
                if b[i:i + SPARSE_BLOCK] == _ZERO_BLOCK[:min(SPARSE_BLOCK, len(b) - i)]:
                    if start < i:
                        f.write(b[start:i])
                    f.seek(min(SPARSE_BLOCK, len(b) - i), os.SEEK_CUR)
                    start = i + SPARSE_BLOCK
            if start < len(b):
                f.write(b[start:])
        if f is not None:
            f.truncate(n)
            f.flush()
            os.fsync(f.fileno())
    if n != entry.size:
        raise _truncated(f"{entry.path} ends after {n} of {entry.size} bytes")
    if h.hexdigest() != entry.sha256:
        raise PackError(f"corrupt archive: {entry.path} does not match its sha256 in the manifest "
                        f"({h.hexdigest()[:16]}... != {entry.sha256[:16]}...)")


def _check_meta(staging: Path, chain: list[str], tag: str, entries: dict[str, _Entry],
                image_id: str | None) -> SnapshotMeta:
    """The link's snapshot.json, checked against the manifest and the chain: the first link has no
    parent, every other one's parent is the link before it, a delta maps the memory.bin of an earlier
    link, whose sha256 in the manifest is the one the delta records."""
    try:
        meta = SnapshotMeta.from_json(json.loads((staging / META_NAME).read_bytes()))
    except SnapshotInvalidError as e:  # a machine spec this forkd version would not write
        raise PackError(f"refused archive: {tag}/{e}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PackError(f"corrupt archive: {tag}/{META_NAME} is invalid: {e}") from e
    if meta.tag != tag:
        raise PackError(f"corrupt archive: {tag}/{META_NAME} says its tag is {meta.tag!r}")
    if meta.kind not in KINDS:
        raise PackError(f"corrupt archive: {tag}/{META_NAME}: unknown snapshot kind {meta.kind!r} (this forkd "
                        f"{__version__} knows {', '.join(KINDS)})")
    i = chain.index(tag)
    if i == 0 and meta.parent is not None:
        raise PackError(f"incomplete archive: its first snapshot, {tag}, has parent {meta.parent!r}, which the "
                        "pack does not hold (a pack must hold the whole chain)")
    if i > 0 and meta.parent != chain[i - 1]:
        raise PackError(f"corrupt archive: {tag}/{META_NAME} names {meta.parent!r} as its parent, the chain "
                        f"{' -> '.join(chain)} puts {chain[i - 1]} before it")
    own_memory = entries.get(f"{tag}/{MEMORY_NAME}")
    if meta.kind == "delta":
        src = meta.memory_source
        if src not in chain[:i]:
            raise PackError(f"corrupt archive: delta {tag} maps the memory.bin of {src!r}, which is not before it "
                            f"in the chain {' -> '.join(chain)}")
        source_memory = entries.get(f"{src}/{MEMORY_NAME}")
        if source_memory is None:
            raise PackError(f"corrupt archive: delta {tag} maps the memory.bin of {src}, which has none in the pack")
        if meta.depends_sha256 != source_memory.sha256:
            raise PackError(f"corrupt archive: delta {tag} depends on a memory.bin of {src} with sha256 "
                            f"{str(meta.depends_sha256)[:16]}..., the pack's has sha256 "
                            f"{source_memory.sha256[:16]}...")
        if own_memory is not None:
            raise PackError(f"corrupt archive: {MANIFEST_NAME} lists a {MEMORY_NAME} for {tag}, a delta (it maps "
                            f"that of {src})")
    else:
        if meta.memory_source is not None or meta.depends_sha256 is not None:
            raise PackError(f"corrupt archive: {tag}/{META_NAME}: a {meta.kind} snapshot with a memory source "
                            f"({meta.memory_source!r})")
        if own_memory is None:
            raise PackError(f"corrupt archive: {MANIFEST_NAME} lists no {MEMORY_NAME} for {tag}, a {meta.kind} "
                            "snapshot")
    if meta.disk and meta.disk.get("image") != image_id:
        raise PackError(f"corrupt archive: {tag}/{META_NAME} was made from image {meta.disk.get('image')!r}, "
                        f"but the pack carries image {image_id!r}")
    if meta.disk:
        layers, hashes = meta.disk["layers"], meta.disk.get("layer_sha256") or []
        if layers != chain[:i + 1] or len(hashes) != len(layers):
            raise PackError(f"corrupt archive: {tag}/{META_NAME}: its disk layers {layers!r} are not its chain "
                            f"{' -> '.join(chain[:i + 1])}")
        for t, digest in zip(layers, hashes, strict=True):
            entry = entries.get(f"{t}/{disks.LAYER_NAME}")
            if entry is None or entry.sha256 != digest:
                raise PackError(f"corrupt archive: {tag} needs the disk layer of {t} with sha256 {str(digest)[:16]}"
                                "..., which the pack does not hold")
        base = entries.get(f"{packimage.IMAGE_DIR}/{disks.ROOTFS_NAME}")
        if base is None or base.sha256 != meta.disk.get("base_sha256"):
            raise PackError(f"corrupt archive: {tag} needs the file system of image {meta.disk.get('image')}, "
                            "which the pack does not hold")
    elif any(e.dir == tag and e.name == disks.LAYER_NAME for e in entries.values()):
        raise PackError(f"corrupt archive: {MANIFEST_NAME} lists a disk layer for {tag}, which has no disk")
    for name in _own_files(meta):
        key = f"{tag}/{name}"
        if key not in entries:
            raise PackError(f"corrupt archive: {MANIFEST_NAME} lists no {name} for {tag}")
        rec, entry = meta.files.get(name) or {}, entries[key]
        if rec.get("size") != entry.size or rec.get("sha256") != entry.sha256:
            raise PackError(f"corrupt archive: {tag}/{META_NAME} records {name} as {rec.get('size')} bytes, "
                            f"sha256 {str(rec.get('sha256'))[:16]}..., the manifest as {entry.size} bytes, "
                            f"sha256 {entry.sha256[:16]}...")
    return meta


def compat_warnings(meta: SnapshotMeta) -> list[str]:
    """Why this host would refuse to restore the snapshot (checked for real by ``check_restorable``)."""
    from forkd.engine.accel import choose_accel
    from forkd.engine.qemu import qemu_binary

    out: list[str] = []
    try:
        version = qemu_binary().version
        if meta.qemu.get("version") != version:
            out.append(f"snapshot {meta.tag} was made with QEMU {meta.qemu.get('version')}, this host has "
                       f"QEMU {version}: it will not restore here")
    except ForkdError as e:
        out.append(f"cannot tell whether snapshot {meta.tag} restores here: {e}")
    try:
        accel = choose_accel().name
        if meta.spec.accel != accel:
            out.append(f"snapshot {meta.tag} was made with accelerator {meta.spec.accel}, this host uses {accel}: "
                       "it will not restore here")
    except ForkdError as e:
        out.append(f"cannot tell whether snapshot {meta.tag} restores here: {e}")
    return out


class PackConflictError(PackError, SnapshotExistsError):
    """A snapshot of the pack's chain already exists here with other content (and force was not given)."""


def _local_difference(store: SnapshotStore, local: str, link: str, entries: dict[str, _Entry]
                      ) -> tuple[SnapshotMeta | None, str | None]:
    """(the local snapshot's metadata, None) if snapshot ``local`` here holds the same files as the pack's
    ``link`` (same sizes and sha256 of vmstate and memory.bin per its snapshot.json, and its files still
    match them); otherwise (metadata or None, why not)."""
    path = store.path(local)
    try:
        meta = SnapshotMeta.from_json(json.loads((path / META_NAME).read_bytes()))
    except FileNotFoundError:
        return None, f"it has no {META_NAME}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SnapshotInvalidError) as e:
        return None, f"its {META_NAME} is unreadable ({e})"
    mine = {name: meta.files.get(name) or {} for name in _own_files(meta)}
    theirs = {name: entries[f"{link}/{name}"] for name in (VMSTATE_NAME, MEMORY_NAME, disks.LAYER_NAME)
              if f"{link}/{name}" in entries}
    if mine.keys() != theirs.keys():
        return meta, (f"it {'has' if MEMORY_NAME in mine else 'has no'} memory.bin of its own, the pack's "
                      f"{'has' if MEMORY_NAME in theirs else 'has none'}")
    for name, entry in theirs.items():
        rec = mine[name]
        if rec.get("size") != entry.size or rec.get("sha256") != entry.sha256:
            return meta, (f"its {name} differs (sha256 {str(rec.get('sha256'))[:16]}... here, "
                          f"{entry.sha256[:16]}... in the pack)")
    try:
        for name, entry in theirs.items():
            size = (path / name).stat().st_size
            if size != entry.size:
                return meta, f"its {name} is damaged ({size} bytes, {META_NAME} records {entry.size})"
            verify_sha256(path / name, entry.sha256, f"snapshot {local}")
    except (OSError, SnapshotInvalidError) as e:
        return meta, f"its files are damaged: {e}"
    return meta, None


def _same_place_in_chain(local: SnapshotMeta, packed: SnapshotMeta) -> str | None:
    """Why ``local`` (same files as ``packed``) is still not the same snapshot, or None."""
    for field_ in ("kind", "parent", "memory_source", "depends_sha256"):
        a, b = getattr(local, field_), getattr(packed, field_)
        if a != b:
            return f"its {field_} is {a!r} here, {b!r} in the pack"
    return None


def _publish(store: SnapshotStore, staging: Path, tag: str, replace: bool) -> Path | None:
    """Rename ``staging`` into place as snapshot ``tag``. ``replace``: an existing one is renamed away
    first, and its new path (to delete, or to put back) is returned."""
    final = store.path(tag)
    seal(staging)
    if replace and (final.exists() or final.is_symlink()):
        trash = store.root / f".deleting-{tag}-{secrets.token_hex(4)}"
        os.rename(final, trash)
        try:
            os.rename(staging, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.rename(trash, final)
            raise PackError(f"cannot register snapshot {tag}: {e}") from e
        fsync_dir(store.root)
        return trash
    try:
        os.rename(staging, final)  # fails if the target appeared and is not empty
    except OSError as e:
        raise PackConflictError(f"snapshot {tag} appeared while the pack was being unpacked: {e}") from e
    fsync_dir(store.root)
    return None


def _unpublish(store: SnapshotStore, tag: str, replaced: Path | None) -> None:
    """Undo ``_publish``: remove the snapshot it registered and put back the one it replaced."""
    final = store.path(tag)
    junk = store.root / f".deleting-{tag}-{secrets.token_hex(4)}"
    try:
        os.rename(final, junk)
        if replaced is not None:
            os.rename(replaced, final)
    except OSError as e:
        log.error("unpack: cannot roll back snapshot %s: %s", tag, e)
    shutil.rmtree(junk, ignore_errors=True)
    with contextlib.suppress(OSError):
        fsync_dir(store.root)


@dataclass
class UnpackResult:
    tags: list[str]  # the pack's chain as it now is here, root first (the pack's snapshot last)
    registered: list[str] = field(default_factory=list)  # written by this unpack (new or replaced)
    reused: list[str] = field(default_factory=list)  # already here with the same files: left as they were
    replaced: list[str] = field(default_factory=list)  # among registered: were here with other content (force)


def unpack(store: SnapshotStore, archive: Path, *, tag: str | None = None, force: bool = False,
           progress: ByteProgress | None = None, warn: Callable[[str], None] | None = None) -> list[str]:
    """Unpack a pack into ``store``; return the tags of its chain, root first (the packed snapshot last),
    whether registered now or already here. ``unpack_chain`` says which were which."""
    return unpack_chain(store, archive, tag=tag, force=force, progress=progress, warn=warn).tags


def unpack_chain(store: SnapshotStore, archive: Path, *, tag: str | None = None, force: bool = False,
                 progress: ByteProgress | None = None, warn: Callable[[str], None] | None = None) -> UnpackResult:
    """Unpack a pack (a snapshot and the chain it depends on) into ``store``.

    Each link of the chain is extracted into a staging directory of its own and checked (sizes, sha256,
    snapshot.json against the manifest and against the chain); only when every link agrees are they
    registered, root first. A link whose tag exists here with the same files is reused as it is; with
    other content the unpack is refused (PackConflictError, before anything is extracted) unless
    ``force``, which replaces it. If registering a later link fails, the links registered before it are
    removed again (replaced ones put back). ``tag`` registers the snapshot under another name (its
    snapshot.json is rewritten): only for a pack of one snapshot, since the links of a chain name each
    other by tag. A corrupt, truncated or unsafe archive raises PackError and registers nothing.
    ``warn`` receives a message for each reason this host would refuse to restore the snapshots (another
    QEMU version or accelerator), and for snapshots here that depended on a replaced one; by default they
    are logged. ``progress(done, total)`` counts compressed bytes read.
    """
    archive = Path(archive)
    if tag is not None:
        validate_tag(tag)
    try:
        f = open(archive, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as e:
        raise PackError(f"cannot read {archive}: {e.strerror or e}") from e
    stagings: dict[str, Path] = {}  # pack tag -> staging directory not (yet) registered
    try:
        size = os.fstat(f.fileno()).st_size
        check_zstd_frames(f, size)
        f.seek(0)
        source = _SourceReader(f, size, progress)
        dctx = zstandard.ZstdDecompressor()
        reader = dctx.stream_reader(cast(IO[bytes], source), read_size=CHUNK, read_across_frames=True)
        limited = _LimitedReader(reader, limit=MAX_MANIFEST_BYTES + (64 << 10))
        try:
            with tarfile.open(fileobj=cast(IO[bytes], limited), mode="r|", bufsize=CHUNK,
                              tarinfo=_GuardedTarInfo) as tar:
                first = tar.next()
                if (first is None or first.name != MANIFEST_NAME or first.type not in _REGULAR
                        or first.size > MAX_MANIFEST_BYTES):
                    raise PackError(f"not a forkd pack: {archive} does not start with a {MANIFEST_NAME}")
                mf = tar.extractfile(first)
                assert mf is not None
                pack_tag, chain, entries, image_id = _parse_manifest(mf.read(first.size))
                # everything after the manifest: the files, a header (+ pax header) each, the end blocks
                limited.limit = (limited.pos + sum(e.size for e in entries.values()) + len(entries) * (64 << 10)
                                 + (1 << 20))
                if tag is not None and len(chain) > 1:
                    raise PackError(f"--tag renames a single snapshot; this pack holds a chain of {len(chain)} "
                                    f"({' -> '.join(chain)}) whose snapshots name each other by tag (parent, "
                                    "memory source), so they keep their own tags: unpack it without --tag")
                names = {t: tag if tag is not None else t for t in chain}  # pack tag -> tag here
                # the links already here: the same snapshot (reuse), or a conflict (refused, or replaced)
                plan: dict[str, str] = {t: "new" for t in chain}
                local_metas: dict[str, SnapshotMeta] = {}
                conflicts: list[str] = []
                for t in chain:
                    if not (store.path(names[t]).exists() or store.path(names[t]).is_symlink()):
                        continue
                    local_meta, why = _local_difference(store, names[t], t, entries)
                    if why is None:
                        assert local_meta is not None
                        plan[t], local_metas[t] = "reuse", local_meta
                    else:
                        plan[t] = "replace"
                        conflicts.append(f"{names[t]} ({why})")
                if conflicts and not force:
                    raise PackConflictError(
                        f"snapshot{'s' if len(conflicts) > 1 else ''} {'; '.join(conflicts)} already "
                        f"exist{'' if len(conflicts) > 1 else 's'} here and differ from the pack's; use --force to "
                        "replace " + ("them" if len(conflicts) > 1 else "it")
                        + (" or --tag to unpack it under another name" if len(chain) == 1 else ""))
                image_plan = None
                if image_id is not None:
                    try:
                        image_plan = packimage.local_state(
                            image_id, entries[f"{packimage.IMAGE_DIR}/{disks.ROOTFS_NAME}"].sha256)
                    except packimage.PackImageError as e:
                        raise PackConflictError(str(e)) from e
                    if image_plan == "new":
                        image_root().mkdir(parents=True, exist_ok=True)
                        image_staging = image_root() / f".staging-{image_id}-{secrets.token_hex(4)}-{os.getpid()}"
                        image_staging.mkdir(mode=0o700)
                        stagings[packimage.IMAGE_DIR] = image_staging
                store.root.mkdir(parents=True, exist_ok=True)
                _check_room(store, entries, [t for t in chain if force or plan[t] != "reuse"]
                            + ([packimage.IMAGE_DIR] if image_plan == "new" else []))
                for t in chain:
                    stagings[t] = store.root / f".staging-{names[t]}-{os.getpid()}-{secrets.token_hex(4)}"
                    stagings[t].mkdir(mode=0o700)
                metas: dict[str, SnapshotMeta] = {}
                seen: set[str] = set()
                while (ti := tar.next()) is not None:
                    entry = _check_member(ti, entries, seen)
                    seen.add(ti.name)
                    src = tar.extractfile(ti)
                    assert src is not None
                    if entry.dir == packimage.IMAGE_DIR:
                        _extract(src, stagings[entry.dir] / entry.name if image_plan == "new" else None, entry)
                        continue
                    # a link kept as it is here: its files are only checked, not written
                    keep = plan[entry.dir] == "reuse" and entry.dir in metas
                    _extract(src, None if keep else stagings[entry.dir] / entry.name, entry)
                    if entry.name != META_NAME:
                        continue
                    meta = metas[entry.dir] = _check_meta(stagings[entry.dir], chain, entry.dir, entries,
                                                               image_id)
                    if plan[entry.dir] == "reuse":
                        why = _same_place_in_chain(local_metas[entry.dir], meta)
                        if why is not None and not force:
                            raise PackConflictError(
                                f"snapshot {names[entry.dir]} already exists here with the same files but is not "
                                f"the pack's ({why}); use --force to replace it")
                        if why is not None:
                            plan[entry.dir] = "replace"
                missing = sorted(set(entries) - seen)
                if missing:
                    raise _truncated(f"{', '.join(missing)} listed in the manifest but missing from the archive")
                if image_id is not None and not any(m.disk for m in metas.values()):
                    raise PackError(f"corrupt archive: {MANIFEST_NAME} carries image {image_id}, which none of "
                                    "its snapshots was made from")
                image_record: dict[str, Any] = {}
                if image_plan == "new":
                    try:
                        image_record = packimage.check_staged(stagings[packimage.IMAGE_DIR], str(image_id), entries)
                    except packimage.PackImageError as e:
                        raise PackError(str(e)) from e
                while limited.read(CHUNK):  # to the end of the stream: the zstd checksum is verified there
                    pass
        except tarfile.TarError as e:
            raise _truncated(str(e)) from e
        except EOFError as e:
            raise _truncated(f"unexpected end of data: {e}") from e
        except (UnicodeError, ValueError) as e:
            if isinstance(e, ForkdError):
                raise
            raise PackError(f"corrupt archive: {e}") from e
        if tag is not None and tag != pack_tag:
            metas[pack_tag].tag = tag
            atomic_write_json(stagings[pack_tag] / META_NAME, metas[pack_tag].to_json(), mode=0o600)
        result = UnpackResult(tags=[names[t] for t in chain])
        for t in chain:
            if plan[t] != "reuse":
                fsync_dir(stagings[t])
        if image_plan == "new":  # first: the snapshots need it; a complete image is harmless if they fail
            packimage.publish(stagings.pop(packimage.IMAGE_DIR), str(image_id), image_record)
        published: list[tuple[str, Path | None]] = []  # (tag here, the replaced copy)
        try:
            for t in chain:  # root first: a link is never there without the ones it depends on
                if plan[t] == "reuse":
                    if not store.path(names[t]).is_dir():
                        raise PackError(f"snapshot {names[t]} was removed while the pack was being unpacked")
                    result.reused.append(names[t])
                    continue
                replaced = _publish(store, stagings[t], names[t], replace=plan[t] == "replace")
                del stagings[t]
                published.append((names[t], replaced))
                result.registered.append(names[t])
                if plan[t] == "replace":
                    result.replaced.append(names[t])
        except BaseException:
            for local, replaced in reversed(published):
                _unpublish(store, local, replaced)
            raise
        for _, replaced in published:
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
        for t in chain:  # hashed while extracting: no re-hash at the first spawn
            if names[t] in result.registered:
                for name in _own_files(metas[t]):
                    with contextlib.suppress(OSError):
                        remember_verified(store.path(names[t]) / name, entries[f"{t}/{name}"].sha256)
    finally:
        f.close()
        for staging in stagings.values():
            shutil.rmtree(staging, ignore_errors=True)
    messages = _orphan_warnings(store, result) if result.replaced else []
    checked: set[tuple[str | None, str]] = set()
    for t in reversed(chain):  # the packed snapshot first: it names the problem
        key = (metas[t].qemu.get("version"), metas[t].spec.accel)
        if key not in checked:
            checked.add(key)
            messages += compat_warnings(metas[t])
    for msg in messages:
        (warn or log.warning)(msg)
    return result


def _orphan_warnings(store: SnapshotStore, result: UnpackResult) -> list[str]:
    """Snapshots here (outside the pack) made from a snapshot the unpack replaced."""
    out: list[str] = []
    users: dict[str, list[str]] = {t: [] for t in result.replaced}
    for t, snap, _err in store.list():
        if snap is None or t in result.tags:
            continue
        for dep in {snap.meta.parent, snap.meta.memory_source} & users.keys():
            users[str(dep)].append(t)
    for t, deps in users.items():
        if deps:
            out.append(f"snapshot {t} was replaced; {', '.join(sorted(set(deps)))} here were made from the old one "
                       "(a delta among them no longer restores)")
    return out
