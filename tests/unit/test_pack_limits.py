"""A hostile pack is refused by unpack: a machine spec this forkd would not write, too many snapshots, too
many bytes, no room for them, a member longer than the manifest says. No VM."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_pack import CHAIN, FLAT, TAG, _craft, _edit_link_meta, _make, _make_chain, _members, _nothing_registered
from test_specguard import HOSTILE

from forkd.engine import pack as packmod
from forkd.engine.chain import MAX_DEPTH
from forkd.engine.pack import pack, unpack, unpack_chain
from forkd.engine.snapshot import MEMORY_NAME, SnapshotStore
from forkd.errors import PackError


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    out = tmp_path / f"{TAG}.tar.zst"
    pack(_make(tmp_path / "src"), TAG, out)
    return out


@pytest.fixture
def chain_archive(tmp_path: Path) -> Path:
    out = tmp_path / "chain.tar.zst"
    pack(_make_chain(tmp_path / "chain-src"), FLAT, out)
    return out


def _spec_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda meta: edit(meta["machine"])


@pytest.mark.parametrize("name", ["extra_device", "machine_pc", "machine_opts_extra", "cpu_property",
                                  "memory_huge", "vcpus_string", "accel_opts_extra", "unknown_field"])
def test_a_pack_with_a_tampered_spec_is_refused(archive: Path, tmp_path: Path, name: str) -> None:
    edit, field = HOSTILE[name]
    bad = _craft(tmp_path / "bad.tar.zst", _edit_link_meta(_members(archive), TAG, _spec_edit(edit)))
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError, match=rf"^refused archive: {TAG}/snapshot\.json: {field}.*tampered with"):
        unpack(dst, bad)
    _nothing_registered(dst.root)


def test_a_tampered_link_in_a_chain_is_refused(chain_archive: Path, tmp_path: Path) -> None:
    edit, _ = HOSTILE["extra_device"]
    bad = _craft(tmp_path / "bad.tar.zst", _edit_link_meta(_members(chain_archive), CHAIN[1], _spec_edit(edit)))
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError, match=rf"refused archive: {CHAIN[1]}/snapshot\.json: spec\.devices"):
        unpack(dst, bad)
    _nothing_registered(dst.root)


def _with_manifest(archive: Path, edit: Callable[[dict[str, Any]], None]) -> list[Any]:
    members = _members(archive)
    manifest = json.loads(members[0][1])
    edit(manifest)
    data = json.dumps(manifest).encode()
    ti = members[0][0]
    ti.size = len(data)
    return [(ti, data), *members[1:]]


def test_an_overlong_chain_is_refused(archive: Path, tmp_path: Path) -> None:
    long_chain = [f"link{i}" for i in range(MAX_DEPTH + 1)] + [TAG]
    assert len(long_chain) == packmod.MAX_CHAIN + 1
    bad = _craft(tmp_path / "long.tar.zst", _with_manifest(archive, lambda m: m.__setitem__("chain", long_chain)))
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError, match=rf"chain holds {len(long_chain)} snapshots.*at most {packmod.MAX_CHAIN}"):
        unpack(dst, bad)
    _nothing_registered(dst.root)


def test_chain_cap_is_exact(chain_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packmod, "MAX_CHAIN", len(CHAIN) - 1)
    with pytest.raises(PackError, match=f"chain holds {len(CHAIN)} snapshots"):
        unpack(SnapshotStore(tmp_path / "dst1"), chain_archive)
    _nothing_registered(tmp_path / "dst1")
    monkeypatch.setattr(packmod, "MAX_CHAIN", len(CHAIN))
    assert unpack(SnapshotStore(tmp_path / "dst2"), chain_archive) == CHAIN


def test_an_oversize_pack_is_refused(archive: Path, tmp_path: Path) -> None:
    def huge(m: dict[str, Any]) -> None:
        next(f for f in m["files"] if f["path"].endswith(MEMORY_NAME))["size"] = packmod.MAX_UNPACK_BYTES

    bad = _craft(tmp_path / "huge.tar.zst", _with_manifest(archive, huge))
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError, match=rf"add up to \d+ bytes; this forkd unpacks at most {packmod.MAX_UNPACK_BYTES}"):
        unpack(dst, bad)
    _nothing_registered(dst.root)


def test_pack_refuses_what_unpack_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _make(tmp_path / "src")
    monkeypatch.setattr(packmod, "MAX_UNPACK_BYTES", 1 << 20)
    with pytest.raises(PackError, match="a pack holds at most 1048576"):
        pack(store, TAG, tmp_path / "x.tar.zst")
    assert list(tmp_path.glob("x.tar.zst*")) == []


def test_no_room_is_refused_before_writing(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need = sum(f["size"] for f in json.loads(_members(archive)[0][1])["files"])
    free = {"bytes": packmod.FREE_MARGIN_BYTES + need - 1}
    monkeypatch.setattr(packmod, "free_bytes", lambda _p: free["bytes"])
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError, match=rf"not enough disk space to unpack: its files need up to {need} bytes"):
        unpack(dst, archive)
    _nothing_registered(dst.root)
    free["bytes"] += 1
    assert unpack(dst, archive) == [TAG]
    # a link already here is not written again: no room needed for it (unless --force may replace it)
    free["bytes"] = 0
    res = unpack_chain(dst, archive)
    assert res.reused == [TAG]
    with pytest.raises(PackError, match="not enough disk space"):
        unpack_chain(dst, archive, force=True)


def test_a_member_longer_than_its_manifest_size_stops_at_once(tmp_path: Path) -> None:
    entry = packmod._Entry("t/vmstate", "t", "vmstate", 10, "0" * 64)
    dest = tmp_path / "vmstate"
    src = io.BytesIO(b"x" * (3 * packmod.CHUNK))
    with pytest.raises(PackError, match=r"t/vmstate runs past the 10 bytes the manifest records"):
        packmod._extract(src, dest, entry)
    assert dest.stat().st_size <= entry.size
    assert src.tell() == packmod.CHUNK  # the first chunk overran: nothing more was read


def test_a_member_header_larger_than_the_manifest_is_refused(archive: Path, tmp_path: Path) -> None:
    members = _members(archive)
    ti, data = members[2]
    ti.size = len(data) + 4096
    bad = _craft(tmp_path / "long.tar.zst", [*members[:2], (ti, data + bytes(4096)), *members[3:]])
    dst = SnapshotStore(tmp_path / "dst")
    with pytest.raises(PackError, match="the manifest records"):
        unpack(dst, bad)
    _nothing_registered(dst.root)


def test_no_staging_for_a_pack_without_room(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caps are checked from the manifest: no staging directory is made for a refused pack."""
    made: list[Path] = []
    real = Path.mkdir

    def spy(self: Path, *a: Any, **kw: Any) -> None:
        made.append(self)
        real(self, *a, **kw)

    monkeypatch.setattr(packmod, "free_bytes", lambda _p: 0)
    monkeypatch.setattr(Path, "mkdir", spy)
    with pytest.raises(PackError, match="not enough disk space"):
        unpack(SnapshotStore(tmp_path / "dst"), archive)
    assert not [p for p in made if p.name.startswith(".staging-")]
