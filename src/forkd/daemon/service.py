"""The controller's core: owns the engine, the live sandboxes and the state file.

HTTP handlers call these methods; nothing here knows about HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkd.daemon.state import StateFile
from forkd.engine import Child, Engine
from forkd.engine.cleanup import sweep
from forkd.engine.vm import process_matches, recorded_vms
from forkd.errors import ChannelClosedError, ForkdError, SnapshotNotFoundError
from forkd.paths import validate_child_id, validate_tag

log = logging.getLogger("forkd.controller")


class NotFound(ForkdError):
    pass


class Conflict(ForkdError):
    pass


class Busy(ForkdError):
    """Too many operations of a kind in flight (503)."""


#: ended sandboxes remembered (why they ended), newest kept
MAX_ENDED = 1000
#: how often expired lifetimes are looked for, seconds
REAP_INTERVAL_S = 1.0


@dataclass
class Sandbox:
    child: Child
    network: str = "internet"
    memory_limit_mib: int | None = None
    netns: str | None = None
    ready_ms: float | None = None
    from_pool: bool = False
    created_at: float = field(default_factory=time.time)
    ports: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None  # unix time; None: lives until killed
    branch_count: int = 0

    @property
    def id(self) -> str:
        return self.child.id

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "snapshot_tag": self.child.snapshot, "pid": self.child.pid,
                "workdir": str(self.child.vm.workdir.path), "created_at": self.created_at,
                "network": self.network, "memory_limit_mib": self.memory_limit_mib, "netns": self.netns,
                "ready_ms": self.ready_ms, "from_pool": self.from_pool, "ports": self.ports,
                "metadata": self.metadata, "expires_at": self.expires_at, "branch_count": self.branch_count}

    def matches(self, metadata: dict[str, str]) -> bool:
        return all(self.metadata.get(k) == v for k, v in metadata.items())

    def info(self) -> dict[str, Any]:
        status = self.child.vm.exit_status()
        return {**self.record(), "status": "running" if status is None else "exited", "exit_reason": status,
                "created_at_unix": int(self.created_at), "guest_addr": None, "has_branched": self.branch_count > 0}


#: packs and unpacks at once (each reads or writes GiBs)
PACKS_IN_FLIGHT = 2


class Controller:
    def __init__(self, engine: Engine, state: StateFile, pool_size: int = 0,
                 default_lifetime_s: float | None = None) -> None:
        self.engine = engine
        self.state = state
        self.pool_size = pool_size
        self.default_lifetime_s = default_lifetime_s  # --sandbox-timeout; None: sandboxes live until killed
        self._sandboxes: dict[str, Sandbox] = {}
        self._ended: dict[str, dict[str, Any]] = {}  # id -> {"reason", "ended_at", "snapshot_tag"}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._lock = threading.RLock()
        self._spawn_lock = threading.Lock()
        self.branch_concurrency = 4
        self._branch_slots: threading.BoundedSemaphore | None = None
        self._pending: dict[str, dict[str, Any]] = {}  # branch tag -> {"status": "writing"|"failed", ...}
        self.spawn_observer: Any = None  # callback(seconds) per restored child, for metrics
        self._pack_slots = threading.BoundedSemaphore(PACKS_IN_FLIGHT)
        self._scratch: set[Path] = set()  # scratch directories of packs and uploads in flight
        self.last_active: dict[str, float] = {}  # sandbox id -> unix time of the last request that used it
        self.workspaces: Any = None  # forkd.daemon.workspaces.Workspaces, set by the daemon
        self.node_name = "node"  # --node-name: how GET /v1/capacity (and multi-controller sandbox ids) name it
        self.max_sandboxes: int | None = None  # --max-sandboxes; None: no limit
        self._reserved = 0  # children of spawns in flight (counted against max_sandboxes)

    # -- lifecycle
    def reconcile(self) -> dict[str, list[str]]:
        """Re-adopt recorded sandboxes whose QEMU is alive and really is theirs; prune the rest; kill
        orphans (VMs in our run dir that no record owns, e.g. pool members of a crashed daemon)."""
        recorded = self.state.load()
        self._ended = self.state.load_ended()
        adopted, pruned, orphans = [], [], []
        for sid, rec in recorded.items():
            workdir = Path(str(rec.get("workdir", "")))
            try:
                validate_child_id(sid)
                if workdir.parent != self.engine.run_dir or not process_matches(int(rec.get("pid", 0)), sid):
                    raise ForkdError("process gone")
                child = self.engine.adopt(workdir)
                child.ping(timeout=30)
            except (ForkdError, OSError, ValueError) as e:
                log.info("pruning sandbox %s: %s", sid, e)
                with contextlib.suppress(Exception):
                    if process_matches(int(rec.get("pid", 0)), sid):
                        child = self.engine.adopt(workdir)
                        child.kill()
                if workdir.parent == self.engine.run_dir:
                    shutil.rmtree(workdir, ignore_errors=True)
                pruned.append(sid)
                continue
            self._sandboxes[sid] = Sandbox(
                child=child, network=str(rec.get("network", "internet")), memory_limit_mib=rec.get("memory_limit_mib"),
                netns=rec.get("netns"), ready_ms=rec.get("ready_ms"), from_pool=bool(rec.get("from_pool")),
                ports=dict(rec.get("ports") or {}), metadata=_str_dict(rec.get("metadata")),
                expires_at=_float_or_none(rec.get("expires_at")), branch_count=int(rec.get("branch_count") or 0),
                created_at=float(rec.get("created_at", time.time())))
            adopted.append(sid)
        for r in recorded_vms(self.engine.run_dir):
            if r.alive and r.meta.get("id") not in self._sandboxes:
                with contextlib.suppress(Exception):
                    self.engine.adopt(r.workdir.path).kill()
                orphans.append(str(r.meta.get("id")))
        sweep(self.engine.run_dir, self.engine.store)
        expired = self.reap()  # lifetimes that ran out while the daemon was down
        self._save()
        return {"adopted": adopted, "pruned": pruned, "orphans_killed": orphans, "expired": expired}

    def start_reaper(self) -> None:
        """Kill sandboxes whose lifetime ran out, once a second, on a thread of its own."""
        def loop() -> None:
            while not self._stop.wait(REAP_INTERVAL_S):
                try:
                    self.reap()
                except Exception:  # never let the reaper die
                    log.exception("reaping expired sandboxes failed")
        self._reaper = threading.Thread(target=loop, name="forkd-reaper", daemon=True)
        self._reaper.start()

    def reap(self, now: float | None = None) -> list[str]:
        """Kill every sandbox whose lifetime has run out and remember why. Returns their ids."""
        now = time.time() if now is None else now
        with self._lock:
            due = [sb for sb in self._sandboxes.values() if sb.expires_at is not None and sb.expires_at <= now]
            for sb in due:
                lifetime = sb.expires_at - sb.created_at if sb.expires_at is not None else 0
                self._end(sb, f"its lifetime ran out at {_iso(sb.expires_at)} ({lifetime:.0f} s after it started)")
            if due:
                self._save()
        for sb in due:
            log.info("sandbox %s expired", sb.id)
            with contextlib.suppress(Exception):
                sb.child.kill()
        return [sb.id for sb in due]

    def _end(self, sb: Sandbox, reason: str) -> None:
        self._sandboxes.pop(sb.id, None)
        self.last_active.pop(sb.id, None)
        self._ended[sb.id] = {"reason": reason, "ended_at": time.time(), "snapshot_tag": sb.child.snapshot,
                              "metadata": sb.metadata}
        while len(self._ended) > MAX_ENDED:  # the oldest goes (state.json keeps keys sorted, not in order)
            self._ended.pop(min(self._ended, key=lambda k: float(self._ended[k].get("ended_at") or 0)))

    def shutdown(self) -> None:
        """Stop pools and let go of the sandboxes: their VMs keep running for the next start-up."""
        self._stop.set()
        self.engine.close_pools()
        with self._lock:
            for sb in self._sandboxes.values():
                sb.child.vm.disconnect()
            self._save()

    def _save(self) -> None:
        with self._lock:
            self.state.save({sid: sb.record() for sid, sb in self._sandboxes.items()}, self._ended)

    # -- snapshots
    def _describe(self, snap_summary: dict[str, Any], chain: bool) -> dict[str, Any]:
        tag = snap_summary["tag"]
        out = {**snap_summary, "status": "ready", "bootable": True, "sandboxes": self.users_of(tag),
               "created_at_unix": int(float(snap_summary.get("created_at") or 0))}
        if chain:
            out.update(self.engine.chain_info(tag))
        return out

    def snapshot_info(self, tag: str) -> dict[str, Any]:
        validate_tag(tag)
        if tag in self._pending and not self.engine.store.exists(tag):
            p = self._pending[tag]
            raise Conflict(f"snapshot {tag} is {p['status']}" + (f": {p['error']}" if p.get("error") else ""))
        return self._describe(self.engine.store.open(tag).summary(), chain=True)

    def list_snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot directory; one that cannot be restored is listed as not bootable, with why."""
        out = []
        for tag, snap, err in self.engine.store.list():
            if snap is not None:
                out.append(self._describe(snap.summary(), chain=False))
            else:
                out.append({"tag": tag, "status": "failed", "bootable": False,
                            "warning": f"snapshot is not bootable: {err}", "sandboxes": 0})
        return out

    def pending_snapshots(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"tag": t, **p} for t, p in self._pending.items() if not self.engine.store.exists(t)]

    def create_snapshot(self, tag: str, memory_mib: int, vcpus: int, warm_code: str | None,
                        boot_timeout_s: float, image: str | None = None) -> dict[str, Any]:
        snap = self.engine.create_snapshot(tag, memory_mib=memory_mib, vcpus=vcpus, warm_code=warm_code,
                                           boot_timeout=boot_timeout_s, image_name=image)
        return {**snap.summary(), "status": "ready", "sandboxes": 0}

    def delete_snapshot(self, tag: str, force: bool = False, cascade: bool = False) -> list[str]:
        from forkd.engine import chain

        validate_tag(tag)
        if not self.engine.store.exists(tag):
            raise SnapshotNotFoundError(f"snapshot {tag} not found")
        victims = chain.subtree(self.engine.store, tag) if cascade else [tag]
        users = {t: n for t in victims if (n := self.users_of(t))}
        if users and not force:
            raise Conflict(f"snapshot(s) in use by live sandboxes: {users}; kill them first or pass ?force=true")
        return self.engine.delete_snapshot(tag, cascade=cascade, force=force)

    def compact(self, tag: str, to: str) -> dict[str, Any]:
        snap = self.engine.compact(tag, to)
        return self._describe(snap.summary(), chain=True)

    # -- packs (a slot is held from the start of a pack until its file is sent, from the start of an
    # upload until it is unpacked: at most PACKS_IN_FLIGHT files of the kind in the store at once)
    def _take_pack_slot(self) -> None:
        if not self._pack_slots.acquire(blocking=False):
            raise Busy(f"{PACKS_IN_FLIGHT} packs or unpacks are already in flight; retry later")

    def pack(self, tag: str, level: int) -> tuple[Path, dict[str, Any]]:
        """Pack ``tag`` (and its chain) into a scratch directory of the store: (the file, what was
        packed). The caller sends it, then calls ``done_with(file)``, which removes it and frees the slot."""
        from forkd.engine.pack import pack

        validate_tag(tag)
        if not self.engine.store.exists(tag):
            raise SnapshotNotFoundError(f"snapshot {tag} not found")
        self._take_pack_slot()
        area: Path | None = None
        try:
            area = self.engine.store.scratch("pack")
            out = area / f"{tag}.tar.zst"
            res = pack(self.engine.store, tag, out, level=level)
        except BaseException:
            if area is not None:
                self.engine.store.discard(area)
            self._pack_slots.release()
            raise
        with self._lock:
            self._scratch.add(area)
        return out, res

    def upload_area(self) -> Path:
        """A scratch directory of the store for a pack being received; ``done_with`` removes it (and
        frees the slot taken here)."""
        self._take_pack_slot()
        try:
            area = self.engine.store.scratch("upload")
        except BaseException:
            self._pack_slots.release()
            raise
        with self._lock:
            self._scratch.add(area)
        return area

    def done_with(self, path: Path) -> None:
        """Remove the scratch directory holding ``path`` (a pack of ``pack`` or ``upload_area``) and
        free its slot; a second call for the same path does nothing."""
        with self._lock:
            if path.parent not in self._scratch:
                return
            self._scratch.discard(path.parent)
        try:
            self.engine.store.discard(path.parent)
        finally:
            self._pack_slots.release()

    def unpack(self, archive: Path, tag: str | None, force: bool) -> dict[str, Any]:
        """Verify and register the pack at ``archive`` (see engine.pack.unpack_chain)."""
        from forkd.engine.pack import unpack_chain

        if tag is not None:
            validate_tag(tag)
        warnings: list[str] = []
        t0 = time.monotonic()
        res = unpack_chain(self.engine.store, archive, tag=tag, force=force, warn=warnings.append)
        return {"tags": res.tags, "registered": res.registered, "reused": res.reused, "replaced": res.replaced,
                "warnings": warnings, "seconds": round(time.monotonic() - t0, 3)}

    # -- branch
    def branch(self, sid: str, tag: str | None, mode: str, wait: bool) -> tuple[dict[str, Any], bool]:
        """BRANCH sandbox ``sid``. Returns (answer, finished): finished is False for ``wait=False``."""
        child = self.running(sid)
        tag = validate_tag(tag) if tag else f"br-{sid[3:]}-{secrets.token_hex(4)}"
        if self._branch_slots is None:
            self._branch_slots = threading.BoundedSemaphore(self.branch_concurrency)
        if not self._branch_slots.acquire(blocking=False):
            raise Busy(f"{self.branch_concurrency} branches are already in flight (--branch-concurrency); "
                       "retry later")
        try:
            with self._lock:
                if self.engine.store.exists(tag) or self._pending.get(tag, {}).get("status") == "writing":
                    raise Conflict(f"snapshot {tag} already exists or is being written")
                self._pending[tag] = {"status": "writing"}
        except BaseException:
            self._branch_slots.release()
            raise

        def work() -> dict[str, Any]:
            try:
                res = self.engine.branch(child, tag, mode)
            except BaseException as e:
                with self._lock:
                    self._pending[tag] = {"status": "failed", "error": str(e)}
                raise
            finally:
                assert self._branch_slots is not None
                self._branch_slots.release()
            with self._lock:
                self._pending.pop(tag, None)
                if (sb := self._sandboxes.get(sid)) is not None:
                    sb.branch_count += 1
                    self._save()
            return {**res.to_json(), "status": "ready", "branched_from": sid, "bootable": True}

        if wait:
            try:
                return work(), True
            except ChannelClosedError as e:
                raise Conflict(f"sandbox {sid} stopped during the branch: {e}") from e

        def background() -> None:
            with contextlib.suppress(Exception):
                work()

        threading.Thread(target=background, name=f"branch-{tag}", daemon=True).start()
        return {"tag": tag, "status": "writing", "branched_from": sid, "bootable": False}, False

    def branches_in_flight(self) -> tuple[int, int]:
        """(BRANCH operations running, --branch-concurrency): every branch is ``writing`` until it ends."""
        with self._lock:
            running = sum(1 for p in self._pending.values() if p.get("status") == "writing")
        return running, self.branch_concurrency

    def users_of(self, tag: str) -> int:
        with self._lock:
            return sum(1 for sb in self._sandboxes.values() if sb.child.snapshot == tag and sb.child.alive())

    # -- sandboxes
    def spawn(self, tag: str, n: int, network: str, memory_limit_mib: int | None, per_child_netns: bool,
              timeout_s: float, expose: tuple[int, ...] = (), lifetime_s: float | None = None,
              metadata: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Fork ``n`` children. ``lifetime_s``: seconds each lives (None: the daemon's default, which is
        none unless --sandbox-timeout set one); ``metadata``: labels to find them by. Busy (503) if they
        would pass ``--max-sandboxes`` (counting the spawns in flight)."""
        validate_tag(tag)
        with self._lock:
            if self.max_sandboxes is not None:
                running = self.active_count() + self._reserved
                if running + n > self.max_sandboxes:
                    raise Busy(f"n: {n} more sandboxes would pass this controller's --max-sandboxes "
                               f"{self.max_sandboxes} ({running} running or starting); see GET /v1/capacity")
            self._reserved += n
        try:
            return self._spawn_now(tag, n, network, memory_limit_mib, per_child_netns, timeout_s, expose,
                                   lifetime_s, metadata)
        finally:
            with self._lock:
                self._reserved -= n

    def _spawn_now(self, tag: str, n: int, network: str, memory_limit_mib: int | None, per_child_netns: bool,
                   timeout_s: float, expose: tuple[int, ...], lifetime_s: float | None,
                   metadata: dict[str, str] | None) -> list[dict[str, Any]]:
        lifetime = lifetime_s if lifetime_s is not None else self.default_lifetime_s
        if self.pool_size > 0 and network in ("internet", "user"):
            self.engine.start_pool(tag, self.pool_size)
        # netns numbers are picked from the live children, so spawns that use them go one at a time
        with self._spawn_lock if per_child_netns else contextlib.nullcontext():
            results = self.engine.spawn(tag, n, timeout=timeout_s, network=network, memory_limit_mib=memory_limit_mib,
                                        per_child_netns=per_child_netns, expose=expose)
        out: list[dict[str, Any]] = []
        with self._lock:
            for r in results:
                if r.child is None:
                    out.append({"index": r.index, "sandbox": None, "error": r.error})
                    continue
                sb = Sandbox(child=r.child, network=network, memory_limit_mib=memory_limit_mib,
                             netns=r.child.vm.meta.get("netns"), ports=dict(r.child.vm.meta.get("ports") or {}),
                             ready_ms=None if r.child.ready_s is None else round(r.child.ready_s * 1000, 2),
                             from_pool=r.child.from_pool, metadata=dict(metadata or {}))
                sb.expires_at = None if lifetime is None else sb.created_at + lifetime
                self._sandboxes[sb.id] = sb
                if self.spawn_observer is not None and r.child.ready_s is not None:
                    self.spawn_observer(r.child.ready_s)
                info = sb.info()
                out.append({**info, "index": r.index, "sandbox": info, "error": None})  # flat: the original's
            self._save()
        return out

    def list_sandboxes(self, metadata: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The live sandboxes (those whose labels include every ``metadata`` pair)."""
        with self._lock:
            return [sb.info() for sb in self._sandboxes.values() if sb.matches(metadata or {})]

    def get(self, sid: str) -> Sandbox:
        validate_child_id(sid)
        with self._lock:
            sb = self._sandboxes.get(sid)
            ended = self._ended.get(sid)
        if sb is None:
            if ended is not None:
                raise NotFound(f"sandbox {sid} not found: it is gone ({ended['reason']})")
            raise NotFound(f"sandbox {sid} not found")
        return sb

    def set_lifetime(self, sid: str, lifetime_s: float) -> dict[str, Any]:
        """The sandbox now ends ``lifetime_s`` seconds from now (longer or shorter than before)."""
        sb = self.get(sid)
        with self._lock:
            sb.expires_at = time.time() + lifetime_s
            self._save()
        return sb.info()

    def running(self, sid: str) -> Child:
        """The child of a running sandbox; Conflict if its VM has exited."""
        sb = self.get(sid)
        status = sb.child.vm.exit_status()
        if status is not None:
            raise Conflict(f"sandbox {sid} is not running ({status})")
        self.last_active[sid] = time.time()
        return sb.child

    def delete(self, sid: str) -> None:
        sb = self.get(sid)
        with self._lock:
            self._end(sb, f"it was killed at {_iso(time.time())}")
            self._save()
        sb.child.kill()

    def call(self, sid: str, fn: Any) -> Any:
        """Run ``fn(child)``; a VM that dies meanwhile becomes a Conflict naming how it ended."""
        child = self.running(sid)
        try:
            return fn(child)
        except ChannelClosedError as e:
            raise Conflict(f"sandbox {sid} stopped: {e}") from e

    def starting(self) -> int:
        """Children of spawns in flight."""
        with self._lock:
            return self._reserved

    def pool_ready(self) -> dict[str, int]:
        """Snapshot tag -> members ready in its pool."""
        return {tag: pool.ready_count() for tag, pool in sorted(self.engine.pools().items())}

    def active_count(self) -> int:
        with self._lock:
            return sum(1 for sb in self._sandboxes.values() if sb.child.alive())


def _iso(t: float | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _str_dict(v: object) -> dict[str, str]:
    return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else {}


def _float_or_none(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
