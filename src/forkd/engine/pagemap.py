"""Finding and reading the pages a child VM has written: its own copy-on-write copies of guest RAM.

A child maps ``memory.bin`` MAP_PRIVATE. A page the guest (or QEMU's device emulation) has written is
an anonymous CoW copy: in ``/proc/PID/pagemap`` it is present without the file-page bit, or swapped.
Every other page is still the file's page. ``PAGEMAP_SCAN`` (Linux >= 6.7) returns those pages as
ranges in one ioctl; older kernels read the pagemap entries (8 bytes per page).
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import functools
import mmap
import os
import struct
from pathlib import Path
from typing import Any

PAGE = 4096
PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED = 1 << 2, 1 << 3, 1 << 4
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg), sizeof == 96
Runs = list[tuple[int, int]]  # [first page, end page)


def ram_mapping(pid: int, memory_path: Path, size: int) -> int:
    """Virtual address of the ``size``-byte mapping of ``memory_path`` in process ``pid``."""
    want = os.path.realpath(memory_path)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.realpath(parts[5].strip()) == want:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if hi - lo == size:
                    return lo
    raise LookupError(f"process {pid} has no {size}-byte mapping of {memory_path}")


def _merge(runs: Runs) -> Runs:
    out: Runs = []
    for s, e in runs:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def scan_ioctl(pid: int, vaddr: int, npages: int, max_regions: int = 1 << 14) -> Runs:
    """Dirty runs via PAGEMAP_SCAN; OSError(ENOTTY/EINVAL) on kernels without it."""
    regs = (ctypes.c_uint64 * (3 * max_regions))()
    runs: Runs = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        start, end = vaddr, vaddr + npages * PAGE
        while start < end:
            arg = bytearray(struct.pack(
                "<QQQQQQQQQQQQ", 96, 0, start, end, 0, ctypes.addressof(regs), max_regions, 0,
                PAGE_IS_FILE, PAGE_IS_FILE, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, PAGE_IS_FILE | PAGE_IS_PRESENT))
            n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)
            walk_end = struct.unpack_from("<Q", arg, 32)[0]
            runs += [((regs[3 * i] - vaddr) // PAGE, (regs[3 * i + 1] - vaddr) // PAGE) for i in range(n)]
            if n < max_regions or walk_end <= start:
                break
            start = walk_end
    finally:
        os.close(fd)
    return _merge(runs)


def scan_entries(pid: int, vaddr: int, npages: int) -> Runs:
    """Dirty runs by reading the pagemap entries (any kernel)."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, npages * 8, (vaddr // PAGE) * 8)
    finally:
        os.close(fd)
    entries = array.array("Q", raw)
    present, swapped, file_page = 1 << 63, 1 << 62, 1 << 61
    runs: Runs = []
    start = -1
    for i, e in enumerate(entries):
        dirty = (e & present and not e & file_page) or e & swapped
        if dirty and start < 0:
            start = i
        elif not dirty and start >= 0:
            runs.append((start, i))
            start = -1
    if start >= 0:
        runs.append((start, len(entries)))
    return runs


def dirty_runs(pid: int, vaddr: int, npages: int) -> Runs:
    try:
        return scan_ioctl(pid, vaddr, npages)
    except OSError:
        return scan_entries(pid, vaddr, npages)


def prefaulted(nbytes: int) -> mmap.mmap:
    """An anonymous buffer whose pages are already faulted in, so copying into it during the pause
    pays no first-touch faults."""
    size = max(PAGE, -(-nbytes // PAGE) * PAGE)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


IOV_MAX = 1024


@functools.cache
def _process_vm_readv() -> Any:
    fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                   ctypes.c_ulong]
    return fn


def read_runs(pid: int, vaddr: int, runs: Runs, buf: mmap.mmap) -> list[tuple[int, memoryview]]:
    """Copy the pages of ``runs`` out of the process into ``buf``; returns (first page, view) per run.

    ``process_vm_readv`` with up to IOV_MAX runs a call: a third faster than reading /proc/PID/mem,
    which copies page by page (measured: 100 MiB in 30 ms against 45 ms)."""
    view = memoryview(buf)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    out = []
    local: list[tuple[int, int]] = []
    remote: list[tuple[int, int]] = []
    pos = 0
    for s, e in runs:
        n = (e - s) * PAGE
        out.append((s, view[pos:pos + n]))
        local.append((base + pos, n))
        remote.append((vaddr + s * PAGE, n))
        pos += n
    readv = _process_vm_readv()
    for i in range(0, len(local), IOV_MAX):
        lv = (_IOVec * len(local[i:i + IOV_MAX]))(*(_IOVec(a, n) for a, n in local[i:i + IOV_MAX]))
        rv = (_IOVec * len(lv))(*(_IOVec(a, n) for a, n in remote[i:i + IOV_MAX]))
        want = sum(n for _a, n in local[i:i + IOV_MAX])
        got = readv(pid, lv, len(lv), rv, len(rv), 0)
        if got != want:
            err = ctypes.get_errno()
            why = os.strerror(err) if got < 0 else "the process's memory map changed"
            raise OSError(err, f"short read of guest RAM: {got} of {want} bytes ({why})")
    return out
