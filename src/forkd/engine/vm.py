"""A QEMU process with its work dir, its QMP connection and its agent channel.

Both connections are Unix sockets that *we* bind and listen on, hand to QEMU as inherited fds
(``-chardev socket,fd=N,server=on``) and connect to before QEMU has even started. So nothing can
race the connect, commands can be written ahead, and a restarted controller can connect again later.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkd.engine import cgroup
from forkd.engine.channel import AgentChannel
from forkd.engine.qemu import HostSide, MachineSpec, QemuBinary, build_argv
from forkd.engine.qmp import QMPClient
from forkd.errors import ValidationError, VMError
from forkd.fsutil import atomic_write_json, tail

META = "vm.json"


@dataclass(frozen=True)
class WorkDir:
    """Files of one VM process: sockets, console and QEMU logs, metadata."""

    path: Path

    @property
    def agent_sock(self) -> Path:
        return self.path / "agent.sock"

    @property
    def qmp_sock(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.path / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def meta(self) -> Path:
        return self.path / META

    def read_meta(self) -> dict[str, Any] | None:
        try:
            d = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None


def vm_name(vm_id: str) -> str:
    """The ``-name`` of a forkd VM: how a PID is recognised as ours (see ``process_matches``)."""
    return f"forkd-{vm_id}"


@dataclass(frozen=True)
class RecordedVM:
    """A work dir in a run dir, what its vm.json says, and whether that VM is still running."""

    workdir: WorkDir
    meta: dict[str, Any]
    alive: bool


def recorded_vms(run_dir: Path) -> list[RecordedVM]:
    """Every work dir under ``run_dir`` that has a readable vm.json, sorted by name."""
    if not run_dir.is_dir():
        return []
    out = []
    for d in sorted(run_dir.iterdir()):
        meta = WorkDir(d).read_meta() if d.is_dir() else None
        if meta is not None:
            out.append(RecordedVM(WorkDir(d), meta, process_matches(int(meta.get("pid", 0)), str(meta.get("id", "")))))
    return out


def process_matches(pid: int, vm_id: str) -> bool:
    """True if ``pid`` is alive and really is the QEMU of VM ``vm_id`` (its command line says so).

    A recycled PID belongs to some other program, whose command line does not carry our ``-name``.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    args = raw.split(b"\0")
    want = vm_name(vm_id).encode()
    return any(a == b"-name" and b == want for a, b in zip(args, args[1:], strict=False))


PR_SET_THP_DISABLE = 41


@functools.cache
def disable_thp_for_children() -> bool:
    """Turn transparent huge pages off for this process and so for every QEMU it starts (inherited).

    QEMU asks for huge pages on its TCG translation buffer; each child would then hold whole 2 MiB
    pages (16 MiB measured) where it touches a few KiB. Without them a child's private memory is what
    it really uses.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


NETNS_DIR = Path("/var/run/netns")


def netns_prefix(netns: str | None) -> list[str]:
    """The command prefix that runs QEMU inside network namespace ``netns`` (checked to exist)."""
    if netns is None:
        return []
    if not (NETNS_DIR / netns).exists():
        raise ValidationError(f"network namespace {netns} does not exist; create the child namespaces "
                              "with: scripts/netns-setup.sh N")
    ip = shutil.which("ip")
    if ip is None:
        raise ValidationError("per-child network namespaces need iproute2's ip: apt-get install -y iproute2")
    return [ip, "netns", "exec", netns]


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    os.chmod(path, 0o600)
    s.listen(4)
    return s


def _connect(path: Path, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            if time.monotonic() > deadline:
                raise VMError(f"cannot connect to {path}: {e}") from e
            time.sleep(0.005)


@dataclass
class VMProcess:
    """A running QEMU (started by us, or adopted after a restart) and our connections to it."""

    vm_id: str
    workdir: WorkDir
    pid: int
    qmp: QMPClient
    channel: AgentChannel
    popen: subprocess.Popen[bytes] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    cgroup: cgroup.Cgroup | None = None

    @classmethod
    def launch(cls, vm_id: str, workdir: Path, qemu: QemuBinary, spec: MachineSpec, memory_path: Path, *,
               share: bool, boot: tuple[Path, Path, str] | None = None, incoming: bool = False,
               netdev: str = "user,id=net0", pass_fds: tuple[int, ...] = (),
               qmp_ahead: list[tuple[str, dict[str, Any] | None]] = (),  # type: ignore[assignment]
               meta: dict[str, Any] | None = None, memory_limit_mib: int | None = None,
               netns: str | None = None) -> tuple[VMProcess, list[int]]:
        """Start QEMU. Commands in ``qmp_ahead`` are written before it starts; their ids are returned.

        ``memory_limit_mib`` puts the process in a memory cgroup of its own; ``netns`` runs it inside
        that network namespace (its user-mode network then reaches out from there).
        """
        disable_thp_for_children()
        prefix = netns_prefix(netns)
        cg = cgroup.create(vm_id, memory_limit_mib) if memory_limit_mib is not None else None
        wd = WorkDir(workdir)
        wd.path.mkdir(mode=0o700, parents=True, exist_ok=False)
        agent_l, qmp_l = _listen(wd.agent_sock), _listen(wd.qmp_sock)
        agent_c = qmp_c = None
        try:
            agent_c, qmp_c = _connect(wd.agent_sock), _connect(wd.qmp_sock)
            qmp = QMPClient(qmp_c, vm_name(vm_id))
            ids = [qmp.send("qmp_capabilities")] + [qmp.send(c, a) for c, a in qmp_ahead]
            host = HostSide(name=vm_name(vm_id), agent_fd=agent_l.fileno(), qmp_fd=qmp_l.fileno(),
                            console_path=wd.console, netdev=netdev)
            argv = prefix + build_argv(qemu, spec, host, memory_path, share=share, boot=boot, incoming=incoming)
            with open(wd.qemu_log, "wb") as log:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(agent_l.fileno(), qmp_l.fileno(), *pass_fds),
                    start_new_session=True,  # children outlive the CLI's or daemon's process group
                )
        except BaseException:
            for s in (agent_c, qmp_c):
                if s is not None:
                    s.close()
            if cg is not None:
                cg.remove(timeout=0)
            raise
        finally:
            agent_l.close()
            qmp_l.close()
        vm_meta = {"id": vm_id, "pid": popen.pid, "name": vm_name(vm_id), "started_at": time.time(),
                   "memory_limit_mib": memory_limit_mib, "netns": netns, **(meta or {})}
        vm = cls(vm_id=vm_id, workdir=wd, pid=popen.pid, qmp=qmp, channel=None,  # type: ignore[arg-type]
                 popen=popen, meta=vm_meta, cgroup=cg)
        if cg is not None:
            try:
                cgroup.attach(cg, popen.pid)
            except OSError as e:
                vm.channel = AgentChannel(agent_c, vm_name(vm_id))
                vm.kill()
                raise VMError(f"cannot put VM {vm_id} in its memory cgroup {cg.path}: {e}") from e
        vm.channel = AgentChannel(agent_c, vm_name(vm_id), vm.describe_exit)
        atomic_write_json(wd.meta, vm_meta, mode=0o600)
        return vm, ids[1:]

    @classmethod
    def adopt(cls, workdir: Path) -> VMProcess:
        """Reconnect to a VM we started earlier (e.g. before a controller restart)."""
        wd = WorkDir(workdir)
        meta = wd.read_meta()
        if not meta:
            raise VMError(f"{workdir}: no readable {META}")
        vm_id, pid = str(meta["id"]), int(meta["pid"])
        if not process_matches(pid, vm_id):
            raise VMError(f"VM {vm_id}: process {pid} is gone or is not this VM")
        qmp = QMPClient(_connect(wd.qmp_sock, 5), vm_name(vm_id))
        qmp.execute("qmp_capabilities", timeout=10)
        vm = cls(vm_id=vm_id, workdir=wd, pid=pid, qmp=qmp, channel=None, meta=meta,  # type: ignore[arg-type]
                 cgroup=cgroup.find(vm_id))
        vm.channel = AgentChannel(_connect(wd.agent_sock, 5), vm_name(vm_id), vm.describe_exit)
        return vm

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return process_matches(self.pid, self.vm_id)

    def exit_status(self) -> str | None:
        """How the process ended ("exit status 1", "killed by signal 9", "OOM-killed ..."), or None
        while it runs."""
        if self.popen is not None:
            rc = self.popen.poll()
            if rc is None:
                return None
            status = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        elif process_matches(self.pid, self.vm_id):
            return None
        else:
            status = "process gone"
        if self.cgroup is not None and self.cgroup.oom_killed():
            return f"OOM-killed: over its memory limit of {self.meta.get('memory_limit_mib')} MiB ({status})"
        return status

    def describe_exit(self) -> str:
        # the channel may notice EOF a moment before the process is reaped
        status = None
        for _ in range(50):
            status = self.exit_status()
            if status is not None:
                break
            time.sleep(0.01)
        if status is None:
            return "QEMU is still running"
        log = tail(self.workdir.qemu_log, 1500).strip()
        return f"QEMU {status}" + (f"; QEMU said: {log}" if log else "")

    def disconnect(self) -> None:
        """Close our QMP and agent connections; the VM keeps running (and can be adopted again)."""
        self.channel.close()
        self.qmp.close()

    def kill(self, remove_workdir: bool = True, sig: int = signal.SIGKILL) -> None:
        """End the QEMU process (only if it still is ours) and, by default, remove the work dir."""
        if self.popen is not None:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)
        elif process_matches(self.pid, self.vm_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            _wait_gone(self.pid, self.vm_id, 10)
        self.disconnect()
        if self.cgroup is not None and not self.alive():
            self.cgroup.remove()
        if remove_workdir:
            shutil.rmtree(self.workdir.path, ignore_errors=True)


def _wait_gone(pid: int, vm_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_matches(pid, vm_id) and time.monotonic() < deadline:
        time.sleep(0.01)
