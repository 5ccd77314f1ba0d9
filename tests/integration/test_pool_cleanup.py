"""The pre-started pool, and cleanup of dead children's leftovers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, start_daemon_process, wait_healthy

from forkd.engine import Engine
from forkd.engine.cleanup import orphans, sweep
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


def forkd_qemus(under: Path) -> list[int]:
    """PIDs of forkd QEMUs whose jail (work dir) lies under ``under``."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                args = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"-name\0forkd-" in args and str(under).encode() in args:
                out.append(int(p.name))
    return out


def test_a_daemon_sigterm_leaves_no_pool_qemu(engine: Engine, snapshot: str, forkd_home: Path) -> None:
    d = forkd_home / "pool-daemon"
    d.mkdir()
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--state", str(d / "state.json"), "--audit-log", str(d / "audit.log"),
            "--snapshot-root", str(engine.store.root), "--pool-size", "2"]
    proc = start_daemon_process(args, d)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        r = httpx.post(f"{url}/v1/sandboxes", json={"snapshot_tag": snapshot, "n": 1}, timeout=600)
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 300
        while len(forkd_qemus(d / "run")) < 3:  # the sandbox and two pool members
            assert time.monotonic() < deadline, "the pool never filled"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        time.sleep(1)
        left = forkd_qemus(d / "run")
        assert len(left) == 1, left  # the sandbox keeps running (re-adopted at the next start); no pool member
        assert not [o for o in orphans() if str(d) in o.log]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in forkd_qemus(d / "run"):
            os.kill(pid, signal.SIGKILL)


def test_cleanup_kills_a_qemu_whose_work_dir_is_gone(engine: Engine, spawn) -> None:
    (k,) = spawn(1)
    shutil.rmtree(k.vm.workdir.path)  # as a controller that crashed between the two would leave it
    assert any(o.pid == k.pid for o in orphans())
    env = {**os.environ, "FORKD_RUN_DIR": str(engine.run_dir), "FORKD_SNAPSHOT_ROOT": str(engine.store.root)}
    dry = subprocess.run(["forkd", "cleanup", "--dry-run", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert any(str(k.pid) in line for line in json.loads(dry.stdout)["killed"]) and k.alive()
    out = subprocess.run(["forkd", "cleanup", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert any(str(k.pid) in line for line in json.loads(out.stdout)["killed"])
    deadline = time.monotonic() + 30
    while k.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not k.alive()
