"""A real snapshot packed, unpacked into another snapshot root, and forked from there."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from forkd.engine import Engine
from forkd.engine.pack import pack, unpack

pytestmark = pytest.mark.vm


def test_pack_unpack_and_fork(engine: Engine, snapshot: str, tmp_path: Path) -> None:
    out = tmp_path / f"{snapshot}.tar.zst"
    t0 = time.monotonic()
    res = pack(engine.store, snapshot, out)
    pack_s = time.monotonic() - t0
    assert res["bytes_out"] == out.stat().st_size < res["bytes_in"]

    eng = Engine(snapshot_root=tmp_path / "root", run_dir=tmp_path / "run")
    try:
        warnings: list[str] = []
        t0 = time.monotonic()
        assert unpack(eng.store, out, warn=warnings.append) == [snapshot]
        unpack_s = time.monotonic() - t0
        assert warnings == []  # same host: same QEMU and accelerator
        snap = eng.store.open(snapshot)
        assert snap.meta.files == engine.store.open(snapshot).meta.files
        print(f"\npack {res['bytes_in'] / 2**20:.1f} MiB -> {res['bytes_out'] / 2**20:.1f} MiB "
              f"({res['ratio']}x) in {pack_s:.1f} s; unpack in {unpack_s:.1f} s; "
              f"unpacked memory.bin allocates {snap.summary()['memory_allocated_bytes'] / 2**20:.1f} MiB")

        results = eng.spawn(snapshot, 2)
        children = [r.child for r in results if r.child is not None]
        try:
            assert [r.error for r in results] == [None, None]
            for child in children:
                assert child.eval("numpy.zeros(5).tolist()")["value"] == [0.0] * 5
        finally:
            for child in children:
                child.kill()
    finally:
        eng.close()
