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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkd.engine import cgroup, jail, netfilter
from forkd.engine.channel import ADOPT_LEFTOVER_LINES, AgentChannel
from forkd.engine.disk import DiskChain, fsize_limit, new_layer
from forkd.engine.qemu import CONSOLE_RING, HostSide, MachineSpec, QemuBinary, build_argv
from forkd.engine.qmp import QMPClient
from forkd.errors import ForkdError, ValidationError, VMError
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


def netns_path(netns: str | None) -> str | None:
    """The file of network namespace ``netns`` (checked to exist), which QEMU enters before exec."""
    if netns is None:
        return None
    path = NETNS_DIR / netns
    if "/" in netns or not path.exists():
        raise ValidationError(f"network namespace {netns} does not exist; create the child namespaces "
                              "with: scripts/netns-setup.sh N")
    return str(path)


UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL


@contextlib.contextmanager
def _sockaddr(path: Path) -> Iterator[str]:
    """An address for the Unix socket ``path``: the path itself, or, when it is longer than a socket
    address may be (a deep state dir), the same file reached through an open fd of its directory."""
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _sockaddr(path) as addr:
        s.bind(addr)
    os.chmod(path, 0o600)
    s.listen(4)
    return s


def _connect(path: Path, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _sockaddr(path) as addr:
                s.connect(addr)
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
    violation: str | None = None  # why the agent's channel was closed and the VM killed

    @classmethod
    def launch(cls, vm_id: str, workdir: Path, qemu: QemuBinary, spec: MachineSpec, memory_path: Path, *,
               share: bool, boot: tuple[Path, Path, str] | None = None, incoming: bool = False,
               netdev: str = "user,id=net0", pass_fds: tuple[int, ...] = (),
               qmp_ahead: list[tuple[str, dict[str, Any] | None]] = (),  # type: ignore[assignment]
               meta: dict[str, Any] | None = None, memory_limit_mib: int | None = None,
               netns: str | None = None, cpu_limit: float | None = None,
               disk: tuple[DiskChain, Path | None] | None = None) -> tuple[VMProcess, list[int]]:
        """Start QEMU, jailed (see ``jail``) unless jailing is off. Commands in ``qmp_ahead`` are written
        before it starts; their ids are returned.

        ``memory_limit_mib`` caps the VM's cgroup (default when jailed: guest RAM + QEMU's overhead),
        ``cpu_limit`` gives it a CPU quota; ``netns`` runs it inside that network namespace (its
        user-mode network then reaches out from there). A parent (``boot``) logs its console to a file;
        everyone else has a bounded console ring. ``disk`` is the root disk's read-only chain and its
        writable top layer (None: a new empty one in the work dir, a child's own).
        """
        disable_thp_for_children()
        netns_file = netns_path(netns)
        jailed = jail.enabled()
        wd = WorkDir(workdir)
        wd.path.mkdir(mode=0o700, parents=True, exist_ok=False)
        if share and not memory_path.exists():
            # created here at its full size: a jailed QEMU may not grow a file past its FSIZE limit
            with open(memory_path, "xb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.truncate(spec.memory_mib << 20)
        if jailed:
            netfilter.ensure(netns_file)
        lease = jail.lease_uid() if jailed else None
        cg = None
        agent_l = qmp_l = agent_c = qmp_c = None
        try:
            if jailed or memory_limit_mib is not None or cpu_limit is not None:
                cg = cgroup.create(vm_id, memory_limit_mib, guest_mib=spec.memory_mib, cpu_limit=cpu_limit)
            spec_jail = jail.JailSpec(lease.uid, jail.make_root(wd.path)) if lease is not None else None
            disk_args: list[str] = []
            fsize = None
            if disk is not None:
                chain, top = disk
                top = top or new_layer(wd.path / "disk.qcow2", chain.size_bytes)
                disk_args = chain.blockdev_args(top)
                fsize = fsize_limit(chain.size_bytes)
                meta = {**(meta or {}), "disk_top": str(top), "disk_layers": len(chain.layers)}
            agent_l, qmp_l = _listen(wd.agent_sock), _listen(wd.qmp_sock)
            agent_c, qmp_c = _connect(wd.agent_sock), _connect(wd.qmp_sock)
            qmp = QMPClient(qmp_c, vm_name(vm_id))
            ids = [qmp.send("qmp_capabilities")] + [qmp.send(c, a) for c, a in qmp_ahead]
            host = HostSide(name=vm_name(vm_id), agent_fd=agent_l.fileno(), qmp_fd=qmp_l.fileno(),
                            console_path=wd.console if boot is not None else None, netdev=netdev, jail=spec_jail,
                            disk_args=tuple(disk_args))
            argv = build_argv(qemu, spec, host, memory_path, share=share, boot=boot, incoming=incoming)
            pre = jail.Preexec(cgroup_procs=cg.procs_files() if cg is not None else [], netns=netns_file,
                               unshare=jailed, rlimits=jailed, oom_score_adj=jail.OOM_SCORE_ADJ if jailed else None,
                               drop_caps=jailed, fsize=fsize)
            fds = (agent_l.fileno(), qmp_l.fileno(), *pass_fds, *((lease.fd,) if lease is not None else ()))
            with open(wd.qemu_log, "wb") as log:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=fds,
                    preexec_fn=pre.build() if pre.needed() else None,
                    start_new_session=True,  # children outlive the CLI's or daemon's process group
                )
        except BaseException as e:
            for s in (agent_c, qmp_c):
                if s is not None:
                    s.close()
            if cg is not None:
                cg.remove(timeout=0)
            said = tail(wd.qemu_log, 1000).strip() if wd.qemu_log.exists() else ""
            shutil.rmtree(wd.path, ignore_errors=True)
            if isinstance(e, subprocess.SubprocessError):
                raise VMError(f"cannot start QEMU for VM {vm_id}: {e}" + (f" ({said})" if said else "")) from e
            raise
        finally:
            for s in (agent_l, qmp_l):
                if s is not None:
                    s.close()
            if lease is not None:
                lease.close()  # QEMU holds the uid's lock from now on
        vm_meta = {"id": vm_id, "pid": popen.pid, "name": vm_name(vm_id), "started_at": time.time(),
                   "memory_limit_mib": memory_limit_mib, "cpu_limit": cpu_limit, "netns": netns,
                   "uid": spec_jail.uid if spec_jail is not None else None,
                   "jail": str(spec_jail.root) if spec_jail is not None else None, **(meta or {})}
        vm = cls(vm_id=vm_id, workdir=wd, pid=popen.pid, qmp=qmp, channel=None,  # type: ignore[arg-type]
                 popen=popen, meta=vm_meta, cgroup=cg)
        vm.channel = AgentChannel(agent_c, vm_name(vm_id), vm.describe_exit, on_violation=vm.on_violation,
                                  expect_ready=boot is not None)  # a restored agent announced itself in its parent
        atomic_write_json(wd.meta, vm_meta, mode=0o600)
        return vm, ids[1:]

    def save_meta(self) -> None:
        """Rewrite the work dir's record of this VM (after ``meta`` changed)."""
        atomic_write_json(self.workdir.meta, self.meta, mode=0o600)

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
        vm.channel = AgentChannel(_connect(wd.agent_sock, 5), vm_name(vm_id), vm.describe_exit,
                                  on_violation=vm.on_violation, leftover_lines=ADOPT_LEFTOVER_LINES)
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
        if self.violation is not None:
            return f"killed: agent {self.violation}"
        if self.cgroup is not None and self.cgroup.oom_killed():
            return f"OOM-killed: over its memory limit of {self.meta.get('memory_limit_mib')} MiB ({status})"
        return status

    def on_violation(self, reason: str) -> None:
        """The agent broke its protocol (a hostile or broken guest): record why, SIGKILL the QEMU."""
        self.violation = reason
        self.meta["exit_reason"] = f"killed: agent {reason}"
        with contextlib.suppress(ProcessLookupError):
            if self.popen is not None:
                self.popen.send_signal(signal.SIGKILL)
            elif process_matches(self.pid, self.vm_id):
                os.kill(self.pid, signal.SIGKILL)

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

    def console_tail(self, limit: int = 4000) -> str:
        """The end of the guest's serial console: its log file (a parent), or its ring, read over QMP
        while the VM runs (everyone else). Empty when there is nothing to read."""
        if self.workdir.console.exists():
            return tail(self.workdir.console, limit)
        if not self.alive():
            return ""
        try:
            r = self.qmp.execute("ringbuf-read", {"device": "console", "size": CONSOLE_RING, "format": "utf8"},
                                 timeout=5)
        except ForkdError:
            return ""
        return str(r)[-limit:] if isinstance(r, str) else ""

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
