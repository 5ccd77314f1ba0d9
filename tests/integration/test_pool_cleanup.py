"""The pre-started pool, and cleanup of dead children's leftovers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from forkd.engine import Engine
from forkd.engine.cleanup import sweep
from forkd.engine.vm import process_matches

pytestmark = pytest.mark.vm


def test_pool_serves_spawns_and_refills(engine: Engine, snapshot: str) -> None:
    pool = engine.start_pool(snapshot, 2)
    try:
        assert pool.wait_full(timeout=300)
        waiting = [vm.pid for vm in list(pool._ready)]
        results = engine.spawn(snapshot, 3)
        kids = [r.child for r in results]
        assert all(kids), [r.error for r in results]
        assert sum(k.from_pool for k in kids) >= 2
        assert set(waiting) <= {k.pid for k in kids}  # the waiting QEMUs became children
        for k in kids:
            assert k.eval("numpy.zeros(5).tolist()")["value"] == [0.0] * 5
            assert k.fresh["rng_reseeded"]
        assert pool.wait_full(timeout=300), pool.stats()
        for k in kids:
            k.kill()
    finally:
        members = [vm for vm in list(pool._ready)]
        engine.close_pools()
    deadline = time.monotonic() + 30
    while any(process_matches(vm.pid, vm.vm_id) for vm in members) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(process_matches(vm.pid, vm.vm_id) for vm in members)
    assert all(not vm.workdir.path.exists() for vm in members)


def test_cleanup_removes_dead_leftovers_only(engine: Engine, snapshot: str, spawn) -> None:
    dead, live = spawn(2)
    os.kill(dead.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while dead.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    rep = sweep(engine.run_dir, engine.store)
    assert str(dead.vm.workdir.path) in rep.removed
    assert str(live.vm.workdir.path) in rep.kept_live
    assert live.vm.workdir.path.exists() and not dead.vm.workdir.path.exists()
    assert live.eval("1")["value"] == 1
