"""Build and find forkd's guest image: a Debian kernel plus an uncompressed newc initramfs.

The image is made from Debian packages, never from the host's installed files: the kernel ``.deb`` and
the default recipe's packages (``GUEST_APT``: busybox-static, python3.11, python3-numpy and everything
they depend on, as apt resolves them from an empty root) are downloaded into the cache with
``apt-get download`` and unpacked into a staging tree (maintainer scripts are not run; the alternatives
they register are applied). The tree's busybox, python3.11 with its trimmed standard library, numpy and
the libraries they link (resolved in the tree, see elfdeps.py), the virtio kernel modules, ``/init``
(``init.sh``) and the agent (``agent.py``) go into the initramfs. The only programs of the tree run on
the host are Debian's own static busybox (for its applet list) and python3.11 (to byte-compile).

An image lives in ``<image_root>/<image_id>/`` (``vmlinuz``, ``initramfs.cpio``, ``image.json``).
The id is a hash of the build inputs (package versions, hashes of ``agent.py`` and ``init.sh``,
the builder version), so a changed input means a new image. A build is assembled in
``<image_root>/.staging-<id>-<pid>/`` and renamed into place once ``image.json`` (written last,
atomically) is there; a directory without ``image.json`` is never reported as an image.
"""

from __future__ import annotations

import ctypes
import fnmatch
import gzip
import hashlib
import json
import lzma
import mmap
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkd import paths
from forkd.errors import ForkdError, ImageBuildError, ImageNotFoundError
from forkd.fsutil import fsync_file, pid_alive
from forkd.guest import elfdeps, rootfs
from forkd.guest.cpio import CpioWriter

BUILDER_VERSION = "2"

KERNEL_PACKAGE_ENV = "FORKD_GUEST_KERNEL_PACKAGE"
DEFAULT_KERNEL_META = "linux-image-cloud-amd64"
FALLBACK_KERNEL_META = "linux-image-amd64"

#: Base kernel command line for ``-append`` (it keys the image id). The image's ``cmdline`` adds
#: ``tsc_early_khz=<host TSC kHz>`` on x86-64 hosts, see :func:`kernel_cmdline`.
#: ``tsc=reliable``: the TSC is the clocksource whatever the host looks like (a guest that distrusts it
#: falls back to jiffies and a 250 Hz tick forever). The rest removes periodic wake-ups an idle sandbox
#: does not need: the lockup watchdogs, PSI averaging and the memory cgroup's stat flushing.
KERNEL_CMDLINE = ("console=ttyS0 panic=-1 quiet loglevel=3 random.trust_cpu=off tsc=reliable "
                  "nowatchdog nmi_watchdog=0 psi=0 cgroup_disable=memory")

#: The default image's userland, as an image recipe would name it: Debian's packages (with their
#: dependencies, resolved by apt and downloaded into the cache; never the host's installed files),
#: unpacked into a staging tree and packed into the initramfs. libblas3/liblapack3 pick numpy's BLAS.
GUEST_APT = ("busybox-static", "python3.11", "python3-numpy", "libblas3", "liblapack3")

GUEST_SRC_DIR = Path(__file__).resolve().parent
AGENT_SRC = GUEST_SRC_DIR / "agent.py"
INIT_SRC = GUEST_SRC_DIR / "init.sh"

GUEST_BUSYBOX = "/usr/bin/busybox"
GUEST_PYTHON = "/usr/bin/python3.11"
GUEST_STDLIB = "/usr/lib/python3.11"
GUEST_NUMPY = "/usr/lib/python3/dist-packages/numpy"

#: Names (fnmatch patterns, matched against every path component) left out of the stdlib copy.
STDLIB_EXCLUDE = (
    "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "config-3.11-*", "site-packages", "dist-packages", "distutils",
    "_test*.so", "_ctypes_test*", "xxlimited*",
)
NUMPY_EXCLUDE = ("tests",)

#: Kernel modules the guest needs (with their dependencies, unless built in): the microvm
#: transport, the virtio-serial agent channel, the NIC and the root disk of recipe images. The optional
#: ones are loaded when the kernel has them: virtio-rng, vsock (hosts with vhost-vsock) and virtio-pci (q35 machines).
REQUIRED_MODULES = ("virtio_mmio", "virtio_console", "virtio_net", "virtio_blk")
OPTIONAL_MODULES = ("virtio_pci", "virtio_rng", "vmw_vsock_virtio_transport")

IMAGE_JSON = "image.json"
KERNEL_NAME = "vmlinuz"
INITRAMFS_NAME = "initramfs.cpio"

BUILD_STEPS = (
    "resolve guest packages",
    "fetch kernel package",
    "unpack kernel",
    "resolve kernel modules",
    "guest packages",
    "write initramfs",
    "finalize",
)

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------
# ImageInfo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """A built guest image: where its files are and what it was built from."""

    image_id: str            # 16 hex chars: sha256 of the canonical JSON of ``inputs``
    path: Path               # <image_root>/<image_id>
    kernel: Path             # path/vmlinuz
    initramfs: Path          # path/initramfs.cpio
    kernel_version: str      # e.g. "6.1.0-56-cloud-amd64"
    cmdline: str             # kernel command line to pass with -append
    inputs: dict[str, str]   # what the id is keyed by
    built_at: float          # unix time the build finished
    size_bytes: int          # kernel + initramfs (+ root file system)
    # an image built from a recipe (guest/recipe.py) boots the same kernel and initramfs, then switches
    # to its own root file system on a disk
    name: str | None = None
    rootfs: Path | None = None       # path/rootfs.ext4
    rootfs_sha256: str | None = None
    disk_mib: int = 0                # the root file system's size
    python: str | None = None        # the image's interpreter, as the guest sees it ("/usr/bin/python3.11")
    # "build" (made here) or "pack" (published by forkd unpack: never a build cache, never the boot image)
    origin: str = "build"

    def to_json(self) -> dict[str, Any]:
        """The ``image.json`` content (file names relative to the image directory)."""
        extra: dict[str, Any] = {}
        if self.rootfs is not None:
            extra = {"name": self.name, "rootfs": self.rootfs.name, "rootfs_sha256": self.rootfs_sha256,
                     "disk_mib": self.disk_mib, "python": self.python}
        if self.origin != "build":
            extra["origin"] = self.origin
        return {**extra,
            "format": 1,
            "image_id": self.image_id,
            "kernel": self.kernel.name,
            "initramfs": self.initramfs.name,
            "kernel_version": self.kernel_version,
            "cmdline": self.cmdline,
            "inputs": dict(self.inputs),
            "built_at": self.built_at,
            "size_bytes": self.size_bytes,
        }

    @classmethod
    def from_json(cls, path: Path, d: dict[str, Any]) -> ImageInfo:
        """Rebuild an ImageInfo from ``image.json`` content ``d`` of the image directory ``path``."""
        path = Path(path)
        return cls(
            image_id=str(d["image_id"]),
            path=path,
            kernel=path / str(d.get("kernel", KERNEL_NAME)),
            initramfs=path / str(d.get("initramfs", INITRAMFS_NAME)),
            kernel_version=str(d["kernel_version"]),
            cmdline=str(d["cmdline"]),
            inputs={str(k): str(v) for k, v in dict(d["inputs"]).items()},
            built_at=float(d["built_at"]),
            size_bytes=int(d["size_bytes"]),
            name=str(d["name"]) if d.get("name") else None,
            rootfs=path / str(d["rootfs"]) if d.get("rootfs") else None,
            rootfs_sha256=str(d["rootfs_sha256"]) if d.get("rootfs_sha256") else None,
            disk_mib=int(d.get("disk_mib") or 0),
            python=str(d["python"]) if d.get("python") else None,
            origin=str(d.get("origin") or "build"),
        )


# ---------------------------------------------------------------------------------------------
# Small helpers: subprocesses, hashing, durable writes
# ---------------------------------------------------------------------------------------------


def _run(argv: list[str], *, cwd: Path | None = None, hint: str = "") -> str:
    """Run ``argv`` (no shell) and return its stdout; raise ImageBuildError if it fails."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{argv[0]} not found{': ' + hint if hint else ''}") from e
    if proc.returncode != 0:
        tail = proc.stderr.strip()[-800:]
        raise ImageBuildError(
            f"`{' '.join(argv)}` failed (exit {proc.returncode}): {tail}{' -- ' + hint if hint else ''}"
        )
    return proc.stdout


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_file(path.parent)


def _copy_durable(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fsync_file(dst)


# ---------------------------------------------------------------------------------------------
# Kernel command line
# ---------------------------------------------------------------------------------------------

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")


def _rdtsc_function() -> tuple[Callable[[], int], mmap.mmap]:
    """A callable running ``rdtsc`` (from an executable anonymous page), and the page to keep alive."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_RDTSC_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_uint64)(address), page


def host_tsc_khz(samples: int = 3, interval_s: float = 0.05) -> int | None:
    """The host's TSC frequency in kHz, measured against CLOCK_MONOTONIC; None if unknown.

    CLOCK_MONOTONIC is what QEMU's virtual clock (and so the guest's PIT) follows; under TCG the
    guest's TSC is the host's ``rdtsc``. Only on x86-64 Linux; the samples must agree within
    0.1 %, else None is returned.
    """
    if platform.machine() not in ("x86_64", "amd64"):
        return None
    try:
        rdtsc, _page = _rdtsc_function()
    except (OSError, ValueError, AttributeError):
        return None
    rates = []
    for _ in range(samples):
        c0, t0 = rdtsc(), time.monotonic_ns()
        time.sleep(interval_s)
        c1, t1 = rdtsc(), time.monotonic_ns()
        rates.append((c1 - c0) * 1_000_000 / (t1 - t0))
    rates.sort()
    khz = rates[len(rates) // 2]
    if not 100_000 <= khz <= 20_000_000 or (rates[-1] - rates[0]) > khz * 0.001:
        return None
    return round(khz)


def kernel_cmdline() -> str:
    """The command line stored in a new image: KERNEL_CMDLINE plus ``tsc_early_khz`` when measurable.

    Under TCG the guest TSC runs at the host TSC rate, and microvm has no HPET or ACPI PM timer:
    the guest calibrates its TSC against the emulated PIT, which fails in about one boot in four
    on a 2-core host ("tsc: Unable to calibrate against PIT", then the boot hangs in
    ``calibrate_delay``). Telling the kernel the frequency skips that calibration. The value is
    the host's, so an image belongs to the host that built it.
    """
    khz = host_tsc_khz()
    return KERNEL_CMDLINE if khz is None else f"{KERNEL_CMDLINE} tsc_early_khz={khz}"


# ---------------------------------------------------------------------------------------------
# Inputs and ids
# ---------------------------------------------------------------------------------------------


def _apt_show(package: str) -> dict[str, str] | None:
    """Fields of the candidate version of ``package`` from ``apt-cache show``, or None if unknown."""
    try:
        proc = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                              capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageBuildError("apt-cache not found: the guest image is built from Debian packages") from e
    fields: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            break
        if not line.startswith((" ", "\t")) and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields if proc.returncode == 0 and "Package" in fields else None


def _kernel_from_meta(meta: str, fields: dict[str, str]) -> tuple[str, str]:
    """(package, version) of the versioned kernel image that meta package ``meta`` depends on."""
    for alternative in re.split(r"[,|]", fields.get("Depends", "")):
        m = re.match(r"\s*(linux-image-\d\S*)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", alternative)
        if not m:
            continue
        if m.group(2):
            return m.group(1), m.group(2)
        dep = _apt_show(m.group(1))
        if dep is not None:
            return m.group(1), dep["Version"]
    if re.fullmatch(r"linux-image-\d.*", meta) and "Version" in fields:
        return meta, fields["Version"]          # already a versioned kernel package
    raise ImageBuildError(f"cannot find the kernel image package that {meta} depends on "
                          f"(Depends: {fields.get('Depends', '')!r})")


APT_LISTS = Path("/var/lib/apt/lists")
_kernel_memo: dict[tuple[str | None, int], tuple[str, str, str]] = {}


def resolve_kernel_package() -> tuple[str, str, str]:
    """Return (meta package, kernel package, version) for the guest kernel, from apt's lists.

    The meta package is ``$FORKD_GUEST_KERNEL_PACKAGE`` if set, else ``linux-image-cloud-amd64``,
    falling back to ``linux-image-amd64``. ``apt-cache`` takes ~0.7 s without a package cache,
    so the answer is remembered until apt's lists change (``apt-get update``).
    """
    override = os.environ.get(KERNEL_PACKAGE_ENV)
    try:
        key = (override, APT_LISTS.stat().st_mtime_ns)
    except OSError:
        key = (override, -1)
    if key not in _kernel_memo:
        _kernel_memo[key] = _resolve_kernel_package(override)
    return _kernel_memo[key]


def _resolve_kernel_package(override: str | None) -> tuple[str, str, str]:
    candidates = [override] if override else [DEFAULT_KERNEL_META, FALLBACK_KERNEL_META]
    for meta in candidates:
        fields = _apt_show(meta)
        if fields is not None:
            return (meta, *_kernel_from_meta(meta, fields))
    raise ImageBuildError(
        f"apt knows no guest kernel package ({' or '.join(candidates)}); run `apt-get update` "
        f"(Debian main must be in the apt sources){'' if override else f' or set {KERNEL_PACKAGE_ENV}'}"
    )


def guest_package_versions(packages: Iterable[str] = GUEST_APT) -> dict[str, str]:
    """The version of every package of the default image (``packages`` and their dependencies), as apt
    resolves them from an empty root; ImageBuildError naming an unknown one."""
    return dict(rootfs.resolve_apt(list(packages), b""))


def _source_file_hash(path: Path, what: str) -> str:
    if not path.is_file():
        raise ImageBuildError(f"{what} is missing at {path}: it ships with forkd; reinstall forkd")
    return _sha256_file(path)


def image_inputs() -> dict[str, str]:
    """Everything the image id is keyed by. Cheap: apt-cache, apt's remembered resolution and two file
    hashes."""
    _meta, kernel_package, kernel_version = resolve_kernel_package()
    inputs = {
        "builder_version": BUILDER_VERSION,
        "cmdline": KERNEL_CMDLINE,
        "kernel_package": kernel_package,
        "kernel_package_version": kernel_version,
    }
    for name, version in guest_package_versions().items():
        inputs[f"pkg:{name}"] = version
    inputs["sha256:agent.py"] = _source_file_hash(AGENT_SRC, "the guest agent (agent.py)")
    inputs["sha256:init.sh"] = _source_file_hash(INIT_SRC, "the guest init script (init.sh)")
    return inputs


def image_id_for(inputs: dict[str, str]) -> str:
    """16 hex characters of the sha256 of the canonical JSON of ``inputs``."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------


def _root(root: Path | str | None) -> Path:
    return Path(root) if root is not None else paths.image_root()


def load_image(path: Path) -> ImageInfo | None:
    """The image in directory ``path``, or None unless its image.json and files are all there."""
    try:
        with open(path / IMAGE_JSON, encoding="utf-8") as f:
            info = ImageInfo.from_json(path, json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.image_id != path.name or not info.kernel.is_file() or not info.initramfs.is_file():
        return None
    if info.rootfs is not None and not info.rootfs.is_file():
        return None
    return info


def _find(root: Path, inputs: dict[str, str]) -> ImageInfo | None:
    """The boot image built here for ``inputs`` (never a recipe image, never one a pack published)."""
    info = load_image(root / image_id_for(inputs))
    ok = info is not None and info.inputs == inputs and info.rootfs is None and info.origin == "build"
    return info if ok else None


def find_image(root: Path | None = None) -> ImageInfo | None:
    """The built image for the *current* inputs under ``root`` (default: the image root), or None."""
    return _find(_root(root), image_inputs())


def list_images(root: Path | None = None) -> list[ImageInfo]:
    """All complete images under ``root``, oldest first (staging and partial directories skipped)."""
    root = _root(root)
    if not root.is_dir():
        return []
    images = [info for child in sorted(root.iterdir())
              if not child.name.startswith(".") and child.is_dir()
              and (info := load_image(child)) is not None]
    return sorted(images, key=lambda i: (i.built_at, i.image_id))


def require_image(root: Path | None = None) -> ImageInfo:
    """Like :func:`find_image`, but raise ImageNotFoundError when no image is built."""
    root = _root(root)
    inputs = image_inputs()
    info = _find(root, inputs)
    if info is None:
        raise ImageNotFoundError(
            f"no guest image built for the current inputs (id {image_id_for(inputs)}) under {root}; "
            "run `forkd image build`"
        )
    return info


# ---------------------------------------------------------------------------------------------
# Kernel package: download (cached), unpack, modules
# ---------------------------------------------------------------------------------------------


def deb_cache_dir() -> Path:
    """Where downloaded .debs (the kernel's, recipe images' packages) are kept between builds."""
    return paths.cache_dir() / "debs"


def _deb_matches(deb: Path, package: str, version: str) -> bool:
    try:
        out = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
    except ImageBuildError:
        return False
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields.get("Package") == package and fields.get("Version") == version


def fetch_kernel_deb(package: str, version: str) -> Path:
    """Return the cached ``.deb`` of ``package`` ``version``, downloading it with apt if missing."""
    cache = deb_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{package}_{version.replace(':', '%3a')}.deb"
    if target.is_file() and _deb_matches(target, package, version):
        return target
    _clean_stale(cache, ".download-*")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", suffix=f"-{os.getpid()}", dir=cache))
    try:
        _run(["apt-get", "download", f"{package}={version}"], cwd=tmp,
             hint="check network access to the Debian mirror and run `apt-get update`")
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1 or not _deb_matches(debs[0], package, version):
            raise ImageBuildError(f"apt-get download {package}={version} did not produce that package")
        fsync_file(debs[0])
        os.replace(debs[0], target)
        fsync_file(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def unpack_kernel(deb: Path, dest: Path) -> tuple[str, Path, Path]:
    """Unpack ``deb`` into ``dest``; return (kernel version, vmlinuz path, modules directory)."""
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    moddirs = [d for base in ("lib/modules", "usr/lib/modules") if (dest / base).is_dir()
               for d in sorted((dest / base).iterdir()) if d.is_dir()]
    if len(moddirs) != 1:
        raise ImageBuildError(f"{deb.name}: expected one lib/modules/<version> directory, found {len(moddirs)}")
    kver = moddirs[0].name
    vmlinuz = dest / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.is_file():
        raise ImageBuildError(f"{deb.name}: no boot/vmlinuz-{kver} inside")
    return kver, vmlinuz, moddirs[0]


_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def module_name(path: str | Path) -> str:
    """Kernel name of a module file: basename without ``.ko[.xz|.gz|.zst]``, ``-`` as ``_``."""
    base = Path(path).name
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def read_module(path: Path) -> bytes:
    """Content of a module file, decompressed (xz and gzip; zstd is refused)."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        raise ImageBuildError(f"{path.name}: zstd-compressed kernel modules are not supported")
    return path.read_bytes()


def _elf_section(data: bytes, wanted: bytes) -> bytes | None:
    """The content of section ``wanted`` of a little-endian ELF64 object, or None."""
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise ValueError("not a little-endian ELF64 object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, strtab, _ = header(shstrndx)
    for i in range(shnum):
        name, offset, size = header(i)
        end = data.index(b"\0", strtab + name)
        if data[strtab + name:end] == wanted:
            return data[offset:offset + size]
    return None


def module_depends(path: Path) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` section."""
    modinfo = _elf_section(read_module(path), b".modinfo") or b""
    for entry in modinfo.split(b"\0"):
        if entry.startswith(b"depends="):
            return [d for d in entry[len(b"depends="):].decode().split(",") if d]
    return []


def _modules_dep(moddir: Path) -> dict[str, list[str]] | None:
    """Dependencies from ``modules.dep`` (name -> names), or None if depmod has not run."""
    dep_file = moddir / "modules.dep"
    if not dep_file.is_file():
        return None
    deps: dict[str, list[str]] = {}
    for line in dep_file.read_text().splitlines():
        mod, sep, rest = line.partition(":")
        if sep:
            deps[module_name(mod)] = [module_name(d) for d in rest.split()]
    return deps


def _builtin_modules(moddir: Path) -> set[str]:
    f = moddir / "modules.builtin"
    return {module_name(line) for line in f.read_text().split()} if f.is_file() else set()


def _module_index(moddir: Path) -> dict[str, Path]:
    """Module name -> path relative to ``moddir`` for every module file under it."""
    index: dict[str, Path] = {}
    for path in sorted(moddir.rglob("*.ko*")):
        if path.name.endswith(_MODULE_SUFFIXES):
            index.setdefault(module_name(path), path.relative_to(moddir))
    return index


def module_load_order(moddir: Path, required: Iterable[str] = REQUIRED_MODULES,
                      optional: Iterable[str] = OPTIONAL_MODULES) -> list[Path]:
    """Module files (relative to ``moddir``) to insmod, dependencies first, built-ins left out.

    Dependencies come from ``modules.dep`` when present (the .deb ships none: depmod runs at
    install time), else from each module's ``.modinfo`` ``depends=``. A required module that is
    neither built in nor present raises ImageBuildError; a missing optional one is skipped.
    """
    builtin, index, dep_map = _builtin_modules(moddir), _module_index(moddir), _modules_dep(moddir)
    order: list[Path] = []
    done: set[str] = set()

    def deps_of(name: str) -> list[str]:
        return dep_map.get(name, []) if dep_map is not None else module_depends(moddir / index[name])

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name in chain:
            raise ImageBuildError(f"kernel module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            raise ImageBuildError(f"kernel module {name} ({' <- '.join(chain) or 'required'}) is neither "
                                  f"built in nor present under {moddir}")
        for dep in deps_of(name):
            visit(dep, chain + (name,))
        done.add(name)
        order.append(index[name])

    for name in required:
        visit(name, ())
    for name in optional:
        if name in index or name in builtin:
            visit(name, ())
    return order


# ---------------------------------------------------------------------------------------------
# Guest file collection
# ---------------------------------------------------------------------------------------------


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _pyc_header(pyc: Path) -> bytes | None:
    """The 16-byte header to store for ``pyc``, or None to leave a stale/sourceless pyc out.

    Archive members have mtime 0, so a timestamp-based pyc is valid in the guest only if its
    recorded source mtime is 0 too: a pyc that is fresh on the host gets that field zeroed.
    Hash-based pycs do not depend on mtimes and are kept as they are.
    """
    with open(pyc, "rb") as f:
        head = f.read(16)
    if len(head) < 16:
        return None
    flags, mtime, size = struct.unpack("<III", head[4:16])
    if flags != 0:
        return head
    try:
        st = (pyc.parent.parent / (pyc.name.split(".", 1)[0] + ".py")).stat()
    except OSError:
        return None
    if mtime != int(st.st_mtime) & 0xFFFFFFFF or size != st.st_size & 0xFFFFFFFF:
        return None
    return head[:8] + b"\0\0\0\0" + head[12:]


def _tree_symlink(w: CpioWriter, link: Path, guest: str, top: Path, exclude: Iterable[str]) -> None:
    """Keep a symlink only if it is relative and points to a kept entry inside ``top``."""
    target = os.readlink(link)
    resolved = Path(os.path.realpath(link))
    try:
        rel = resolved.relative_to(top.resolve())
    except ValueError:
        return
    if not os.path.isabs(target) and resolved.exists() and not any(_excluded(p, exclude) for p in rel.parts):
        w.add_symlink(guest, target)


def _tree_file(w: CpioWriter, path: Path, guest: str) -> None:
    """Add a regular file; a ``__pycache__`` pyc only if its source went in (os.walk adds it first)."""
    if path.suffix == ".pyc" and path.parent.name == "__pycache__":
        guest_source = guest.rsplit("/", 2)[0] + "/" + path.name.split(".", 1)[0] + ".py"
        header = _pyc_header(path) if guest_source in w else None
        if header is not None:
            w.add_file(guest, path, prefix=header)
    else:
        w.add_file(guest, path)


def add_tree(w: CpioWriter, top: Path, guest_top: str, exclude: Iterable[str] = ()) -> list[Path]:
    """Add the tree ``top`` as ``guest_top``, skipping names matching ``exclude``; return its .so files."""
    exclude = tuple(exclude)
    shared: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        guest_here = f"{guest_top}/{here.relative_to(top)}".removesuffix("/.")
        w.add_dir(guest_here, os.stat(here).st_mode)
        dirnames[:] = sorted(d for d in dirnames if not _excluded(d, exclude))
        for name in sorted(filenames) + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            if _excluded(name, exclude):
                continue
            if path.is_symlink():
                _tree_symlink(w, path, f"{guest_here}/{name}", top, exclude)
            elif path.is_file():
                _tree_file(w, path, f"{guest_here}/{name}")
                if name.endswith(".so"):
                    shared.append(path)
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
    return shared


def guest_lib_path(guest_path: str) -> str:
    """Archive path of a library: ``/lib*``, ``/bin``, ``/sbin`` go under ``usr/`` (merged /usr)."""
    rel = guest_path.lstrip("/")
    first = rel.split("/", 1)[0]
    return f"usr/{rel}" if first in ("lib", "lib64", "lib32", "libx32", "bin", "sbin") else rel


def add_libraries(w: CpioWriter, tree: Path, elf_files: Iterable[str]) -> list[str]:
    """Add every library the ELF files (guest paths in ``tree``) need, under the names the loader uses."""
    added = []
    for loader_path, real in sorted(elfdeps.libraries(tree, elf_files).items()):
        guest = guest_lib_path(loader_path)
        if guest not in w:
            w.add_file(guest, tree / real.lstrip("/"))
            added.append(guest)
    return added


#: Directories of the guest root: name -> mode. ``bin``, ``sbin``, ``lib``, ``lib64`` are symlinks
#: into ``usr`` (Debian's merged /usr), so library paths from the host's ldd resolve unchanged.
SKELETON_DIRS = {
    "dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755, "tmp": 0o1777, "root": 0o700,
    "etc": 0o755, "forkd": 0o755, "usr/bin": 0o755, "usr/lib": 0o755, "usr/lib64": 0o755,
    "usr/local/bin": 0o755, "var/tmp": 0o1777,
}
SKELETON_LINKS = {"bin": "usr/bin", "sbin": "usr/bin", "usr/sbin": "bin", "lib": "usr/lib",
                  "lib64": "usr/lib64"}

ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hostname": "forkd\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tforkd\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
}


def add_skeleton(w: CpioWriter, image_id: str) -> None:
    """Empty directories, merged-/usr symlinks and the small /etc files."""
    for name, mode in SKELETON_DIRS.items():
        w.add_dir(name, mode)
    for name, target in SKELETON_LINKS.items():
        w.add_symlink(name, target)
    for name, text in ETC_FILES.items():
        w.add_bytes(name, text.encode())
    w.add_bytes("etc/forkd-image-id", f"{image_id}\n".encode())


def add_busybox(w: CpioWriter, tree: Path) -> int:
    """Debian's static busybox as /usr/bin/busybox plus a symlink per applet; return the applet count."""
    busybox = tree / GUEST_BUSYBOX.lstrip("/")
    w.add_file("usr/bin/busybox", busybox, 0o755)
    # the applet list, from the downloaded (static, Debian-built) binary itself
    applets = sorted(set(_run([str(busybox), "--list"]).split()))
    count = 0
    for applet in applets:
        if re.fullmatch(r"[A-Za-z0-9_.\[\]+-]+", applet) and applet != "busybox" and f"usr/bin/{applet}" not in w:
            w.add_symlink(f"usr/bin/{applet}", "busybox")
            count += 1
    return count


def add_python(w: CpioWriter, tree: Path) -> list[str]:
    """Debian's python3.11, the trimmed stdlib and numpy from ``tree``; return the guest paths of the
    ELF files to resolve libraries for."""
    w.add_file("usr/bin/python3.11", tree / GUEST_PYTHON.lstrip("/"), 0o755)
    w.add_symlink("usr/bin/python3", "python3.11")
    elf = [GUEST_PYTHON]
    for top, exclude in ((GUEST_STDLIB, STDLIB_EXCLUDE), (GUEST_NUMPY, NUMPY_EXCLUDE)):
        for so in add_tree(w, tree / top.lstrip("/"), top.lstrip("/"), exclude):
            elf.append("/" + str(so.relative_to(tree)))
    return elf


def userland_tree(dest: Path, versions: dict[str, str]) -> Path:
    """The default image's packages (``versions``: package -> version) downloaded (cached) and unpacked
    into ``dest``, their alternatives applied; nothing of them is run but busybox's applet list."""
    dest.mkdir(mode=0o755)
    rootfs.merged_usr_skeleton(dest)
    rootfs.install_debs(rootfs.download_debs(sorted(versions.items()), deb_cache_dir()), dest)
    for need in (GUEST_BUSYBOX, GUEST_PYTHON, f"{GUEST_STDLIB}/json/__init__.py", f"{GUEST_NUMPY}/__init__.py"):
        if rootfs.resolve_in(dest, need) is None:
            raise ImageBuildError(f"the default image's packages ({', '.join(GUEST_APT)}) gave no {need}")
    compile_bytecode(dest, (GUEST_STDLIB, GUEST_NUMPY))
    return dest


def compile_bytecode(tree: Path, guest_dirs: Iterable[str]) -> None:
    """Byte-compile ``guest_dirs`` with the tree's own Debian python3.11 (run through the tree's own
    loader and libraries, so it works on any x86-64 host), as ``unchecked-hash`` .pyc files: the
    initramfs stores mtime 0, so timestamp-checked ones would be recompiled by every guest that imports
    them. Debian's packages ship no .pyc (their postinst makes them), and maintainer scripts are not run."""
    usr = tree / "usr"
    loader = usr / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2"
    python = tree / GUEST_PYTHON.lstrip("/")
    argv = [str(loader), "--library-path", str(usr / "lib" / "x86_64-linux-gnu"), str(python),
            "-S", "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash", "-s", str(tree),
            "-p", "/", "-x", "/(test|tests|idlelib|tkinter|lib2to3|turtledemo)/",
            *[str(tree / d.lstrip("/")) for d in guest_dirs]]
    try:
        proc = subprocess.run(argv, env={"PYTHONHOME": str(usr), "PATH": "/usr/bin:/bin"}, capture_output=True,
                              text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ImageBuildError(f"byte-compiling the default image's Python failed: {e}") from e
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout)[-600:]
        raise ImageBuildError(f"byte-compiling the default image's Python failed: {why}")


def add_modules(w: CpioWriter, moddir: Path, kver: str, order: list[Path]) -> list[str]:
    """Add the modules (decompressed) and /etc/forkd-modules listing their guest paths in load order."""
    guest_paths = []
    for rel in order:
        plain = rel.with_name(_plain_ko_name(rel.name))
        guest = f"lib/modules/{kver}/{plain.as_posix()}"
        if rel.name.endswith(".ko"):
            w.add_file(f"usr/{guest}", moddir / rel, 0o644)
        else:
            w.add_bytes(f"usr/{guest}", read_module(moddir / rel), 0o644)
        guest_paths.append(f"/{guest}")
    w.add_bytes("etc/forkd-modules", "".join(f"{p}\n" for p in guest_paths).encode())
    return guest_paths


def _plain_ko_name(name: str) -> str:
    """``virtio_net.ko.xz`` -> ``virtio_net.ko``."""
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".ko"
    return name


def add_forkd_files(w: CpioWriter) -> None:
    """/init and the agent."""
    w.add_file("init", INIT_SRC, 0o755)
    w.add_file("forkd/agent.py", AGENT_SRC, 0o644)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


class _Steps:
    """Calls ``progress(step, done, total)`` as a build advances through its steps (BUILD_STEPS by default)."""

    def __init__(self, progress: Progress | None, steps: tuple[str, ...] = BUILD_STEPS) -> None:
        self._progress, self._steps = progress, steps

    def __call__(self, step: str) -> None:
        if self._progress is not None:
            self._progress(step, self._steps.index(step), len(self._steps))

    def finish(self) -> None:
        if self._progress is not None:
            self._progress("done", len(self._steps), len(self._steps))


def _clean_stale(root: Path, *patterns: str) -> None:
    """Remove ``<pattern>-<pid>`` directories under ``root`` left by processes that are gone."""
    for d in [d for pattern in patterns for d in root.glob(pattern)]:
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _write_initramfs(out: Path, image_id: str, kver: str, moddir: Path, modules: list[Path], tree: Path,
                     steps: _Steps) -> None:
    with open(out, "wb") as f:
        w = CpioWriter(f)
        add_skeleton(w, image_id)
        add_busybox(w, tree)
        add_libraries(w, tree, add_python(w, tree))
        add_modules(w, moddir, kver, modules)
        add_forkd_files(w)
        steps("write initramfs")
        w.close()
        os.fsync(f.fileno())


def _build_into(staging: Path, final: Path, image_id: str, inputs: dict[str, str], steps: _Steps) -> ImageInfo:
    """Fill ``staging`` with vmlinuz, initramfs.cpio and (last) image.json describing ``final``."""
    steps("fetch kernel package")
    deb = fetch_kernel_deb(inputs["kernel_package"], inputs["kernel_package_version"])
    steps("unpack kernel")
    kver, vmlinuz, moddir = unpack_kernel(deb, staging / "_kernel")
    steps("resolve kernel modules")
    modules = module_load_order(moddir)
    steps("guest packages")
    versions = {k[4:]: v for k, v in inputs.items() if k.startswith("pkg:")}
    tree = userland_tree(staging / "_root", versions)
    _write_initramfs(staging / INITRAMFS_NAME, image_id, kver, moddir, modules, tree, steps)
    shutil.rmtree(tree)
    steps("finalize")
    cmdline = kernel_cmdline()
    _copy_durable(vmlinuz, staging / KERNEL_NAME)
    shutil.rmtree(staging / "_kernel")
    info = ImageInfo(
        image_id=image_id, path=final, kernel=final / KERNEL_NAME, initramfs=final / INITRAMFS_NAME,
        kernel_version=kver, cmdline=cmdline, inputs=dict(inputs), built_at=time.time(),
        size_bytes=sum((staging / n).stat().st_size for n in (KERNEL_NAME, INITRAMFS_NAME)),
    )
    _write_json_atomic(staging / IMAGE_JSON, info.to_json())
    return info


def _publish(staging: Path, final: Path, info: ImageInfo, force: bool) -> ImageInfo:
    """Rename ``staging`` to ``final``; an existing complete image wins unless ``force``."""
    trash = None
    if final.exists():
        existing = load_image(final)
        if existing is not None and existing.inputs == info.inputs and existing.rootfs is None \
                and existing.origin == "build" and not force:
            return existing                      # a concurrent build finished first
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
    os.rename(staging, final)
    fsync_file(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return info


_build_lock = threading.Lock()


def build_image(root: Path | None = None, *, force: bool = False,
                progress: Progress | None = None) -> ImageInfo:
    """Build the guest image for the current inputs under ``root`` and return it.

    Returns the existing image without rebuilding unless ``force``. ``progress(step, done,
    total)`` is called at the start of each step (``done`` = steps finished) and once more with
    ``("done", total, total)``. Raises ImageBuildError (naming the fix) if anything fails; a failed
    or interrupted build leaves no directory that looks like an image. Builds in one process are
    serialized; builds in different processes use separate staging directories.
    """
    with _build_lock:
        return _build_image(_root(root), force, _Steps(progress))


def _build_image(root: Path, force: bool, steps: _Steps) -> ImageInfo:
    steps("resolve guest packages")
    inputs = image_inputs()
    image_id = image_id_for(inputs)
    existing = None if force else _find(root, inputs)
    if existing is not None:
        steps.finish()
        return existing
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, ".staging-*", ".trash-*")
    staging = root / f".staging-{image_id}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        info = _build_into(staging, root / image_id, image_id, inputs, steps)
        info = _publish(staging, root / image_id, info, force)
    except ForkdError:
        raise
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        raise ImageBuildError(f"building the guest image failed: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    steps.finish()
    return info
