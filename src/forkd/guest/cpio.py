"""A deterministic writer for ``newc`` cpio archives (the format the Linux kernel unpacks as initramfs).

``newc`` is the SVR4 "no CRC" format (magic ``070701``): each member is a 110-byte ASCII header of
thirteen 8-digit hex fields, the NUL-terminated name, padding to a 4-byte boundary, the data, and
padding to a 4-byte boundary again. The archive ends with a member named ``TRAILER!!!``.

The writer only records members as they are added; :meth:`CpioWriter.close` writes them all, in
sorted path order, with mtime 0, uid/gid 0, distinct inode numbers and ``nlink`` 1 (2 for
directories), so the same inputs always give the same bytes and no member is a hard link. Missing
parent directories are added (mode 0755). Regular files are streamed from disk in chunks at
close time, never held in memory.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
CHUNK = 1 << 20


@dataclass(frozen=True)
class _Member:
    """One archive member; exactly one of ``src``, ``data`` or ``target`` is used, by ``kind``."""

    kind: int                   # stat.S_IFDIR, S_IFREG or S_IFLNK
    perm: int                   # permission bits (0o7777 mask)
    src: Path | None = None     # regular file streamed from disk
    data: bytes | None = None   # regular file given in memory (small generated files)
    prefix: bytes = b""         # replaces the first len(prefix) bytes of ``src``'s content
    target: str | None = None   # symlink target


def normalize_name(name: str) -> str:
    """Return ``name`` as a relative archive path (no leading ``/`` or ``./``), or raise ValueError."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"invalid archive name {name!r}: must be a non-empty path without '..'")
    return "/".join(parts)


def _align4(n: int) -> int:
    """Number of padding bytes needed after ``n`` bytes to reach a multiple of 4."""
    return (4 - n % 4) % 4


def encode_header(name: str, *, ino: int, mode: int, nlink: int, filesize: int) -> bytes:
    """Return the header, name, NUL and padding of one newc member (uid/gid/mtime/devices 0)."""
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, filesize, 0, 0, 0, 0, len(raw_name), 0)
    head = MAGIC + b"".join(b"%08X" % f for f in fields)
    assert len(head) == HEADER_SIZE
    return head + raw_name + b"\0" * _align4(HEADER_SIZE + len(raw_name))


def _sort_key(name: str) -> tuple[str, ...]:
    """Sort by path components, so a directory is followed by its whole subtree."""
    return tuple(name.split("/"))


class CpioWriter:
    """Collect members, then write a deterministic newc archive to ``fileobj`` on :meth:`close`.

    Adding the same name twice raises ValueError, except a directory added again with the same
    mode (or an implicit parent directory later added explicitly).
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._out = fileobj
        self._members: dict[str, _Member] = {}
        self._implicit: set[str] = set()
        self._closed = False
        self.bytes_written = 0

    # -- adding members ---------------------------------------------------------------------------

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory with permission bits ``mode``."""
        self._add(name, _Member(stat.S_IFDIR, mode & 0o7777))

    def add_file(self, name: str, src: Path | str, mode: int | None = None, *, prefix: bytes = b"") -> None:
        """Add the regular file ``src`` (symlinks followed) as ``name``; it is read at close time.

        ``mode`` defaults to the source's permission bits. ``prefix``, if given, replaces the first
        ``len(prefix)`` bytes of the content (the file must be at least that long).
        """
        src = Path(src)
        st = src.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{src} is not a regular file")
        if len(prefix) > st.st_size:
            raise ValueError(f"prefix longer than {src} ({st.st_size} bytes)")
        perm = stat.S_IMODE(st.st_mode) if mode is None else mode & 0o7777
        self._add(name, _Member(stat.S_IFREG, perm, src=src, prefix=prefix))

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file whose content is ``data`` (for small generated files)."""
        self._add(name, _Member(stat.S_IFREG, mode & 0o7777, data=bytes(data)))

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symbolic link ``name`` -> ``target`` (stored verbatim, mode 0777)."""
        if not target or "\0" in target:
            raise ValueError(f"invalid symlink target {target!r} for {name!r}")
        self._add(name, _Member(stat.S_IFLNK, 0o777, target=target))

    def __contains__(self, name: str) -> bool:
        return normalize_name(name) in self._members

    def names(self) -> list[str]:
        """All member names recorded so far (including implicit parents), in archive order."""
        return sorted(self._members, key=_sort_key)

    def _add(self, name: str, member: _Member) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        name = normalize_name(name)
        if name == TRAILER:
            raise ValueError(f"{TRAILER!r} is reserved")
        old = self._members.get(name)
        if old is not None and not self._may_replace(name, old, member):
            raise ValueError(f"duplicate archive member {name!r}")
        self._add_parents(name)
        self._members[name] = member
        self._implicit.discard(name)

    def _may_replace(self, name: str, old: _Member, new: _Member) -> bool:
        if old.kind != stat.S_IFDIR or new.kind != stat.S_IFDIR:
            return False
        return name in self._implicit or old.perm == new.perm

    def _add_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self._members.get(parent)
            if existing is None:
                self._members[parent] = _Member(stat.S_IFDIR, 0o755)
                self._implicit.add(parent)
            elif existing.kind != stat.S_IFDIR:
                raise ValueError(f"{parent!r} is not a directory (needed as parent of {name!r})")

    # -- writing ----------------------------------------------------------------------------------

    def close(self) -> int:
        """Write all members in sorted order and the trailer; return the archive size in bytes."""
        if self._closed:
            return self.bytes_written
        self._closed = True
        for ino, name in enumerate(self.names(), start=1):
            self._write_member(ino, name, self._members[name])
        self._write(encode_header(TRAILER, ino=0, mode=0, nlink=1, filesize=0))
        self._out.flush()
        return self.bytes_written

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.bytes_written += len(data)

    def _write_member(self, ino: int, name: str, m: _Member) -> None:
        mode = m.kind | m.perm
        if m.kind == stat.S_IFDIR:
            self._write(encode_header(name, ino=ino, mode=mode, nlink=2, filesize=0))
        elif m.kind == stat.S_IFLNK:
            assert m.target is not None
            self._write_data(name, ino, mode, m.target.encode())
        elif m.data is not None:
            self._write_data(name, ino, mode, m.data)
        else:
            assert m.src is not None
            self._write_stream(name, ino, mode, m.src, m.prefix)

    def _write_data(self, name: str, ino: int, mode: int, data: bytes) -> None:
        self._write(encode_header(name, ino=ino, mode=mode, nlink=1, filesize=len(data)))
        self._write(data + b"\0" * _align4(len(data)))

    def _write_stream(self, name: str, ino: int, mode: int, src: Path, prefix: bytes) -> None:
        with open(src, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._write(encode_header(name, ino=ino, mode=mode, nlink=1, filesize=size))
            if prefix:
                f.seek(len(prefix))
                self._write(prefix)
            remaining = size - len(prefix)
            while remaining > 0:
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:
                    raise OSError(f"{src} shrank while being archived")
                self._write(chunk)
                remaining -= len(chunk)
        self._write(b"\0" * _align4(size))

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
