"""Workspaces against a real daemon with real VMs: suspend to disk, resume by name, restarts, idle."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon

from forkd import ConflictError, Controller, NotFoundError, UnprocessableEntityError
from forkd.sdk import Sandbox

pytestmark = pytest.mark.vm

TIMEOUT = 600.0  # seconds: TCG on a slow shared machine
MAX_DEPTH = 4  # the daemon's default --workspace-max-depth

SETUP = """
import os, random, subprocess, time
answer = 42
with open('/tmp/ws-file', 'w') as f:
    f.write('kept')
ticker = subprocess.Popen(['sh', '-c', 'while true; do date +%s > /tmp/tick; sleep 1; done'])
"""


@pytest.fixture(scope="module")
def ctl(daemon: Daemon) -> Iterator[Controller]:
    with Controller(daemon.url, daemon.token, timeout=TIMEOUT) as c:
        yield c


def _gone(pid: int) -> bool:
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _ws_snapshots(ctl: Controller, name: str) -> set[str]:
    return {s.tag for s in ctl.list_snapshots() if s.tag.startswith(f"ws-{name}-")}


def _check_restored(sb: Sandbox) -> None:
    assert sb.eval("answer") == 42
    assert sb.files.read_text("/tmp/ws-file") == "kept"
    assert sb.eval("ticker.poll()") is None  # the background process still runs
    first = sb.files.read_text("/tmp/tick").strip()
    time.sleep(2.5)
    assert sb.files.read_text("/tmp/tick").strip() != first  # ... and goes on ticking


def test_suspend_resume_cycles(ctl: Controller, snapshot: str) -> None:
    name = "ws-main"
    ws = ctl.create_workspace(name, snapshot, network="none", lifetime=3600, metadata={"team": "a"},
                              timeout=TIMEOUT)
    try:
        info = ws.info()
        assert info.status == "running" and info.state_tag is None and info.options["network"] == "none"
        sb = ws.sandbox()
        assert sb.info.metadata == {"team": "a", "forkd.workspace": name}
        sb.run_code(SETUP, timeout=120)
        with pytest.raises(ConflictError):
            ctl.create_workspace(name, snapshot, timeout=TIMEOUT)
        with pytest.raises(ConflictError):
            ws.resume()
        before_rand = sb.eval("random.random()")
        suspended_at = time.time()

        info = ws.suspend()
        assert info.status == "suspended" and info.state_tag and info.sandbox_id is None
        assert info.state_bytes > 0 and info.last_suspend and info.last_suspend["dirty_bytes"] > 0
        assert _gone(sb.info.pid), "the suspended sandbox's QEMU is still running"
        with pytest.raises(NotFoundError):
            ctl.get_sandbox(sb.id)
        with pytest.raises(ConflictError):
            ws.suspend()

        # the RNG is reseeded on every restore: a probe forked from the same state draws other numbers
        probe = ctl.spawn_sandbox(info.state_tag, network="none", timeout=TIMEOUT)
        with probe:
            probe_draw = (probe.eval("random.random()"), probe.eval("os.urandom(8).hex()"))
        time.sleep(1)

        sb2 = ws.resume()
        assert sb2.id != sb.id and sb2.info.network == "none" and sb2.info.expires_at is not None
        assert sb2.info.metadata["team"] == "a"
        _check_restored(sb2)
        draw = (sb2.eval("random.random()"), sb2.eval("os.urandom(8).hex()"))
        assert draw[0] != probe_draw[0] and draw[1] != probe_draw[1] and draw[0] != before_rand
        guest_now = sb2.eval("time.time()")
        assert guest_now > suspended_at + 1 and abs(guest_now - time.time()) < 60  # the clock moved on

        for i in range(5):
            sb2.run_code(f"answer += 0; step = {i}", timeout=120)
            info = ws.suspend()
            assert info.status == "suspended" and info.depth <= MAX_DEPTH
            assert _ws_snapshots(ctl, name) == set(info.links), "a suspend left an orphaned snapshot"
            assert set(info.links) <= {info.state_tag, *(ctl.snapshot_info(info.state_tag).ancestors or [])}
            sb2 = ws.resume()
            assert sb2.eval("step") == i
        _check_restored(sb2)
        assert ws.info().suspends == 6
        names = [w.name for w in ctl.list_workspaces()]
        assert name in names
    finally:
        ws.delete()
    assert _ws_snapshots(ctl, name) == set()
    with pytest.raises(NotFoundError):
        ws.info()


def test_restart_while_suspended_running_and_stale(ctl: Controller, daemon: Daemon, snapshot: str) -> None:
    name = "ws-restart"
    ws = ctl.create_workspace(name, snapshot, network="none", timeout=TIMEOUT)
    try:
        ws.sandbox().run_code("mark = 'kept'", timeout=120)
        ws.suspend()
        daemon.restart()
        with Controller(daemon.url, daemon.token, timeout=TIMEOUT) as c:
            w = c.workspace(name)
            assert w.info().status == "suspended"
            sb = w.resume()
            assert sb.eval("mark") == "kept"
            sb.run_code("mark2 = 'also'", timeout=120)
        daemon.restart()  # while running: the VM is re-adopted
        with Controller(daemon.url, daemon.token, timeout=TIMEOUT) as c:
            w = c.workspace(name)
            info = w.info()
            assert info.status == "running" and info.sandbox_id == sb.id
            assert w.sandbox().eval("mark2") == "also"
            pid = w.sandbox().info.pid
        # a reboot: the daemon is down and the VM dies with the host
        daemon.stop()
        os.kill(pid, signal.SIGKILL)
        assert _gone(pid)
        daemon.restart()
        with Controller(daemon.url, daemon.token, timeout=TIMEOUT) as c:
            w = c.workspace(name)
            assert w.info().status == "stale"
            with pytest.raises(ConflictError):
                w.suspend()
            sb = w.resume()  # from its last suspended state
            assert sb.eval("mark") == "kept" and w.info().status == "running"
    finally:
        with Controller(daemon.url, daemon.token, timeout=TIMEOUT) as c:
            c.workspace(name).delete()
    assert _ws_snapshots(ctl, name) == set()


def test_idle_auto_suspend(ctl: Controller, snapshot: str) -> None:
    name = "ws-idle"
    ws = ctl.create_workspace(name, snapshot, network="none", idle_suspend=3, timeout=TIMEOUT)
    try:
        pid = ws.sandbox().info.pid
        deadline = time.monotonic() + 300
        while ws.info().status == "running" and time.monotonic() < deadline:
            time.sleep(1)
        info = ws.info()
        assert info.status == "suspended" and info.state_tag, info
        assert _gone(pid)
        assert ws.resume().ping().numpy
    finally:
        ws.delete()


def test_bad_names_and_unknown(ctl: Controller, daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        r = c.post("/v1/workspaces", json={"name": "bad name!", "snapshot_tag": snapshot})
        assert r.status_code == 422 and "name" in r.json()["error"]
        r = c.post("/v1/workspaces", json={"name": "x" * 65, "snapshot_tag": snapshot})
        assert r.status_code == 422
        r = c.get("/v1/workspaces/bad.name")
        assert r.status_code == 422 and "name" in r.json()["error"]
        r = c.post("/v1/workspaces/nope/suspend")
        assert r.status_code == 404 and "nope" in r.json()["error"]
        r = c.post("/v1/workspaces", json={"name": "ws-nosnap", "snapshot_tag": "no-such-snapshot"})
        assert r.status_code == 404
        r = c.post("/v1/workspaces", json={"name": "ws-x", "snapshot_tag": snapshot, "idle_suspend_s": "3"})
        assert r.status_code == 422
    with pytest.raises(NotFoundError):
        ctl.workspace("nope").resume()
    with pytest.raises(UnprocessableEntityError):
        ctl.workspace("bad.name").info()


def test_cli(daemon: Daemon, snapshot: str) -> None:
    import json
    import subprocess
    import sys

    remote = ["--url", daemon.url, "--token-file", str(daemon.dir / "token")]

    def forkd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "forkd.cli", "workspace", *args], capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert not check or p.returncode == 0, p.stderr
        return p

    info = json.loads(forkd("create", "ws-cli", "--tag", snapshot, "--network", "none", "--label", "k=v",
                            *remote, "--json").stdout)
    assert info["status"] == "running" and info["options"]["metadata"] == {"k": "v"}
    try:
        assert json.loads(forkd("suspend", "ws-cli", *remote, "--json").stdout)["status"] == "suspended"
        p = forkd("suspend", "ws-cli", *remote, check=False)
        assert p.returncode == 1 and "already suspended" in p.stderr
        assert "ws-cli" in forkd("list", *remote).stdout
        assert json.loads(forkd("resume", "ws-cli", *remote, "--json").stdout)["status"] == "running"
        assert json.loads(forkd("info", "ws-cli", *remote, "--json").stdout)["sandbox_id"]
        p = forkd("info", "bad.name", *remote, check=False)
        assert p.returncode == 2 and "name" in p.stderr
    finally:
        forkd("rm", "ws-cli", *remote)
    p = forkd("info", "ws-cli", *remote, check=False)
    assert p.returncode == 1 and "not found" in p.stderr


E2B_PYTHON = Path(__file__).resolve().parents[2] / ".venv-e2b" / "bin" / "python"
E2B_SCRIPT = """
import json, sys
from e2b import Sandbox, SandboxQuery, SandboxState
tag = sys.argv[1]
out = {}
sb = Sandbox.create(template=tag, timeout=300, envs={"FOO": "bar"}, metadata={"k": "v"})
sb.files.write("/tmp/p.txt", "kept")
bg = sb.commands.run("sleep 600", background=True)
out["id"] = sb.sandbox_id
out["paused"] = sb.pause()
out["again"] = sb.pause()
out["state"] = str(sb.get_info().state.value)
def listed(state):
    return [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(state=[state])).next_items()]
out["listed_paused"] = listed(SandboxState.PAUSED)
sb.connect(timeout=300)
out["running"] = sb.is_running()
out["file"] = sb.files.read("/tmp/p.txt")
out["env"] = sb.commands.run("echo $FOO").stdout
out["bg"] = bg.pid in [p.pid for p in sb.commands.list()]
out["info_id"] = sb.get_info().sandbox_id
out["listed_running"] = listed(SandboxState.RUNNING)
other = Sandbox.connect(sb.sandbox_id)
out["other"] = other.files.read("/tmp/p.txt")
sb.pause()
out["resumed_by_class"] = Sandbox.connect(sb.sandbox_id).commands.run("cat /tmp/p.txt").stdout
out["killed"] = sb.kill()
print(json.dumps(out))
"""


def test_e2b_pause_and_resume(engine: object, snapshot: str, forkd_home: Path) -> None:
    import json
    import subprocess

    from conftest import free_port, make_token_file, start_daemon_process, wait_healthy

    if not E2B_PYTHON.exists():
        pytest.skip(f"{E2B_PYTHON} is missing: run `make e2b-venv`")
    d = forkd_home / "e2b-ws-daemon"
    d.mkdir()
    key = "e2b_" + os.urandom(20).hex()
    port, e2b_port = free_port(), free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--state", str(d / "state.json"), "--audit-log", str(d / "audit.log"),
            "--token-file", str(make_token_file(d / "token", key)), "--snapshot-root",
            str(engine.store.root), "--e2b-bind", f"127.0.0.1:{e2b_port}"]  # type: ignore[attr-defined]
    proc = start_daemon_process(args, d)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        url = f"http://127.0.0.1:{e2b_port}"
        env = {"PATH": os.environ["PATH"], "E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": key}
        p = subprocess.run([str(E2B_PYTHON), "-I", "-c", E2B_SCRIPT, snapshot], capture_output=True, text=True,
                           timeout=TIMEOUT, env=env)
        assert p.returncode == 0, p.stderr[-4000:] + (d / "daemon.log").read_text()[-3000:]
        out = json.loads(p.stdout)
        assert out["paused"] is True and out["again"] is False and out["state"] == "paused"
        assert out["listed_paused"] == [out["id"]] and out["listed_running"] == [out["id"]]
        assert out["running"] is True and out["info_id"] == out["id"]
        assert out["file"] == "kept" and out["other"] == "kept" and out["resumed_by_class"] == "kept"
        assert out["env"] == "bar\n" and out["bg"] is True and out["killed"] is True
        assert not [t for t in os.listdir(engine.store.root) if t.startswith("ws-e2b-")]  # type: ignore[attr-defined]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
