"""BRANCH with real VMs: snapshot a running child (delta or flat), fork grandchildren from it, chains of
branches, the delete rules (and an orphaned delta), compaction, the root's pool serving delta branches,
a child that dies mid-branch, two branches of one child at once, packing a chain, and no RAM-discarding
device in any snapshot.

Engine level (no daemon). Every test makes its own branch snapshots and deletes them afterwards; the
session snapshot is only ever a base, never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forkd.engine import Child, Engine, qstream
from forkd.engine.snapshot import MEMORY_NAME, META_NAME, VMSTATE_NAME, Snapshot
from forkd.errors import (
    DependentsError,
    ForkdError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    ValidationError,
    VMError,
)
from forkd.fsutil import sha256_file

pytestmark = pytest.mark.vm

# 50 MiB of data (1 MiB of random bytes, repeated) and a variable, set in the child before the branch.
SETUP = "import os, zlib\nWHO='child'\nDATA=bytearray(os.urandom(1<<20))*50\nCK=zlib.crc32(DATA)"
CHECK = "(WHO, zlib.crc32(DATA) == CK, len(DATA))"
SEEN_BY_GRANDCHILD = ["child", True, 50 << 20]
T = 300.0  # agent timeout for anything touching the 50 MiB (TCG is slow; never asserted)
RAM_DISCARDING = re.compile(r"balloon|virtio-mem|free-page", re.I)


def new_tag(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@pytest.fixture
def tags(engine: Engine, snapshot: str) -> Iterator[list[str]]:
    """Branch tags a test creates; whatever is left of them (and below them) is deleted afterwards."""
    made: list[str] = []
    yield made
    for t in reversed(made):
        assert t != snapshot
        if engine.store.exists(t):
            try:
                engine.delete_snapshot(t, cascade=True)
            except SnapshotNotFoundError:
                pass
            except ForkdError:  # e.g. an orphaned delta the engine refuses to open: remove it directly
                engine.store.delete(t)


@pytest.fixture
def fork(engine: Engine) -> Iterator[Callable[..., list[Child]]]:
    """``fork(tag, n, eng=None, **spawn_kw)`` -> children of ``tag`` (from ``eng``, default the session
    engine), all killed after the test."""
    made: list[Child] = []

    def _fork(tag: str, n: int = 1, eng: Engine | None = None, **kw: Any) -> list[Child]:
        kw.setdefault("timeout", T)
        results = (eng or engine).spawn(tag, n, **kw)
        made.extend(r.child for r in results if r.child is not None)
        errors = [r.error for r in results if r.child is None]
        assert not errors, errors
        return [r.child for r in results if r.child is not None]

    yield _fork
    for c in made:
        with contextlib.suppress(Exception):
            c.kill()


def branch(engine: Engine, tags: list[str], child: Child, prefix: str, mode: str) -> Any:
    tag = new_tag(prefix)
    tags.append(tag)
    res = engine.branch(child, tag, mode=mode)
    assert res.snapshot.tag == tag and res.mode == mode and res.snapshot.meta.kind == mode
    assert res.snapshot.meta.parent == child.snapshot
    assert res.pause_ms > 0 and res.total_ms >= res.pause_ms and res.dirty_bytes > 0
    return res


def own_files(snap: Snapshot) -> dict[str, str]:
    """sha256 of the files the snapshot directory holds itself."""
    return {n: sha256_file(snap.path / n) for n in (MEMORY_NAME, VMSTATE_NAME) if (snap.path / n).exists()}


def assert_no_ram_discarding_devices(snap: Snapshot) -> None:
    """A device that gives guest RAM back (balloon, virtio-mem, free page reporting/hinting) would make
    a child's QEMU discard pages of the shared base file: none may be in any snapshot's machine."""
    devices = json.loads((snap.path / META_NAME).read_text())["machine"]["devices"]
    assert devices, f"{snap.tag}: no devices recorded"
    bad = [d for d in devices if RAM_DISCARDING.search(d)]
    assert not bad, f"snapshot {snap.tag} has RAM-discarding devices: {bad}"


def no_leftovers(engine: Engine, tag: str) -> None:
    root = engine.store.root
    assert not (root / tag).exists(), f"a snapshot directory was left for {tag}"
    left = [p.name for p in root.iterdir() if p.name.startswith(f".staging-{tag}-")]
    assert not left, f"staging directories left: {left}"


# ---------------------------------------------------------------------------------- (a) grandchildren


@pytest.mark.parametrize("mode", ["delta", "flat"])
def test_branch_grandchildren_see_the_child_and_stay_isolated(engine: Engine, snapshot: str, spawn, fork,
                                                              tags: list[str], mode: str) -> None:
    base = engine.store.open(snapshot)
    base_before = {"memory.bin": sha256_file(base.memory), "vmstate": sha256_file(base.vmstate)}
    assert base_before == {n: base.meta.files[n]["sha256"] for n in (MEMORY_NAME, VMSTATE_NAME)}

    (child,) = spawn(1)
    child.run_code(SETUP, timeout=T)
    res = branch(engine, tags, child, f"br-{mode}", mode)
    snap = res.snapshot
    assert res.dirty_bytes >= 50 << 20, res.to_json()
    assert snap.meta.branch["dirty_bytes"] == res.dirty_bytes and snap.meta.branch["sandbox"] == child.id
    if mode == "delta":
        assert snap.meta.memory_source == snapshot and snap.memory == base.memory
        assert not (snap.path / MEMORY_NAME).exists()
        assert snap.meta.depends_sha256 == base_before["memory.bin"]
        assert snap.vmstate.stat().st_size > 50 << 20  # the dirty pages ride in the vmstate
    else:
        assert snap.meta.memory_source is None and snap.memory == snap.path / MEMORY_NAME
        assert snap.memory.stat().st_size == base.memory.stat().st_size
        assert snap.vmstate.stat().st_size < 1 << 20  # devices only, like a root's
    assert_no_ram_discarding_devices(snap)
    branch_files = own_files(snap)
    assert branch_files == {n: snap.meta.files[n]["sha256"] for n in branch_files}

    # The source keeps running, and what it does after the branch is not in the branch.
    assert child.vm.qmp.execute("query-status", timeout=30)["status"] == "running"
    assert child.eval(CHECK, timeout=T)["value"] == SEEN_BY_GRANDCHILD
    child.run_code("WHO='source-after'", timeout=T)

    g0, g1 = fork(snap.tag, 2)
    assert not RAM_DISCARDING.search(Path(f"/proc/{g0.pid}/cmdline").read_bytes().decode(errors="replace"))
    for g in (g0, g1):
        assert g.snapshot == snap.tag and g.fresh["clock_set"] and g.fresh["rng_reseeded"], g.fresh
        assert g.eval(CHECK, timeout=T)["value"] == SEEN_BY_GRANDCHILD
    rand = [k.eval("os.urandom(16).hex()", timeout=T)["value"] for k in (child, g0, g1)]
    assert len(set(rand)) == 3, f"a grandchild repeats another VM's os.urandom: {rand}"
    g0.run_code("WHO='g0'\nDATA[:] = bytes(len(DATA))", timeout=T)
    assert g0.eval(CHECK, timeout=T)["value"] == ["g0", False, 50 << 20]
    assert g1.eval(CHECK, timeout=T)["value"] == SEEN_BY_GRANDCHILD
    assert child.eval(CHECK, timeout=T)["value"] == ["source-after", True, 50 << 20]
    for g in (g0, g1):
        g.kill()
    child.kill()

    assert own_files(snap) == branch_files, "the branch's files changed after its grandchildren ran"
    assert {"memory.bin": sha256_file(base.memory), "vmstate": sha256_file(base.vmstate)} == base_before
    engine.open_snapshot(snap.tag)  # still passes every check (sizes, hashes, the delta's source)


# ------------------------------------------------------------------------------- (b) three generations


@pytest.mark.parametrize("modes", [("delta", "delta", "delta"), ("flat", "flat", "flat"), ("delta", "flat", "delta")],
                         ids=["delta-delta-delta", "flat-flat-flat", "delta-flat-delta"])
def test_three_generation_chain(engine: Engine, snapshot: str, spawn, fork, tags: list[str],
                                modes: tuple[str, str, str]) -> None:
    (child,) = spawn(1)
    current = child
    chain: list[Snapshot] = []
    for gen, mode in enumerate(modes, start=1):
        current.run_code(f"import os, zlib\nG{gen}='gen{gen}'\nD{gen}=os.urandom(4<<20)\nK{gen}=zlib.crc32(D{gen})",
                         timeout=T)
        if gen == 1:  # random pages the last generation zero-fills: its branch carries them as zero pages,
            current.run_code("Z=bytearray(os.urandom(4<<20))", timeout=T)  # over a base that has them random
        if gen == 3:
            current.run_code("Z[:] = bytes(len(Z))", timeout=T)
        res = branch(engine, tags, current, f"gen{gen}-{mode}", mode)
        snap = res.snapshot
        source = engine.store.open(current.snapshot)
        if mode == "delta":  # maps the memory.bin its source maps: a root's or a flat branch's
            assert snap.meta.memory_source == source.memory_owner
        else:
            assert snap.meta.memory_source is None and (snap.path / MEMORY_NAME).exists()
        assert_no_ram_discarding_devices(snap)
        chain.append(snap)
        current.kill()
        (current,) = fork(snap.tag, 1)
    everything = "(G1, G2, G3, zlib.crc32(D1) == K1, zlib.crc32(D2) == K2, zlib.crc32(D3) == K3, Z.count(0))"
    want = [f"gen{i}" for i in (1, 2, 3)] + [True] * 3 + [4 << 20]
    assert current.eval(everything, timeout=T)["value"] == want
    current.kill()
    # the end of the chain compacted into a parentless copy holds all of it too
    compacted = new_tag("gen-compact")
    tags.append(compacted)
    engine.compact(chain[-1].tag, compacted)
    (current,) = fork(compacted, 1)
    assert current.eval(everything, timeout=T)["value"] == want
    current.kill()

    t1, t2, t3 = (s.tag for s in chain)
    assert engine.chain_info(t3)["depth"] == 3 and engine.chain_info(t3)["ancestors"] == [snapshot, t1, t2]
    assert engine.chain_info(t3)["dependents"] == []
    assert engine.chain_info(t2)["ancestors"] == [snapshot, t1] and engine.chain_info(t2)["dependents"] == [t3]
    assert engine.chain_info(t1)["ancestors"] == [snapshot] and engine.chain_info(t1)["dependents"] == [t2]
    assert engine.chain_info(t1)["depth"] == 1
    assert t1 in engine.chain_info(snapshot)["dependents"] and engine.chain_info(snapshot)["depth"] == 0
    for snap in chain:
        info = engine.chain_info(snap.tag)
        if snap.meta.kind == "delta":  # no memory.bin of its own: physically only its vmstate
            assert info["physical_bytes"] < info["logical_bytes"]
        engine.open_snapshot(snap.tag)


# ------------------------------------------------------------------------------------ (c) delete rules


def test_delete_rules(engine: Engine, snapshot: str, spawn, fork, tags: list[str]) -> None:
    (child,) = spawn(1)
    child.run_code("WHO='c'", timeout=T)
    a = branch(engine, tags, child, "del-a", "delta").snapshot.tag  # a -> b, c   (for cascade)
    x = branch(engine, tags, child, "del-x", "delta").snapshot.tag  # x -> y      (for force)
    child.kill()
    (g,) = fork(a, 1)
    b = branch(engine, tags, g, "del-b", "delta").snapshot.tag
    c = branch(engine, tags, g, "del-c", "flat").snapshot.tag
    g.kill()
    (gx,) = fork(x, 1)
    gx.run_code("WHO='y'", timeout=T)
    y = branch(engine, tags, gx, "del-y", "flat").snapshot.tag
    gx.kill()
    assert engine.chain_info(a)["dependents"] == sorted([b, c])

    # dependents: refused (409 in the API), naming them
    with pytest.raises(DependentsError) as ei:
        engine.delete_snapshot(a)
    assert b in str(ei.value) and c in str(ei.value) and "cascade" in str(ei.value)
    # cascade and force together: refused
    with pytest.raises(ValidationError, match="cascade and force"):
        engine.delete_snapshot(a, cascade=True, force=True)
    assert all(engine.store.exists(t) for t in (a, b, c, x, y))

    # force: only x goes; y (flat, a base of its own) is orphaned and still forks
    assert engine.delete_snapshot(x, force=True) == [x]
    assert not engine.store.exists(x) and engine.store.exists(y)
    assert engine.store.open(y).meta.parent == x
    (gy,) = fork(y, 1)
    assert gy.eval("WHO", timeout=T)["value"] == "y"
    gy.kill()

    # cascade: the whole subtree, leaves first; the session snapshot is untouched
    deleted = engine.delete_snapshot(a, cascade=True)
    assert sorted(deleted) == sorted([a, b, c]) and deleted[-1] == a
    assert not any(engine.store.exists(t) for t in (a, b, c))
    engine.open_snapshot(snapshot)
    assert engine.delete_snapshot(y) == [y]


# ------------------------------------------------------------------------------------- (d) compaction


@pytest.mark.parametrize("mode", ["delta", "flat"])
def test_compact_then_fork(engine: Engine, snapshot: str, spawn, fork, tags: list[str], mode: str) -> None:
    (child,) = spawn(1)
    child.run_code("import os, zlib\nWHO='compact'\nDATA=os.urandom(8<<20)\nCK=zlib.crc32(DATA)", timeout=T)
    src = branch(engine, tags, child, f"cmp-{mode}", mode).snapshot
    child.kill()
    to = new_tag(f"cmpd-{mode}")
    tags.append(to)
    comp = engine.compact(src.tag, to)
    m = comp.meta
    assert (m.tag, m.parent, m.kind, m.memory_source, m.depends_sha256) == (to, None, "root", None, None)
    assert m.branch == {"compacted_from": src.tag}
    assert (comp.path / MEMORY_NAME).is_file() and comp.memory == comp.path / MEMORY_NAME
    assert qstream.parse_root(comp.vmstate.read_bytes()).ram_pages == []  # no guest RAM in the vmstate
    assert engine.chain_info(to)["depth"] == 0 and engine.chain_info(src.tag)["dependents"] == []
    assert_no_ram_discarding_devices(comp)

    # it stands alone: delete its source, then fork it
    engine.delete_snapshot(src.tag)
    (g,) = fork(to, 1)
    assert g.eval("(WHO, zlib.crc32(DATA) == CK, len(DATA))", timeout=T)["value"] == ["compact", True, 8 << 20]


# ---------------------------------------------------------------------------- (e) root pool serves deltas


def test_root_pool_serves_delta_branches(engine: Engine, snapshot: str, spawn, fork, tags: list[str]) -> None:
    (child,) = spawn(1)
    child.run_code("import os, zlib\nWHO='pooled'\nDATA=os.urandom(4<<20)\nCK=zlib.crc32(DATA)", timeout=T)
    delta = branch(engine, tags, child, "pool-d", "delta").snapshot.tag
    flat = branch(engine, tags, child, "pool-f", "flat").snapshot.tag
    child.kill()
    try:
        pool = engine.start_pool(snapshot, 2, warm=False)  # a warm pool has the root's own state loaded
        assert pool.wait_full(timeout=600), pool.stats()
        kids = fork(delta, 2, concurrency=2)
        assert [k.from_pool for k in kids] == [True, True]
        for k in kids:
            assert k.eval("(WHO, zlib.crc32(DATA) == CK)", timeout=T)["value"] == ["pooled", True]
        # a flat branch has a memory.bin of its own: the root's pool cannot serve it
        (kf,) = fork(flat, 1)
        assert not kf.from_pool
        assert kf.eval("(WHO, zlib.crc32(DATA) == CK)", timeout=T)["value"] == ["pooled", True]
        # a warm pool (the default) has the root's own state loaded: a delta is then restored cold, correctly
        engine.close_pools()
        assert engine.start_pool(snapshot, 1).wait_full(timeout=600)
        (kw,) = fork(delta, 1)
        assert not kw.from_pool
        assert kw.eval("(WHO, zlib.crc32(DATA) == CK)", timeout=T)["value"] == ["pooled", True]
    finally:
        engine.close_pools()


# ------------------------------------------------------------------------ (f) a child that dies mid-branch


def test_branch_of_a_killed_sandbox(engine: Engine, spawn) -> None:
    (child,) = spawn(1)
    os.kill(child.pid, signal.SIGKILL)
    child.vm.popen.wait(timeout=60)
    tag = new_tag("dead")
    with pytest.raises((SnapshotError, VMError)) as ei:
        engine.branch(child, tag, mode="delta")
    msg = str(ei.value)
    assert child.id in msg and ("not running" in msg or "exited" in msg) and "signal 9" in msg, msg
    no_leftovers(engine, tag)


def sigkill_and_wait_zombie(pid: int, timeout: float = 60.0) -> None:
    """SIGKILL ``pid`` and wait until it is a zombie, without reaping it (as when a VM dies on its own:
    nobody waits for it while a branch runs)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(r"^State:\s+Z", Path(f"/proc/{pid}/status").read_text(), re.M):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die after SIGKILL")


@pytest.mark.parametrize("mode", ["delta", "flat"])
@pytest.mark.parametrize("after", ["stop", "xen-save-devices-state"])
def test_sandbox_killed_mid_branch(engine: Engine, spawn, monkeypatch: pytest.MonkeyPatch, after: str,
                                   mode: str) -> None:
    """SIGKILL the child's QEMU inside the pause: once it has answered ``stop`` (before its devices are
    saved), or once it has saved its devices (before its pages are read)."""
    (child,) = spawn(1)
    child.run_code("import os\nWHO='doomed'\nD=bytearray(os.urandom(4<<20))", timeout=T)
    qmp = child.vm.qmp
    execute = qmp.execute
    seen: list[str] = []

    def execute_then_die(command: str, *args: Any, **kw: Any) -> Any:
        seen.append(command)
        out = execute(command, *args, **kw)
        if command == after:
            sigkill_and_wait_zombie(child.pid)
        return out

    monkeypatch.setattr(qmp, "execute", execute_then_die)
    tag = new_tag(f"midway-{mode}")
    with pytest.raises(SnapshotError) as ei:
        engine.branch(child, tag, mode=mode)
    msg = str(ei.value)
    assert after in seen and seen[0] == "stop", seen
    assert child.id in msg and "killed by signal 9" in msg and "no snapshot was written" in msg, msg
    no_leftovers(engine, tag)


def test_branch_refuses_an_existing_tag_and_a_bad_mode(engine: Engine, snapshot: str, spawn) -> None:
    before = engine.store.open(snapshot).meta.files
    (child,) = spawn(1)
    with pytest.raises(SnapshotExistsError, match=snapshot):
        engine.branch(child, snapshot, mode="delta")
    tag = new_tag("badmode")
    with pytest.raises(ValidationError, match="mode"):
        engine.branch(child, tag, mode="sideways")
    no_leftovers(engine, tag)
    assert engine.store.open(snapshot).meta.files == before
    assert child.vm.qmp.execute("query-status", timeout=30)["status"] == "running"
    assert child.eval("1 + 1", timeout=T)["value"] == 2
    engine.open_snapshot(snapshot)


# -------------------------------------------------------------------------------------- (g) pack a chain


def test_pack_of_a_chain_unpacks_into_a_fresh_root_and_forks(engine: Engine, snapshot: str, spawn, fork,
                                                             tags: list[str], tmp_path: Path) -> None:
    from forkd.engine.pack import pack, unpack, unpack_chain

    (child,) = spawn(1)
    child.run_code("import os, zlib\nWHO='packed'\nDATA=os.urandom(4<<20)\nCK=zlib.crc32(DATA)", timeout=T)
    delta = branch(engine, tags, child, "pack-d", "delta").snapshot
    child.kill()

    out = tmp_path / "chain.tar.zst"
    res = pack(engine.store, delta.tag, out)
    assert res["chain"] == [snapshot, delta.tag]
    paths = {f["path"] for f in res["files"]}
    assert {f"{snapshot}/{n}" for n in (META_NAME, VMSTATE_NAME, MEMORY_NAME)} <= paths
    assert {f"{delta.tag}/{META_NAME}", f"{delta.tag}/{VMSTATE_NAME}"} <= paths

    eng = Engine(snapshot_root=tmp_path / "root", run_dir=tmp_path / "run")
    try:
        warnings: list[str] = []
        assert unpack(eng.store, out, warn=warnings.append) == [snapshot, delta.tag]
        assert warnings == []
        assert eng.store.open(snapshot).meta.files == engine.store.open(snapshot).meta.files
        assert eng.store.open(delta.tag).meta.files == delta.meta.files
        assert eng.chain_info(delta.tag)["ancestors"] == [snapshot]
        (g,) = fork(delta.tag, 1, eng=eng)
        assert g.eval("(WHO, zlib.crc32(DATA) == CK)", timeout=T)["value"] == ["packed", True]
        assert str(tmp_path / "root") in Path(f"/proc/{g.pid}/cmdline").read_bytes().decode(errors="replace")
        again = unpack_chain(eng.store, out)  # the same chain again: every link is already there
        assert (again.tags, again.registered, again.reused) == ([snapshot, delta.tag], [], [snapshot, delta.tag])
    finally:
        eng.close()


# ------------------------------------------------------------------- (h) no RAM-discarding device anywhere


def test_no_snapshot_has_a_ram_discarding_device(engine: Engine, snapshot: str) -> None:
    snaps = [s for _t, s, _e in engine.store.list() if s is not None]
    assert snapshot in {s.tag for s in snaps}
    for s in snaps:
        assert_no_ram_discarding_devices(s)


# ------------------------------------------------------------- (c') an orphaned delta can still be deleted


def test_a_delta_orphaned_by_force_can_be_deleted(engine: Engine, spawn, fork, tags: list[str]) -> None:
    """``force`` deletes a flat branch that a delta branch maps the memory.bin of: the delta no longer
    restores (a clear error), and deleting it must still work (it is what is left to do with it)."""
    (child,) = spawn(1)
    flat = branch(engine, tags, child, "orph-f", "flat").snapshot.tag
    child.kill()
    (g,) = fork(flat, 1)
    delta = branch(engine, tags, g, "orph-d", "delta").snapshot
    g.kill()
    assert delta.meta.memory_source == flat
    assert engine.delete_snapshot(flat, force=True) == [flat]
    with pytest.raises(SnapshotInvalidError, match=f"depends on snapshot {flat}"):
        engine.open_snapshot(delta.tag)
    with pytest.raises(SnapshotInvalidError, match="memory.bin is missing"):  # before any QEMU starts
        engine.spawn(delta.tag, 1, timeout=T)
    assert engine.delete_snapshot(delta.tag) == [delta.tag]
    assert not engine.store.exists(delta.tag)


# --------------------------------------------------------------- two branches of one sandbox at once


def test_two_branches_of_one_sandbox_at_once_each_capture_a_stopped_vm(engine: Engine, spawn, fork,
                                                                       tags: list[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two branches of the same sandbox (the daemon runs up to 4 at once, with different tags). Whatever
    the engine does (serialize them, or refuse one), neither may save devices or read pages from a
    running VM: here branch B is held inside its pause until branch A has sent its ``cont``."""
    (child,) = spawn(1)
    child.run_code("import os, zlib\nWHO='twice'\nDATA=os.urandom(4<<20)\nCK=zlib.crc32(DATA)", timeout=T)
    qmp = child.vm.qmp
    execute = qmp.execute
    both_stopped = threading.Barrier(2, timeout=10)
    a_resumed = threading.Event()
    saved_while: list[tuple[str, str]] = []

    def execute_interleaved(command: str, *args: Any, **kw: Any) -> Any:
        me = threading.current_thread().name
        if command == "xen-save-devices-state":
            saved_while.append((me, execute("query-status", timeout=30)["status"]))
        out = execute(command, *args, **kw)
        if command == "stop":
            with contextlib.suppress(threading.BrokenBarrierError):
                both_stopped.wait()  # both inside a pause at once, if the engine lets them
            if me == "B":
                a_resumed.wait(timeout=60)
        elif command == "cont" and me == "A":
            a_resumed.set()
        return out

    monkeypatch.setattr(qmp, "execute", execute_interleaved)
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        tag = new_tag(f"twice-{name}")
        tags.append(tag)
        try:
            results[name] = engine.branch(child, tag, mode="delta")
        except ForkdError as e:  # refusing the second branch with a clear error is fine too
            results[name] = e

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("A", "B")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=600)
    monkeypatch.undo()
    assert child.vm.qmp.execute("query-status", timeout=30)["status"] == "running"
    assert saved_while and all(status == "paused" for _, status in saved_while), \
        f"device state saved from a running VM: {saved_while}"
    for name, res in results.items():
        if isinstance(res, ForkdError):
            continue
        (g,) = fork(res.snapshot.tag, 1)
        assert g.eval("(WHO, zlib.crc32(DATA) == CK)", timeout=T)["value"] == ["twice", True], name
