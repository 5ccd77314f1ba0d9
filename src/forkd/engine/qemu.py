"""QEMU binary discovery and the command lines of parent and child VMs.

Parent and children must present the guest with exactly the same machine and devices (their state is
in ``vmstate``); only host-side backends (sockets, files, network) differ per process. ``MachineSpec``
holds the guest-visible part and is recorded in ``snapshot.json``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forkd.engine.disk import DISK_DEVICE
from forkd.engine.jail import JailSpec
from forkd.engine.jail import qemu_args as jail_args
from forkd.engine.specguard import check_spec_json
from forkd.errors import VMError

AGENT_PORT_NAME = "org.forkd.agent"
GUEST_MAC = "52:54:00:12:34:56"
# QEMU's own seccomp filter: a compromised QEMU cannot exec, raise privileges or use obsolete calls.
SANDBOX_OPTS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# A jailed QEMU calls setuid/setgid itself (after the filter is in place) to drop root; once it has,
# it has no capabilities and no_new_privs, so set*id can no longer raise anything.
JAILED_SANDBOX_OPTS = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
#: A child's serial console is a ring in QEMU's memory (the last CONSOLE_RING bytes, read over QMP):
#: a guest writing to it for ever costs the host nothing more.
CONSOLE_RING = 64 << 10
#: microvm's default firmware name, and the file Debian ships qboot as. QEMU 7.2's qemu-system-data has
#: bios-microvm.bin -> qboot.rom; later ones drop the link, so the name falls through to SeaBIOS's
#: microvm build (/usr/share/seabios), which cannot boot -kernel with x-option-roms=off.
MICROVM_BIOS, QBOOT = "bios-microvm.bin", "qboot.rom"


@dataclass(frozen=True)
class QemuBinary:
    """A qemu-system-x86_64 binary and its version."""

    path: str
    version: str  # "7.2.22"
    package: str  # "Debian 1:7.2+dfsg-7+deb12u18+b3"
    # qboot, named explicitly (``-bios``) when microvm's default firmware name would not find it
    bios: str | None = None

    def to_json(self) -> dict[str, str]:
        d = asdict(self)
        if d["bios"] is None:
            del d["bios"]
        return d

    def at_least(self, major: int, minor: int) -> bool:
        """Whether this QEMU is version ``major.minor`` or later."""
        return version_tuple(self.version) >= (major, minor)


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a QEMU version string such as "10.0.2"."""
    major, minor = (int(x) for x in version.split(".")[:2])
    return major, minor


def qemu_path() -> str:
    """Path of qemu-system-x86_64 (``$FORKD_QEMU`` overrides); VMError with an install hint if absent."""
    cand = os.environ.get("FORKD_QEMU") or shutil.which("qemu-system-x86_64")
    if not cand or not os.access(cand, os.X_OK):
        raise VMError("qemu-system-x86_64 not found; install it with: apt-get install -y qemu-system-x86")
    return cand


@functools.lru_cache(maxsize=8)
def _probe(path: str) -> QemuBinary:
    try:
        out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise VMError(f"{path} -version failed: {e}") from e
    m = re.search(r"version (\d+\.\d+\.\d+)\s*(?:\((.*?)\))?", out)
    if not m:
        raise VMError(f"cannot parse the QEMU version from: {out.strip()[:200]!r}")
    return QemuBinary(path=path, version=m.group(1), package=m.group(2) or "", bios=_qboot_override(path))


def _qboot_override(path: str) -> str | None:
    """The qboot file to pass with ``-bios`` when ``bios-microvm.bin`` in this QEMU's data directories
    (``-L help``, searched in order as QEMU does) is not qboot, else None (QEMU's default is qboot)."""
    try:
        out = subprocess.run([path, "-L", "help"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    dirs = [Path(line.strip()) for line in out.splitlines() if line.strip().startswith("/")]

    def first(name: str) -> Path | None:
        return next((d / name for d in dirs if (d / name).is_file()), None)

    qboot, default = first(QBOOT), first(MICROVM_BIOS)
    if qboot is None or (default is not None and default.resolve() == qboot.resolve()):
        return None
    return str(qboot.resolve())


def qemu_binary() -> QemuBinary:
    """The QEMU binary forkd uses, probed once per process."""
    return _probe(qemu_path())


@dataclass(frozen=True)
class MachineSpec:
    """Everything the guest can see; identical for a parent and all of its children."""

    memory_mib: int = 512
    vcpus: int = 1
    machine: str = "microvm"
    # mem-merge=off: guest RAM is never offered to KSM (cross-tenant de-duplication is a side channel)
    machine_opts: str = "x-option-roms=off,mem-merge=off"
    accel: str = "tcg"
    accel_opts: str = ""
    cpu: str = "max"
    devices: tuple[str, ...] = field(default_factory=lambda: default_devices())

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        return d

    @classmethod
    def from_json(cls, d: object) -> MachineSpec:
        """The spec recorded in snapshot.json; SnapshotInvalidError (naming the field and the rule)
        unless every field is one this forkd version writes (see ``specguard``)."""
        return cls(**check_spec_json(d, device_lists()))

    def check(self) -> MachineSpec:
        """This spec, re-checked as ``from_json`` checks a recorded one (before it reaches a QEMU argv)."""
        check_spec_json(self.to_json(), device_lists())
        return self

    @property
    def has_disk(self) -> bool:
        return DISK_DEVICE in self.devices


def default_devices() -> tuple[str, ...]:
    """Guest devices in a fixed order (microvm assigns virtio-mmio slots in command-line order)."""
    return (
        "virtio-serial-device,id=vser0",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},bus=vser0.0",
        f"virtio-net-device,netdev=net0,mac={GUEST_MAC}",
    )


def device_lists() -> tuple[tuple[str, ...], ...]:
    """The device lists a spec may have: without a root disk (initramfs guest), and with one."""
    return default_devices(), (*default_devices(), DISK_DEVICE)


def default_accel_opts(accel: str) -> str:
    # A smaller translation cache costs little guest speed and keeps per-child memory down.
    return "tb-size=32" if accel == "tcg" else ""


@dataclass
class HostSide:
    """Per-process host backends: socket fds, log files, network."""

    name: str
    agent_fd: int
    qmp_fd: int
    console_path: Path | None  # None: the console is a ring (CONSOLE_RING bytes, QMP ringbuf-read)
    netdev: str = "user,id=net0"
    sandbox: bool = True
    jail: JailSpec | None = None
    disk_args: tuple[str, ...] = ()  # -blockdev options of the root disk (see engine/disk.py)


def build_argv(qemu: QemuBinary, spec: MachineSpec, host: HostSide, memory_path: Path, *,
               share: bool, boot: tuple[Path, Path, str] | None = None, incoming: bool = False) -> list[str]:
    """The QEMU command line.

    ``share=True`` maps ``memory_path`` MAP_SHARED (a parent writing its RAM into the snapshot file);
    ``share=False`` maps it MAP_PRIVATE (a child: copy-on-write over the snapshot).
    ``boot`` is (kernel, initrd, cmdline) for a parent; children boot from the state instead and need none.
    """
    accel = spec.accel + (f",{spec.accel_opts}" if spec.accel_opts else "")
    machine = spec.machine + (f",{spec.machine_opts}" if spec.machine_opts else "") + ",memory-backend=mem"
    mem = (f"memory-backend-file,id=mem,size={spec.memory_mib}M,mem-path={memory_path},"
           f"share={'on' if share else 'off'}")
    if not share and qemu.at_least(8, 2):
        # QEMU 8.2+: open the snapshot's memory file O_RDONLY (the private mapping stays writable RAM,
        # rom=off): a compromised child QEMU holds no fd that could write the shared base file
        mem += ",readonly=on,rom=off"
    argv = [qemu.path, "-name", host.name, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-accel", accel, "-cpu", spec.cpu, "-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M",
            "-machine", machine, "-object", mem]
    if qemu.bios is not None:
        argv += ["-bios", qemu.bios]
    if host.sandbox:
        argv += ["-sandbox", JAILED_SANDBOX_OPTS if host.jail is not None else SANDBOX_OPTS]
    if host.jail is not None:
        argv += jail_args(qemu.version, host.jail)
    if boot is not None:
        kernel, initrd, cmdline = boot
        argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
    if host.console_path is None:
        argv += ["-chardev", f"ringbuf,id=console,size={CONSOLE_RING}", "-serial", "chardev:console"]
    else:
        argv += ["-serial", f"file:{host.console_path}"]
    argv += ["-chardev", f"socket,id=agent,fd={host.agent_fd},server=on,wait=off",
             "-chardev", f"socket,id=qmp,fd={host.qmp_fd},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control",
             "-netdev", host.netdev, *host.disk_args]
    for dev in spec.devices:
        argv += ["-device", dev]
    # No global-state section in the stream: a child runs as soon as the state is loaded (no 'cont').
    argv += ["-global", "migration.store-global-state=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv
