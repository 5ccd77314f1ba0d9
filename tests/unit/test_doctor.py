"""``forkd doctor``: the status logic of the checks (host paths monkeypatched), and one real run."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from forkd import doctor
from forkd.cli.main import cli
from forkd.doctor import Check

GOOD_TOKEN = b"Zm9ya2QtdGVzdC10b2tlbi0zMi1ieXRlcy0wMDAwMDA="


# -- kvm / accelerator


def test_kvm_pvm_without_vmx_warns_naming_it_and_tcg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.touch()
    monkeypatch.setattr(doctor, "KVM_DEV", dev)
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"fpu", "sse2", "avx2"})
    monkeypatch.setattr(doctor, "software_kvm_module", lambda: "kvm_pvm")
    c = doctor.check_kvm()
    assert c.status == "WARN"
    assert "kvm_pvm" in c.detail and "TCG" in c.detail and "stock guest" in c.detail


def test_no_dev_kvm_warns_tcg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "KVM_DEV", tmp_path / "missing")
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"sse2"})
    monkeypatch.setattr(doctor, "software_kvm_module", lambda: None)
    c = doctor.check_kvm()
    assert c.status == "WARN" and "TCG" in c.detail and "no " in c.detail


def test_vmx_and_a_kvm_device_that_opens_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.touch()
    monkeypatch.setattr(doctor, "KVM_DEV", dev)
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"vmx", "sse2"})
    c = doctor.check_kvm()
    assert c.status == "PASS" and "vmx" in c.detail


def test_vmx_without_dev_kvm_hints_the_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "KVM_DEV", tmp_path / "missing")
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"svm"})
    c = doctor.check_kvm()
    assert c.status == "WARN" and c.hint == "modprobe kvm_amd"


def test_forced_kvm_that_is_unusable_fails_the_accelerator_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.engine import accel

    monkeypatch.setenv("FORKD_ACCEL", "kvm")
    monkeypatch.setattr(accel, "kvm_status", lambda: (False, "no vmx/svm"))
    c = doctor.check_accel()
    assert c.status == "FAIL" and "KVM is not usable" in c.detail and "FORKD_ACCEL" in c.hint


# -- kernel, cgroups, KSM


@pytest.mark.parametrize(("release", "status", "scan"), [
    ("6.18.44-fc", "PASS", "PAGEMAP_SCAN available"),
    ("6.1.0-26-amd64", "PASS", "no PAGEMAP_SCAN"),
    ("5.4.0-150-generic", "WARN", "no PAGEMAP_SCAN"),
])
def test_kernel_version(release: str, status: str, scan: str) -> None:
    c = doctor.check_kernel(release)
    assert c.status == status and scan in c.detail


def test_cgroup_v2_memory_controller_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    monkeypatch.setattr(doctor, "CGROUP_V2_ROOT", tmp_path)
    c = doctor.check_cgroup_memory()
    assert c.status == "PASS" and "v2" in c.detail


def test_cgroup_v1_memory_is_a_pass_with_v1_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    monkeypatch.setattr(doctor, "CGROUP_V2_ROOT", tmp_path / "unified")
    monkeypatch.setattr(doctor, "CGROUP_V1_MEMORY", v1)
    c = doctor.check_cgroup_memory()
    assert c.status == "PASS" and "v1 fallback" in c.detail


def test_no_memory_controller_warns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "CGROUP_V2_ROOT", tmp_path / "none")
    monkeypatch.setattr(doctor, "CGROUP_V1_MEMORY", tmp_path / "none" / "memory")
    c = doctor.check_cgroup_memory()
    assert c.status == "WARN" and "memory_limit_mib" in c.detail


@pytest.mark.parametrize(("content", "status"), [("1\n", "WARN"), ("0\n", "PASS"), ("2\n", "PASS"), (None, "PASS")])
def test_ksm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None, status: str) -> None:
    run = tmp_path / "run"
    if content is not None:
        run.write_text(content)
    monkeypatch.setattr(doctor, "KSM_RUN", run)
    c = doctor.check_ksm()
    assert c.status == status
    if status == "WARN":
        assert "side channel" in c.detail and c.hint.startswith(f"echo 0 > {run}")


def test_netns_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "NETNS_DIR", tmp_path)
    c = doctor.check_netns()
    assert c.status == "WARN" and c.hint == "scripts/netns-setup.sh N"
    for i in (1, 2, 3):
        (tmp_path / f"forkd-child-{i}").touch()
    (tmp_path / "other").touch()
    c = doctor.check_netns()
    assert c.status == "PASS" and c.detail.startswith("3 ")


# -- disk


@pytest.mark.parametrize(("free", "status"), [(100 << 20, "FAIL"), (2 << 30, "WARN"), (10 << 30, "PASS")])
def test_snapshot_space(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, free: int, status: str) -> None:
    monkeypatch.setattr(doctor, "free_bytes", lambda _p: free)
    c = doctor.check_snapshot_space(tmp_path)
    assert c.status == status
    if status != "PASS":
        assert c.hint


def test_space_is_measured_at_the_nearest_existing_parent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Path] = []

    def free(p: Path) -> int:
        seen.append(p)
        return 10 << 30

    monkeypatch.setattr(doctor, "free_bytes", free)
    c = doctor.check_snapshot_space(tmp_path / "a" / "b" / "snapshots")
    assert c.status == "PASS" and seen == [tmp_path] and f"measured at {tmp_path}" in c.detail


@pytest.mark.parametrize(("free", "status", "fit"), [(1 << 20, "FAIL", 0), (100 << 20, "WARN", 20),
                                                      (10 << 30, "PASS", 2048)])
def test_scratch_space_says_how_many_children_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, free: int,
                                                  status: str, fit: int) -> None:
    monkeypatch.setattr(doctor, "free_bytes", lambda _p: free)
    c = doctor.check_scratch_space(tmp_path)
    assert c.status == status and f"room for about {fit} children" in c.detail


# -- token, TLS, state


def _token_file(tmp_path: Path, data: bytes, mode: int) -> Path:
    f = tmp_path / "token"
    f.write_bytes(data)
    f.chmod(mode)
    return f


def test_token_file_readable_by_others_fails(tmp_path: Path) -> None:
    f = _token_file(tmp_path, GOOD_TOKEN, 0o644)
    c = doctor.check_token_file(f)
    assert c.status == "FAIL" and "0644" in c.detail and c.hint == f"chmod 600 {f}"


def test_placeholder_token_fails(tmp_path: Path) -> None:
    c = doctor.check_token_file(_token_file(tmp_path, b"REPLACE_ME_WITH_32_BYTES_BASE64", 0o600))
    assert c.status == "FAIL" and "placeholder" in c.detail and "urandom" in c.hint


def test_good_token_file_passes(tmp_path: Path) -> None:
    assert doctor.check_token_file(_token_file(tmp_path, GOOD_TOKEN, 0o600)).status == "PASS"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _pair(ca: trustme.CA, tmp_path: Path, name: str, not_after: dt.datetime | None = None) -> tuple[Path, Path]:
    leaf = ca.issue_cert("127.0.0.1", "localhost", not_after=not_after)
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def test_tls_mismatched_key_fails(ca: trustme.CA, tmp_path: Path) -> None:
    cert1, _ = _pair(ca, tmp_path, "one")
    _, key2 = _pair(ca, tmp_path, "two")
    c = doctor.check_tls(cert1, key2)
    assert c.status == "FAIL" and "do not load as a pair" in c.detail and "openssl" in c.hint


def test_tls_matching_pair_passes(ca: trustme.CA, tmp_path: Path) -> None:
    c = doctor.check_tls(*_pair(ca, tmp_path, "one"))
    assert c.status == "PASS" and "expires" in c.detail


def test_tls_expiring_soon_warns(ca: trustme.CA, tmp_path: Path) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=10)
    c = doctor.check_tls(*_pair(ca, tmp_path, "soon", not_after=soon))
    assert c.status == "WARN" and "days left" in c.detail


def test_tls_cert_without_key_fails(ca: trustme.CA, tmp_path: Path) -> None:
    cert, _ = _pair(ca, tmp_path, "one")
    assert doctor.check_tls(cert, None).status == "FAIL"


def test_state_file(tmp_path: Path) -> None:
    missing = doctor.check_state(tmp_path / "state.json")
    assert missing.status == "PASS" and "will be created" in missing.detail
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    c = doctor.check_state(bad)
    assert c.status == "FAIL" and "not valid JSON" in c.detail
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"version": 1, "sandboxes": {"sb-1": {"pid": 1}}}))
    c = doctor.check_state(good)
    assert c.status == "PASS" and "1 sandbox" in c.detail


# -- daemon


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/healthz":
            body, status = b'{"ok": true}', 200
        elif self.headers.get("Authorization") == "Bearer right-token-0123456789":
            body, status = b'{"version": "0.1.0", "accelerator": "tcg", "qemu_version": "7.2.22"}', 200
        else:
            body, status = b'{"error": "invalid bearer token"}', 401
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_daemon() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_daemon_not_configured_warns() -> None:
    c = doctor.check_daemon(None, None)
    assert c.status == "WARN" and "not configured" in c.detail


def test_daemon_wrong_token_fails(fake_daemon: str) -> None:
    c = doctor.check_daemon(fake_daemon, "wrong-token-0123456789")
    assert c.status == "FAIL" and "token was rejected" in c.detail


def test_daemon_no_token_fails(fake_daemon: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORKD_TOKEN", raising=False)
    c = doctor.check_daemon(fake_daemon, None)
    assert c.status == "FAIL" and "needs a token" in c.detail


def test_daemon_right_token_passes(fake_daemon: str) -> None:
    c = doctor.check_daemon(fake_daemon, "right-token-0123456789")
    assert c.status == "PASS" and "accelerator tcg" in c.detail


def test_daemon_connection_refused_fails() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    c = doctor.check_daemon(f"http://127.0.0.1:{port}", None)
    assert c.status == "FAIL" and "cannot reach" in c.detail and "forkd-controller" in c.hint


# -- running them


def test_a_check_that_raises_becomes_a_fail_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom() -> Check:
        raise RuntimeError("sysfs exploded")

    monkeypatch.setattr(doctor, "check_ksm", boom)
    checks = doctor.run_checks(None, None, None, None, None, None, tmp_path, tmp_path)
    assert [c.number for c in checks] == list(range(1, len(checks) + 1))
    (ksm,) = [c for c in checks if c.name == "ksm"]
    assert ksm.status == "FAIL" and "sysfs exploded" in ksm.detail


def test_optional_checks_only_when_given(tmp_path: Path) -> None:
    names = [c.name for c in doctor.run_checks(None, None, None, None, None, None, tmp_path, tmp_path)]
    assert names[:5] == ["os/arch", "kernel", "kvm", "qemu", "accelerator"]
    assert names[-1] == "daemon" and "token file" not in names
    tok = _token_file(tmp_path, GOOD_TOKEN, 0o600)
    names = [c.name for c in doctor.run_checks(None, None, tok, None, None, tmp_path / "s.json", tmp_path, tmp_path)]
    assert names[-2:] == ["token file", "state file"]


def test_cli_exit_code_and_json_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [Check(1, "a", "PASS", "fine"), Check(2, "b", "WARN", "meh", "do x"), Check(3, "c", "FAIL", "[bad]", "y")]
    monkeypatch.setattr(doctor, "run_checks", lambda *a: rows)
    res = CliRunner().invoke(cli, ["doctor", "--json"], env={"FORKD_URL": "", "FORKD_STATE": ""})
    assert res.exit_code == 1, res.output
    assert json.loads(res.output)["summary"] == {"pass": 1, "warn": 1, "fail": 1}
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 1 and "[bad]" in res.output and "1 fail" in res.output
    monkeypatch.setattr(doctor, "run_checks", lambda *a: rows[:2])
    assert CliRunner().invoke(cli, ["doctor"]).exit_code == 0


def test_real_run_on_this_machine() -> None:
    """``forkd doctor --json`` for real: valid JSON, and the accelerator check says what choose_accel picks."""
    from forkd.engine.accel import choose_accel, cpu_flags, software_kvm_module

    env = {k: v for k, v in os.environ.items()
           if k not in ("FORKD_URL", "FORKD_TOKEN", "FORKD_TOKEN_FILE", "FORKD_TLS_CERT", "FORKD_TLS_KEY",
                        "FORKD_STATE", "FORKD_ACCEL")}
    proc = subprocess.run([sys.executable, "-m", "forkd.cli", "doctor", "--json"], capture_output=True, text=True,
                          timeout=300, env=env)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"not JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    out = json.dumps(report, indent=2)
    checks = {c["name"]: c for c in report["checks"]}
    fails = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert proc.returncode == (1 if fails else 0), out
    assert report["summary"]["fail"] == len(fails), out
    acc = checks["accelerator"]
    assert acc["status"] == "PASS", out
    assert acc["detail"].startswith(choose_accel().name.upper()), out
    if software_kvm_module() == "kvm_pvm" and not {"vmx", "svm"} & cpu_flags():
        # this project's build machine: software-only KVM, so TCG, and nothing else should fail here
        assert acc["detail"].startswith("TCG") and "kvm_pvm" in acc["detail"], out
        assert checks["kvm"]["status"] == "WARN" and "kvm_pvm" in checks["kvm"]["detail"], out
        assert not fails, out
