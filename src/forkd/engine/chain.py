"""Snapshot chains: ancestry, dependents, deletion rules and compaction into a flat, parentless copy."""

from __future__ import annotations

import os
import time
from typing import Any

from forkd.engine import qstream
from forkd.engine.branch import reflink_or_copy
from forkd.engine.snapshot import MEMORY_NAME, VMSTATE_NAME, Snapshot, SnapshotMeta, SnapshotStore
from forkd.errors import DependentsError, SnapshotInvalidError, SnapshotNotFoundError, ValidationError
from forkd.fsutil import allocated_bytes

MAX_DEPTH = 64


def ancestors(store: SnapshotStore, tag: str) -> list[str]:
    """Tags of ``tag``'s ancestors, root first (not including ``tag``)."""
    out: list[str] = []
    cur = store.open(tag).meta.parent
    seen = {tag}
    while cur:
        if cur in seen or len(out) >= MAX_DEPTH:
            raise SnapshotInvalidError(f"snapshot {tag}: its chain of parents loops or is deeper than {MAX_DEPTH}")
        seen.add(cur)
        out.append(cur)
        try:
            cur = store.open(cur).meta.parent
        except ForkdLookupErrors:
            out.pop()  # a parent deleted with force: the chain stops before it
            break
    return list(reversed(out))


def dependents(store: SnapshotStore, tag: str) -> list[str]:
    """Snapshots whose parent is ``tag`` (direct children in the chain)."""
    return sorted(t for t, snap, _err in store.list() if snap is not None and snap.meta.parent == tag)


def subtree(store: SnapshotStore, tag: str) -> list[str]:
    """``tag`` and everything below it, leaves first."""
    out: list[str] = []
    for d in dependents(store, tag):
        out += subtree(store, d)
    return out + [tag]


def info(store: SnapshotStore, tag: str) -> dict[str, Any]:
    snap = store.open(tag)
    anc = ancestors(store, tag)
    own = [snap.path / n for n in (MEMORY_NAME, VMSTATE_NAME) if (snap.path / n).exists()]
    return {"depth": len(anc), "ancestors": anc, "dependents": dependents(store, tag),
            "logical_bytes": (snap.meta.spec.memory_mib << 20) + snap.meta.files[VMSTATE_NAME]["size"],
            "physical_bytes": sum(allocated_bytes(p) for p in own)}


def delete(store: SnapshotStore, tag: str, *, cascade: bool = False, force: bool = False) -> list[str]:
    """Delete ``tag``. With dependents: refused unless ``cascade`` (delete the subtree) or ``force``
    (delete only this one; its dependents are orphaned and a delta among them no longer restores).
    Returns the tags deleted."""
    if cascade and force:
        raise ValidationError("cascade and force cannot be used together")
    if not store.path(tag).is_dir():  # not store.open: a broken or orphaned snapshot must stay deletable
        raise SnapshotNotFoundError(f"snapshot {tag} not found in {store.root}")
    deps = dependents(store, tag)
    if deps and not (cascade or force):
        raise DependentsError(f"snapshot {tag} has {len(deps)} dependent snapshot(s): {', '.join(deps)}; "
                              "delete with cascade=true (the whole subtree) or force=true (orphan them)")
    victims = subtree(store, tag) if cascade else [tag]
    for t in victims:
        store.delete(t)
    return victims


def compact(store: SnapshotStore, tag: str, to: str) -> Snapshot:
    """Write ``to``: a flat, parentless copy of ``tag`` (its own memory.bin, a root-like vmstate)."""
    if to == tag:
        raise ValidationError("to must differ from the snapshot being compacted")
    src = store.open(tag)
    if src.meta.disk:
        raise ValidationError(f"snapshot {tag} has a root disk: compacting image-based snapshots is not "
                              "supported yet (its disk layers would have to be merged too)")
    src.check_files()
    parsed = qstream.parse(src.vmstate.read_bytes())
    staging = store.stage(to)
    ok = False
    try:
        mem = staging / MEMORY_NAME
        reflink_or_copy(src.memory, mem, src.meta.spec.memory_mib << 20)
        if parsed.ram_pages:
            data = src.vmstate.read_bytes()
            fd = os.open(mem, os.O_WRONLY | os.O_CLOEXEC)
            try:
                zero = bytes(qstream.PAGE)
                for offset, kind, pos in parsed.ram_pages:
                    page = zero if kind == qstream.F_ZERO else data[pos:pos + qstream.PAGE]
                    os.pwrite(fd, page, offset)
            finally:
                os.close(fd)
        (staging / VMSTATE_NAME).write_bytes(qstream.splice(parsed, parsed.devices))
        m = src.meta
        meta = SnapshotMeta(tag=to, created_at=time.time(), spec=m.spec, qemu=m.qemu, accel_reason=m.accel_reason,
                            host_cpu=m.host_cpu, image=m.image, guest=m.guest, files={}, parent=None, kind="root",
                            branch={"compacted_from": tag})
        snap = store.publish(staging, meta)
        ok = True
        return snap
    finally:
        if not ok:
            store.discard(staging)


ForkdLookupErrors = (SnapshotInvalidError, SnapshotNotFoundError)
