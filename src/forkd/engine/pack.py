"""Portable snapshots: a snapshot directory packed into one ``.tar.zst`` file, and unpacked elsewhere.

A pack is a tar stream compressed with zstd (one frame with a content checksum). Its first member is
``manifest.json``::

    {"forkd_pack_version": 1, "forkd_version": "...", "created_at": 1700000000.0, "tag": "py",
     "files": [{"path": "py/snapshot.json", "size": ..., "sha256": "..."}, ...], "chain": ["py"]}

followed by the snapshot's files under ``<tag>/`` (``snapshot.json``, ``vmstate``, ``memory.bin``; never
dotfiles). ``chain`` lists the snapshot directories the pack holds, root first (one for now). Memory
images are tarred as regular files: zstd makes their zero runs cheap, and unpack writes them back
sparse.

Unpacking never trusts the archive: members are read one by one from the stream into a staging
directory, each must be a regular file listed in the manifest, each file's size and sha256 are checked
while it is written, and the snapshot is registered (renamed into place) only once everything agrees.
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from forkd import __version__
from forkd.engine.snapshot import MEMORY_NAME, META_NAME, VMSTATE_NAME, SnapshotMeta, SnapshotStore
from forkd.engine.verify import remember_verified
from forkd.errors import ForkdError, PackError, SnapshotExistsError, ValidationError
from forkd.fsutil import atomic_write_json, fsync_dir
from forkd.paths import validate_tag

log = logging.getLogger(__name__)

PACK_VERSION = 1
MANIFEST_NAME = "manifest.json"
SNAPSHOT_FILES = (META_NAME, VMSTATE_NAME, MEMORY_NAME)  # in archive order
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_META_BYTES = 16 << 20
MAX_EXT_HEADER_BYTES = 64 << 10  # pax / GNU long-name headers
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_EXT_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                     tarfile.GNUTYPE_LONGLINK)
MIN_LEVEL, MAX_LEVEL = 1, 22
SPARSE_BLOCK = 4096
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_BLOCK = bytes(SPARSE_BLOCK)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
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


def pack(store: SnapshotStore, tag: str, out: Path, *, progress: ByteProgress | None = None, level: int = 3,
         force: bool = False) -> dict[str, Any]:
    """Write snapshot ``tag`` to ``out`` (a ``.tar.zst``); return what was written.

    The snapshot's files are checked against ``snapshot.json`` first (memory.bin through the verified-hash
    cache), so the manifest can be written before the files; each file is hashed again while it is
    streamed in, and a file that changed meanwhile fails the pack. Nothing is held in memory beyond
    1 MiB chunks. The archive is written to ``<out>.partial`` and renamed; an existing ``out`` is only
    replaced with ``force``. ``progress(done, total)`` counts uncompressed file bytes. The result has
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
    snap = store.open(tag)
    source = getattr(snap.meta, "memory_source", None)
    if source or any(n not in snap.meta.files for n in (VMSTATE_NAME, MEMORY_NAME)):
        raise PackError(f"snapshot {tag} has no memory.bin of its own"
                        + (f" (it maps that of {source})" if source else "")
                        + ": this forkd packs only snapshots that hold all their files")
    snap.check_files()
    meta_bytes = (snap.path / META_NAME).read_bytes()
    try:
        meta_now = SnapshotMeta.from_json(json.loads(meta_bytes))
    except (ValueError, KeyError, TypeError) as e:
        raise PackError(f"snapshot {tag}: {META_NAME} changed while it was being packed: {e}") from e
    if meta_now.files != snap.meta.files or meta_now.tag != tag:
        raise PackError(f"snapshot {tag}: {META_NAME} changed while it was being packed; try again")

    records: list[dict[str, Any]] = [
        {"path": f"{tag}/{META_NAME}", "size": len(meta_bytes), "sha256": hashlib.sha256(meta_bytes).hexdigest()}]
    for name in (VMSTATE_NAME, MEMORY_NAME):
        rec = snap.meta.files[name]
        records.append({"path": f"{tag}/{name}", "size": int(rec["size"]), "sha256": str(rec["sha256"])})
    created_at = time.time()
    manifest = {"forkd_pack_version": PACK_VERSION, "forkd_version": __version__, "created_at": created_at,
                "tag": tag, "files": records, "chain": [tag]}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()

    total = sum(r["size"] for r in records)
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
                tar.addfile(_tarinfo(records[0]["path"], len(meta_bytes), created_at), io.BytesIO(meta_bytes))
                advance(len(meta_bytes))
                for rec, name in zip(records[1:], (VMSTATE_NAME, MEMORY_NAME), strict=True):
                    src = snap.path / name
                    with open(src, "rb") as sf:
                        st = os.fstat(sf.fileno())
                        if st.st_size != rec["size"]:
                            raise PackError(f"snapshot {tag}: {name} changed size while it was being packed")
                        reader = _HashingReader(sf, advance)
                        try:
                            tar.addfile(_tarinfo(rec["path"], rec["size"], st.st_mtime), cast(IO[bytes], reader))
                        except OSError as e:
                            if "unexpected end of data" not in str(e):
                                raise
                            raise PackError(f"snapshot {tag}: {name} shrank while it was being packed") from e
                    if reader.h.hexdigest() != rec["sha256"]:
                        raise PackError(f"snapshot {tag}: {name} changed while it was being packed "
                                        "(its sha256 no longer matches snapshot.json)")
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
    return {"tag": tag, "path": str(out), "chain": [tag], "files": records, "level": level,
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
    into memory."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _GuardedTarInfo:
        obj = super().frombuf(buf, encoding, errors)
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


def _parse_manifest(data: bytes) -> tuple[str, list[str], dict[str, _Entry]]:
    """(tag, chain, entries by path) of a manifest, or PackError naming what is wrong."""
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
        for t in chain:
            validate_tag(t, "chain entry")
        validate_tag(tag, "manifest tag")
    except ValidationError as e:
        raise PackError(f"corrupt archive: {MANIFEST_NAME}: {e}") from e
    if len(set(chain)) != len(chain) or chain[-1] != tag:
        raise PackError(f"corrupt archive: {MANIFEST_NAME}: chain {chain!r} does not end with its tag {tag!r}")
    if len(chain) != 1:
        raise PackError(f"this pack holds a chain of {len(chain)} snapshots ({' -> '.join(chain)}); "
                        f"this forkd {__version__} unpacks single snapshots only")
    if not isinstance(files, list):
        raise PackError(f"corrupt archive: {MANIFEST_NAME} has no file list")
    entries: dict[str, _Entry] = {}
    for rec in files:
        if not isinstance(rec, dict):
            raise PackError(f"corrupt archive: {MANIFEST_NAME}: file entry {rec!r} is not an object")
        path, size, digest = rec.get("path"), rec.get("size"), rec.get("sha256")
        parts = path.split("/") if isinstance(path, str) else []
        if not isinstance(path, str) or len(parts) != 2 or parts[0] not in chain or parts[1] not in SNAPSHOT_FILES:
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
    for t in chain:
        missing = [n for n in SNAPSHOT_FILES if f"{t}/{n}" not in entries]
        if missing:
            raise PackError(f"corrupt archive: {MANIFEST_NAME} lists no {', '.join(missing)} for snapshot {t}")
    return tag, chain, entries


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


def _extract(src: IO[bytes], dest: Path, entry: _Entry) -> None:
    """Copy one member's bytes to ``dest`` (new file), leaving all-zero 4 KiB blocks as holes; check the
    size and sha256 against the manifest."""
    h = hashlib.sha256()
    n = 0
    with open(dest, "xb") as f:
        while True:
            b = src.read(CHUNK)
            if not b:
                break
            h.update(b)
            n += len(b)
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
        f.truncate(n)
        f.flush()
        os.fsync(f.fileno())
    if n != entry.size:
        raise _truncated(f"{entry.path} ends after {n} of {entry.size} bytes")
    if h.hexdigest() != entry.sha256:
        raise PackError(f"corrupt archive: {entry.path} does not match its sha256 in the manifest "
                        f"({h.hexdigest()[:16]}... != {entry.sha256[:16]}...)")


def _check_meta(staging: Path, tag: str, entries: dict[str, _Entry]) -> SnapshotMeta:
    try:
        meta = SnapshotMeta.from_json(json.loads((staging / META_NAME).read_bytes()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PackError(f"corrupt archive: {tag}/{META_NAME} is invalid: {e}") from e
    if meta.tag != tag:
        raise PackError(f"corrupt archive: {tag}/{META_NAME} says its tag is {meta.tag!r}")
    for name in (VMSTATE_NAME, MEMORY_NAME):
        rec, entry = meta.files.get(name) or {}, entries[f"{tag}/{name}"]
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


def _publish(store: SnapshotStore, staging: Path, tag: str, force: bool) -> None:
    final = store.path(tag)
    if final.exists():
        if not force:
            raise SnapshotExistsError(f"snapshot {tag} already exists; use --force to replace it or --tag to "
                                      "unpack it under another name")
        trash = store.root / f".deleting-{tag}-{secrets.token_hex(4)}"
        os.rename(final, trash)
        try:
            os.rename(staging, final)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(trash, final)
            raise
        fsync_dir(store.root)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(staging, final)  # fails if the target appeared and is not empty
    except OSError as e:
        raise SnapshotExistsError(f"snapshot {tag} appeared while it was being unpacked: {e}") from e
    fsync_dir(store.root)


def unpack(store: SnapshotStore, archive: Path, *, tag: str | None = None, force: bool = False,
           progress: ByteProgress | None = None, warn: Callable[[str], None] | None = None) -> list[str]:
    """Unpack a pack into ``store``; return the tags registered (root first).

    ``tag`` registers the snapshot under another name (its snapshot.json is rewritten); an existing
    snapshot of that name is replaced only with ``force``. A corrupt, truncated or unsafe archive
    raises PackError and registers nothing. ``warn`` receives a message for each reason this host would
    refuse to restore the snapshot (another QEMU version or accelerator); by default they are logged.
    ``progress(done, total)`` counts compressed bytes read.
    """
    archive = Path(archive)
    if tag is not None:
        validate_tag(tag)
    try:
        f = open(archive, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as e:
        raise PackError(f"cannot read {archive}: {e.strerror or e}") from e
    staging: Path | None = None
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
                pack_tag, _chain, entries = _parse_manifest(mf.read(first.size))
                # everything after the manifest: the files, a header (+ pax header) each, the end blocks
                limited.limit = (limited.pos + sum(e.size for e in entries.values()) + len(entries) * (64 << 10)
                                 + (1 << 20))
                target = tag or pack_tag
                validate_tag(target)
                if store.exists(target) and not force:
                    raise SnapshotExistsError(f"snapshot {target} already exists; use --force to replace it or "
                                              "--tag to unpack it under another name")
                store.root.mkdir(parents=True, exist_ok=True)
                staging = store.root / f".staging-{target}-{os.getpid()}-{secrets.token_hex(4)}"
                staging.mkdir(mode=0o755)
                seen: set[str] = set()
                while (ti := tar.next()) is not None:
                    entry = _check_member(ti, entries, seen)
                    seen.add(ti.name)
                    src = tar.extractfile(ti)
                    assert src is not None
                    _extract(src, staging / entry.name, entry)
                missing = sorted(set(entries) - seen)
                if missing:
                    raise _truncated(f"{', '.join(missing)} listed in the manifest but missing from the archive")
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
        meta = _check_meta(staging, pack_tag, entries)
        if target != pack_tag:
            meta.tag = target
            atomic_write_json(staging / META_NAME, meta.to_json())
        fsync_dir(staging)
        _publish(store, staging, target, force)
        staging = None
        final = store.path(target)
        for name in (VMSTATE_NAME, MEMORY_NAME):  # hashed while extracting: no re-hash at the first spawn
            with contextlib.suppress(OSError):
                remember_verified(final / name, entries[f"{pack_tag}/{name}"].sha256)
    finally:
        f.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    for msg in compat_warnings(meta):
        (warn or log.warning)(msg)
    return [target]
