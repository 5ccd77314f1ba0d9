"""The ``forkd`` CLI in local mode, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vm


def forkd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "forkd.cli", *args], capture_output=True, text=True,
                       env=os.environ.copy(), timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"forkd {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_fork_eval_json(snapshot: str) -> None:
    out = json.loads(forkd("fork", "--tag", snapshot, "-n", "2", "--eval", "numpy.zeros(5).tolist()",
                           "--json").stdout)
    assert out["summary"]["ok"] == 2
    for c in out["children"]:
        assert c["result"] == "[0.0, 0.0, 0.0, 0.0, 0.0]" and c["pss_kib"] > 0 and c["ready_ms"] > 0


def test_fork_exec_table(snapshot: str) -> None:
    p = forkd("fork", "--tag", snapshot, "-n", "1", "--exec", "uname", "-s")
    assert "Linux" in p.stdout and "1/1 ok" in p.stdout


def test_snapshot_list_info_and_bad_tag(snapshot: str) -> None:
    tags = [s["tag"] for s in json.loads(forkd("snapshot", "list", "--json").stdout)]
    assert snapshot in tags
    info = json.loads(forkd("snapshot", "info", snapshot, "--json").stdout)
    assert info["memory_mib"] == 512
    p = forkd("snapshot", "info", "../etc", check=False)
    assert p.returncode == 2 and "tag must match" in p.stderr
    p = forkd("fork", "--tag", "does-not-exist", check=False)
    assert p.returncode == 1 and "not found" in p.stderr


def test_cleanup_json(snapshot: str) -> None:
    out = json.loads(forkd("cleanup", "--json").stdout)
    assert "removed" in out and "kept_live" in out


def test_sandbox_commands_local(snapshot: str) -> None:
    (row,) = json.loads(forkd("sandbox", "spawn", "--tag", snapshot, "--json").stdout)
    sid = row["id"]
    try:
        assert any(r["id"] == sid and r["status"] == "running" for r in json.loads(
            forkd("sandbox", "list", "--json").stdout))
        forkd("sandbox", "run", sid, "x = 6")
        assert forkd("sandbox", "eval", sid, "x * 7").stdout.strip() == "42"
        p = forkd("sandbox", "exec", sid, "/bin/sh", "-c", "echo out; exit 3", check=False)
        assert p.returncode == 3 and p.stdout == "out\n"
    finally:
        forkd("sandbox", "kill", sid)
    assert not any(r["id"] == sid for r in json.loads(forkd("sandbox", "list", "--json").stdout)
                   if r["status"] == "running")


def test_sandbox_commands_through_the_daemon(daemon) -> None:  # type: ignore[no-untyped-def]
    env = {"FORKD_URL": daemon.url, "FORKD_TOKEN": daemon.token}
    os.environ.update(env)
    try:
        (row,) = json.loads(forkd("sandbox", "spawn", "--tag", "pyagent-test", "--json").stdout)
        sid = row["id"]
        assert forkd("sandbox", "eval", sid, "numpy.zeros(2).tolist()").stdout.strip() == "[0.0, 0.0]"
        assert sid in forkd("sandbox", "list").stdout
        forkd("sandbox", "kill", sid)
        p = forkd("sandbox", "eval", sid, "1", check=False)
        assert p.returncode == 1 and "not found" in p.stderr
    finally:
        for k in env:
            os.environ.pop(k, None)


def test_bench_local_and_daemon(snapshot: str, daemon) -> None:  # type: ignore[no-untyped-def]
    out = json.loads(forkd("bench", "--tag", snapshot, "-n", "2", "--json").stdout)
    assert [s["step"].split()[0] for s in out["steps"]] == ["spawn", "exec", "eval", "branch", "fan-out", "cleanup"]
    assert out["steps"][4]["detail"] == "2/2 up" and "pause" in out["steps"][3]["detail"]
    os.environ["FORKD_TOKEN"] = daemon.token
    try:
        out = json.loads(forkd("bench", "--tag", snapshot, "-n", "2", "--url", daemon.url, "--json").stdout)
    finally:
        os.environ.pop("FORKD_TOKEN", None)
    assert out["target"] == daemon.url and out["steps"][-1]["detail"] == "3 killed, branch deleted"
    assert [s["step"].split()[0] for s in out["steps"]][3] == "branch"


def test_snapshot_commands_through_the_daemon(daemon, snapshot: str) -> None:  # type: ignore[no-untyped-def]
    token_file = daemon.dir / "token"
    remote = ["--url", daemon.url, "--token-file", str(token_file)]
    made = json.loads(forkd("snapshot", *remote, "create", "--tag", "cli-remote", "--json").stdout)
    assert made["tag"] == "cli-remote" and made["bootable"] is True
    listed = json.loads(forkd("snapshot", *remote, "list", "--json").stdout)
    assert {"cli-remote", snapshot} <= {s["tag"] for s in listed}
    assert json.loads(forkd("snapshot", *remote, "info", "cli-remote", "--json").stdout)["memory_mib"] == 512
    assert "deleted cli-remote" in forkd("snapshot", *remote, "rm", "cli-remote").stdout
    p = forkd("snapshot", *remote, "info", "cli-remote", check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "not found" in p.stderr


def test_pack_and_unpack_through_the_daemon(daemon, snapshot: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    remote = ["--url", daemon.url, "--token-file", str(daemon.dir / "token")]
    out = tmp_path / "cli.tar.zst"
    packed = json.loads(forkd("pack", "--tag", snapshot, "--out", str(out), "--level", "1", *remote, "--json").stdout)
    assert packed["chain"] == [snapshot] and packed["bytes_out"] == out.stat().st_size
    got = json.loads(forkd("unpack", str(out), "--tag", "cli-unpacked", *remote, "--json").stdout)
    assert got["tags"] == got["registered"] == ["cli-unpacked"]
    assert "cli-unpacked" in forkd("snapshot", *remote, "list").stdout
    forkd("snapshot", *remote, "rm", "cli-unpacked")
    bad = forkd("unpack", str(tmp_path / "missing.tar.zst"), *remote, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
