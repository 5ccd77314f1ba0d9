"""Workspaces: a sandbox under a name that can be suspended to disk and resumed later.

A suspend is a BRANCH of the workspace's sandbox (memory, devices, writable disk layer) to a snapshot
``ws-<name>-<n>``, then a kill; a resume spawns one sandbox from that snapshot with the options the
workspace was created with. The registry is ``workspaces.json`` beside the daemon's ``state.json``,
rewritten atomically (temp file, fsync, rename) on every change.

Chains: a branch of a sandbox restored from a delta is again a delta of the same memory owner, so the
previous state is usually not needed by the new one: it is deleted and the new one re-parented onto
its predecessor's parent. A state that another one maps (a flat one under a delta) is kept. When the
workspace's own links grow deeper than ``max_depth``, the state is compacted into a flat, parentless
copy and the old links go.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forkd.daemon.service import Conflict, NotFound
from forkd.errors import DependentsError, ForkdError, SnapshotInvalidError, SnapshotNotFoundError, ValidationError
from forkd.fsutil import atomic_write_json, read_versioned_json
from forkd.limits import MAX_METADATA

if TYPE_CHECKING:
    from forkd.daemon.service import Controller

log = logging.getLogger("forkd.controller")

VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: the label every workspace sandbox carries (its workspace's name)
LABEL = "forkd.workspace"
#: default --workspace-max-depth: links of its own a workspace's state may sit on before compaction
DEFAULT_MAX_DEPTH = 4
#: the BRANCH mode of a suspend (--workspace-mode). delta: the state is the dirty pages only (its size
#: follows the dirty memory) and maps the base snapshot's memory file, which a workspace keeps anyway;
#: flat would copy the base's memory file into every state; auto: delta up to 32 MiB, flat above
MODES = ("delta", "auto", "flat")
DEFAULT_MODE = "delta"
#: how often idle workspaces are looked for, seconds
IDLE_INTERVAL_S = 1.0
#: newer activity than the record's by this many seconds is written to workspaces.json
LAST_ACTIVE_SAVE_S = 5.0
#: seconds allowed for a resume's restore
RESUME_TIMEOUT_S = 300.0


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationError(f"workspace name must match ^[A-Za-z0-9_-]{{1,64}}$ (letters, digits, '_' and '-', "
                              f"1-64 characters); got {name!r}")
    return name


def state_tag_for(name: str, n: int) -> str:
    """The tag of a workspace's ``n``-th state: ``ws-<name>-<n>``, or with a long name its first 40
    characters and a hash of it (a tag is at most 64 characters too)."""
    tag = f"ws-{name}-{n}"
    if len(tag) <= 64:
        return tag
    return f"ws-{name[:40]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}-{n}"


class WorkspaceNotFound(NotFound):
    pass


class WorkspaceConflict(Conflict):
    pass


class Registry:
    """``workspaces.json``: the records by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        ws = read_versioned_json(self.path, VERSION, "workspaces").get("workspaces", {})
        return {k: v for k, v in ws.items() if isinstance(v, dict) and isinstance(k, str) and NAME_RE.fullmatch(k)}

    def save(self, records: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"version": VERSION, "workspaces": records}, mode=0o600)


class Workspaces:
    """The workspaces of one controller: create, suspend, resume, delete, the idle check."""

    def __init__(self, ctl: Controller, registry: Registry, max_depth: int = DEFAULT_MAX_DEPTH,
                 idle_suspend_s: float | None = None, mode: str = DEFAULT_MODE) -> None:
        if max_depth < 1:
            raise ValidationError(f"workspace max depth must be >= 1; got {max_depth}")
        if mode not in MODES:
            raise ValidationError(f"workspace branch mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.ctl = ctl
        self.registry = registry
        self.max_depth = max_depth
        self.default_idle_suspend_s = idle_suspend_s
        self._records: dict[str, dict[str, Any]] = registry.load()
        self._lock = threading.RLock()  # the records
        self._name_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- helpers
    def _save(self) -> None:
        with self._lock:
            self.registry.save(self._records)

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def _record(self, name: str) -> dict[str, Any]:
        validate_name(name)
        with self._lock:
            rec = self._records.get(name)
        if rec is None:
            raise WorkspaceNotFound(f"workspace {name} not found")
        return rec

    def _sandbox_alive(self, sid: str | None) -> bool:
        if not sid:
            return False
        try:
            sb = self.ctl.get(sid)
        except ForkdError:
            return False
        return sb.child.vm.exit_status() is None

    def status(self, rec: dict[str, Any]) -> str:
        if rec.get("sandbox_id"):
            return "running" if self._sandbox_alive(rec["sandbox_id"]) else "stale"
        return "suspended"

    def last_active(self, rec: dict[str, Any]) -> float:
        sid = rec.get("sandbox_id")
        seen = self.ctl.last_active.get(sid, 0.0) if sid else 0.0
        return max(float(rec.get("last_active") or 0.0), seen)

    def _idle_s(self, rec: dict[str, Any]) -> float | None:
        v = rec.get("options", {}).get("idle_suspend_s")
        return float(v) if isinstance(v, (int, float)) else self.default_idle_suspend_s

    def _state_bytes(self, rec: dict[str, Any]) -> int:
        total = 0
        for tag in self._needed(rec):
            with contextlib.suppress(ForkdError, OSError, KeyError):
                total += int(self.ctl.engine.chain_info(tag)["physical_bytes"])
        return total

    def _depth(self, rec: dict[str, Any]) -> int:
        """Links of the workspace's own under (and including) its state."""
        state = rec.get("state_tag")
        if not state:
            return 0
        from forkd.engine import chain

        try:
            anc = chain.ancestors(self.ctl.engine.store, state)
        except ForkdError:
            return 1
        links = set(rec.get("links") or [])
        return 1 + sum(1 for t in anc if t in links)

    def _needed(self, rec: dict[str, Any]) -> list[str]:
        """The workspace's links its state needs: the state and the memory owners it maps."""
        out: list[str] = []
        tag = rec.get("state_tag")
        links = set(rec.get("links") or [])
        store = self.ctl.engine.store
        while tag and tag in links and tag not in out:
            out.append(tag)
            try:
                snap = store.open(tag)
            except ForkdError:
                break
            tag = snap.meta.memory_source if snap.meta.kind == "delta" else None
            if snap.meta.disk:  # every disk layer of the chain is needed
                with contextlib.suppress(ForkdError):
                    from forkd.engine import chain
                    out += [t for t in chain.ancestors(store, rec["state_tag"]) if t in links and t not in out]
                break
        return out

    def info(self, rec: dict[str, Any]) -> dict[str, Any]:
        status = self.status(rec)
        return {"name": rec["name"], "snapshot_tag": rec["snapshot_tag"], "state_tag": rec.get("state_tag"),
                "sandbox_id": rec.get("sandbox_id") if status == "running" else None,
                "status": status, "options": dict(rec.get("options") or {}),
                "created_at": float(rec.get("created_at") or 0.0), "last_active": self.last_active(rec),
                "suspended_at": rec.get("suspended_at"), "state_bytes": self._state_bytes(rec),
                "depth": self._depth(rec), "links": list(rec.get("links") or []),
                "suspends": int(rec.get("suspends") or 0), "last_suspend": rec.get("last_suspend")}

    # -- the API
    def list_all(self) -> list[dict[str, Any]]:
        with self._lock:
            recs = [dict(r) for _, r in sorted(self._records.items())]
        return [self.info(r) for r in recs]

    def get(self, name: str) -> dict[str, Any]:
        return self.info(self._record(name))

    def sandbox_of(self, name: str) -> tuple[str | None, str | None]:
        """(status, sandbox id) of workspace ``name`` from its record alone (cheap; (None, None): none)."""
        with self._lock:
            rec = self._records.get(name)
        if rec is None:
            return None, None
        return self.status(rec), rec.get("sandbox_id")

    def adopt(self, name: str, sid: str) -> dict[str, Any]:
        """Make the running sandbox ``sid`` (not made as a workspace) workspace ``name``, with its options:
        its network, memory limit, labels and lifetime (as it was given at its spawn)."""
        validate_name(name)
        sb = self.ctl.get(sid)
        with self._name_lock(name):
            with self._lock:
                if name in self._records:
                    raise WorkspaceConflict(f"workspace {name} already exists")
            lifetime = None if sb.expires_at is None else max(1.0, sb.expires_at - sb.created_at)
            meta = {k: v for k, v in sb.metadata.items() if k != LABEL}
            options = {"network": sb.network, "memory_limit_mib": sb.memory_limit_mib, "lifetime_s": lifetime,
                       "metadata": meta, "idle_suspend_s": None}
            now = time.time()
            rec: dict[str, Any] = {"name": name, "snapshot_tag": sb.child.snapshot, "state_tag": None,
                                   "sandbox_id": sid, "options": options, "created_at": now,
                                   "last_active": self.ctl.last_active.get(sid, now), "suspended_at": None,
                                   "links": [], "seq": 0, "suspends": 0, "last_suspend": None}
            with self._lock:
                self._records[name] = rec
                self._save()
            return self.info(rec)

    def create(self, name: str, snapshot_tag: str, network: str = "internet", memory_limit_mib: int | None = None,
               lifetime_s: float | None = None, metadata: dict[str, str] | None = None,
               idle_suspend_s: float | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
        validate_name(name)
        meta = dict(metadata or {})
        if LABEL in meta:
            raise ValidationError(f"metadata: {LABEL!r} is set by the daemon (the workspace's name)")
        if len(meta) >= MAX_METADATA:
            raise ValidationError(f"metadata: a workspace takes at most {MAX_METADATA - 1} labels (one is {LABEL})")
        with self._name_lock(name):
            with self._lock:
                if name in self._records:
                    raise WorkspaceConflict(f"workspace {name} already exists")
            options = {"network": network, "memory_limit_mib": memory_limit_mib, "lifetime_s": lifetime_s,
                       "metadata": meta, "idle_suspend_s": idle_suspend_s}
            sid = self._spawn(name, snapshot_tag, options, timeout_s)
            now = time.time()
            rec: dict[str, Any] = {"name": name, "snapshot_tag": snapshot_tag, "state_tag": None, "sandbox_id": sid,
                   "options": options, "created_at": now, "last_active": now, "suspended_at": None,
                   "links": [], "seq": 0, "suspends": 0, "last_suspend": None}
            with self._lock:
                self._records[name] = rec
                self._save()
            return self.info(rec)

    def _spawn(self, name: str, tag: str, options: dict[str, Any], timeout_s: float) -> str:
        out = self.ctl.spawn(tag, 1, str(options.get("network") or "internet"), options.get("memory_limit_mib"),
                             False, timeout_s, lifetime_s=options.get("lifetime_s"),
                             metadata={**(options.get("metadata") or {}), LABEL: name})
        entry = out[0]
        if entry.get("sandbox") is None:
            raise ForkdError(f"workspace {name}: its sandbox did not start from {tag}: {entry.get('error')}")
        return str(entry["sandbox"]["id"])

    def suspend(self, name: str) -> dict[str, Any]:
        with self._name_lock(name):
            rec = self._record(name)
            status = self.status(rec)
            if status == "suspended":
                raise WorkspaceConflict(f"workspace {name} is already suspended (in {rec.get('state_tag')})")
            if status == "stale":
                raise WorkspaceConflict(f"workspace {name} is stale: its sandbox {rec.get('sandbox_id')} is gone; "
                                        "resume it (from its last state) first")
            sid = str(rec["sandbox_id"])
            seq = int(rec.get("seq") or 0) + 1
            while self.ctl.engine.store.exists(state_tag_for(name, seq)):
                seq += 1
            tag = state_tag_for(name, seq)
            with self._lock:  # recorded before it exists: a crash in between leaves no snapshot unknown
                rec["seq"] = seq
                rec["links"] = [*(rec.get("links") or []), tag]
                self._save()
            try:
                res, _ = self.ctl.branch(sid, tag, self.mode, wait=True)
            except BaseException:
                with self._lock:
                    if not self.ctl.engine.store.exists(tag):
                        rec["links"] = [t for t in rec["links"] if t != tag]
                    self._save()
                raise
            with contextlib.suppress(ForkdError):
                self.ctl.delete(sid)
            previous = rec.get("state_tag")
            with self._lock:
                rec.update(state_tag=tag, sandbox_id=None, suspended_at=time.time(),
                           last_active=max(float(rec.get("last_active") or 0), self.ctl.last_active.get(sid, 0.0)),
                           suspends=int(rec.get("suspends") or 0) + 1,
                           last_suspend={k: res.get(k) for k in ("mode", "pause_ms", "total_ms", "dirty_bytes",
                                                                 "bytes_written")})
                self._save()
            self.ctl.last_active.pop(sid, None)
            log.info("workspace %s suspended into %s (previous %s)", name, tag, previous)
            self._collect(rec)
            if self._depth(rec) > self.max_depth:
                self._compact(rec)
            return self.info(rec)

    def resume(self, name: str, timeout_s: float = RESUME_TIMEOUT_S) -> dict[str, Any]:
        with self._name_lock(name):
            rec = self._record(name)
            status = self.status(rec)
            if status == "running":
                raise WorkspaceConflict(f"workspace {name} is running (sandbox {rec['sandbox_id']})")
            if rec.get("sandbox_id"):  # stale: an exited VM the controller still lists goes first
                with contextlib.suppress(ForkdError):
                    self.ctl.delete(str(rec["sandbox_id"]))
            source = rec.get("state_tag") or rec["snapshot_tag"]
            sid = self._spawn(name, source, rec.get("options") or {}, timeout_s)
            with self._lock:
                rec.update(sandbox_id=sid, last_active=time.time())
                self._save()
            self._collect(rec)  # a stale one's sandbox may have held a link
            return self.info(rec)

    def delete(self, name: str) -> list[str]:
        """Kill the workspace's sandbox and delete its states; returns the tags deleted."""
        with self._name_lock(name):
            rec = self._record(name)
            sid = rec.get("sandbox_id")
            if sid:
                with contextlib.suppress(ForkdError):
                    self.ctl.delete(str(sid))
            with self._lock:
                self._records.pop(name, None)
                self._save()
            deleted: list[str] = []
            for tag in reversed(rec.get("links") or []):
                if not self.ctl.engine.store.exists(tag):
                    continue
                try:
                    deleted += self.ctl.delete_snapshot(tag)
                except (DependentsError, ForkdError) as e:
                    log.warning("workspace %s: keeping %s: %s", name, tag, e)
            self.ctl.last_active.pop(str(sid), None)
            return deleted

    # -- chains
    def _collect(self, rec: dict[str, Any]) -> None:
        """Delete the workspace's links its state no longer needs (newest first), re-parenting their
        dependents onto their parent; a link a live sandbox or another snapshot still needs stays."""
        from forkd.engine import chain

        store = self.ctl.engine.store
        needed = set(self._needed(rec))
        running = rec.get("sandbox_id")
        in_use = set()
        if running:
            with contextlib.suppress(ForkdError):
                in_use.add(self.ctl.get(str(running)).child.snapshot)
        for tag in reversed(list(rec.get("links") or [])):
            if tag in needed or tag in in_use:
                continue
            if not store.exists(tag):
                self._drop_link(rec, tag)
                continue
            if self.ctl.users_of(tag):
                continue
            try:
                snap = store.open(tag)
                deps = chain.dependents(store, tag)
                if not all(self._reparentable(d, tag) for d in deps):
                    continue
                for d in deps:
                    self._reparent(d, snap.meta.parent)
                self.ctl.delete_snapshot(tag)
            except ForkdError as e:
                log.warning("workspace %s: could not delete %s: %s", rec["name"], tag, e)
                continue
            self._drop_link(rec, tag)

    def _drop_link(self, rec: dict[str, Any], tag: str) -> None:
        with self._lock:
            rec["links"] = [t for t in rec.get("links") or [] if t != tag]
            self._save()

    def _reparentable(self, dep: str, tag: str) -> bool:
        """Whether ``dep`` restores without ``tag``'s files (it maps another memory file, no disk layers)."""
        try:
            d = self.ctl.engine.store.open(dep).meta
        except ForkdError:
            return False
        return not d.disk and not (d.kind == "delta" and d.memory_source == tag)

    def _reparent(self, dep: str, parent: str | None) -> None:
        from forkd.engine.snapshot import META_NAME

        path = self.ctl.engine.store.path(dep) / META_NAME
        d = json.loads(path.read_text())
        d["parent"] = parent
        atomic_write_json(path, d, mode=0o600)

    def _compact(self, rec: dict[str, Any]) -> None:
        """Replace the state by a flat, parentless copy, then collect the old links."""
        state = str(rec["state_tag"])
        seq = int(rec.get("seq") or 0) + 1
        while self.ctl.engine.store.exists(state_tag_for(rec["name"], seq)):
            seq += 1
        to = state_tag_for(rec["name"], seq)
        with self._lock:
            rec["seq"] = seq
            rec["links"] = [*(rec.get("links") or []), to]
            self._save()
        try:
            self.ctl.compact(state, to)
        except (ValidationError, SnapshotInvalidError, SnapshotNotFoundError, OSError) as e:
            log.warning("workspace %s: not compacting %s: %s", rec["name"], state, e)
            if not self.ctl.engine.store.exists(to):
                self._drop_link(rec, to)
            return
        with self._lock:
            rec["state_tag"] = to
            self._save()
        log.info("workspace %s: compacted %s into %s", rec["name"], state, to)
        self._collect(rec)

    # -- idle
    def start_idle_check(self) -> None:
        def loop() -> None:
            while not self._stop.wait(IDLE_INTERVAL_S):
                try:
                    self.suspend_idle()
                except Exception:  # never let the thread die
                    log.exception("suspending idle workspaces failed")
        self._thread = threading.Thread(target=loop, name="forkd-workspace-idle", daemon=True)
        self._thread.start()

    def suspend_idle(self, now: float | None = None) -> list[str]:
        """Suspend every running workspace idle for longer than its ``idle_suspend_s``."""
        now = time.time() if now is None else now
        with self._lock:
            recs = list(self._records.values())
        done = []
        changed = False
        for rec in recs:  # activity is kept in memory; written here (at most every few seconds) for restarts
            seen = self.last_active(rec)
            if seen - float(rec.get("last_active") or 0.0) >= LAST_ACTIVE_SAVE_S:
                with self._lock:
                    rec["last_active"] = seen
                changed = True
        if changed:
            self._save()
        for rec in recs:
            idle = self._idle_s(rec)
            if idle is None or not rec.get("sandbox_id") or now - self.last_active(rec) < idle:
                continue
            if self.status(rec) != "running":
                continue
            try:
                self.suspend(rec["name"])
                done.append(rec["name"])
                log.info("workspace %s suspended after %.0f s idle", rec["name"], idle)
            except (WorkspaceNotFound, WorkspaceConflict):
                continue
            except ForkdError as e:
                log.warning("workspace %s: idle suspend failed: %s", rec["name"], e)
        return done

    def stop(self) -> None:
        self._stop.set()
