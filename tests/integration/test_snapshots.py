"""Snapshot files and metadata: tampering, missing files, mismatched hosts, boot failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from forkd.engine import Engine
from forkd.errors import BootTimeoutError, SnapshotExistsError, SnapshotInvalidError, SnapshotNotFoundError

pytestmark = pytest.mark.vm


def clone_snapshot(engine: Engine, src: str, dst: str, copy_memory: bool = False) -> Path:
    """A copy of snapshot ``src`` as ``dst``: vmstate copied, memory.bin hard-linked (or sparse-copied)."""
    s, d = engine.store.path(src), engine.store.path(dst)
    d.mkdir()
    shutil.copy(s / "vmstate", d / "vmstate")
    if copy_memory:
        subprocess.run(["cp", "--sparse=always", str(s / "memory.bin"), str(d / "memory.bin")], check=True)
    else:
        os.link(s / "memory.bin", d / "memory.bin")
    meta = json.loads((s / "snapshot.json").read_text())
    meta["tag"] = dst
    (d / "snapshot.json").write_text(json.dumps(meta))
    return d


def edit_meta(d: Path, fn) -> None:
    meta = json.loads((d / "snapshot.json").read_text())
    fn(meta)
    (d / "snapshot.json").write_text(json.dumps(meta))


def test_metadata_records_the_machine(engine: Engine, snapshot: str) -> None:
    meta = json.loads((engine.store.path(snapshot) / "snapshot.json").read_text())
    assert meta["machine"]["machine"] == "microvm"
    assert meta["machine"]["accel"] == engine.accel.name
    assert meta["qemu"]["version"] == engine.qemu.version
    assert meta["files"]["vmstate"]["sha256"] and meta["files"]["memory.bin"]["size"] == 512 << 20
    assert meta["image"]["id"] and meta["guest"]["numpy"]
    assert not list(engine.store.root.glob(".staging-*"))


def test_tampered_vmstate_is_refused(engine: Engine, snapshot: str) -> None:
    d = clone_snapshot(engine, snapshot, "tampered-vmstate")
    data = bytearray((d / "vmstate").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "vmstate").write_bytes(bytes(data))
    with pytest.raises(SnapshotInvalidError, match="vmstate is corrupt"):
        engine.spawn("tampered-vmstate", 1)


def test_tampered_memory_is_refused(engine: Engine, snapshot: str) -> None:
    d = clone_snapshot(engine, snapshot, "tampered-memory", copy_memory=True)
    with open(d / "memory.bin", "r+b") as f:
        f.seek(1 << 20)
        b = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(SnapshotInvalidError, match="memory.bin is corrupt"):
        engine.spawn("tampered-memory", 1)


def test_missing_files_are_named(engine: Engine, snapshot: str) -> None:
    d = clone_snapshot(engine, snapshot, "missing-mem")
    (d / "memory.bin").unlink()
    with pytest.raises(SnapshotInvalidError, match="memory.bin is missing"):
        engine.spawn("missing-mem", 1)
    d = clone_snapshot(engine, snapshot, "missing-meta")
    (d / "snapshot.json").unlink()
    with pytest.raises(SnapshotInvalidError, match="snapshot.json is missing"):
        engine.spawn("missing-meta", 1)
    with pytest.raises(SnapshotNotFoundError):
        engine.spawn("never-made", 1)


def test_other_qemu_or_accelerator_is_refused(engine: Engine, snapshot: str) -> None:
    d = clone_snapshot(engine, snapshot, "old-qemu")
    edit_meta(d, lambda m: m["qemu"].update(version="6.0.0"))
    with pytest.raises(SnapshotInvalidError, match="made with QEMU 6.0.0"):
        engine.spawn("old-qemu", 1)
    other = "kvm" if engine.accel.name == "tcg" else "tcg"
    d = clone_snapshot(engine, snapshot, "other-accel")
    edit_meta(d, lambda m: m["machine"].update(accel=other))
    with pytest.raises(SnapshotInvalidError, match=f"accelerator {other}"):
        engine.spawn("other-accel", 1)


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_state_qemu_cannot_load_fails_fast_with_qemu_message(engine: Engine, snapshot: str, damage: str) -> None:
    """A vmstate that passes our checks (its hash re-recorded) but that QEMU rejects: the child's error
    says what QEMU said, and nothing hangs."""
    from forkd.fsutil import sha256_file

    tag = f"bad-stream-{damage}"
    d = clone_snapshot(engine, snapshot, tag)
    data = bytearray((d / "vmstate").read_bytes())
    if damage == "magic":
        data[0:4] = b"XXXX"
    else:
        data = data[: len(data) // 2]
    (d / "vmstate").write_bytes(bytes(data))
    edit_meta(d, lambda m: m["files"]["vmstate"].update(sha256=sha256_file(d / "vmstate"), size=len(data)))
    (res,) = engine.spawn(tag, 1, timeout=60)
    assert res.child is None and "died while restoring" in res.error, res.error
    assert "QEMU said" in res.error


def test_existing_tag_is_refused(engine: Engine, snapshot: str) -> None:
    with pytest.raises(SnapshotExistsError):
        engine.create_snapshot(snapshot)


def test_boot_timeout_reports_console_and_leaves_nothing(engine: Engine, image: object) -> None:
    with pytest.raises(BootTimeoutError, match="did not come up within 1 s"):
        engine.create_snapshot("too-slow", boot_timeout=1, image=image)
    assert not engine.store.exists("too-slow")
    assert not list(engine.store.root.glob(".staging-too-slow-*"))
