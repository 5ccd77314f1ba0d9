"""Portable snapshots (``forkd pack`` / ``forkd unpack``) on a fake snapshot: no VM."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner

from forkd.engine import pack as packmod
from forkd.engine.pack import MANIFEST_NAME, pack, unpack, unpack_chain
from forkd.engine.qemu import MachineSpec
from forkd.engine.snapshot import MEMORY_NAME, META_NAME, VMSTATE_NAME, SnapshotMeta, SnapshotStore
from forkd.errors import PackError, SnapshotExistsError, SnapshotInvalidError, ValidationError
from forkd.fsutil import allocated_bytes

TAG = "packme"
MEM_SIZE = 8 << 20


def _staged(store: SnapshotStore, tag: str, mem_size: int = MEM_SIZE) -> Path:
    """A staged snapshot with a sparse memory.bin: a few random 4 KiB pages in a file of holes."""
    staging = store.stage(tag)
    rnd = random.Random(tag)
    with open(staging / MEMORY_NAME, "wb") as f:
        f.truncate(mem_size)
        for off in (0, 4096 * 3, mem_size // 2 + 12345, mem_size - 4096):
            f.seek(off)
            f.write(rnd.randbytes(4096))
    (staging / VMSTATE_NAME).write_bytes(b"QEVM" + rnd.randbytes(60_000))
    return staging


def _meta(tag: str) -> SnapshotMeta:
    return SnapshotMeta(tag=tag, created_at=time.time(), spec=MachineSpec(), qemu={"version": "7.2.22"},
                        accel_reason="", host_cpu="", image={}, guest={}, files={})


def _make(root: Path, tag: str = TAG, mem_size: int = MEM_SIZE) -> SnapshotStore:
    store = SnapshotStore(root)
    store.publish(_staged(store, tag, mem_size), _meta(tag))
    return store


@pytest.fixture
def packed(tmp_path: Path) -> tuple[SnapshotStore, Path]:
    store = _make(tmp_path / "src")
    out = tmp_path / f"{TAG}.tar.zst"
    pack(store, TAG, out)
    return store, out


def _nothing_registered(root: Path) -> None:
    assert not root.exists() or list(root.iterdir()) == [], list(root.iterdir())


def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Every member of a pack and its bytes (for crafting variants)."""
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(archive.read_bytes()), read_across_frames=True)
    out = []
    with tarfile.open(fileobj=data, mode="r|") as tar:
        for ti in tar:
            f = tar.extractfile(ti)
            out.append((ti, f.read() if f else b""))
    return out


def _craft(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(write_checksum=True).stream_writer(buf, closefd=False) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    path.write_bytes(buf.getvalue())
    return path


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _with_manifest(members: list[tuple[tarfile.TarInfo, bytes]], edit: object) -> list[tuple[tarfile.TarInfo, bytes]]:
    manifest = json.loads(members[0][1])
    edit(manifest)  # type: ignore[operator]
    return [_reg(MANIFEST_NAME, json.dumps(manifest).encode()), *members[1:]]


def test_round_trip(packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    src, archive = packed
    members = _members(archive)
    assert [ti.name for ti, _ in members] == [MANIFEST_NAME, f"{TAG}/{META_NAME}", f"{TAG}/{VMSTATE_NAME}",
                                              f"{TAG}/{MEMORY_NAME}"]  # no .verified.json
    manifest = json.loads(members[0][1])
    assert manifest["forkd_pack_version"] == 1 and manifest["tag"] == TAG and manifest["chain"] == [TAG]
    assert [f["path"] for f in manifest["files"]] == [ti.name for ti, _ in members[1:]]
    assert all(ti.isreg() for ti, _ in members)

    dst = SnapshotStore(tmp_path / "dst")
    assert unpack(dst, archive) == [TAG]
    for name in (META_NAME, VMSTATE_NAME, MEMORY_NAME):
        assert (dst.path(TAG) / name).read_bytes() == (src.path(TAG) / name).read_bytes(), name
    snap = dst.open(TAG)
    snap.check_files()
    assert [p.name for p in dst.root.iterdir()] == [TAG]  # no staging left
    if allocated_bytes(src.path(TAG) / MEMORY_NAME) < MEM_SIZE:  # the filesystem keeps holes
        assert allocated_bytes(snap.memory) < MEM_SIZE // 2


def test_pack_result_and_overwrite(tmp_path: Path) -> None:
    store = _make(tmp_path / "src")
    out = tmp_path / "a.tar.zst"
    seen: list[tuple[int, int]] = []
    res = pack(store, TAG, out, progress=lambda d, t: seen.append((d, t)))
    total = sum(f["size"] for f in res["files"])
    assert res["bytes_in"] == total and res["bytes_out"] == out.stat().st_size
    assert res["bytes_out"] < MEM_SIZE // 10 and res["ratio"] > 10
    assert seen[-1] == (total, total)
    assert not (tmp_path / "a.tar.zst.partial").exists()
    with pytest.raises(PackError, match="already exists"):
        pack(store, TAG, out)
    pack(store, TAG, out, force=True, level=19)
    with pytest.raises(ValidationError, match="level"):
        pack(store, TAG, tmp_path / "b.tar.zst", level=0)


def test_pack_refuses_a_corrupt_snapshot(tmp_path: Path) -> None:
    store = _make(tmp_path / "src")
    with pytest.raises(Exception, match="not found"):
        pack(store, "nope", tmp_path / "x.tar.zst")
    with open(store.path(TAG) / VMSTATE_NAME, "r+b") as f:
        f.write(b"X")
    with pytest.raises(Exception, match="vmstate is corrupt"):
        pack(store, TAG, tmp_path / "x.tar.zst")
    assert list(tmp_path.glob("x.tar.zst*")) == []
    # a root snapshot whose snapshot.json records no memory.bin
    meta = json.loads((store.path(TAG) / META_NAME).read_text())
    del meta["files"][MEMORY_NAME]
    (store.path(TAG) / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(SnapshotInvalidError, match="records no memory.bin"):
        pack(store, TAG, tmp_path / "x.tar.zst")
    assert list(tmp_path.glob("x.tar.zst*")) == []


@pytest.mark.parametrize("where", [4, 40, 300, 0.25, 0.5, 0.75, -40, -10, -2])
def test_flipped_byte_is_refused(packed: tuple[SnapshotStore, Path], tmp_path: Path, where: float) -> None:
    _, archive = packed
    data = bytearray(archive.read_bytes())
    pos = int(where * len(data)) if isinstance(where, float) else where % len(data)
    data[pos] ^= 0xFF
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(bytes(data))
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError):
        unpack(dst, bad)
    _nothing_registered(dst.root)


@pytest.mark.parametrize("cut", [0.5, -10, -1])
def test_truncated_archive_is_refused(packed: tuple[SnapshotStore, Path], tmp_path: Path, cut: float) -> None:
    _, archive = packed
    data = archive.read_bytes()
    bad = tmp_path / "cut.tar.zst"
    bad.write_bytes(data[:int(len(data) * cut)] if isinstance(cut, float) else data[:cut])
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError, match="truncated or corrupt archive"):
        unpack(dst, bad)
    _nothing_registered(dst.root)


def test_not_a_pack(tmp_path: Path) -> None:
    dst = SnapshotStore(tmp_path / "dst")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_bytes(b"hello world\n" * 100)
    for name in ("empty", "text"):
        with pytest.raises(PackError):
            unpack(dst, tmp_path / name)
    with pytest.raises(PackError, match="cannot read"):
        unpack(dst, tmp_path / "missing")
    plain = _craft(tmp_path / "plain.tar.zst", [_reg("hello.txt", b"hi")])
    with pytest.raises(PackError, match="not a forkd pack"):
        unpack(dst, plain)
    _nothing_registered(dst.root)


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti, b""


def _hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.LNKTYPE, target
    return ti, b""


def _device(name: str) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
    return ti, b""


def _variants(members: list[tuple[tarfile.TarInfo, bytes]]) -> dict[str, tuple[list, str]]:
    files = members[1:]
    man = members[0]
    vm = next(d for ti, d in files if ti.name.endswith(VMSTATE_NAME))

    def bad_hash(m: dict) -> None:
        m["files"][2]["sha256"] = "0" * 64

    def bad_size(m: dict) -> None:
        m["files"][1]["size"] += 1

    def v2(m: dict) -> None:
        m["forkd_pack_version"] = 2

    def escape_in_manifest(m: dict) -> None:
        m["files"][1]["path"] = f"{TAG}/../{VMSTATE_NAME}"

    def chain2(m: dict) -> None:
        m["chain"] = ["base", TAG]

    return {
        "dotdot": ([*members, _reg("../evil", b"x")], r"escapes the target directory"),
        "dotdot_inside": ([*members, _reg(f"{TAG}/../../evil", b"x")], r"escapes the target directory"),
        "absolute": ([*members, _reg("/tmp/forkd-evil", b"x")], "absolute path"),
        "symlink_extra": ([*members, _symlink(f"{TAG}/link", "/etc/passwd")], "symlink"),
        "symlink_instead": ([man, files[0], _symlink(f"{TAG}/{VMSTATE_NAME}", "/etc/passwd"), files[2]], "symlink"),
        "hardlink": ([man, files[0], _hardlink(f"{TAG}/{VMSTATE_NAME}", "/etc/passwd"), files[2]], "hardlink"),
        "device": ([man, files[0], _device(f"{TAG}/{VMSTATE_NAME}"), files[2]], "device"),
        "extra": ([*members, _reg(f"{TAG}/extra", b"x")], "not in the manifest"),
        "extra_dotfile": ([*members, _reg(f"{TAG}/.verified.json", b"{}")], "not in the manifest"),
        "duplicate": ([*members, _reg(f"{TAG}/{VMSTATE_NAME}", vm)], "appears twice"),
        "missing": (members[:3], "missing from the archive"),
        "manifest_not_first": ([*files, man], "not a forkd pack"),
        "manifest_hash": (_with_manifest(members, bad_hash), "sha256"),
        "manifest_size": (_with_manifest(members, bad_size), "bytes"),
        "manifest_v2": (_with_manifest(members, v2), "unsupported pack version 2"),
        "manifest_escape": (_with_manifest(members, escape_in_manifest), "unexpected path"),
        "manifest_chain": (_with_manifest(members, chain2), "chain"),
        "member_content": ([man, files[0], _reg(f"{TAG}/{VMSTATE_NAME}", vm[:-1] + b"!"), files[2]], "sha256"),
    }


def test_crafted_archives_are_refused(packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    _, archive = packed
    members = _members(archive)
    for name, (variant, match) in _variants(members).items():
        bad = _craft(tmp_path / f"{name}.tar.zst", variant)
        dst = SnapshotStore(tmp_path / f"dst-{name}")
        with pytest.raises(PackError, match=match):
            unpack(dst, bad)
        _nothing_registered(dst.root)
    assert not list(tmp_path.rglob("*evil*"))
    assert not Path("/tmp/forkd-evil").exists()
    # the crafting itself is sound: the unmodified members unpack
    dst = SnapshotStore(tmp_path / "dst-ok")
    assert unpack(dst, _craft(tmp_path / "ok.tar.zst", members)) == [TAG]


def test_snapshot_json_must_agree_with_manifest(packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    _, archive = packed
    members = _members(archive)
    meta = json.loads(members[1][1])
    meta["files"][VMSTATE_NAME]["sha256"] = "1" * 64
    meta["tag"] = "other"
    for i, (edit, match) in enumerate([({"files": meta["files"]}, "records vmstate"), ({"tag": "other"}, "tag")]):
        m2 = json.loads(members[1][1]) | edit
        data = json.dumps(m2).encode()
        manifest = json.loads(members[0][1])
        manifest["files"][0].update(size=len(data), sha256=__import__("hashlib").sha256(data).hexdigest())
        variant = [_reg(MANIFEST_NAME, json.dumps(manifest).encode()), _reg(members[1][0].name, data), *members[2:]]
        dst = SnapshotStore(tmp_path / f"dst{i}")
        with pytest.raises(PackError, match=match):
            unpack(dst, _craft(tmp_path / f"m{i}.tar.zst", variant))
        _nothing_registered(dst.root)


def test_expansion_is_bounded(packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    """A huge pax header is refused before it is read; so is a stream longer than its manifest allows."""
    _, archive = packed
    members = _members(archive)
    ti = tarfile.TarInfo(f"{TAG}/{VMSTATE_NAME}")
    ti.pax_headers = {"comment": "x" * (4 << 20)}
    ti.size = 0
    bomb = _craft(tmp_path / "bomb.tar.zst", [*members[:2], (ti, b"")])
    with pytest.raises(PackError, match="extended tar header"):
        unpack(SnapshotStore(tmp_path / "dst"), bomb)
    # a valid pack followed by 64 MiB of zeros inside the same zstd frame (~2 KiB compressed)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(write_checksum=True).stream_writer(buf, closefd=False) as zw:
        with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for ti, data in members:
                tar.addfile(ti, io.BytesIO(data))
        for _ in range(64):
            zw.write(bytes(1 << 20))
    (tmp_path / "tail.tar.zst").write_bytes(buf.getvalue())
    with pytest.raises(PackError, match="expands beyond"):
        unpack(SnapshotStore(tmp_path / "dst"), tmp_path / "tail.tar.zst")
    _nothing_registered(tmp_path / "dst")


def test_rename_with_tag(packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    _, archive = packed
    dst = SnapshotStore(tmp_path / "dst")
    assert unpack(dst, archive, tag="renamed") == ["renamed"]
    snap = dst.open("renamed")
    assert snap.meta.tag == "renamed"
    snap.check_files()
    assert not dst.exists(TAG)
    with pytest.raises(ValidationError):
        unpack(dst, archive, tag="../x")


def test_existing_tag_needs_force(packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    src, archive = packed
    # the same snapshot: reused as it is
    ino = (src.path(TAG) / MEMORY_NAME).stat().st_ino
    res = unpack_chain(src, archive)
    assert (res.tags, res.registered, res.reused) == ([TAG], [], [TAG])
    assert (src.path(TAG) / MEMORY_NAME).stat().st_ino == ino
    # another snapshot of that name: refused
    other = SnapshotStore(tmp_path / "other")
    staging = other.stage(TAG)
    (staging / VMSTATE_NAME).write_bytes(b"QEVM other")
    (staging / MEMORY_NAME).write_bytes(b"other")
    other.publish(staging, _meta(TAG))
    with pytest.raises(SnapshotExistsError, match=r"packme \(its vmstate differs.*--force.*--tag"):
        unpack(other, archive)
    assert (other.path(TAG) / MEMORY_NAME).read_bytes() == b"other"
    # damage the existing copy (snapshot.json still records the right hashes): not the same any more
    vm = src.path(TAG) / VMSTATE_NAME
    vm.write_bytes(b"damaged")
    (src.path(TAG) / "marker").write_text("old")
    with pytest.raises(PackError, match="damaged"):
        unpack(src, archive)
    assert vm.read_bytes() == b"damaged"
    # --force replaces it with the archive's
    res = unpack_chain(src, archive, force=True)
    assert (res.tags, res.registered, res.replaced, res.reused) == ([TAG], [TAG], [TAG], [])
    assert not (src.path(TAG) / "marker").exists()
    src.open(TAG).check_files()
    assert sorted(p.name for p in src.root.iterdir()) == [TAG]  # old copy and staging gone


def test_warns_about_another_qemu(packed: tuple[SnapshotStore, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.engine import accel, qemu

    _, archive = packed
    monkeypatch.setattr(qemu, "qemu_binary", lambda: qemu.QemuBinary("/x/qemu", "9.9.9", ""))
    monkeypatch.setattr(accel, "choose_accel", lambda *a: accel.AccelChoice("kvm", "test", "host"))
    warnings: list[str] = []
    assert unpack(SnapshotStore(tmp_path / "dst"), archive, warn=warnings.append) == [TAG]
    assert any("QEMU 7.2.22" in w and "9.9.9" in w for w in warnings), warnings
    assert any("accelerator tcg" in w for w in warnings), warnings


def test_memory_image_is_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.fsutil import atomic_write_json, sha256_file

    size = 64 << 20
    store = _make(tmp_path / "src", mem_size=size)
    # non-zero data in every MiB, so neither side can shortcut through holes
    with open(store.path(TAG) / MEMORY_NAME, "r+b") as f:
        for off in range(0, size, 1 << 20):
            f.seek(off)
            f.write(os.urandom(64 << 10))
    meta = store.open(TAG).meta
    meta.files[MEMORY_NAME]["sha256"] = sha256_file(store.path(TAG) / MEMORY_NAME)
    atomic_write_json(store.path(TAG) / META_NAME, meta.to_json())

    reads: list[int] = []
    real = packmod._HashingReader.read

    def spy(self: packmod._HashingReader, n: int = -1) -> bytes:
        b = real(self, n)
        reads.append(len(b))
        return b

    monkeypatch.setattr(packmod._HashingReader, "read", spy)
    out = tmp_path / "big.tar.zst"
    tracemalloc.start()
    try:
        pack(store, TAG, out)
        _, pack_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        unpack(SnapshotStore(tmp_path / "dst"), out)
        _, unpack_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(reads) <= 1 << 20 and sum(reads) >= size
    # constant (~4-8 MiB: 1 MiB chunks, tarfile's buffer, check_files' 4 MiB hashing reads), not O(size)
    assert pack_peak < size // 4, pack_peak
    assert unpack_peak < size // 4, unpack_peak
    SnapshotStore(tmp_path / "dst").open(TAG).check_files()


def _flat(s: str) -> str:
    return " ".join(s.split())  # rich wraps long lines


def test_cli_pack_unpack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.cli.main import cli

    _make(tmp_path / "src")
    out = tmp_path / "p.tar.zst"
    monkeypatch.setenv("FORKD_SNAPSHOT_ROOT", str(tmp_path / "src"))
    r = CliRunner().invoke(cli, ["pack", "--tag", TAG, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["bytes_out"] == out.stat().st_size
    r = CliRunner().invoke(cli, ["pack", "--tag", TAG, "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in _flat(r.output)
    r = CliRunner().invoke(cli, ["pack", "--tag", TAG, "--out", str(out), "--force", "--level", "1"])
    assert r.exit_code == 0, r.output

    monkeypatch.setenv("FORKD_SNAPSHOT_ROOT", str(tmp_path / "dst"))
    r = CliRunner().invoke(cli, ["unpack", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tags"] == [TAG]
    r = CliRunner().invoke(cli, ["unpack", str(out)])  # the same snapshot again: reused
    assert r.exit_code == 0 and "reused" in _flat(r.output), r.output
    (tmp_path / "dst" / TAG / VMSTATE_NAME).write_bytes(b"damaged")
    r = CliRunner().invoke(cli, ["unpack", str(out)])
    assert r.exit_code == 1 and "differ from the pack's; use --force" in _flat(r.output), r.output
    r = CliRunner().invoke(cli, ["unpack", str(out), "--force", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["replaced"] == [TAG]
    r = CliRunner().invoke(cli, ["unpack", str(out), "--tag", "copy2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["copy2", TAG]
    out.write_bytes(out.read_bytes()[:-10])
    r = CliRunner().invoke(cli, ["unpack", str(out), "--tag", "copy3"])
    assert r.exit_code == 1 and "truncated" in _flat(r.output)


# ------------------------------------------------------------------------------------------- chains

ROOT, DELTA, FLAT = "base", "mid", "leaf"
CHAIN = [ROOT, DELTA, FLAT]


def _make_chain(root: Path) -> SnapshotStore:
    """base (root, memory.bin) -> mid (delta: maps base's memory.bin) -> leaf (flat: a memory.bin of its own)."""
    store = _make(root, ROOT)
    staging = store.stage(DELTA)
    (staging / VMSTATE_NAME).write_bytes(b"QEVM" + random.Random(DELTA).randbytes(20_000))
    meta = _meta(DELTA)
    meta.kind, meta.parent, meta.memory_source = "delta", ROOT, ROOT
    meta.depends_sha256 = store.open(ROOT).meta.files[MEMORY_NAME]["sha256"]
    store.publish(staging, meta)
    meta = _meta(FLAT)
    meta.kind, meta.parent = "flat", DELTA
    store.publish(_staged(store, FLAT), meta)
    return store


@pytest.fixture
def chain_packed(tmp_path: Path) -> tuple[SnapshotStore, Path]:
    store = _make_chain(tmp_path / "src")
    out = tmp_path / "chain.tar.zst"
    res = pack(store, FLAT, out)
    assert res["chain"] == CHAIN and res["tag"] == FLAT
    return store, out


def _snapshot_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_chain_round_trip(chain_packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    src, archive = chain_packed
    members = _members(archive)
    assert [ti.name for ti, _ in members] == [
        MANIFEST_NAME,
        f"{ROOT}/{META_NAME}", f"{ROOT}/{VMSTATE_NAME}", f"{ROOT}/{MEMORY_NAME}",
        f"{DELTA}/{META_NAME}", f"{DELTA}/{VMSTATE_NAME}",  # a delta has no memory.bin of its own
        f"{FLAT}/{META_NAME}", f"{FLAT}/{VMSTATE_NAME}", f"{FLAT}/{MEMORY_NAME}"]
    manifest = json.loads(members[0][1])
    assert manifest["chain"] == CHAIN and manifest["tag"] == FLAT
    assert [f["path"] for f in manifest["files"]] == [ti.name for ti, _ in members[1:]]

    dst = SnapshotStore(tmp_path / "dst")
    res = unpack_chain(dst, archive)
    assert (res.tags, res.registered, res.reused, res.replaced) == (CHAIN, CHAIN, [], [])
    assert _snapshot_dirs(dst.root) == sorted(CHAIN)  # no staging left
    for t in CHAIN:
        snap = dst.open(t)
        snap.check_files()
        for p in src.path(t).iterdir():
            if not p.name.startswith("."):
                assert (dst.path(t) / p.name).read_bytes() == p.read_bytes(), p
    assert not (dst.path(DELTA) / MEMORY_NAME).exists()
    assert dst.open(DELTA).memory == dst.path(ROOT) / MEMORY_NAME

    # the same pack again: every link is already here with the same files
    inodes = {t: (dst.path(t) / VMSTATE_NAME).stat().st_ino for t in CHAIN}
    res = unpack_chain(dst, archive)
    assert (res.tags, res.registered, res.reused) == (CHAIN, [], CHAIN)
    assert {t: (dst.path(t) / VMSTATE_NAME).stat().st_ino for t in CHAIN} == inodes
    assert unpack(dst, archive) == CHAIN
    assert _snapshot_dirs(dst.root) == sorted(CHAIN)


def test_pack_a_delta_then_its_branch(chain_packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    """A delta packs with its memory source; a later pack of the chain reuses what is already there."""
    src, chain_archive = chain_packed
    res = pack(src, DELTA, tmp_path / "mid.tar.zst")
    assert res["chain"] == [ROOT, DELTA]
    assert [f["path"] for f in res["files"]][-1] == f"{DELTA}/{VMSTATE_NAME}"
    dst = SnapshotStore(tmp_path / "dst")
    assert unpack(dst, tmp_path / "mid.tar.zst") == [ROOT, DELTA]
    dst.open(DELTA).check_files()
    res2 = unpack_chain(dst, chain_archive)
    assert (res2.registered, res2.reused) == ([FLAT], [ROOT, DELTA])
    for t in CHAIN:
        dst.open(t).check_files()


def test_pack_refuses_an_incomplete_chain(tmp_path: Path) -> None:
    store = _make_chain(tmp_path / "src")
    # the delta's memory source is not one of its ancestors
    store.publish(_staged(store, "other"), _meta("other"))
    meta = store.open(DELTA).meta
    meta.memory_source, meta.depends_sha256 = "other", store.open("other").meta.files[MEMORY_NAME]["sha256"]
    (store.path(DELTA) / META_NAME).write_text(json.dumps(meta.to_json()))
    with pytest.raises(PackError, match="not one of its ancestors"):
        pack(store, FLAT, tmp_path / "x.tar.zst")
    # an ancestor deleted (with force): the chain cannot be packed whole
    store.delete(DELTA)
    with pytest.raises(PackError, match="depends on mid, which cannot be packed.*compact"):
        pack(store, FLAT, tmp_path / "x.tar.zst")
    assert list(tmp_path.glob("x.tar.zst*")) == []


def test_chain_conflict_needs_force(chain_packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    _, archive = chain_packed
    dst = _make(tmp_path / "dst", ROOT, mem_size=MEM_SIZE // 2)  # another snapshot named base
    old_mem = (dst.path(ROOT) / MEMORY_NAME).read_bytes()
    kid = dst.stage("kid")  # a local delta made from the old base
    (kid / VMSTATE_NAME).write_bytes(b"QEVM kid")
    meta = _meta("kid")
    meta.kind, meta.parent, meta.memory_source = "delta", ROOT, ROOT
    meta.depends_sha256 = dst.open(ROOT).meta.files[MEMORY_NAME]["sha256"]
    dst.publish(kid, meta)
    with pytest.raises(PackError, match=r"base \(its memory.bin differs.*--force") as ei:
        unpack(dst, archive)
    assert isinstance(ei.value, SnapshotExistsError)
    assert _snapshot_dirs(dst.root) == [ROOT, "kid"]  # nothing registered, nothing extracted
    assert (dst.path(ROOT) / MEMORY_NAME).read_bytes() == old_mem

    warnings: list[str] = []
    res = unpack_chain(dst, archive, force=True, warn=warnings.append)
    assert (res.registered, res.replaced, res.reused) == (CHAIN, [ROOT], [])
    assert _snapshot_dirs(dst.root) == sorted([*CHAIN, "kid"])
    for t in CHAIN:
        dst.open(t).check_files()
    assert any("base was replaced" in w and "kid" in w for w in warnings), warnings


def test_chain_publish_failure_rolls_back(chain_packed: tuple[SnapshotStore, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering the last link fails: the links registered before it go, a replaced one comes back."""
    _, archive = chain_packed
    dst = _make(tmp_path / "dst", ROOT, mem_size=MEM_SIZE // 2)
    old_meta = (dst.path(ROOT) / META_NAME).read_bytes()
    real = packmod._publish

    def failing(store: SnapshotStore, staging: Path, tag: str, replace: bool) -> Path | None:
        if tag == FLAT:
            raise PackError("disk on fire")
        return real(store, staging, tag, replace)

    monkeypatch.setattr(packmod, "_publish", failing)
    with pytest.raises(PackError, match="disk on fire"):
        unpack(dst, archive, force=True)
    assert _snapshot_dirs(dst.root) == [ROOT]  # no mid, no staging or trash
    assert (dst.path(ROOT) / META_NAME).read_bytes() == old_meta
    dst.open(ROOT).check_files()


def test_chain_rename_is_refused(chain_packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    _, archive = chain_packed
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError, match="--tag renames a single snapshot.*name each other by tag"):
        unpack(dst, archive, tag="renamed")
    assert _snapshot_dirs(dst.root) == []


def _edit_link_meta(members: list[tuple[tarfile.TarInfo, bytes]], link: str,
                    edit: object) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members with ``link``'s snapshot.json edited, and the manifest made to agree with it."""
    manifest = json.loads(members[0][1])
    out = []
    for ti, data in members[1:]:
        if ti.name == f"{link}/{META_NAME}":
            meta = json.loads(data)
            edit(meta)  # type: ignore[operator]
            ti, data = _reg(ti.name, json.dumps(meta).encode())
            rec = next(r for r in manifest["files"] if r["path"] == ti.name)
            rec.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        out.append((ti, data))
    return [_reg(MANIFEST_NAME, json.dumps(manifest).encode()), *out]


def _chain_variants(members: list[tuple[tarfile.TarInfo, bytes]]) -> dict[str, tuple[list, str]]:
    files = {ti.name: (ti, d) for ti, d in members[1:]}
    root_mem = files[f"{ROOT}/{MEMORY_NAME}"][1]

    def set_(key: str, value: object) -> object:
        return lambda m: m.__setitem__(key, value)

    def drop_root(m: dict) -> None:
        m["chain"] = [DELTA, FLAT]
        m["files"] = [f for f in m["files"] if not f["path"].startswith(f"{ROOT}/")]

    def delta_memory(m: dict) -> None:
        m["files"].append({"path": f"{DELTA}/{MEMORY_NAME}", "size": len(root_mem),
                           "sha256": hashlib.sha256(root_mem).hexdigest()})

    without_root = [ti_d for ti_d in members[1:] if not ti_d[0].name.startswith(f"{ROOT}/")]
    return {
        "depends_sha256": (_edit_link_meta(members, DELTA, set_("depends_sha256", "ab" * 32)),
                           "delta mid depends on a memory.bin of base with sha256 abababab"),
        "memory_source_later": (_edit_link_meta(members, DELTA, set_("memory_source", FLAT)),
                                "not before it in the chain"),
        "memory_source_none": (_edit_link_meta(members, DELTA, set_("memory_source", None)),
                               "not before it in the chain"),
        "parent": (_edit_link_meta(members, FLAT, set_("parent", ROOT)), "names 'base' as its parent"),
        "root_parent": (_edit_link_meta(members, ROOT, set_("parent", "elsewhere")), "has parent 'elsewhere'"),
        "delta_as_flat": (_edit_link_meta(members, DELTA, set_("kind", "flat")), "memory source"),
        "unknown_kind": (_edit_link_meta(members, FLAT, set_("kind", "weird")), "unknown snapshot kind"),
        "delta_with_memory": (_with_manifest([*members, _reg(f"{DELTA}/{MEMORY_NAME}", root_mem)], delta_memory),
                              "lists a memory.bin for mid, a delta"),
        "without_root": (_with_manifest([members[0], *without_root], drop_root), "has parent 'base'"),
        "extra_delta_memory": ([*members, _reg(f"{DELTA}/{MEMORY_NAME}", root_mem)], "not in the manifest"),
        "dotdot": ([*members, _reg(f"{DELTA}/../{ROOT}/{MEMORY_NAME}", b"x")], "escapes the target directory"),
        "symlink": ([members[0], *[(_symlink(ti.name, "/etc/passwd") if ti.name == f"{DELTA}/{VMSTATE_NAME}"
                                    else (ti, d)) for ti, d in members[1:]]], "symlink"),
        "missing_flat_memory": (members[:-1], "missing from the archive"),
    }


def test_crafted_chain_archives_are_refused(chain_packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    _, archive = chain_packed
    members = _members(archive)
    for name, (variant, match) in _chain_variants(members).items():
        bad = _craft(tmp_path / f"{name}.tar.zst", variant)
        dst = SnapshotStore(tmp_path / f"dst-{name}")
        with pytest.raises(PackError, match=match):
            unpack(dst, bad)
        _nothing_registered(dst.root)
    dst = SnapshotStore(tmp_path / "dst-ok")  # the crafting itself is sound
    assert unpack(dst, _craft(tmp_path / "ok.tar.zst", members)) == CHAIN


def test_damaged_chain_archive_is_refused(chain_packed: tuple[SnapshotStore, Path], tmp_path: Path) -> None:
    _, archive = chain_packed
    data = archive.read_bytes()
    for i, where in enumerate([0.3, 0.6, 0.9, -10]):
        pos = int(where * len(data)) if isinstance(where, float) else where % len(data)
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        for kind, bad in (("flip", bytes(flipped)), ("cut", data[:pos])):
            path = tmp_path / f"{kind}{i}.tar.zst"
            path.write_bytes(bad)
            dst = SnapshotStore(tmp_path / f"dst-{kind}{i}")
            with pytest.raises(PackError):
                unpack(dst, path)
            _nothing_registered(dst.root)


def test_cli_unpack_chain(chain_packed: tuple[SnapshotStore, Path], tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.cli.main import cli

    src, archive = chain_packed
    monkeypatch.setenv("FORKD_SNAPSHOT_ROOT", str(src.root))
    r = CliRunner().invoke(cli, ["pack", "--tag", FLAT, "--out", str(tmp_path / "c.tar.zst")])
    assert r.exit_code == 0 and "chain base -> mid -> leaf" in _flat(r.output), r.output
    monkeypatch.setenv("FORKD_SNAPSHOT_ROOT", str(tmp_path / "dst"))
    r = CliRunner().invoke(cli, ["unpack", str(archive)])
    assert r.exit_code == 0, r.output
    out = _flat(r.output)
    assert all(f"{t}: registered" in out for t in CHAIN) and "unpacked base -> mid -> leaf" in out, out
    r = CliRunner().invoke(cli, ["unpack", str(archive), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert (res["tags"], res["registered"], res["reused"]) == (CHAIN, [], CHAIN)
    r = CliRunner().invoke(cli, ["unpack", str(archive)])
    assert r.exit_code == 0 and all(f"{t}: reused" in _flat(r.output) for t in CHAIN), r.output
    r = CliRunner().invoke(cli, ["unpack", str(archive), "--tag", "x"])
    assert r.exit_code == 1 and "--tag renames a single snapshot" in _flat(r.output), r.output


IMAGE_ID = "0123456789abcdef"


def _image_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SnapshotStore, Path]:
    """A fake image-based snapshot (an image with a 64 MiB file system, a qcow2 layer) packed."""
    from forkd.engine import disk as disks
    from forkd.fsutil import sha256_file
    from forkd.guest.image import ImageInfo

    monkeypatch.setenv("FORKD_IMAGE_ROOT", str(tmp_path / "images-src"))
    monkeypatch.setenv("FORKD_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "images-src" / IMAGE_ID
    d.mkdir(parents=True)
    (d / "vmlinuz").write_bytes(b"kernel")
    (d / "initramfs.cpio").write_bytes(b"initramfs")
    with open(d / disks.ROOTFS_NAME, "wb") as f:
        f.truncate(64 << 20)
        f.write(b"ext4-ish")
    info = ImageInfo(image_id=IMAGE_ID, path=d, kernel=d / "vmlinuz", initramfs=d / "initramfs.cpio",
                     kernel_version="6.1", cmdline="console=ttyS0", inputs={"x": "y"}, built_at=time.time(),
                     size_bytes=1, name="img", rootfs=d / disks.ROOTFS_NAME,
                     rootfs_sha256=sha256_file(d / disks.ROOTFS_NAME), disk_mib=64, python="/usr/bin/python3")
    (d / "image.json").write_text(json.dumps(info.to_json()))
    store = SnapshotStore(tmp_path / "src")
    staging = _staged(store, TAG)
    disks.new_layer(staging / disks.LAYER_NAME, 64 << 20)
    meta = _meta(TAG)
    meta.disk = {"image": IMAGE_ID, "size_bytes": 64 << 20, "base_sha256": info.rootfs_sha256, "layers": [TAG],
                 "layer_sha256": [sha256_file(staging / disks.LAYER_NAME)]}
    store.publish(staging, meta)
    out = tmp_path / "img.tar.zst"
    pack(store, TAG, out)
    monkeypatch.setenv("FORKD_IMAGE_ROOT", str(tmp_path / "images-dst"))
    return store, out


def test_image_pack_publishes_an_imported_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.guest.image import load_image

    _, archive = _image_snapshot(tmp_path, monkeypatch)
    unpack(SnapshotStore(tmp_path / "dst"), archive)
    info = load_image(tmp_path / "images-dst" / IMAGE_ID)
    assert info is not None and info.origin == "pack"  # never a build cache or the boot image
    snap = SnapshotStore(tmp_path / "dst").open(TAG)
    snap.check_disk()
    assert snap.disk_chain().size_bytes == 64 << 20  # type: ignore[union-attr]


def test_image_pack_must_carry_the_snapshots_own_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, archive = _image_snapshot(tmp_path, monkeypatch)
    members = _members(archive)
    other = "fedcba9876543210"
    # the manifest names another image (say the predictable id of the default boot image)
    bad = _craft(tmp_path / "b1.tar.zst", _with_manifest(members, lambda m: m.update(image=other)))
    with pytest.raises(PackError):
        unpack(SnapshotStore(tmp_path / "dst1"), bad)
    assert not (tmp_path / "images-dst" / other).exists()

    def retarget(meta: dict) -> None:
        meta["disk"]["image"] = other
    bad = _craft(tmp_path / "b2.tar.zst", _edit_link_meta(members, TAG, retarget))
    with pytest.raises(PackError, match="carries image"):
        unpack(SnapshotStore(tmp_path / "dst2"), bad)
    assert not (tmp_path / "images-dst").exists() or not list((tmp_path / "images-dst").iterdir())


def test_disk_size_comes_from_the_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, archive = _image_snapshot(tmp_path, monkeypatch)

    def grow(meta: dict) -> None:
        meta["disk"]["size_bytes"] = 1 << 44  # a 16 TiB RLIMIT_FSIZE for every child, if it were believed
    bad = _craft(tmp_path / "b.tar.zst", _edit_link_meta(_members(archive), TAG, grow))
    unpack(SnapshotStore(tmp_path / "dst"), bad)
    snap = SnapshotStore(tmp_path / "dst").open(TAG)
    assert snap.disk_chain().size_bytes == 64 << 20  # type: ignore[union-attr]
    with pytest.raises(SnapshotInvalidError, match="records a disk of"):
        snap.check_disk()
