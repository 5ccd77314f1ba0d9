"""Every QEMU is jailed: its own uid, no capabilities, an empty root, its cgroups, rlimits; the snapshot's
files are out of reach; a guest flooding its console costs the host nothing more."""

from __future__ import annotations

import os
import re
import resource
import time
from pathlib import Path

import pytest

from forkd.engine import Engine, jail
from forkd.engine.vm import VMProcess

pytestmark = pytest.mark.vm


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def limits(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        m = re.match(r"(.+?)\s{2,}(\S+)\s+(\S+)", line)
        if m:
            out[m.group(1).strip()] = m.group(2)
    return out


def assert_jailed(vm: VMProcess) -> int:
    """Checks one running QEMU's jail; returns its uid."""
    st = status(vm.pid)
    uid = int(st["Uid"].split()[0])
    assert uid in jail.uid_range(), st["Uid"]
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    root = os.readlink(f"/proc/{vm.pid}/root")
    assert root == str(vm.workdir.path / "root") and os.listdir(root) == []
    lim = limits(vm.pid)
    assert lim["Max core file size"] == "0" and lim["Max open files"] == str(jail.RLIMITS[resource.RLIMIT_NOFILE])
    assert int(lim["Max file size"]) == jail.RLIMITS[resource.RLIMIT_FSIZE]
    assert Path(f"/proc/{vm.pid}/oom_score_adj").read_text().strip() == str(jail.OOM_SCORE_ADJ)
    cg = Path(f"/proc/{vm.pid}/cgroup").read_text()
    assert f"/forkd/{vm.vm_id}" in cg, cg
    for ns in ("mnt", "ipc", "uts"):
        assert os.readlink(f"/proc/{vm.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    return uid


def test_children_are_jailed_with_distinct_uids(spawn) -> None:
    kids = spawn(3)
    uids = {assert_jailed(k.vm) for k in kids}
    assert len(uids) == 3
    assert all(k.eval("6*7")["value"] == 42 for k in kids)
    # a sibling cannot signal another: different uids, no CAP_KILL (checked from a jailed uid's view)
    a, b = kids[0], kids[1]
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(int(status(a.pid)["Gid"].split()[0]))
            os.setuid(int(status(a.pid)["Uid"].split()[0]))
            os.kill(b.pid, 0)
            os._exit(1)
        except PermissionError:
            os._exit(0)
        except BaseException:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0
    assert b.eval("1")["value"] == 1


def memory_fd_modes(pid: int, memory: Path) -> list[int]:
    """The access modes (O_RDONLY, O_RDWR, ...) of every fd process ``pid`` holds on ``memory``."""
    want, modes = str(memory.resolve()), []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != want:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags = next(int(line.split()[1], 8) for line in info.splitlines() if line.startswith("flags:"))
        modes.append(flags & os.O_ACCMODE)
    return modes


def test_a_child_holds_the_memory_file_read_only_on_qemu_8_2(engine: Engine, snapshot: str, spawn) -> None:
    """QEMU 8.2+ children open memory.bin O_RDONLY (readonly=on,rom=off); QEMU 7.2 opens it O_RDWR (see
    docs/security.md). Either way the mapping is private, writable RAM: the guest's writes are its own."""
    snap = engine.store.open(snapshot)
    (k,) = spawn(1)
    assert memory_fd_modes(k.pid, snap.memory) == [os.O_RDONLY if engine.qemu.at_least(8, 2) else os.O_RDWR]
    k.run_code("B = bytearray(b'y') * (16 << 20)")
    smaps = Path(f"/proc/{k.pid}/smaps").read_text().splitlines()
    i = next(i for i, line in enumerate(smaps) if line.endswith(str(snap.memory.resolve())))
    assert smaps[i].split()[1] == "rw-p", smaps[i]
    dirty_kib = next(int(line.split()[1]) for line in smaps[i + 1:] if line.startswith("Private_Dirty:"))
    assert dirty_kib >= 16 << 10, dirty_kib
    assert k.eval("B[-1]")["value"] == ord("y")


def test_pool_members_are_jailed(engine: Engine, snapshot: str) -> None:
    pool = engine.start_pool(snapshot, 2)
    try:
        deadline = time.monotonic() + 300
        while len(pool._ready) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        members = list(pool._ready)
        assert len(members) == 2
        assert len({assert_jailed(vm) for vm in members}) == 2
    finally:
        engine.start_pool(snapshot, 0)


def test_the_parent_is_jailed_while_it_boots(engine: Engine, image) -> None:
    seen: list[int] = []

    def step(msg: str) -> None:
        if msg.startswith("letting the guest settle"):
            for p in Path("/proc").iterdir():
                if p.name.isdigit():
                    try:
                        args = (p / "cmdline").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    if b"-name" in args and args[args.index(b"-name") + 1].startswith(b"forkd-parent-jailcheck"):
                        seen.append(int(status(int(p.name))["Uid"].split()[0]))
                        assert int(status(int(p.name))["CapEff"], 16) == 0

    engine.create_snapshot("jailcheck", image=image, step=step, settle_max_s=5)
    try:
        assert len(seen) == 1 and seen[0] in jail.uid_range()
        snap_dir = engine.store.path("jailcheck")
        assert snap_dir.stat().st_mode & 0o077 == 0
        for f in snap_dir.iterdir():
            assert f.stat().st_mode & 0o077 == 0, f
    finally:
        engine.delete_snapshot("jailcheck")


def test_a_console_flood_stays_in_its_ring_and_the_sandbox_keeps_answering(spawn) -> None:
    (k,) = spawn(1)
    k.run_code("import subprocess\n"
               "flood = subprocess.Popen(['/bin/sh', '-c', 'while :; do echo flood-flood-flood-flood-flood; done "
               "> /dev/ttyS0'], start_new_session=True)")
    t0 = time.monotonic()
    rss = []
    while time.monotonic() - t0 < 60:
        assert k.eval("2+2", timeout=120)["value"] == 4
        rss.append(int(status(k.pid)["VmRSS"].split()[0]))
        time.sleep(5)
    written = sum(f.stat().st_size for f in k.vm.workdir.path.rglob("*") if f.is_file())
    assert written < 1 << 20, written  # sockets and vm.json: no console file grows on the host
    assert "flood-flood" in k.vm.console_tail()
    assert max(rss) - rss[0] < 32 << 10, rss  # KiB: QEMU's memory does not grow with the output
    assert k.run_code("flood.kill(); flood.wait()\n'stopped'")["value"] == "stopped"


def test_a_busy_launcher_with_many_open_files_still_starts_jailed_vms(spawn) -> None:
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(jail.RLIMITS[resource.RLIMIT_NOFILE] + 64)]
    try:
        (k,) = spawn(1)
        assert_jailed(k.vm)
        assert k.eval("3*3")["value"] == 9
    finally:
        for fd in held:
            os.close(fd)
