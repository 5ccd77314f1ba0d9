"""The engine facade: what the CLI and the daemon both call."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkd.engine.accel import AccelChoice, choose_accel
from forkd.engine.child import Child
from forkd.engine.parent import create_snapshot
from forkd.engine.pool import Pool
from forkd.engine.qemu import QemuBinary, qemu_binary
from forkd.engine.restore import NETWORKS, finish_restore, launch_child, send_state
from forkd.engine.snapshot import Snapshot, SnapshotStore, host_cpu_model, make_spec
from forkd.engine.vm import VMProcess, recorded_vms
from forkd.errors import ForkdError, SnapshotExistsError, ValidationError
from forkd.paths import run_dir as default_run_dir
from forkd.paths import validate_tag

log = logging.getLogger(__name__)
MAX_CHILDREN = 1000
MIN_LIMIT_MIB = 64
MIN_CPU_LIMIT, MAX_CPU_LIMIT = 0.01, 256.0
NETNS_PREFIX = "forkd-child-"


@dataclass
class SpawnResult:
    """One child of a spawn: the child, or the error that stopped it (the others are unaffected)."""

    index: int
    child: Child | None = None
    error: str | None = None
    then: Any = None  # what the ``then`` callback returned (or the ForkdError it raised)
    then_s: float | None = None  # seconds from the start of this child's restore until ``then`` returned


class Engine:
    """Snapshots, children and pools under one snapshot root and one run dir."""

    def __init__(self, snapshot_root: Path | None = None, run_dir: Path | None = None,
                 accel: str | None = None) -> None:
        self.store = SnapshotStore(snapshot_root)
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self._accel_request = accel
        self._pools: dict[str, Pool] = {}
        self._branching: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @functools.cached_property
    def accel(self) -> AccelChoice:
        return choose_accel(self._accel_request)

    @functools.cached_property
    def qemu(self) -> QemuBinary:
        return qemu_binary()

    @functools.cached_property
    def host_cpu(self) -> str:
        return host_cpu_model()

    # -- snapshots
    def create_snapshot(self, tag: str, *, memory_mib: int = 512, vcpus: int = 1, warm_code: str | None = None,
                        boot_timeout: float = 300.0, keep_workdir: bool = False,
                        step: Callable[[str], None] | None = None, image: Any = None,
                        settle_max_s: float = 60.0, image_name: str | None = None) -> Snapshot:
        """Boot a parent from the guest image (the default one, or the recipe image ``image_name``), warm
        it, let it settle (at most ``settle_max_s`` seconds) and save it as snapshot ``tag``."""
        from forkd.guest.image import require_image
        from forkd.guest.recipe import find_named

        make_spec(memory_mib, vcpus, self._accel_request)  # bad arguments fail before anything else
        if self.store.exists(tag):  # before building or finding the image
            raise SnapshotExistsError(f"snapshot {tag} already exists; delete it first (forkd snapshot rm {tag})")
        img = image or (find_named(image_name) if image_name else require_image())
        spec, reason = make_spec(memory_mib, vcpus, self._accel_request, kernel_cmdline=img.cmdline,
                                 disk=img.rootfs is not None)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return create_snapshot(self.store, tag, spec, reason, self.qemu, img, self.run_dir,
                               warm_code=warm_code, boot_timeout=boot_timeout, keep_workdir=keep_workdir, step=step,
                               settle_max_s=settle_max_s)

    def open_snapshot(self, tag: str) -> Snapshot:
        """Snapshot ``tag``, checked to be restorable on this host (files, hashes, QEMU, accelerator)."""
        snap = self.store.open(tag)
        snap.check_restorable(self.qemu, self.accel.name, self.host_cpu)
        return snap

    def delete_snapshot(self, tag: str, *, cascade: bool = False, force: bool = False) -> list[str]:
        """Delete ``tag`` (see ``chain.delete`` for the rules with dependents); returns the tags deleted."""
        from forkd.engine import chain

        if cascade and force:
            raise ValidationError("cascade and force cannot be used together")
        victims = chain.subtree(self.store, tag) if cascade else [tag]
        with self._lock:
            pools = [self._pools.pop(t) for t in victims if t in self._pools]
        for pool in pools:
            pool.close()
        return chain.delete(self.store, tag, cascade=cascade, force=force)

    def branch(self, child: Child, tag: str | None = None, mode: str = "auto") -> Any:
        """Snapshot the running ``child`` as ``tag`` (generated when None); it keeps running.
        Returns a ``BranchResult`` (snapshot, mode chosen, pause in ms, bytes written)."""
        from forkd.engine.branch import branch

        tag = validate_tag(tag) if tag is not None else f"br-{child.id[3:]}-{secrets.token_hex(4)}"
        with self._lock:
            lock = self._branching.setdefault(child.id, threading.Lock())
        with lock:  # branches of one sandbox go one after the other: each needs it paused
            source = self.store.open(child.snapshot)
            return branch(self.store, child, source, tag, mode)

    def compact(self, tag: str, to: str) -> Snapshot:
        """Write ``to``: a flat, parentless copy of snapshot ``tag``."""
        from forkd.engine import chain

        return chain.compact(self.store, validate_tag(tag), validate_tag(to, "to"))

    def chain_info(self, tag: str) -> dict[str, Any]:
        from forkd.engine import chain

        return chain.info(self.store, validate_tag(tag))

    # -- pools
    def start_pool(self, tag: str, size: int, network: str = "internet", warm: bool = True) -> Pool:
        """Keep ``size`` QEMUs ready for snapshot ``tag`` (resizes an existing pool): warm (the snapshot
        loaded and the agent's first requests answered) or, with ``warm=False``, waiting for state."""
        if size < 0:
            raise ValidationError(f"pool size must be >= 0; got {size}")
        replaced = None
        try:
            with self._lock:
                pool = self._pools.get(tag)
                if pool is not None and pool.warm == warm:
                    pool.resize(size)
                    return pool
                replaced = self._pools.pop(tag, None)  # a pool of the other kind: its members go
                snap = self.open_snapshot(tag)
                self.run_dir.mkdir(parents=True, exist_ok=True)
                pool = Pool(snap, self.qemu, self.run_dir, size, network, warm=warm)
                self._pools[tag] = pool
                return pool
        finally:
            if replaced is not None:
                replaced.close()

    def pool(self, tag: str) -> Pool | None:
        with self._lock:
            return self._pools.get(tag)

    def pools(self) -> dict[str, Pool]:
        """The pools by snapshot tag (a copy)."""
        with self._lock:
            return dict(self._pools)

    def close_pools(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for p in pools:
            p.close()

    # -- children
    def spawn(self, tag: str, n: int = 1, *, concurrency: int | None = None, timeout: float = 120.0,
              network: str = "internet", use_pool: bool = True, memory_limit_mib: int | None = None,
              per_child_netns: bool = False, expose: tuple[int, ...] = (), netns: str | None = None,
              cpu_limit: float | None = None, then: Callable[[Child], Any] | None = None) -> list[SpawnResult]:
        """Start ``n`` children of snapshot ``tag``; each succeeds or fails on its own.

        ``timeout`` (seconds) bounds each child's restore; ``concurrency`` is how many restore at once
        (default: the number of CPUs); ``then(child)`` runs in the same worker as soon as that child
        is up (e.g. its first command), and its result lands in ``SpawnResult.then``.
        ``memory_limit_mib`` caps each child (cgroup); ``per_child_netns`` runs child i in network
        namespace ``forkd-child-<i>`` (the lowest numbers no live child uses); ``expose`` forwards
        guest TCP ports from host loopback ports; ``netns`` runs every child in that (existing) network
        namespace instead; ``cpu_limit`` caps each child at that many CPUs (cgroup quota).
        """
        if not isinstance(n, int) or not 1 <= n <= MAX_CHILDREN:
            raise ValidationError(f"n must be an integer in 1..{MAX_CHILDREN}; got {n!r}")
        if network not in NETWORKS:
            raise ValidationError(f"network must be one of {', '.join(NETWORKS)}; got {network!r}")
        if memory_limit_mib is not None and (not isinstance(memory_limit_mib, int) or memory_limit_mib < MIN_LIMIT_MIB):
            raise ValidationError(f"memory_limit_mib must be an integer >= {MIN_LIMIT_MIB}; got {memory_limit_mib!r}")
        for port in expose:
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValidationError(f"expose: ports must be integers in 1..65535; got {port!r}")
        if cpu_limit is not None and (isinstance(cpu_limit, bool) or not isinstance(cpu_limit, (int, float))
                                      or not MIN_CPU_LIMIT <= cpu_limit <= MAX_CPU_LIMIT):
            raise ValidationError(f"cpu_limit must be a number of CPUs in {MIN_CPU_LIMIT}..{MAX_CPU_LIMIT}; "
                                  f"got {cpu_limit!r}")
        if netns is not None and per_child_netns:
            raise ValidationError("netns and per_child_netns cannot be used together")
        snap = self.open_snapshot(tag)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        plain = (network in ("internet", "user") and memory_limit_mib is None and cpu_limit is None
                 and not per_child_netns and not expose and netns is None)
        pool = self._pool_for(snap) if use_pool and plain else None
        namespaces = self._free_netns(n) if per_child_netns else [netns] * n
        workers = max(1, min(n, concurrency or os.cpu_count() or 2))

        def one(i: int) -> SpawnResult:
            t0 = time.monotonic()
            try:
                res = SpawnResult(i, child=self._restore_one(snap, pool, timeout, network, memory_limit_mib,
                                                             namespaces[i], tuple(expose), cpu_limit))
            except ForkdError as e:
                return SpawnResult(i, error=str(e))
            except OSError as e:
                return SpawnResult(i, error=f"{type(e).__name__}: {e}")
            if then is not None and res.child is not None:
                try:
                    res.then = then(res.child)
                except ForkdError as e:
                    res.then = e
                res.then_s = time.monotonic() - t0
            return res

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spawn") as ex:
            return list(ex.map(one, range(n)))

    def _pool_for(self, snap: Snapshot) -> Pool | None:
        """The pool a spawn of ``snap`` takes from: its own, else a cold pool of the snapshot whose
        memory it shares (a warm member has another snapshot's state loaded already)."""
        own = self.pool(snap.tag)
        if own is not None:
            return own
        owner = self.pool(snap.memory_owner) if snap.memory_owner != snap.tag else None
        return owner if owner is not None and not owner.warm else None

    def _free_netns(self, n: int) -> list[str | None]:
        """``forkd-child-<i>`` names for ``n`` children: the lowest numbers no live child is using."""
        used = {str(r.meta["netns"]) for r in recorded_vms(self.run_dir) if r.alive and r.meta.get("netns")}
        out: list[str | None] = []
        i = 1
        while len(out) < n:
            name = f"{NETNS_PREFIX}{i}"
            if name not in used:
                out.append(name)
            i += 1
        return out

    def _restore_one(self, snap: Snapshot, pool: Pool | None, timeout: float, network: str,
                     memory_limit_mib: int | None = None, netns: str | None = None,
                     expose: tuple[int, ...] = (), cpu_limit: float | None = None) -> Child:
        vm: VMProcess | None = pool.take() if pool is not None else None
        t0 = time.monotonic()
        try:
            if vm is not None:
                if pool is not None and not pool.warm:
                    send_state(vm, snap)
                return finish_restore(vm, snap, t0, timeout, from_pool=True)
            vm = launch_child(snap, self.qemu, self.run_dir, network=network, memory_limit_mib=memory_limit_mib,
                              netns=netns, expose=expose, cpu_limit=cpu_limit)
            return finish_restore(vm, snap, t0, timeout)
        except BaseException:
            if vm is not None:
                with contextlib.suppress(ForkdError, OSError):
                    vm.kill(remove_workdir=True)
            raise

    def adopt(self, workdir: Path) -> Child:
        """Reconnect to a child started by an earlier process (its work dir holds what we need)."""
        vm = VMProcess.adopt(workdir)
        return Child(id=vm.vm_id, snapshot=str(vm.meta.get("snapshot", "")), vm=vm,
                     created_at=float(vm.meta.get("started_at", time.time())))

    def close(self) -> None:
        self.close_pools()
