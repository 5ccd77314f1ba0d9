"""Unit tests of engine modules that need no VM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from forkd.engine import accel as accel_mod
from forkd.engine import jail
from forkd.engine.channel import AgentChannel
from forkd.engine.cleanup import sweep
from forkd.engine.jsonlines import LineReader, LineTooLong
from forkd.engine.qemu import HostSide, MachineSpec, QemuBinary, build_argv
from forkd.engine.snapshot import MEMORY_NAME, VMSTATE_NAME, SnapshotMeta, SnapshotStore
from forkd.engine.vm import process_matches, vm_name
from forkd.errors import (
    AgentError,
    ChannelClosedError,
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    ValidationError,
)
from forkd.paths import validate_tag


def test_validate_tag() -> None:
    assert validate_tag("py-agent_1") == "py-agent_1"
    for bad in ["", "a" * 65, "../x", "a.b", "a b", None, 3]:
        with pytest.raises(ValidationError, match="tag must match"):
            validate_tag(bad)


def test_accel_forced_and_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    assert accel_mod.choose_accel("tcg").name == "tcg"
    with pytest.raises(ValidationError, match="accel must be one of"):
        accel_mod.choose_accel("xen")
    monkeypatch.setattr(accel_mod, "kvm_status", lambda: (False, "no vmx"))
    with pytest.raises(ValidationError, match="KVM is not usable: no vmx"):
        accel_mod.choose_accel("kvm")
    c = accel_mod.choose_accel("auto")
    assert (c.name, c.cpu_model) == ("tcg", "max") and "no vmx" in c.reason
    monkeypatch.setattr(accel_mod, "kvm_status", lambda: (True, "has vmx"))
    assert accel_mod.choose_accel(None).name == "kvm"
    assert accel_mod.choose_accel(None).cpu_model == "host"


def test_kvm_status_without_hw_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel_mod, "cpu_flags", lambda: {"sse2"})
    monkeypatch.setattr(accel_mod, "software_kvm_module", lambda: "kvm_pvm")
    ok, why = accel_mod.kvm_status()
    assert not ok and "kvm_pvm" in why


def _argv(share: bool, incoming: bool, boot: bool) -> list[str]:
    q = QemuBinary("/usr/bin/qemu-system-x86_64", "7.2.22", "")
    host = HostSide(name="forkd-x", agent_fd=5, qmp_fd=6, console_path=Path("/tmp/c.log"))
    return build_argv(q, MachineSpec(), host, Path("/s/memory.bin"), share=share, incoming=incoming,
                      boot=(Path("/k"), Path("/i"), "console=ttyS0") if boot else None)


def test_parent_and_child_argv() -> None:
    parent = _argv(True, False, True)
    child = _argv(False, True, False)
    assert any("share=on" in a for a in parent) and "-kernel" in parent and "-incoming" not in parent
    assert any("share=off" in a for a in child) and "-kernel" not in child
    assert child[-2:] == ["-incoming", "defer"]
    devs = lambda argv: [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]  # noqa: E731
    assert devs(parent) == devs(child)
    assert "migration.store-global-state=off" in child


def test_argv_by_qemu_version() -> None:
    """7.2 keeps its command line; 8.2+ children open the memory file read-only; the jail flags follow
    what each QEMU has (-chroot gone in 9.0, -runas in 10.0); qboot is named only when it must be."""
    host = HostSide(name="forkd-x", agent_fd=5, qmp_fd=6, console_path=None)
    mem = Path("/s/memory.bin")

    def argv(version: str, share: bool, bios: str | None = None) -> list[str]:
        return build_argv(QemuBinary("/q", version, "", bios), MachineSpec(), host, mem, share=share)

    def backend(a: list[str]) -> str:
        return a[a.index("-object") + 1]

    assert backend(argv("7.2.22", False)).endswith(",share=off")
    assert backend(argv("8.1.5", False)).endswith(",share=off")
    assert backend(argv("8.2.0", False)).endswith(",share=off,readonly=on,rom=off")
    assert backend(argv("10.0.2", False)).endswith(",share=off,readonly=on,rom=off")
    assert backend(argv("10.0.2", True)).endswith(",share=on")  # a parent writes its RAM into the file
    assert "-bios" not in argv("10.0.2", False)
    a = argv("10.0.2", False, "/usr/share/qemu/qboot.rom")
    assert a[a.index("-bios") + 1] == "/usr/share/qemu/qboot.rom"
    js = jail.JailSpec(1500000007, Path("/w/root"))
    assert jail.qemu_args("7.2.22", js) == ["-chroot", "/w/root", "-runas", "1500000007:1500000007"]
    assert jail.qemu_args("9.0.2", js) == ["-run-with", "chroot=/w/root", "-runas", "1500000007:1500000007"]
    assert jail.qemu_args("10.0.2", js) == ["-run-with", "chroot=/w/root,user=1500000007:1500000007"]
    assert QemuBinary("/q", "7.2.22", "").to_json() == {"path": "/q", "version": "7.2.22", "package": ""}


def test_machine_spec_round_trip() -> None:
    s = MachineSpec(memory_mib=256, vcpus=2, accel_opts="tb-size=32")
    assert MachineSpec.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_line_reader_limits() -> None:
    a, b = socket.socketpair()
    r = LineReader(b, max_line=100)
    a.sendall(b'{"x":1}\n' + b"y" * 300 + b"\nz")
    assert r.readline() == b'{"x":1}\n'
    with pytest.raises(LineTooLong):
        r.readline()
    a.close()
    # the rest of the long line and the unterminated "z" never come back as lines
    lines = []
    while line := r.readline():
        lines.append(line)
    assert all(b"z" not in x for x in lines)


def fake_agent(sock: socket.socket, delay_first: float = 0.2) -> threading.Thread:
    def run() -> None:
        f = sock.makefile("rb")
        reqs = [json.loads(f.readline()) for _ in range(3)]
        for req in reversed(reqs):  # answer out of order
            if req["op"] == "boom":
                rep = {"id": req["id"], "ok": False, "error": {"type": "ValueError", "message": "bad"}}
            else:
                rep = {"id": req["id"], "ok": True, "result": {"echo": req["op"]}}
            sock.sendall((json.dumps(rep) + "\n").encode())
        f.readline()  # one more request that is never answered
        time.sleep(delay_first)
        sock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_channel_matches_ids_and_fails_pending_on_close() -> None:
    host, guest = socket.socketpair()
    fake_agent(guest)
    ch = AgentChannel(host, "test", lambda: "QEMU exit status 1")
    f1, f2, f3 = ch.submit("a"), ch.submit("boom"), ch.submit("c")
    assert ch.result("a", f1, 10) == {"echo": "a"}
    with pytest.raises(AgentError, match="ValueError: bad"):
        ch.result("boom", f2, 10)
    assert ch.result("c", f3, 10) == {"echo": "c"}
    with pytest.raises(ChannelClosedError, match="before the reply to hang.*exit status 1"):
        ch.call("hang", timeout=10)
    with pytest.raises(ChannelClosedError):
        ch.submit("after")
    ch.close()


def _staged(store: SnapshotStore, tag: str, memory: bytes = b"\0" * 8192, vmstate: bytes = b"QEVM....") -> Path:
    staging = store.stage(tag)
    (staging / MEMORY_NAME).write_bytes(memory)
    (staging / VMSTATE_NAME).write_bytes(vmstate)
    return staging


def _meta(tag: str) -> SnapshotMeta:
    return SnapshotMeta(tag=tag, created_at=time.time(), spec=MachineSpec(), qemu={"version": "7.2.22"},
                        accel_reason="", host_cpu="", image={}, guest={}, files={})


def test_store_publish_open_and_corruption(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = store.publish(_staged(store, "t1"), _meta("t1"))
    assert [t for t, s, e in store.list()] == ["t1"]
    again = store.open("t1")
    again.check_files()
    with pytest.raises(SnapshotExistsError, match="already exists"):
        store.stage("t1")
    # a flipped byte in vmstate is caught by its hash
    data = bytearray(snap.vmstate.read_bytes())
    data[0] ^= 1
    snap.vmstate.write_bytes(bytes(data))
    with pytest.raises(SnapshotInvalidError, match="vmstate is corrupt"):
        store.open("t1").check_files()
    # truncation is caught by the size
    snap.memory.write_bytes(b"\0" * 10)
    with pytest.raises(SnapshotInvalidError, match="memory.bin is 10 bytes"):
        store.open("t1").check_files()
    snap.memory.unlink()
    with pytest.raises(SnapshotInvalidError, match="memory.bin is missing"):
        store.open("t1").check_files()
    (snap.path / "snapshot.json").write_text("{not json")
    with pytest.raises(SnapshotInvalidError, match="snapshot.json is corrupt"):
        store.open("t1")
    with pytest.raises(SnapshotNotFoundError):
        store.open("nope")


def test_verification_is_cached_by_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.engine import verify

    store = SnapshotStore(tmp_path)
    store.publish(_staged(store, "t2"), _meta("t2"))
    calls = []
    real = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(verify, "_memo", {})
    store.open("t2").check_files()
    assert calls == []  # identities recorded at publish time
    snap = store.open("t2")
    snap.memory.write_bytes(b"\1" * 8192)  # same size, new content: identity changes
    with pytest.raises(SnapshotInvalidError, match="memory.bin is corrupt"):
        snap.check_files()
    assert calls


def test_staging_is_never_listed_and_is_swept(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    staging = _staged(store, "half")
    assert store.list() == []
    assert staging in store.sweep_staging() or True  # our own pid is alive: kept
    assert staging.exists()
    dead = tmp_path / ".staging-x-999999999-abcd"
    dead.mkdir()
    assert dead in store.sweep_staging()
    assert not dead.exists()


def test_process_matches_and_cleanup(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name", vm_name("live1")])
    try:
        deadline = time.monotonic() + 30
        while not process_matches(live.pid, "live1") and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd
        assert process_matches(live.pid, "live1")
        assert not process_matches(live.pid, "other")
        for vid, pid in (("live1", live.pid), ("dead1", 999999999), ("recycled", live.pid)):
            d = tmp_path / vid
            d.mkdir()
            (d / "vm.json").write_text(json.dumps({"id": vid, "pid": pid}))
        rep = sweep(tmp_path)
        assert sorted(Path(p).name for p in rep.removed) == ["dead1", "recycled"]
        assert [Path(p).name for p in rep.kept_live] == ["live1"]
        assert (tmp_path / "live1").exists() and not (tmp_path / "dead1").exists()
    finally:
        live.kill()
        live.wait()


def test_unix_sockets_work_in_a_directory_deeper_than_a_socket_address(tmp_path: Path) -> None:
    from forkd.engine import vm

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "qmp.sock"
    assert len(os.fsencode(path)) > vm.UNIX_PATH_MAX
    server = vm._listen(path)
    client = vm._connect(path, timeout=5)
    conn, _ = server.accept()
    client.sendall(b"hi")
    assert conn.recv(2) == b"hi" and path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    for s in (conn, client, server):
        s.close()
