"""The real forkd-controller process over real HTTP, with real VMs behind it."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import Daemon, free_port, make_token_file, start_daemon_process, wait_healthy

pytestmark = pytest.mark.vm


def spawn(c: httpx.Client, tag: str, n: int = 1) -> list[str]:
    r = c.post("/v1/sandboxes", json={"snapshot_tag": tag, "n": n})
    assert r.status_code == 201, r.text
    entries = r.json()
    assert len(entries) == n and all(e["sandbox"] for e in entries), entries
    return [e["sandbox"]["id"] for e in entries]


def test_auth(daemon: Daemon) -> None:
    assert httpx.get(f"{daemon.url}/healthz").json() == {"ok": True}
    for headers in ({}, {"Authorization": "Bearer wrong-token-123456"}, {"Authorization": daemon.token}):
        r = httpx.get(f"{daemon.url}/v1/snapshots", headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
    assert httpx.get(f"{daemon.url}/version", headers=daemon.headers).json()["accelerator"] in ("kvm", "tcg")
    assert daemon.token not in (daemon.dir / "daemon.log").read_text()


@pytest.mark.parametrize("content,mode,why", [
    ("short", 0o600, "at least 16"),
    ("REPLACE_ME_WITH_32_BYTES_BASE64", 0o600, "placeholder"),
    ("CHANGE_ME-0123456789abcdef", 0o600, "placeholder"),
    ("0123456789abcdef0123", 0o644, "chmod 600"),
    ("   \n", 0o600, "empty"),
])
def test_bad_token_files_are_refused(tmp_path: Path, content: str, mode: int, why: str) -> None:
    tf = tmp_path / "token"
    tf.write_text(content)
    tf.chmod(mode)
    p = subprocess.run([sys.executable, "-m", "forkd.daemon", "serve", "--bind", f"127.0.0.1:{free_port()}",
                        "--token-file", str(tf), "--state", str(tmp_path / "s.json"),
                        "--audit-log", str(tmp_path / "a.log")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and why in p.stderr, p.stderr
    assert content.strip() == "" or content not in p.stderr  # the token is never echoed


def test_non_loopback_without_token_is_refused(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "forkd.daemon", "serve", "--bind", f"0.0.0.0:{free_port()}",
                        "--state", str(tmp_path / "s.json"), "--audit-log", str(tmp_path / "a.log")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "without --token-file" in p.stderr


def test_tls(tmp_path: Path, engine) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--state", str(tmp_path / "s.json"), "--audit-log",
            str(tmp_path / "a.log"), "--tls-cert", str(tmp_path / "server.pem"), "--tls-key",
            str(tmp_path / "server.pem"), "--snapshot-root", str(engine.store.root),
            "--token-file", str(make_token_file(tmp_path / "token", "x" * 32))]
    proc = start_daemon_process(args, tmp_path)
    try:
        url = f"https://127.0.0.1:{port}"
        wait_healthy(url, proc, verify=str(tmp_path / "ca.pem"))
        auth = {"Authorization": "Bearer " + "x" * 32}
        r = httpx.get(f"{url}/version", verify=str(tmp_path / "ca.pem"), headers=auth)
        assert r.status_code == 200
        with httpx.Client(verify=str(tmp_path / "ca.pem")) as c:
            assert c.get(f"{url}/healthz").status_code == 200
        old = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", verify=old)
    finally:
        proc.terminate()
        proc.wait(60)


def test_validation_errors_name_the_field(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        before = len(c.get("/v1/sandboxes").json())
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "n": 1001})
        assert r.status_code == 422 and "n:" in r.json()["error"]
        r = c.post("/v1/sandboxes", json={"snapshot_tag": "../etc", "n": 1})
        assert r.status_code == 422 and "snapshot_tag" in r.json()["error"]
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "bogus": 1})
        assert r.status_code == 422 and "bogus" in r.json()["error"]
        # no coercion at the edge: a string is not an integer, 1 is not a boolean
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "n": "5"})
        assert r.status_code == 422 and "n:" in r.json()["error"] and "integer" in r.json()["error"]
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "per_child_netns": 1})
        assert r.status_code == 422 and "per_child_netns" in r.json()["error"]
        assert len(c.get("/v1/sandboxes").json()) == before  # nothing was spawned by any of these
        r = c.post("/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert c.get("/v1/sandboxes/..%2Fetc").status_code in (404, 422)
        assert c.get("/v1/sandboxes/sb-0000000000000000").status_code == 404
        assert c.get("/v1/snapshots/nope/info").status_code == 404
        r = c.post("/v1/sandboxes", json={"snapshot_tag": "nope"})
        assert r.status_code == 404 and "nope" in r.json()["error"]
        r = c.post("/v1/snapshots", json={"tag": "from-image", "image": "Bad Name"})
        assert r.status_code == 422 and "image" in r.json()["error"]
        r = c.post("/v1/snapshots", json={"tag": "from-image", "image": "no-such-image"})
        assert r.status_code == 404 and "no image named no-such-image" in r.json()["error"]


def test_sandbox_lifecycle(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        sid, sid2 = spawn(c, snapshot, 2)
        assert c.post(f"/v1/sandboxes/{sid}/ping").json()["numpy"]
        r = c.post(f"/v1/sandboxes/{sid}/eval", json={"expr": "numpy.zeros(5).tolist()"}).json()
        assert r["ok"] and r["value"] == [0.0] * 5
        assert c.post(f"/v1/sandboxes/{sid}/run_code", json={"code": "v = 40"}).json()["ok"]
        r = c.post(f"/v1/sandboxes/{sid}/run_code", json={"code": "print('p')\nv + 2"}).json()
        assert (r["value"], r["stdout"]) == (42, "p\n")
        r = c.post(f"/v1/sandboxes/{sid}/run_code", json={"code": "raise KeyError('k')"}).json()
        assert not r["ok"] and r["error"]["type"] == "KeyError" and "Traceback" in r["error"]["traceback"]
        r = c.post(f"/v1/sandboxes/{sid}/exec", json={"argv": ["/bin/sh", "-c", "cat; exit 4"], "stdin": "x"}).json()
        assert (r["exit_code"], r["stdout"]) == (4, "x")
        data = bytes(range(256)) * 64
        assert c.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/b"}, content=data).json() == {
            "bytes_written": len(data)}
        assert c.get(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/b"}).content == data
        assert c.get(f"/v1/sandboxes/{sid2}/files", params={"path": "/tmp/b"}).status_code == 404
        assert [e["name"] for e in c.get(f"/v1/sandboxes/{sid}/files/list", params={"path": "/tmp"}).json()[
            "entries"]] == ["b"]
        assert c.delete(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/b"}).status_code == 204
        ids = {s["id"] for s in c.get("/v1/sandboxes").json()}
        assert {sid, sid2} <= ids
        for s in (sid, sid2):
            assert c.delete(f"/v1/sandboxes/{s}").status_code == 204
            assert c.get(f"/v1/sandboxes/{s}").status_code == 404


def test_metrics_agree_with_the_api(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        sids = spawn(c, snapshot, 2)
        text = c.get("/metrics").text
        active = sum(1 for s in c.get("/v1/sandboxes").json() if s["status"] == "running")
        snaps = len(c.get("/v1/snapshots").json())
        assert f"forkd_sandboxes_active {float(active)}" in text
        assert f"forkd_snapshots_total {float(snaps)}" in text
        assert 'forkd_build_info{version="' in text and "forkd_spawn_seconds_count" in text
        assert "forkd_http_request_duration_seconds" in text
        assert "forkd_branches_in_flight 0.0" in text and "forkd_branch_concurrency_cap 4.0" in text
        for s in sids:
            c.delete(f"/v1/sandboxes/{s}")


def test_snapshot_in_use_cannot_be_deleted(daemon: Daemon, engine, snapshot: str) -> None:
    from .test_snapshots import clone_snapshot

    clone_snapshot(engine, snapshot, "in-use")
    with daemon.client() as c:
        (sid,) = spawn(c, "in-use")
        r = c.delete("/v1/snapshots/in-use")
        assert r.status_code == 409 and "force" in r.json()["error"]
        assert c.get("/v1/snapshots/in-use/info").json()["sandboxes"] == 1
        c.delete(f"/v1/sandboxes/{sid}")
        assert c.delete("/v1/snapshots/in-use").status_code == 204
        assert c.get("/v1/snapshots/in-use/info").status_code == 404


def test_audit_log_and_sighup_reopen(daemon: Daemon) -> None:
    httpx.get(f"{daemon.url}/v1/sandboxes")  # a 401
    lines = [json.loads(x) for x in daemon.audit.read_text().splitlines()]
    last = [x for x in lines if x["status"] == 401][-1]
    assert {"ts", "method", "path", "status", "latency_us", "ua", "remote"} <= set(last)
    assert daemon.token not in daemon.audit.read_text()
    rotated = daemon.audit.with_suffix(".log.1")
    os.rename(daemon.audit, rotated)
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not daemon.audit.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    httpx.get(f"{daemon.url}/healthz")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and '"/healthz"' not in daemon.audit.read_text():
        time.sleep(0.05)
    assert '"/healthz"' in daemon.audit.read_text()


def test_restart_keeps_sandboxes_and_prunes_dead_ones(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        keep, dead = spawn(c, snapshot, 2)
        c.post(f"/v1/sandboxes/{keep}/run_code", json={"code": "mark = 'before-restart'"})
        dead_pid = c.get(f"/v1/sandboxes/{dead}").json()["pid"]
    assert daemon.stop() == 0
    os.kill(dead_pid, signal.SIGKILL)
    daemon.restart()
    with daemon.client() as c:
        assert c.post(f"/v1/sandboxes/{keep}/eval", json={"expr": "mark"}).json()["value"] == "before-restart"
        assert c.get(f"/v1/sandboxes/{dead}").status_code == 404
        assert dead not in json.loads(daemon.state.read_text())["sandboxes"]
        c.delete(f"/v1/sandboxes/{keep}")


def test_recycled_pid_is_not_adopted(daemon: Daemon, snapshot: str) -> None:
    """A state record whose PID now belongs to another program is pruned, and that program lives."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        daemon.stop()
        state = json.loads(daemon.state.read_text())
        fake = "sb-feedfacefeedface"
        state["sandboxes"][fake] = {"id": fake, "snapshot_tag": snapshot, "pid": other.pid,
                                    "workdir": str(daemon.dir / "run" / fake), "created_at": time.time()}
        daemon.state.write_text(json.dumps(state))
        daemon.restart()
        with daemon.client() as c:
            assert c.get(f"/v1/sandboxes/{fake}").status_code == 404
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_sigterm_drains_in_flight_requests(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        (sid,) = spawn(c, snapshot)
    out: dict[str, object] = {}

    def slow() -> None:
        with daemon.client() as c2:
            out["r"] = c2.post(f"/v1/sandboxes/{sid}/exec", json={"argv": ["sleep", "2"]})

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.7)
    assert daemon.stop(signal.SIGTERM) == 0
    t.join(60)
    assert out["r"].status_code == 200 and out["r"].json()["exit_code"] == 0  # type: ignore[union-attr]
    daemon.restart()
    with daemon.client() as c:
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204


def test_unix_socket(tmp_path: Path, engine) -> None:
    sock = tmp_path / "forkd.sock"
    proc = start_daemon_process(["--bind", f"unix:{sock}", "--state", str(tmp_path / "s.json"), "--audit-log",
                                 str(tmp_path / "a.log"), "--snapshot-root", str(engine.store.root)], tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://forkd") as c:
            assert c.get("/healthz").json() == {"ok": True}
            assert c.get("/v1/snapshots").status_code == 200
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
    finally:
        proc.terminate()
        proc.wait(60)


def test_oom_killed_sandbox_reports_it(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "n": 2, "memory_limit_mib": 160})
        assert r.status_code == 201, r.text
        hog, other = (e["sandbox"]["id"] for e in r.json())
        assert c.get(f"/v1/sandboxes/{hog}").json()["memory_limit_mib"] == 160
        r = c.post(f"/v1/sandboxes/{hog}/run_code", json={"code": "x = bytearray(400 << 20)", "timeout_s": 300})
        assert r.status_code == 409 and "OOM-killed" in r.json()["error"]
        info = c.get(f"/v1/sandboxes/{hog}").json()
        assert info["status"] == "exited" and "OOM-killed" in info["exit_reason"]
        assert c.post(f"/v1/sandboxes/{other}/eval", json={"expr": "1"}).json()["value"] == 1
        for s in (hog, other):
            assert c.delete(f"/v1/sandboxes/{s}").status_code == 204


def test_a_second_daemon_on_the_same_state_is_refused_and_harms_nothing(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        (sid,) = spawn(c, snapshot)
    p = subprocess.run([sys.executable, "-m", "forkd.daemon", "serve", "--bind", f"127.0.0.1:{free_port()}",
                        "--state", str(daemon.state), "--audit-log", str(daemon.dir / "audit2.log")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "already using --state" in p.stderr
    with daemon.client() as c:
        assert c.post(f"/v1/sandboxes/{sid}/ping").status_code == 200
        assert sid in json.loads(daemon.state.read_text())["sandboxes"]
        c.delete(f"/v1/sandboxes/{sid}")


def test_branch_through_the_api(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        (sid,) = spawn(c, snapshot)
        c.post(f"/v1/sandboxes/{sid}/run_code", json={"code": "gen = 'one'"})
        r = c.post(f"/v1/sandboxes/{sid}/branch", json={"tag": "api-br1", "mode": "delta"})
        assert r.status_code == 201, r.text
        b = r.json()
        assert b["mode"] == "delta" and b["pause_ms"] > 0 and b["bytes_written"] > 0
        assert c.post(f"/v1/sandboxes/{sid}/branch", json={"tag": "api-br1"}).status_code == 409
        r = c.post(f"/v1/sandboxes/{sid}/branch", json={"tag": "api-br2", "mode": "flat", "wait": False})
        assert r.status_code == 202 and r.json()["status"] == "writing"
        deadline = time.monotonic() + 300
        while c.get("/v1/snapshots/api-br2/info").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        (g,) = spawn(c, "api-br1")
        assert c.post(f"/v1/sandboxes/{g}/eval", json={"expr": "gen"}).json()["value"] == "one"
        assert c.post(f"/v1/sandboxes/{sid}/ping").status_code == 200  # the source keeps running
        info = c.get("/v1/snapshots/api-br1/info").json()
        assert info["depth"] == 1 and info["ancestors"] == [snapshot] and info["kind"] == "delta"
        assert "api-br1" in c.get(f"/v1/snapshots/{snapshot}/info").json()["dependents"]
        r = c.post("/v1/snapshots/api-br1/compact", json={"to": "api-br1c"})
        assert r.status_code == 201 and r.json()["kind"] == "root" and r.json()["parent"] is None
        for s in (sid, g):
            c.delete(f"/v1/sandboxes/{s}")
        assert c.delete("/v1/snapshots/api-br1?cascade=true&force=true").status_code == 400
        for t in ("api-br1", "api-br2", "api-br1c"):
            assert c.delete(f"/v1/snapshots/{t}").status_code == 204


def test_the_daemon_serves_the_committed_contract(daemon: Daemon) -> None:
    committed = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
    with daemon.client() as c:
        assert c.get("/openapi.json").json() == committed


def _gone(c: httpx.Client, sid: str, timeout: float = 120.0) -> str:
    """Wait until ``sid`` answers 404; its error message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.get(f"/v1/sandboxes/{sid}")
        if r.status_code == 404:
            return str(r.json()["error"])
        time.sleep(0.5)
    raise AssertionError(f"sandbox {sid} still there after {timeout} s")


def test_metadata_labels_and_filter(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "n": 2, "metadata": {"team": "a", "run": "7"}})
        a = [e["sandbox"]["id"] for e in r.json()]
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "metadata": {"team": "b"}})
        (b,) = [e["sandbox"]["id"] for e in r.json()]
        try:
            assert c.get(f"/v1/sandboxes/{b}").json()["metadata"] == {"team": "b"}
            assert sorted(s["id"] for s in c.get("/v1/sandboxes", params={"metadata": "team:a"}).json()) == sorted(a)
            both = c.get("/v1/sandboxes", params=[("metadata", "team:a"), ("metadata", "run:7")]).json()
            assert sorted(s["id"] for s in both) == sorted(a)
            assert c.get("/v1/sandboxes", params=[("metadata", "team:a"), ("metadata", "run:8")]).json() == []
            assert c.get("/v1/sandboxes", params={"metadata": "no-colon"}).status_code == 400
            bad = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "metadata": {"team": 1}})
            assert bad.status_code == 422 and "metadata" in bad.json()["error"]
        finally:
            for sid in [*a, b]:
                c.delete(f"/v1/sandboxes/{sid}")


def test_lifetime_expires_and_can_be_extended(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "n": 2, "lifetime_s": 20})
        short, extended = [e["sandbox"] for e in r.json()]
        assert short["expires_at"] is not None and short["expires_at"] - short["created_at"] == pytest.approx(20)
        moved = c.post(f"/v1/sandboxes/{extended['id']}/timeout", json={"lifetime_s": 600}).json()
        assert moved["expires_at"] > time.time() + 500
        assert c.post(f"/v1/sandboxes/{extended['id']}/timeout", json={"lifetime_s": "600"}).status_code == 422
        why = _gone(c, short["id"])
        assert "lifetime ran out" in why
        for _ in range(100):  # the VM itself is gone
            if not os.path.exists(f"/proc/{short['pid']}"):
                break
            time.sleep(0.2)
        assert not os.path.exists(f"/proc/{short['pid']}")
        assert c.post(f"/v1/sandboxes/{extended['id']}/eval", json={"expr": "1 + 1"}).json()["value"] == 2
        c.delete(f"/v1/sandboxes/{extended['id']}")
        assert "killed" in c.get(f"/v1/sandboxes/{extended['id']}").json()["error"]


def test_lifetime_runs_out_while_the_daemon_is_down(daemon: Daemon, snapshot: str) -> None:
    with daemon.client() as c:
        (sb,) = [e["sandbox"] for e in c.post("/v1/sandboxes", json={"snapshot_tag": snapshot,
                                                                      "lifetime_s": 8}).json()]
    assert daemon.stop() == 0
    assert json.loads(daemon.state.read_text())["sandboxes"][sb["id"]]["expires_at"] == sb["expires_at"]
    time.sleep(max(0.0, sb["expires_at"] - time.time()) + 1)
    daemon.restart()
    with daemon.client() as c:
        assert "lifetime ran out" in _gone(c, sb["id"], timeout=10)
    daemon.restart()  # the reason survives another restart
    with daemon.client() as c:
        assert "lifetime ran out" in _gone(c, sb["id"], timeout=10)


def test_unbootable_snapshots_are_listed_with_why(daemon: Daemon, engine) -> None:  # type: ignore[no-untyped-def]
    import shutil

    broken = engine.store.root / "broken-one"
    broken.mkdir()
    (broken / "snapshot.json").write_text("{not json")
    try:
        with daemon.client() as c:
            entry = next(s for s in c.get("/v1/snapshots").json() if s["tag"] == "broken-one")
            assert entry["bootable"] is False and entry["status"] == "failed"
            assert entry["warning"].startswith("snapshot is not bootable:")
            assert all(s["bootable"] for s in c.get("/v1/snapshots").json() if s["tag"] != "broken-one")
    finally:
        shutil.rmtree(broken)
