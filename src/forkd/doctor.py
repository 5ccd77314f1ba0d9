"""``forkd doctor``: is this host ready to run forkd, and is the controller healthy?

Each check is a small function returning a :class:`Check`; :func:`run_checks` numbers them in a fixed
order. A check never raises: an unexpected exception becomes a FAIL (or WARN) row carrying its text.
Nothing here changes the host.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shutil
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from forkd.engine.accel import choose_accel, cpu_flags, software_kvm_module

Status = Literal["PASS", "WARN", "FAIL"]
GIB = 1 << 30
MIB = 1 << 20
CHILD_WORKDIR_BYTES = 5 * MIB  # a child's work dir: sockets, console and QEMU logs, vm.json
MIN_KERNEL = (5, 10)
PAGEMAP_SCAN_KERNEL = (6, 7)
CERT_WARN_DAYS = 30
HTTP_TIMEOUT_S = 5.0

# Host paths, module-level so tests can point them elsewhere.
KVM_DEV = Path("/dev/kvm")
TUN_DEV = Path("/dev/net/tun")
CGROUP_V2_ROOT = Path("/sys/fs/cgroup")
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
NETNS_DIR = Path("/var/run/netns")
NETNS_PREFIX = "forkd-child-"
KSM_RUN = Path("/sys/kernel/mm/ksm/run")


@dataclass(frozen=True)
class Check:
    """One line of the report. ``hint`` is a concrete fix (a command where there is one)."""

    number: int
    name: str
    status: Status
    detail: str
    hint: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _c(name: str, status: Status, detail: str, hint: str = "") -> Check:
    return Check(0, name, status, detail, hint)


def _run(argv: list[str], timeout: float = 30) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True).stdout


# ---------------------------------------------------------------------------------------------
# Host
# ---------------------------------------------------------------------------------------------


def check_platform() -> Check:
    system, machine = platform.system(), platform.machine()
    if system == "Linux" and machine in ("x86_64", "amd64"):
        return _c("os/arch", "PASS", f"{system} {machine}")
    return _c("os/arch", "FAIL", f"{system} {machine}: forkd runs x86_64 guests on x86_64 Linux hosts only",
              "use an x86_64 Linux host")


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise ValueError(f"cannot parse the kernel version {release!r}")
    return int(m.group(1)), int(m.group(2))


def check_kernel(release: str | None = None) -> Check:
    release = release or platform.release()
    ver = kernel_version(release)
    scan = ("PAGEMAP_SCAN available (fast BRANCH)" if ver >= PAGEMAP_SCAN_KERNEL
            else "no PAGEMAP_SCAN (needs >= 6.7): BRANCH would scan pagemap page by page")
    if ver >= MIN_KERNEL:
        return _c("kernel", "PASS", f"{release}; {scan}")
    return _c("kernel", "WARN", f"{release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}; {scan}",
              "upgrade to a kernel >= 5.10 (Debian 12 ships 6.1)")


def check_kvm() -> Check:
    name = "kvm"
    flags = cpu_flags()
    hw = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
    has_dev = os.path.exists(KVM_DEV)
    if hw is None:
        soft = software_kvm_module()
        if soft and has_dev:
            return _c(name, "WARN",
                      f"no vmx/svm; {KVM_DEV} is provided by {soft} (software-only KVM, nested virtualization), "
                      "which cannot run a stock guest: TCG will be used (correct, slower guest code)",
                      "for KVM speed use a host or VM type with hardware virtualization (vmx/svm) exposed")
        where = f"{KVM_DEV} exists but" if has_dev else f"no {KVM_DEV} and"
        return _c(name, "WARN", f"{where} the CPU has no vmx/svm flag: TCG will be used (software emulation)",
                  "enable VT-x/AMD-V in the firmware, or nested virtualization on the hypervisor")
    if not has_dev:
        return _c(name, "WARN", f"the CPU has {hw} but there is no {KVM_DEV}: TCG will be used",
                  f"modprobe {'kvm_intel' if hw == 'vmx' else 'kvm_amd'}")
    try:
        fd = os.open(KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return _c(name, "WARN", f"the CPU has {hw} but {KVM_DEV} does not open read-write ({e.strerror}): "
                  "TCG will be used", f"run as root or add the user to the kvm group: usermod -aG kvm {_user()}")
    os.close(fd)
    return _c(name, "PASS", f"the CPU has {hw} and {KVM_DEV} opens read-write")


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return "$USER"


def check_qemu() -> Check:
    from forkd.engine.qemu import qemu_binary

    hint = "apt-get install -y qemu-system-x86"
    try:
        q = qemu_binary()
    except Exception as e:  # VMError carries the install hint
        return _c("qemu", "FAIL", str(e), hint)
    machines = _run([q.path, "-machine", "help"])
    if not re.search(r"^microvm\s", machines, re.MULTILINE):
        return _c("qemu", "FAIL", f"{q.path} {q.version} has no 'microvm' machine type", hint)
    pkg = f" ({q.package})" if q.package else ""
    if not q.at_least(8, 2):
        return _c("qemu", "WARN", f"{q.path} {q.version}{pkg}: children open the shared memory.bin read-write "
                  "(read-only needs QEMU 8.2+), so a compromised QEMU could write the base file",
                  "make deps QEMU=backports (QEMU 10 from bookworm-backports), then re-create snapshots")
    return _c("qemu", "PASS", f"{q.path} {q.version}{pkg}; microvm machine available; children map "
              "memory.bin read-only")


def check_accel() -> Check:
    try:
        a = choose_accel()
    except Exception as e:  # FORKD_ACCEL=kvm on a host without KVM: the daemon would refuse to start
        return _c("accelerator", "FAIL", str(e), "unset FORKD_ACCEL (auto picks TCG here) or fix KVM")
    return _c("accelerator", "PASS", f"{a.name.upper()} (-cpu {a.cpu_model}): {a.reason}")


def check_cgroup_memory() -> Check:
    name = "cgroup memory"
    try:
        controllers = (CGROUP_V2_ROOT / "cgroup.controllers").read_text().split()
    except OSError:
        controllers = None
    if controllers is not None and "memory" in controllers:
        return _c(name, "PASS", f"cgroup v2 with the memory controller at {CGROUP_V2_ROOT}")
    v1_limit = CGROUP_V1_MEMORY / "memory.limit_in_bytes"
    if v1_limit.exists() and os.access(CGROUP_V1_MEMORY, os.W_OK):
        return _c(name, "PASS", f"v1 fallback: memory controller at {CGROUP_V1_MEMORY} (hybrid hierarchy; the "
                  "cgroup v2 tree has no memory controller)")
    return _c(name, "WARN", "no writable memory controller (cgroup v2 'memory' in "
              f"{CGROUP_V2_ROOT}/cgroup.controllers, or v1 {CGROUP_V1_MEMORY}): memory_limit_mib is refused",
              "boot with the unified hierarchy (systemd.unified_cgroup_hierarchy=1) and without cgroup_disable=memory;"
              " in a container, mount the host's /sys/fs/cgroup read-write")


def check_tun() -> Check:
    if TUN_DEV.exists():
        return _c("/dev/net/tun", "PASS", f"{TUN_DEV} present")
    return _c("/dev/net/tun", "WARN", f"{TUN_DEV} missing: tap networking is unavailable (the default user-mode "
              "network does not need it)", "modprobe tun")


def check_ip() -> Check:
    ip = shutil.which("ip")
    if ip is None:
        return _c("iproute2", "WARN", "ip not found: per-child network namespaces are unavailable",
                  "apt-get install -y iproute2")
    try:
        ver = _run([ip, "-V"], timeout=10).strip()
    except (OSError, subprocess.SubprocessError):
        ver = "version unknown"
    return _c("iproute2", "PASS", f"{ip}: {ver}")


def check_netns() -> Check:
    names = sorted(p.name for p in NETNS_DIR.glob(NETNS_PREFIX + "*")) if NETNS_DIR.is_dir() else []
    if not names:
        return _c("child netns", "WARN", f"no {NETNS_PREFIX}* namespaces in {NETNS_DIR}: spawns with "
                  "per_child_netns=true will fail (the default does not use them)", "scripts/netns-setup.sh N")
    return _c("child netns", "PASS", f"{len(names)} {NETNS_PREFIX}* namespaces in {NETNS_DIR}")


# ---------------------------------------------------------------------------------------------
# Disk
# ---------------------------------------------------------------------------------------------


def existing_parent(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _where(path: Path) -> tuple[Path, str]:
    at = existing_parent(path)
    return at, str(path) if at == Path(os.path.abspath(path)) else f"{path} (not created yet; measured at {at})"


def check_snapshot_space(root: Path) -> Check:
    at, where = _where(root)
    free = free_bytes(at)
    detail = f"{free / GIB:.1f} GiB free in {where}"
    hint = "free space there, remove unused snapshots (forkd snapshot rm TAG), or move the root (--snapshot-root)"
    if free >= 5 * GIB:
        return _c("snapshot space", "PASS", detail)
    if free >= GIB:
        return _c("snapshot space", "WARN", detail + " (< 5 GiB: a few snapshots at most)", hint)
    return _c("snapshot space", "FAIL", detail + " (< 1 GiB: a 512 MiB snapshot may not fit)", hint)


def check_scratch_space(scratch: Path) -> Check:
    at, where = _where(scratch)
    free = free_bytes(at)
    fit = free // CHILD_WORKDIR_BYTES
    detail = f"{free / GIB:.1f} GiB free in {where}: room for about {fit} children (about 5 MiB per child)"
    hint = "forkd cleanup (stale work dirs); or --prewarm-scratch-dir / FORKD_PREWARM_SCRATCH_DIR on a larger disk"
    if fit < 1:
        return _c("scratch space", "FAIL", detail, hint)
    if fit < 100:
        return _c("scratch space", "WARN", detail, hint)
    return _c("scratch space", "PASS", detail)


def check_image() -> Check:
    from forkd.guest.image import find_image

    try:
        info = find_image()
    except Exception as e:  # missing host packages, no apt lists: the message says what to install
        return _c("guest image", "WARN", f"cannot compute the image inputs: {e}", "apt-get update; forkd image build")
    if info is None:
        return _c("guest image", "WARN", "no guest image built for the current inputs: snapshot create will fail "
                  "(restoring existing snapshots does not need it)", "forkd image build")
    return _c("guest image", "PASS", f"{info.image_id} (kernel {info.kernel_version}) at {info.path}")


#: What the guest kernel needs on its command line to keep a correct, tickless clock on any host.
CLOCK_PARAMS = ("tsc=reliable",)


def check_image_clock(snapshot_root: Path | None = None) -> Check:
    """The current image boots with a trusted TSC; the newest snapshot's guest was tickless."""
    from forkd.guest.image import find_image

    name = "guest clock"
    try:
        info = find_image()
    except Exception as e:  # noqa: BLE001 - the image check reports why
        return _c(name, "WARN", f"cannot find the current image: {e}", "forkd image build")
    if info is None:
        return _c(name, "WARN", "no guest image built yet: its clock cannot be checked", "forkd image build")
    missing = [p for p in CLOCK_PARAMS if p not in info.cmdline.split()]
    if missing:
        return _c(name, "FAIL", f"image {info.image_id} boots without {' '.join(missing)}: on a host whose TSC the "
                  "guest distrusts it falls back to jiffies and ticks 250 times a second in every idle child",
                  "forkd image build --force")
    detail = f"image {info.image_id} boots with {' '.join(CLOCK_PARAMS)}"
    recorded = _newest_snapshot_clock(snapshot_root)
    if recorded is not None:
        tag, clk = recorded
        if not clk.get("tickless"):
            return _c(name, "FAIL", f"{detail}; snapshot {tag} was saved from a ticking guest ({clk})",
                      f"forkd snapshot rm {tag} && forkd snapshot create --tag {tag}")
        detail += (f"; snapshot {tag}: clocksource {clk.get('clocksource')}, tickless, "
                   f"{clk.get('timer_irq_per_s')} timer interrupts/s idle")
    return _c(name, "PASS", detail)


def _newest_snapshot_clock(root: Path | None) -> tuple[str, dict[str, object]] | None:
    from forkd.engine.snapshot import SnapshotStore

    best: tuple[float, str, dict[str, object]] | None = None
    for tag, snap, _err in SnapshotStore(root).list():
        clk = snap.meta.guest.get("clock") if snap is not None else None
        if isinstance(clk, dict) and (best is None or snap.meta.created_at > best[0]):  # type: ignore[union-attr]
            best = (snap.meta.created_at, tag, clk)  # type: ignore[union-attr]
    return None if best is None else (best[1], best[2])


def check_jail() -> Check:
    from forkd.engine import jail

    why = jail.can_jail()
    if why is not None:
        return _c("jail", "FAIL", f"VMs cannot be jailed: {why}; forkd-controller refuses to start without "
                  "--insecure-no-jail", "run forkd-controller as root (packaging/systemd/forkd-controller.service)")
    ids = jail.uid_range()
    if not jail.enabled():
        return _c("jail", "WARN", "jailing is switched off (FORKD_JAIL=off): QEMU runs as root, unconfined",
                  "unset FORKD_JAIL")
    return _c("jail", "PASS", f"each QEMU gets its own uid in {ids.start}..{ids.stop - 1}, an empty chroot, "
              "mount/ipc/uts namespaces, no capabilities, rlimits and its cgroups")


def check_netfilter() -> Check:
    from forkd.engine import netfilter

    try:
        netfilter.nft_path()
    except Exception as e:  # noqa: BLE001
        return _c("network filter", "FAIL", str(e), netfilter.INSTALL_HINT)
    why = netfilter.status()
    if why is not None:
        return _c("network filter", "WARN", why, "it is installed when forkd-controller starts")
    return _c("network filter", "PASS", "nftables table inet forkd: sandboxes reach no host, private, link-local "
              "or metadata address")


def check_image_tools() -> Check:
    """What recipe images need on the host: qemu-img (disk layers), mkfs.ext4, apt-get, dpkg-deb."""
    missing = [t for t in ("qemu-img", "mkfs.ext4", "apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        return _c("image tools", "WARN", f"{', '.join(missing)} not found: recipe images (forkd image build --name) "
                  "cannot be built or forked", "apt-get install -y qemu-utils e2fsprogs")
    from forkd.guest.recipe import named_images

    names = named_images()
    return _c("image tools", "PASS", f"qemu-img, mkfs.ext4, apt and dpkg-deb present; {len(names)} named image(s)"
              + (f": {', '.join(sorted(names))}" if names else ""))


def check_ksm() -> Check:
    try:
        value = KSM_RUN.read_text().strip()
    except FileNotFoundError:
        return _c("ksm", "PASS", "KSM not available in this kernel (memory is never de-duplicated across tenants)")
    if value == "1":
        return _c("ksm", "WARN", "KSM is running: QEMU marks guest RAM mergeable, so identical pages of different "
                  "tenants' VMs get merged, and write timing then reveals what another guest holds (a side "
                  "channel, CVE-2015-2877). forkd's children already share the parent's memory via the page cache",
                  f"echo 0 > {KSM_RUN} (and disable ksmtuned if installed)")
    return _c("ksm", "PASS", f"KSM off ({KSM_RUN} = {value})")


# ---------------------------------------------------------------------------------------------
# Controller
# ---------------------------------------------------------------------------------------------


def _verify_for(tls_cert: Path | None) -> ssl.SSLContext | bool:
    """System CAs, plus the daemon's own certificate as a trust anchor when it is given (self-signed)."""
    if tls_cert is None or not os.access(tls_cert, os.R_OK):
        return True
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=str(tls_cert))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def check_daemon(url: str | None, token: str | None, tls_cert: Path | None = None) -> Check:
    import httpx

    from forkd.sdk._config import resolve, sync_client

    name = "daemon"
    if not url:
        return _c(name, "WARN", "not configured: no --url / FORKD_URL, so no controller was contacted",
                  "forkd doctor --url http://127.0.0.1:8889 (token from FORKD_TOKEN or --token-file)")
    try:
        ep = resolve(url, token or "", _verify_for(tls_cert))  # "" rather than None: no FORKD_TOKEN fallback here
    except ValueError as e:
        return _c(name, "FAIL", str(e), "--url http://HOST:PORT, https://HOST:PORT or unix:/path/to.sock")
    logs = "systemctl status forkd-controller; journalctl -u forkd-controller -n 50"
    try:
        with sync_client(ep, HTTP_TIMEOUT_S) as client:
            r = client.get("/healthz")
            if r.status_code != 200:
                return _c(name, "FAIL", f"GET {url}/healthz answered {r.status_code}: {r.text[:200]}", logs)
            r = client.get("/version")
    except httpx.TimeoutException:
        return _c(name, "FAIL", f"{url} did not answer within {HTTP_TIMEOUT_S:.0f} s", logs)
    except httpx.HTTPError as e:
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            return _c(name, "FAIL", f"{url}: the daemon's certificate is not trusted: {e}",
                      "pass --tls-cert with the daemon's certificate (or the CA that issued it)")
        return _c(name, "FAIL", f"cannot reach {url}: {e}", f"is forkd-controller running? {logs}")
    if r.status_code == 401:
        if ep.token:
            return _c(name, "FAIL", f"{url} is up but the token was rejected (401)",
                      "use the daemon's current token (FORKD_TOKEN or --token-file); it is read only at its start")
        return _c(name, "FAIL", f"{url} is up but needs a token (401) and none was given",
                  "export FORKD_TOKEN=... or pass --token-file /etc/forkd/token")
    if r.status_code != 200:
        return _c(name, "FAIL", f"GET {url}/version answered {r.status_code}: {r.text[:200]}", logs)
    v = r.json()
    return _c(name, "PASS", f"forkd {v.get('version')} at {url}: accelerator {v.get('accelerator')}, "
              f"QEMU {v.get('qemu_version')}")


def check_token_file(path: Path) -> Check:
    from forkd.daemon.auth import load_token

    try:
        load_token(path)
    except Exception as e:  # ValidationError: the message says what is wrong and how to fix it
        hint = f"chmod 600 {path}" if "chmod" in str(e) else \
            f"head -c 32 /dev/urandom | base64 > {path} && chmod 600 {path}"
        return _c("token file", "FAIL", f"the daemon would refuse it: {e}", hint)
    return _c("token file", "PASS", f"{path}: mode 0600 or stricter, not a placeholder, >= 16 bytes")


def cert_not_after(cert: Path) -> dt.datetime | None:
    """The certificate's expiry (UTC), or None when it cannot be decoded here."""
    try:
        from cryptography import x509

        c = x509.load_pem_x509_certificate(cert.read_bytes())
        return c.not_valid_after_utc
    except ImportError:
        pass
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    secs = ssl.cert_time_to_seconds(decode(str(cert))["notAfter"])
    return dt.datetime.fromtimestamp(secs, dt.UTC)


def check_tls(cert: Path | None, key: Path | None) -> Check:
    name = "tls"
    if not cert or not key:
        return _c(name, "FAIL", "--tls-cert and --tls-key must be given together (the daemon refuses one alone)",
                  "give both, or neither")
    for p in (cert, key):
        if not os.access(p, os.R_OK):
            return _c(name, "FAIL", f"TLS file {p} is not readable", f"ls -l {p}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        return _c(name, "FAIL", f"{cert} and {key} do not load as a pair: {e}",
                  f"the key must belong to the certificate: compare `openssl x509 -noout -pubkey -in {cert}` "
                  f"with `openssl pkey -pubout -in {key}`")
    try:
        not_after = cert_not_after(cert)
    except Exception as e:
        return _c(name, "PASS", f"{cert} matches {key} (expiry not checked: {e})")
    if not_after is None:
        return _c(name, "PASS", f"{cert} matches {key} (expiry not checked)")
    left = not_after - dt.datetime.now(dt.UTC)
    when = f"expires {not_after:%Y-%m-%d %H:%M} UTC"
    if left.total_seconds() <= 0:
        return _c(name, "FAIL", f"{cert} has expired ({when})", "renew the certificate and restart the daemon")
    if left.days < CERT_WARN_DAYS:
        return _c(name, "WARN", f"{cert} matches {key} but {when} ({left.days} days left)",
                  "renew the certificate and restart the daemon")
    return _c(name, "PASS", f"{cert} matches {key}; {when} ({left.days} days left)")


def check_state(path: Path) -> Check:
    from forkd.daemon.state import StateFile

    if not path.exists():
        return _c("state file", "PASS", f"{path} does not exist yet; it will be created at the daemon's start")
    try:
        sandboxes = StateFile(path).load()
    except (ValueError, OSError) as e:
        return _c("state file", "FAIL", str(e),
                  f"restore it from backup, or move it aside (mv {path} {path}.bad); at its next start the daemon "
                  "then kills the VMs it no longer has a record of")
    return _c("state file", "PASS", f"{path}: valid JSON, {len(sandboxes)} sandbox record(s)")


# ---------------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------------


def _guard(name: str, fn: Callable[..., Check], *args: object) -> Check:
    try:
        return fn(*args)
    except Exception as e:
        return _c(name, "FAIL", f"the check itself failed: {type(e).__name__}: {e}",
                  "report this with the output of forkd doctor --json")


def run_checks(url: str | None, token: str | None, token_file: Path | None, tls_cert: Path | None,
               tls_key: Path | None, state_file: Path | None, snapshot_root: Path, scratch_dir: Path) -> list[Check]:
    """Every check, in order, numbered from 1. The optional ones run only when their input is given."""
    plan: list[tuple[str, Callable[..., Check], tuple[object, ...]]] = [
        ("os/arch", check_platform, ()),
        ("kernel", check_kernel, ()),
        ("kvm", check_kvm, ()),
        ("qemu", check_qemu, ()),
        ("accelerator", check_accel, ()),
        ("cgroup memory", check_cgroup_memory, ()),
        ("/dev/net/tun", check_tun, ()),
        ("iproute2", check_ip, ()),
        ("child netns", check_netns, ()),
        ("snapshot space", check_snapshot_space, (snapshot_root,)),
        ("scratch space", check_scratch_space, (scratch_dir,)),
        ("guest image", check_image, ()),
        ("guest clock", check_image_clock, (snapshot_root,)),
        ("image tools", check_image_tools, ()),
        ("jail", check_jail, ()),
        ("network filter", check_netfilter, ()),
        ("ksm", check_ksm, ()),
        ("daemon", check_daemon, (url, token, tls_cert)),
    ]
    if token_file is not None:
        plan.append(("token file", check_token_file, (token_file,)))
    if tls_cert is not None or tls_key is not None:
        plan.append(("tls", check_tls, (tls_cert, tls_key)))
    if state_file is not None:
        plan.append(("state file", check_state, (state_file,)))
    return [replace(_guard(name, fn, *args), number=i) for i, (name, fn, args) in enumerate(plan, 1)]


def summary(checks: list[Check]) -> dict[str, int]:
    return {s.lower(): sum(c.status == s for c in checks) for s in ("PASS", "WARN", "FAIL")}
