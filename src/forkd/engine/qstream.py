"""Just enough of QEMU's migration stream format (savevm v3) to splice a BRANCH snapshot together.

A root snapshot's ``vmstate`` (saved with x-ignore-shared) is: header, configuration, the ``ram``
iterative sections (START with the block list, PARTs with the few pages of non-shared blocks such as
the firmware, END), the device sections (FULL), EOF, and a JSON description (vmdesc). A branch's
``vmstate`` is the root's header and RAM sections, optionally one more RAM PART carrying the branched
VM's own pages of guest RAM (a *delta*), and the device sections that ``xen-save-devices-state`` wrote
for the branched VM. Formats: migration/savevm.c and migration/ram.c (same in QEMU 7.2 and 10).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC, VERSION = 0x5145564D, 3
EOF_, START, PART, END, FULL, SUB, VMDESC, CONFIG, COMMAND, FOOTER = 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7E
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONT, F_MFD_FLUSH = 0x02, 0x04, 0x08, 0x10, 0x20, 0x200
PAGE = 4096
RAM_BLOCK = "mem"  # the id of the guest RAM block (memory-backend id=mem)


class StreamError(ValueError):
    """The bytes are not a migration stream this module understands."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.p = 0

    def need(self, n: int) -> None:
        if self.p + n > len(self.d):
            raise StreamError(f"stream truncated at offset {self.p}")

    def u8(self) -> int:
        self.need(1)
        v = self.d[self.p]
        self.p += 1
        return v

    def be16(self) -> int:
        self.need(2)
        v: int = struct.unpack_from(">H", self.d, self.p)[0]
        self.p += 2
        return v

    def be32(self) -> int:
        self.need(4)
        v: int = struct.unpack_from(">I", self.d, self.p)[0]
        self.p += 4
        return v

    def be64(self) -> int:
        self.need(8)
        v: int = struct.unpack_from(">Q", self.d, self.p)[0]
        self.p += 8
        return v

    def skip(self, n: int) -> None:
        self.need(n)
        self.p += n

    def s8(self) -> str:
        n = self.u8()
        self.need(n)
        v = self.d[self.p:self.p + n].decode()
        self.p += n
        return v


@dataclass
class RootStream:
    """The parts of a vmstate a branch reuses, with any guest-RAM pages it carries set aside."""

    ram_prefix: bytes  # header + configuration + RAM sections before END, without guest-RAM pages
    ram_end: bytes  # the RAM END section (with its footer)
    ram_section_id: int
    devices: bytes  # device sections + EOF
    vmdesc: bytes  # the trailing JSON description (may be empty)
    block_pages: dict[str, int]  # pages carried per RAM block
    ram_pages: list[tuple[int, int, int]]  # guest RAM records: (offset, F_ZERO or F_PAGE, payload position)


def parse(data: bytes) -> RootStream:
    """Split a vmstate saved with x-ignore-shared (a root's, a flat branch's or a delta branch's)."""
    r = _Reader(data)
    if r.be32() != MAGIC or r.be32() != VERSION:
        raise StreamError("not a QEMU migration stream (bad magic or version)")
    caps: list[str] = []
    if data[r.p] == CONFIG:
        r.u8()
        r.skip(r.be32())  # machine type
        while data[r.p] == SUB:
            r.u8()
            name = r.s8()
            r.be32()
            if name == "configuration/capabilities":
                caps = [r.s8() for _ in range(r.be32())]
            elif name == "configuration/target-page-bits":
                r.be32()
            elif name == "configuration/uuid":
                r.skip(16)
            else:
                raise StreamError(f"unknown configuration subsection {name!r}")
    if "x-ignore-shared" not in caps:
        raise StreamError("the stream was not saved with x-ignore-shared")
    sid = None
    pages: dict[str, int] = {}
    ram: list[tuple[int, int, int]] = []
    prefix: list[bytes] = [bytes(data[:r.p])]
    end = b""
    last_block = ""
    while True:
        start = r.p
        t = r.u8()
        if t in (START, FULL):
            section = r.be32()
            idstr = r.s8()
            r.be32()
            r.be32()
            if t == FULL:
                r.p = start
                break
            if idstr != "ram":
                raise StreamError(f"unexpected iterative section {idstr!r}")
            sid = section
        elif t in (PART, END):
            if r.be32() != sid:
                raise StreamError("RAM section id mismatch")
        elif t == COMMAND:
            r.be16()
            r.skip(r.be16())
            prefix.append(bytes(data[start:r.p]))
            continue
        elif t == EOF_:
            r.p = start
            break
        else:
            raise StreamError(f"unexpected section type {t:#x} at offset {start}")
        before = len(ram)
        last_block = _ram_body(r, pages, last_block, ram)
        if r.p < len(data) and data[r.p] == FOOTER:
            r.u8()
            r.be32()
        if t == END:
            end = bytes(data[start:r.p])
        elif len(ram) == before:  # a section with guest RAM pages (a delta) is left out of the prefix
            prefix.append(bytes(data[start:r.p]))
    if sid is None or not end:
        raise StreamError("no RAM END section")
    vmdesc = _vmdesc(data)
    return RootStream(ram_prefix=b"".join(prefix), ram_end=end, ram_section_id=sid,
                      devices=bytes(data[r.p:len(data) - len(vmdesc)]), vmdesc=vmdesc, block_pages=pages,
                      ram_pages=ram)


def parse_root(data: bytes) -> RootStream:
    """Like ``parse``, for a vmstate that must carry no guest RAM (a root or a flat branch)."""
    root = parse(data)
    if root.ram_pages:
        raise StreamError(f"the stream carries {len(root.ram_pages)} pages of guest RAM: not a root/flat snapshot")
    return root


def _ram_body(r: _Reader, pages: dict[str, int], last: str, ram: list[tuple[int, int, int]]) -> str:
    while True:
        hdr = r.be64()
        flags, addr = hdr & 0xFFF, hdr & ~0xFFF
        if flags & F_MEM_SIZE:
            total = addr
            while total > 0:
                r.s8()
                length = r.be64()
                r.be64()  # GPA (x-ignore-shared)
                total -= length
            continue
        if flags & F_EOS:
            return last
        if flags & F_MFD_FLUSH and not flags & (F_ZERO | F_PAGE):
            continue
        if flags & (F_ZERO | F_PAGE):
            if not flags & F_CONT:
                last = r.s8()
            if last == RAM_BLOCK:
                ram.append((addr, flags & (F_ZERO | F_PAGE), r.p))
            r.skip(1 if flags & F_ZERO else PAGE)
            pages[last] = pages.get(last, 0) + 1
            continue
        raise StreamError(f"unsupported RAM record flags {flags:#x}")


def _vmdesc(data: bytes) -> bytes:
    """The trailing ``0x06 be32 len json`` description, found from the end (b"" if absent)."""
    p = len(data)
    while (p := data.rfind(b"\x06", 0, p)) > 0:
        if p + 5 <= len(data) and struct.unpack_from(">I", data, p + 1)[0] == len(data) - p - 5 \
                and data[p - 1] == EOF_ and data[p + 5:p + 6] == b"{":
            return bytes(data[p:])
        if len(data) - p > (1 << 22):
            break
    return b""


def device_part(xen_state: bytes) -> bytes:
    """The device sections + EOF written by QMP ``xen-save-devices-state`` (its header removed)."""
    if len(xen_state) < 9 or struct.unpack_from(">II", xen_state, 0) != (MAGIC, VERSION) or xen_state[-1] != EOF_:
        raise StreamError("xen-save-devices-state output is not a complete device stream")
    return bytes(xen_state[8:])


def ram_part(section_id: int, runs: list[tuple[int, memoryview]]) -> bytes:
    """One RAM PART section with guest RAM pages: ``runs`` are (first page number, bytes of the run).
    All-zero pages become one-byte ZERO records."""
    out = [bytes([PART]), struct.pack(">I", section_id)]
    name = RAM_BLOCK.encode()
    first = True
    zero = bytes(PAGE)
    for page0, buf in runs:
        for i in range(len(buf) // PAGE):
            chunk = buf[i * PAGE:(i + 1) * PAGE]
            is_zero = chunk == zero
            hdr = ((page0 + i) * PAGE) | (F_ZERO if is_zero else F_PAGE)
            if first:
                out.append(struct.pack(">Q", hdr) + bytes([len(name)]) + name)
                first = False
            else:
                out.append(struct.pack(">Q", hdr | F_CONT))
            out.append(b"\x00" if is_zero else bytes(chunk))
    out.append(struct.pack(">Q", F_EOS) + bytes([FOOTER]) + struct.pack(">I", section_id))
    return b"".join(out)


def splice(root: RootStream, devices: bytes, delta: bytes = b"") -> bytes:
    """A vmstate: the root's RAM sections [+ a delta PART] + END + the branched VM's devices + vmdesc."""
    return root.ram_prefix + delta + root.ram_end + devices + root.vmdesc
