"""The jail every QEMU runs in (parent, child, pool member): the VMM is assumed compromisable.

QEMU is started as root only long enough to open what it needs (memory file, state, sockets passed
as fds), then it chroots into an empty per-VM directory and drops to a uid/gid of its own, with no
capabilities and ``no_new_privs`` (QEMU's ``-chroot``/``-runas``, or ``-run-with`` on newer QEMUs: ``qemu_args``).
Before exec, in the forked child, forkd joins the VM's cgroups (so the very first page QEMU touches
is charged there), enters its network namespace, unshares mount/IPC/UTS namespaces, shrinks the
capability bounding set to the three QEMU needs to drop privileges, sets rlimits and raises its
OOM score above the daemon's. Each VM's uid comes from a configurable range and is held by a lock
file that QEMU itself keeps open: it is free again the moment that QEMU exits, whoever started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import random
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkd.errors import ForkdError

UID_BASE_ENV, UID_COUNT_ENV = "FORKD_JAIL_UID_BASE", "FORKD_JAIL_UID_COUNT"
DEFAULT_UID_BASE = 1_500_000_000  # far above the usual subuid/subgid ranges
DEFAULT_UID_COUNT = 65536
LOCK_DIR = Path(os.environ.get("FORKD_JAIL_LOCK_DIR", "/run/forkd/uids"))

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x04000000, 0x08000000, 0x40000000
PR_CAPBSET_DROP = 24
CAP_SETGID, CAP_SETUID, CAP_SYS_CHROOT = 6, 7, 18
KEEP_CAPS = frozenset({CAP_SETGID, CAP_SETUID, CAP_SYS_CHROOT})  # what QEMU needs to jail itself
MS_REC, MS_PRIVATE = 0x4000, 1 << 18

#: rlimits of a jailed QEMU. FSIZE bounds every file it can write (its log, a device state), CORE=0:
#: no core dumps. Its tasks are bounded by its pids cgroup, not RLIMIT_NPROC: QEMU starts threads
#: while still root, and NPROC would count those against every root process of the host.
RLIMITS = {
    resource.RLIMIT_NOFILE: 256,
    resource.RLIMIT_FSIZE: 64 << 20,
    resource.RLIMIT_CORE: 0,
}
OOM_SCORE_ADJ = 500  # a VM dies before the daemon (which sets itself to DAEMON_OOM_SCORE_ADJ)
DAEMON_OOM_SCORE_ADJ = -900


class JailError(ForkdError):
    """The jail cannot be set up (not root, no free uid, ...)."""


def uid_range() -> range:
    """The uids (and gids) jailed VMs get: ``FORKD_JAIL_UID_BASE`` .. + ``FORKD_JAIL_UID_COUNT``."""
    try:
        base = int(os.environ.get(UID_BASE_ENV, DEFAULT_UID_BASE))
        count = int(os.environ.get(UID_COUNT_ENV, DEFAULT_UID_COUNT))
    except ValueError as e:
        raise JailError(f"{UID_BASE_ENV}/{UID_COUNT_ENV} must be integers: {e}") from e
    if not (base >= 1000 and 16 <= count <= 1 << 24 and base + count < 2**32 - 1):
        raise JailError(f"jail uid range {base}+{count} is out of bounds (base >= 1000, 16 <= count <= 2^24)")
    return range(base, base + count)


@functools.cache
def can_jail() -> str | None:
    """None if this process can jail VMs, else why not (asked once: spawns call it on their path)."""
    if os.geteuid() != 0:
        return "forkd is not running as root: it cannot give each QEMU its own uid, chroot and namespaces"
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return "cannot read this process's capabilities"
    missing = [n for n, c in (("CAP_SETUID", CAP_SETUID), ("CAP_SETGID", CAP_SETGID),
                              ("CAP_SYS_CHROOT", CAP_SYS_CHROOT), ("CAP_SYS_ADMIN", 21), ("CAP_SETPCAP", 8))
               if not eff >> c & 1]
    if missing:
        return f"this process lacks {', '.join(missing)}"
    return None


@dataclass
class Lease:
    """A uid held for one VM: the lock fd goes to QEMU, which keeps it while it lives."""

    uid: int
    fd: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def lease_uid() -> Lease:
    """A uid no running jailed VM has (machine-wide, whichever forkd process started it)."""
    ids = uid_range()
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    start = random.randrange(len(ids))
    for i in range(len(ids)):
        uid = ids[(start + i) % len(ids)]
        fd = os.open(LOCK_DIR / str(uid), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                continue
            raise
        return Lease(uid, fd)
    raise JailError(f"no free jail uid: all {len(ids)} of {ids.start}..{ids.stop - 1} are in use")


def make_root(workdir: Path) -> Path:
    """The VM's empty root directory: nothing in it, nothing it may write (but files we hand it)."""
    root = workdir / "root"
    root.mkdir(mode=0o555)
    os.chmod(root, 0o555)  # whatever the umask (a unit's UMask=0077 would leave 0500: QEMU's uid could not enter)
    return root


def hand_file(root: Path, name: str, uid: int) -> Path:
    """An empty file in the jail that the VM's uid may write (e.g. a device state QEMU saves by name);
    returns its host path. Inside the jail it is ``/name``."""
    p = root / name
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, uid, uid)
    finally:
        os.close(fd)
    return p


@dataclass(frozen=True)
class JailSpec:
    """One VM's jail: who it runs as and where its root is."""

    uid: int
    root: Path

    @property
    def gid(self) -> int:
        return self.uid


@dataclass
class Preexec:
    """What the forked child does before exec. Everything is prepared here, in the parent, so the child
    only makes system calls (it runs in a copy of a multi-threaded process)."""

    cgroup_procs: list[str] = field(default_factory=list)
    netns: str | None = None
    unshare: bool = True
    rlimits: bool = True
    oom_score_adj: int | None = OOM_SCORE_ADJ
    drop_caps: bool = True
    fsize: int | None = None  # RLIMIT_FSIZE instead of the default (a VM whose disk layer grows)

    def needed(self) -> bool:
        return bool(self.cgroup_procs or self.netns or self.unshare or self.rlimits or self.drop_caps
                    or self.oom_score_adj is not None)

    def build(self) -> Callable[[], None]:
        libc = _libc()
        unshare, setns, prctl, mount, sigignore = libc.unshare, libc.setns, libc.prctl, libc.mount, libc.signal
        procs = [p.encode() for p in self.cgroup_procs]
        netns = self.netns.encode() if self.netns else None
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
        limits = list({**RLIMITS, **({resource.RLIMIT_FSIZE: self.fsize} if self.fsize else {})}.items()) \
            if self.rlimits else []
        oom = str(self.oom_score_adj).encode() if self.oom_score_adj is not None else None
        last_cap = _last_cap()
        drop = [c for c in range(last_cap + 1) if c not in KEEP_CAPS] if self.drop_caps else []
        do_unshare = self.unshare

        def child() -> None:
            try:
                steps()
            except BaseException as e:
                # the child's stderr is the VM's qemu.log: the launcher reports what failed from there
                os.write(2, f"forkd jail: {e!r}\n".encode(errors="replace"))
                raise

        def steps() -> None:
            pid = str(os.getpid()).encode()
            for p in procs:  # the cgroups first: everything after is charged there
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            if netns is not None:
                fd = os.open(netns, os.O_RDONLY)
                try:
                    if setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET) failed")
                finally:
                    os.close(fd)
            if do_unshare:
                if unshare(flags) != 0:
                    raise OSError(ctypes.get_errno(), "unshare(mount, ipc, uts) failed")
                # nothing mounted in here propagates back to the host, nor the other way
                if mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                    raise OSError(ctypes.get_errno(), "making / private in the new mount namespace failed")
            if oom is not None:
                fd = os.open(b"/proc/self/oom_score_adj", os.O_WRONLY)
                try:
                    os.write(fd, oom)
                finally:
                    os.close(fd)
            # after the last open: a busy launcher has fds numbered past NOFILE (they are closed at exec)
            for res, value in limits:
                resource.setrlimit(res, (value, value))
            # SIGXFSZ would kill QEMU at the FSIZE limit; ignored, the write fails with EFBIG instead
            sigignore(signal.SIGXFSZ, 1)  # SIG_IGN, kept across exec
            for cap in drop:
                if prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), f"dropping capability {cap} from the bounding set failed")

        return child


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return libc


_enabled: bool | None = None


def configure(enabled: bool | None) -> None:
    """Jail every VM this process starts (True), none (False), or decide from ``FORKD_JAIL`` (None)."""
    global _enabled
    if enabled:
        why = can_jail()
        if why is not None:
            raise JailError(f"cannot jail VMs: {why}")
    _enabled = enabled


def enabled() -> bool:
    """Whether VMs started now are jailed: as configured, else ``FORKD_JAIL`` (``on``/``off``), else
    whenever this process can (it runs as root)."""
    if _enabled is not None:
        return _enabled
    env = os.environ.get("FORKD_JAIL", "auto").strip().lower()
    if env in ("0", "off", "no", "false"):
        return False
    if env in ("1", "on", "yes", "true"):
        why = can_jail()
        if why is not None:
            raise JailError(f"FORKD_JAIL={env} but {why}")
        return True
    return can_jail() is None


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


def qemu_args(version: str, jail: JailSpec) -> list[str]:
    """QEMU's own privilege drop: chroot into the jail root, then switch to the VM's uid and gid.

    ``-run-with chroot=`` exists since QEMU 8.1 (``-chroot`` was removed in 9.0), ``-run-with user=``
    since 9.1 (``-runas`` was removed in 10.0)."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) >= (9, 1):
        return ["-run-with", f"chroot={jail.root},user={jail.uid}:{jail.gid}"]
    if (major, minor) >= (8, 1):
        return ["-run-with", f"chroot={jail.root}", "-runas", f"{jail.uid}:{jail.gid}"]
    return ["-chroot", str(jail.root), "-runas", f"{jail.uid}:{jail.gid}"]


def set_daemon_oom_score() -> None:
    """Make the calling (daemon) process the OOM killer's last choice among forkd's processes."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(str(DAEMON_OOM_SCORE_ADJ))
