"""Round-trip the newc writer through the system ``cpio -idm`` and check the format rules."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from forkd.guest.cpio import HEADER_SIZE, MAGIC, CpioWriter, normalize_name

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed (apt-get install cpio)")


def _make_sources(tmp: Path) -> dict[str, Path]:
    src = tmp / "src"
    src.mkdir()
    files = {
        "empty": b"",
        "one": b"x",
        "three": b"abc",
        "four": b"abcd",
        "five": b"abcde",
        "big": os.urandom(3 * (1 << 20) + 7),     # more than one read chunk, odd size
    }
    out = {}
    for name, data in files.items():
        p = src / name
        p.write_bytes(data)
        out[name] = p
    out["five"].chmod(0o600)
    out["three"].chmod(0o755)
    return out


def _build(path: Path, sources: dict[str, Path]) -> None:
    with open(path, "wb") as f, CpioWriter(f) as w:
        w.add_dir("etc", 0o755)
        w.add_dir("tmp", 0o1777)
        w.add_dir("root", 0o700)
        w.add_file("usr/bin/tool", sources["three"])                  # implicit parents usr, usr/bin
        w.add_file("data/empty", sources["empty"])
        w.add_file("data/one", sources["one"], 0o640)
        w.add_file("data/four", sources["four"])
        w.add_file("data/five", sources["five"])
        w.add_file("data/big.bin", sources["big"])
        w.add_file("data/patched", sources["five"], 0o644, prefix=b"XY")
        w.add_bytes("/etc/hostname", b"forkd\n")
        w.add_symlink("bin", "usr/bin")
        w.add_symlink("usr/bin/sh", "tool")
        w.add_symlink("data/abs", "/etc/hostname")


def _extract(archive: Path, dest: Path) -> None:
    dest.mkdir()
    with open(archive, "rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], stdin=f, cwd=dest,
                       check=True, capture_output=True)


@needs_cpio
def test_round_trip_through_system_cpio(tmp_path: Path) -> None:
    sources = _make_sources(tmp_path)
    archive = tmp_path / "a.cpio"
    _build(archive, sources)
    out = tmp_path / "out"
    _extract(archive, out)

    def mode(p: str) -> int:
        return stat.S_IMODE(os.lstat(out / p).st_mode)

    assert (out / "usr/bin/tool").read_bytes() == b"abc" and mode("usr/bin/tool") == 0o755
    assert (out / "data/empty").read_bytes() == b""
    assert (out / "data/one").read_bytes() == b"x" and mode("data/one") == 0o640
    assert (out / "data/four").read_bytes() == b"abcd"
    assert (out / "data/five").read_bytes() == b"abcde" and mode("data/five") == 0o600
    assert (out / "data/big.bin").read_bytes() == sources["big"].read_bytes()
    assert (out / "data/patched").read_bytes() == b"XYcde" and mode("data/patched") == 0o644
    assert (out / "etc/hostname").read_bytes() == b"forkd\n" and mode("etc/hostname") == 0o644
    assert mode("tmp") == 0o1777 and mode("root") == 0o700 and mode("usr") == 0o755
    assert os.readlink(out / "bin") == "usr/bin"
    assert os.readlink(out / "usr/bin/sh") == "tool"
    assert os.readlink(out / "data/abs") == "/etc/hostname"
    assert (out / "data/big.bin").stat().st_mtime == 0
    assert (out / "data/big.bin").stat().st_nlink == 1


@needs_cpio
def test_listing_is_sorted_and_parents_come_first(tmp_path: Path) -> None:
    sources = _make_sources(tmp_path)
    archive = tmp_path / "a.cpio"
    _build(archive, sources)
    with open(archive, "rb") as f:
        listing = subprocess.run(["cpio", "-t", "--quiet"], stdin=f, check=True, capture_output=True,
                                 text=True).stdout.split()
    assert listing == sorted(listing, key=lambda n: n.split("/"))
    for i, name in enumerate(listing):
        if "/" in name:
            assert name.rsplit("/", 1)[0] in listing[:i]


def test_deterministic_regardless_of_insertion_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"hello")
    b.write_bytes(b"world!")
    bufs = []
    for order in (("x/a", "y/b", "z"), ("z", "y/b", "x/a")):
        buf = io.BytesIO()
        with CpioWriter(buf) as w:
            for name in order:
                if name == "x/a":
                    w.add_file(name, a, 0o644)
                elif name == "y/b":
                    w.add_file(name, b, 0o644)
                else:
                    w.add_symlink(name, "x/a")
        bufs.append(buf.getvalue())
    assert bufs[0] == bufs[1]


def test_alignment_and_trailer() -> None:
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_bytes("abc", b"12345")         # name 4 bytes with NUL, data 5 bytes
    data = buf.getvalue()
    assert data.startswith(MAGIC)
    # first member: header(110) + "abc\0"(4) = 114 -> padded to 116; data 5 -> padded to 8
    assert data[110:114] == b"abc\0" and data[114:116] == b"\0\0"
    assert data[116:121] == b"12345" and data[121:124] == b"\0\0\0"
    trailer = data[124:]
    assert trailer.startswith(MAGIC)
    assert trailer[HEADER_SIZE:HEADER_SIZE + 11] == b"TRAILER!!!\0"
    assert len(data) % 4 == 0
    fields = [int(trailer[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    assert fields[11] == 11 and fields[6] == 0


def test_header_fields_are_zeroed() -> None:
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.add_bytes("f", b"x", 0o755)
    h = buf.getvalue()[:HEADER_SIZE]
    ino, mode, uid, gid, nlink, mtime, size = (int(h[6 + 8 * i: 14 + 8 * i], 16) for i in range(7))
    assert (ino, mode, uid, gid, nlink, mtime, size) == (1, 0o100755, 0, 0, 1, 0, 1)


def test_name_rules() -> None:
    assert normalize_name("/usr//bin/./x") == "usr/bin/x"
    for bad in ("", "/", "a/../b", ".."):
        with pytest.raises(ValueError):
            normalize_name(bad)
    w = CpioWriter(io.BytesIO())
    w.add_bytes("a", b"1")
    with pytest.raises(ValueError):
        w.add_bytes("a", b"2")
    with pytest.raises(ValueError):
        w.add_bytes("a/b", b"under a file")
    with pytest.raises(ValueError):
        w.add_bytes("TRAILER!!!", b"")
    w.add_bytes("d/x", b"")
    w.add_dir("d", 0o700)                 # implicit parent may be made explicit
    assert "d" in w and w.names() == ["a", "d", "d/x"]
