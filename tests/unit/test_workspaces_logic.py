"""The workspace service over a fake controller (no VM): statuses, conflicts, chains, idle, restarts."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from forkd.daemon.service import Conflict, NotFound
from forkd.daemon.workspaces import LABEL, Registry, Workspaces
from forkd.errors import SnapshotNotFoundError, ValidationError


@dataclass
class Meta:
    parent: str | None
    kind: str = "root"
    memory_source: str | None = None
    disk: dict[str, Any] = field(default_factory=dict)


class FakeStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.snaps: dict[str, Meta] = {}

    def add(self, tag: str, meta: Meta) -> None:
        self.snaps[tag] = meta
        (self.root / tag).mkdir(parents=True, exist_ok=True)
        (self.root / tag / "snapshot.json").write_text(json.dumps({"tag": tag, "parent": meta.parent}))

    def exists(self, tag: str) -> bool:
        return tag in self.snaps

    def path(self, tag: str) -> Path:
        return self.root / tag

    def open(self, tag: str) -> Any:
        if tag not in self.snaps:
            raise SnapshotNotFoundError(tag)
        meta = self.snaps[tag]
        meta.parent = json.loads((self.root / tag / "snapshot.json").read_text())["parent"]  # as re-parented
        return SimpleNamespace(tag=tag, meta=meta)

    def list(self) -> list[tuple[str, Any, None]]:
        return [(t, self.open(t), None) for t in sorted(self.snaps)]


class FakeCtl:
    """What Workspaces uses of the Controller; a branch is a delta of the root (what a resumed delta's
    branch is)."""

    def __init__(self, root: Path, mode_kind: str = "delta") -> None:
        self.store = FakeStore(root)
        self.store.add("base", Meta(parent=None))
        self.engine = SimpleNamespace(store=self.store, chain_info=lambda t: {"physical_bytes": 1000})
        self.sandboxes: dict[str, dict[str, Any]] = {}  # sid -> {"snapshot", "alive", "metadata"}
        self.last_active: dict[str, float] = {}
        self.ids = itertools.count(1)
        self.kind = mode_kind

    def spawn(self, tag: str, n: int, network: str, memory_limit_mib: Any, per_child_netns: bool, timeout_s: float,
              lifetime_s: Any = None, metadata: Any = None) -> list[dict[str, Any]]:
        if not self.store.exists(tag):
            raise SnapshotNotFoundError(f"snapshot {tag} not found")
        sid = f"sb-{next(self.ids):016x}"
        self.sandboxes[sid] = {"snapshot": tag, "alive": True, "metadata": dict(metadata or {}), "network": network}
        return [{"index": 0, "sandbox": {"id": sid}, "error": None}]

    def get(self, sid: str) -> Any:
        if sid not in self.sandboxes:
            raise NotFound(f"sandbox {sid} not found")
        sb = self.sandboxes[sid]
        return SimpleNamespace(child=SimpleNamespace(snapshot=sb["snapshot"], vm=SimpleNamespace(
            exit_status=lambda: None if sb["alive"] else "killed")))

    def branch(self, sid: str, tag: str, mode: str, wait: bool) -> tuple[dict[str, Any], bool]:
        source = self.sandboxes[sid]["snapshot"]
        src = self.store.open(source).meta
        owner = src.memory_source if src.kind == "delta" else source
        if self.kind == "flat":
            self.store.add(tag, Meta(parent=source, kind="flat"))
        elif self.kind == "disk":  # each disk layer sits on its parent's: nothing below may go
            self.store.add(tag, Meta(parent=source, kind="delta", memory_source=owner, disk={"layers": [tag]}))
        else:
            self.store.add(tag, Meta(parent=source, kind="delta", memory_source=owner))
        return {"tag": tag, "mode": self.kind, "dirty_bytes": 4096}, True

    def delete(self, sid: str) -> None:
        self.get(sid)
        del self.sandboxes[sid]

    def users_of(self, tag: str) -> int:
        return sum(1 for s in self.sandboxes.values() if s["snapshot"] == tag and s["alive"])

    def delete_snapshot(self, tag: str) -> list[str]:
        from forkd.engine import chain

        if chain.dependents(self.store, tag):  # type: ignore[arg-type]
            raise Conflict(f"{tag} has dependents")
        del self.store.snaps[tag]
        return [tag]

    def compact(self, tag: str, to: str) -> dict[str, Any]:
        self.store.add(to, Meta(parent=None, kind="root"))
        return {}


def make(tmp_path: Path, **kw: Any) -> tuple[Workspaces, FakeCtl]:
    ctl = FakeCtl(tmp_path / "snapshots", kw.pop("kind", "delta"))
    return Workspaces(ctl, Registry(tmp_path / "workspaces.json"), **kw), ctl  # type: ignore[arg-type]


def ws_tags(ctl: FakeCtl) -> set[str]:
    return {t for t in ctl.store.snaps if t.startswith("ws-")}


def test_lifecycle_statuses_and_conflicts(tmp_path: Path) -> None:
    ws, ctl = make(tmp_path)
    info = ws.create("w", "base", network="none", lifetime_s=60, metadata={"team": "a"})
    assert info["status"] == "running" and info["state_tag"] is None
    sid = info["sandbox_id"]
    assert ctl.sandboxes[sid]["metadata"] == {"team": "a", LABEL: "w"}
    with pytest.raises(Conflict, match="already exists"):
        ws.create("w", "base")
    with pytest.raises(Conflict, match="running"):
        ws.resume("w")
    info = ws.suspend("w")
    assert info["status"] == "suspended" and info["state_tag"] == "ws-w-1" and sid not in ctl.sandboxes
    with pytest.raises(Conflict, match="already suspended"):
        ws.suspend("w")
    info = ws.resume("w")
    assert info["status"] == "running" and info["sandbox_id"] != sid
    assert ctl.sandboxes[info["sandbox_id"]]["snapshot"] == "ws-w-1"
    assert ctl.sandboxes[info["sandbox_id"]]["network"] == "none"
    with pytest.raises(NotFound):
        ws.suspend("nope")
    with pytest.raises(ValidationError):
        ws.get("../x")
    with pytest.raises(SnapshotNotFoundError):
        ws.create("other", "missing")
    assert [w["name"] for w in ws.list_all()] == ["w"]
    ws.delete("w")
    assert ws.list_all() == [] and ws_tags(ctl) == set() and ctl.sandboxes == {}


@pytest.mark.parametrize("kind", ["delta", "flat"])
def test_repeated_suspends_leave_no_orphans_and_a_short_chain(tmp_path: Path, kind: str) -> None:
    ws, ctl = make(tmp_path, kind=kind)
    ws.create("w", "base")
    for i in range(6):
        info = ws.suspend("w")
        assert ws_tags(ctl) == set(info["links"]) == {info["state_tag"]}, i
        assert ctl.store.open(info["state_tag"]).meta.parent == "base"  # re-parented onto the base
        assert info["depth"] == 1
        ws.resume("w")
    ws.delete("w")
    assert ws_tags(ctl) == set()


def test_a_flat_state_that_a_delta_maps_is_kept_then_compacted(tmp_path: Path) -> None:
    ws, ctl = make(tmp_path, kind="flat", max_depth=2)
    ws.create("w", "base")
    ws.suspend("w")                       # ws-w-1: flat
    ws.resume("w")
    ctl.kind = "delta"
    info = ws.suspend("w")                # ws-w-2: a delta mapping ws-w-1
    assert set(info["links"]) == {"ws-w-1", "ws-w-2"} and info["depth"] == 2
    ws.resume("w")
    ctl.kind = "flat"                     # a flat on top of the delta on top of the flat: depth 3 > 2
    info = ws.suspend("w")
    assert info["depth"] <= 2 and ws_tags(ctl) == set(info["links"])


def test_a_link_someone_else_uses_is_kept(tmp_path: Path) -> None:
    ws, ctl = make(tmp_path)
    ws.create("w", "base")
    state = ws.suspend("w")["state_tag"]
    other = ctl.spawn(state, 1, "none", None, False, 1.0)[0]["sandbox"]["id"]  # a user's sandbox of it
    ws.resume("w")
    info = ws.suspend("w")
    assert state in ws_tags(ctl) and state in info["links"]
    ctl.delete(other)
    ws.resume("w")
    info = ws.suspend("w")
    assert ws_tags(ctl) == {info["state_tag"]}


def test_stale_and_restart(tmp_path: Path) -> None:
    ws, ctl = make(tmp_path)
    ws.create("w", "base")
    ws.suspend("w")
    ws.resume("w")
    sid = ws.get("w")["sandbox_id"]
    ctl.sandboxes.pop(sid)  # the VM died with the host; reconcile pruned it
    again = Workspaces(ctl, Registry(tmp_path / "workspaces.json"))  # type: ignore[arg-type]
    info = again.get("w")
    assert info["status"] == "stale" and info["sandbox_id"] is None
    with pytest.raises(Conflict, match="stale"):
        again.suspend("w")
    info = again.resume("w")
    assert info["status"] == "running" and ctl.sandboxes[info["sandbox_id"]]["snapshot"] == "ws-w-1"


def test_idle_suspend(tmp_path: Path) -> None:
    ws, ctl = make(tmp_path, idle_suspend_s=100)
    ws.create("busy", "base")
    ws.create("quiet", "base", idle_suspend_s=10)
    ws.create("never", "base")
    now = ws.get("busy")["last_active"]
    ctl.last_active[ws.get("busy")["sandbox_id"]] = now + 150
    assert ws.suspend_idle(now + 5) == []
    assert ws.suspend_idle(now + 20) == ["quiet"]
    assert sorted(ws.suspend_idle(now + 200)) == ["never"]  # busy was active at +150
    assert ws.get("quiet")["status"] == "suspended" and ws.get("busy")["status"] == "running"
    saved = json.loads((tmp_path / "workspaces.json").read_text())["workspaces"]
    assert saved["busy"]["last_active"] == now + 150  # activity is written for restarts


def test_a_chain_that_cannot_shrink_is_compacted_past_max_depth(tmp_path: Path) -> None:
    ws, ctl = make(tmp_path, kind="disk", max_depth=3)
    ws.create("w", "base")
    depths = []
    for _ in range(5):
        info = ws.suspend("w")
        depths.append(info["depth"])
        assert ws_tags(ctl) == set(info["links"])
        ws.resume("w")
    assert max(depths) <= 3 and depths[:3] == [1, 2, 3]
    assert depths[3] == 1  # the 4th went past 3: compacted into a parentless copy, the old links gone
