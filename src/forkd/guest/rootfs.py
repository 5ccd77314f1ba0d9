"""Filling a recipe image's root file system on the host, without running anything from it.

Each step writes into a staging directory: archives (``docker export`` tars, OCI layouts, ``docker save``
archives) are unpacked with path checks (no member may land outside the root, through ``..`` or a
symlink); Debian packages are resolved by apt against the root's own dpkg status, downloaded into a cache
and unpacked (maintainer scripts are not run); pip wheels are chosen for the image's Python and glibc,
never the host's. ``make_ext4`` turns the directory into the disk image (``mkfs.ext4 -d``, no root
needed, no loop mount).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from forkd import paths
from forkd.errors import ImageBuildError
from forkd.fsutil import atomic_write_json, fsync_file

DPKG_STATUS = "var/lib/dpkg/status"
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
PIP_TARGET = "opt/forkd/python"  # on the guest's PYTHONPATH (set by /init)
PYTHON_MIN, PYTHON_MAX = (3, 9), (3, 13)
APT_HINT = "check the package name (apt-cache search NAME) and run apt-get update"


def _run(argv: list[str], what: str, *, cwd: Path | None = None,
         timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what}: {argv[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise ImageBuildError(f"{what}: {argv[0]} did not finish within {timeout:.0f} s") from e


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------


def _member_name(name: str) -> str:
    """An archive member's path relative to the root ("./usr/bin" and "/usr/bin" are "usr/bin")."""
    while name.startswith("./"):
        name = name[2:]
    return "" if name == "." else name.lstrip("/")


def _inside(root: Path, name: str) -> Path:
    """``root/name`` for an archive member; ImageBuildError if it would escape ``root``."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".", "/")]
    if any(p == ".." for p in parts):
        raise ImageBuildError(f"archive member {name!r} leaves the root file system (..)")
    return root.joinpath(*parts) if parts else root


def _no_symlink_between(root: Path, target: Path) -> None:
    """Refuse to write through a symlink below ``root`` (an archive could point one anywhere)."""
    cur = root
    for part in target.relative_to(root).parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise ImageBuildError(f"archive member {target.relative_to(root)} would be written through the "
                                  f"symlink {cur.relative_to(root)}")


def guarded(root: Path, guest_path: str, *, parents: bool = True) -> Path:
    """The host path of ``guest_path`` in ``root``, safe to write: every directory on the way is a real
    directory below ``root`` (made when ``parents``; a symlink there is refused) and a symlink at the
    path itself is removed. A hostile rootfs or OCI layer can leave a link such as ``/etc -> /host/etc``;
    every write forkd makes into the tree after unpacking goes through here."""
    target = _inside(root, _member_name(guest_path))
    cur = root
    for part in target.relative_to(root).parts[:-1] if target != root else ():
        cur = cur / part
        if cur.is_symlink():
            raise ImageBuildError(f"/{target.relative_to(root)} would be written through the symlink "
                                  f"/{cur.relative_to(root)} that the image's files put there")
        if not cur.exists():
            if not parents:
                raise ImageBuildError(f"/{cur.relative_to(root)} does not exist in the image")
            cur.mkdir(mode=0o755)
        elif not cur.is_dir():
            raise ImageBuildError(f"/{cur.relative_to(root)} is not a directory in the image")
    if target != root and target.is_symlink():
        target.unlink()
    return target


def write_guarded(root: Path, guest_path: str, data: bytes, *, mode: int = 0o644, append: bool = False) -> None:
    """Write (or append to) a file of the tree through :func:`guarded`, never following a link."""
    target = guarded(root, guest_path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    with os.fdopen(os.open(target, flags, mode), "wb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ImageBuildError(f"/{target.relative_to(root)} is not a regular file in the image")
        f.write(data)


def mkdir_guarded(root: Path, guest_path: str, mode: int = 0o755) -> Path:
    """A directory of the tree (and its parents) through :func:`guarded`."""
    target = guarded(root, guest_path)
    if not target.is_dir():
        if target.exists():
            target.unlink()
        target.mkdir(mode=mode)
        os.chmod(target, mode)
    return target


def place_tree(src: Path, root: Path, guest_dst: str) -> None:
    """Copy a host file or directory to ``guest_dst`` in the tree, each entry through :func:`guarded`
    (``shutil.copytree`` would follow a directory link the image already has)."""
    if src.is_symlink():
        guarded(root, guest_dst)
        os.symlink(os.readlink(src), _inside(root, _member_name(guest_dst)))
    elif src.is_dir():
        mkdir_guarded(root, guest_dst, stat.S_IMODE(src.stat().st_mode) | 0o700)
        for child in sorted(src.iterdir()):
            place_tree(child, root, f"{guest_dst.rstrip('/')}/{child.name}")
    elif src.is_file():
        target = guarded(root, guest_dst)
        if target.is_dir():
            shutil.rmtree(target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
        os.chmod(target, stat.S_IMODE(src.stat().st_mode))
    # sockets, FIFOs and devices of the host are not copied


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def extract_tar(fileobj: IO[bytes], root: Path, *, stream: bool = False, merged_usr: bool = False,
                whiteouts: bool = False) -> None:
    """Unpack a tar stream into ``root``, keeping owners and modes (no setuid kept for others' files is
    an image's business: it runs as the guest). ``merged_usr`` maps /bin, /lib, ... into /usr (a Debian
    package unpacked into a merged-/usr root). ``whiteouts`` applies OCI layer whiteouts."""
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*") if stream else tarfile.open(fileobj=fileobj, mode="r:*")  # noqa: SIM115
        with tar:
            for m in tar:
                _extract_member(tar, m, root, merged_usr, whiteouts)
    except tarfile.TarError as e:
        raise ImageBuildError(f"not a readable tar archive: {e}") from e


def _extract_member(tar: tarfile.TarFile, m: tarfile.TarInfo, root: Path, merged_usr: bool, whiteouts: bool) -> None:
    name = _member_name(m.name)
    if merged_usr:
        first, _, rest = name.partition("/")
        if first in MERGED_USR:
            name = f"usr/{first}/{rest}" if rest else f"usr/{first}"
    target = _inside(root, name)
    if target == root:
        return
    _no_symlink_between(root, target)
    base = target.name
    if whiteouts and base.startswith(".wh.") and base != ".wh..wh..opq" and base[4:] in ("", ".", ".."):
        raise ImageBuildError(f"archive member {m.name!r}: a whiteout of {base[4:]!r}")
    if whiteouts and base.startswith(".wh."):
        if base == ".wh..wh..opq":
            for p in list(target.parent.iterdir()) if target.parent.is_dir() else []:
                _remove(p)
        else:
            _remove(target.with_name(base[4:]))
        return
    if m.isdev():
        return  # device nodes come from the guest's devtmpfs
    if m.isdir():
        if target.is_symlink() and merged_usr:
            return  # a merged-/usr link such as /bin -> usr/bin stays
        if target.is_symlink():  # never mkdir or chmod through a link an earlier member made
            target.unlink()
        if target.exists() and not target.is_dir():
            _remove(target)
        target.mkdir(parents=True, exist_ok=True)
    else:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        if m.issym():
            os.symlink(m.linkname, target)
        elif m.islnk():
            src = _inside(root, _member_name(m.linkname))
            _no_symlink_between(root, src)
            if not src.is_file() or src.is_symlink():
                raise ImageBuildError(f"archive member {m.name!r}: hard link to a missing file {m.linkname!r}")
            os.link(src, target)
        elif m.isfile():
            f = tar.extractfile(m)
            assert f is not None
            with open(target, "xb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
        else:
            return  # FIFOs and other special files are skipped
    with contextlib.suppress(OSError):
        os.lchown(target, m.uid, m.gid)
    if not m.issym():
        os.chmod(target, m.mode & 0o7777)


def unpack_rootfs(src: Path, root: Path) -> None:
    """A ``docker export`` tar (any compression) or a directory, copied into ``root``."""
    if src.is_dir():
        shutil.copytree(src, root, symlinks=True, dirs_exist_ok=True)
        return
    if not src.is_file():
        raise ImageBuildError(f"--rootfs {src}: no such file or directory")
    with open(src, "rb") as f:
        extract_tar(f, root)


def _oci_layers(src: Path) -> Iterator[IO[bytes]]:
    """The layer blobs of an OCI image layout (directory or tar) or a ``docker save`` archive, lowest first."""
    if src.is_dir():
        def open_blob(name: str) -> IO[bytes]:
            path = _inside(src, _member_name(name))
            try:
                _no_symlink_between(src, path)
            except ImageBuildError as e:
                raise ImageBuildError(f"--oci {src}: {e}") from None
            try:
                return open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW))  # noqa: SIM115
            except FileNotFoundError:
                raise
            except OSError as e:
                raise ImageBuildError(f"--oci {src}: cannot open {name}: {e.strerror} (a blob must be a "
                                      "regular file, not a link)") from None
        yield from _layers_from(open_blob, src)
        return
    try:
        tar = tarfile.open(src)  # noqa: SIM115 (closed below; opening is what may fail)
    except (OSError, tarfile.TarError) as e:
        raise ImageBuildError(f"--oci {src}: not an OCI layout or docker save archive: {e}") from e
    with tar:
        def open_member(name: str) -> IO[bytes]:
            f = tar.extractfile(_member_name(name))
            if f is None:
                raise KeyError(name)
            return f
        yield from _layers_from(open_member, src)


def _layers_from(open_blob: Callable[[str], IO[bytes]], src: Path) -> Iterator[IO[bytes]]:
    def read(name: str) -> object:
        with open_blob(name) as f:
            return json.loads(f.read(16 << 20))
    try:
        try:
            manifest: Any = read("manifest.json")
            layers = [str(x) for x in manifest[0]["Layers"]]
        except (KeyError, FileNotFoundError):
            index: Any = read("index.json")
            m: Any = read(_blob(index["manifests"][0]["digest"]))
            if "manifests" in m:  # an index of platforms: take linux/amd64
                chosen = next((x for x in m["manifests"] if x.get("platform", {}).get("architecture") == "amd64"),
                              m["manifests"][0])
                m = read(_blob(chosen["digest"]))
            layers = [_blob(x["digest"]) for x in m["layers"]]
    except (KeyError, IndexError, TypeError, ValueError, FileNotFoundError) as e:
        raise ImageBuildError(f"--oci {src}: neither manifest.json (docker save) nor index.json (OCI layout) "
                              f"describes its layers: {e!r}") from e
    for layer in layers:
        yield open_blob(layer)


def _blob(digest: str) -> str:
    algo, _, hexd = str(digest).partition(":")
    if not re.fullmatch(r"[a-z0-9]+", algo) or not re.fullmatch(r"[0-9a-f]{32,128}", hexd):
        raise ImageBuildError(f"not a content digest: {digest!r}")
    return f"blobs/{algo}/{hexd}"


def oci_status(src: Path) -> bytes:
    """The dpkg status the image's layers leave (the last layer's copy, unless a later whiteout removes
    it), read without unpacking: apt resolves against it before the build, so the image id is keyed by
    the package versions."""
    status = b""
    ancestors = {"var", "var/lib", "var/lib/dpkg", DPKG_STATUS}
    for blob in _oci_layers(src):
        with blob:
            try:
                with tarfile.open(fileobj=blob, mode="r|*") as tar:
                    for m in tar:
                        name = _member_name(m.name)
                        parent, _, base = name.rpartition("/")
                        if base == ".wh..wh..opq" and parent in ancestors or \
                                base.startswith(".wh.") and (f"{parent}/{base[4:]}".lstrip("/")) in ancestors:
                            status = b""
                        elif name == DPKG_STATUS and m.isfile():
                            f = tar.extractfile(m)
                            status = f.read(MAX_STATUS) if f is not None else b""
            except tarfile.TarError as e:
                raise ImageBuildError(f"--oci {src}: a layer is not a readable tar archive: {e}") from e
    return status


def unpack_oci(src: Path, root: Path) -> int:
    """Apply the image's layers in order (with whiteouts) into ``root``; returns the layer count."""
    n = 0
    for blob in _oci_layers(src):
        with blob:
            extract_tar(blob, root, stream=True, whiteouts=True)  # "r|*" reads gzip and plain layers
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------------------------

APT_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]{0,127}(?:=[A-Za-z0-9.+~:-]{1,128})?")


def check_apt_name(spec: str) -> str:
    if not isinstance(spec, str) or not APT_NAME.fullmatch(spec):
        raise ImageBuildError(f"apt: {spec!r} is not a Debian package name (lowercase letters, digits, + . -, "
                              "optionally =version)")
    return spec


APT_LISTS = Path("/var/lib/apt/lists")
APT_CONFIG = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"), Path("/etc/apt/preferences.d"))
_resolve_memo: dict[str, list[tuple[str, str]]] = {}


def _apt_state() -> str:
    """What apt's answer depends on besides the request: its package lists and sources (names, sizes,
    mtimes). A change (apt-get update, a new source) gives a new key."""
    h = hashlib.sha256()
    for top in (APT_LISTS, *APT_CONFIG):
        files = sorted(top.iterdir()) if top.is_dir() else [top]
        for f in files:
            with contextlib.suppress(OSError):
                st = f.stat()
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_apt(packages: list[str], status: bytes) -> list[tuple[str, str]]:
    """(package, version) of everything ``packages`` need beyond what ``status`` (a dpkg status file)
    records as installed, without recommends; ImageBuildError naming an unknown package. Answers are
    remembered (in memory and under the cache directory) until apt's lists or sources change: apt's
    resolution costs seconds and every image lookup asks it."""
    key = hashlib.sha256(json.dumps([packages, hashlib.sha256(status).hexdigest(), _apt_state()]).encode()).hexdigest()
    if key in _resolve_memo:
        return list(_resolve_memo[key])
    memo_file = paths.cache_dir() / "apt-resolve" / f"{key[:32]}.json"
    try:
        cached = json.loads(memo_file.read_text())
        if isinstance(cached, list) and all(isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) for y in x)
                                            for x in cached):
            _resolve_memo[key] = [(a, b) for a, b in cached]
            return list(_resolve_memo[key])
    except (OSError, ValueError):
        pass
    out = _resolve_apt(packages, status)
    _resolve_memo[key] = out
    with contextlib.suppress(OSError):
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo_file, out, mode=0o644)
    return list(out)


def _resolve_apt(packages: list[str], status: bytes) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="forkd-apt-") as tmp:
        status_file = Path(tmp) / "status"
        status_file.write_bytes(status)
        proc = _run(["apt-get", "-s", "-q", "-o", f"Dir::State::status={status_file}", "-o", "Debug::NoLocking=1",
                     "-o", "APT::Get::Show-Versions=1", "install", "--no-install-recommends", "-y", *packages],
                    "apt")
    if proc.returncode != 0:
        unknown = re.findall(r"Unable to locate package (\S+)", proc.stderr)
        if unknown:
            raise ImageBuildError(f"apt: unknown package {', '.join(unknown)} ({APT_HINT})")
        no_version = re.findall(r"Version '([^']+)' for '([^']+)' was not found", proc.stderr)
        if no_version:
            raise ImageBuildError(f"apt: package {no_version[0][1]} has no version {no_version[0][0]}")
        raise ImageBuildError(f"apt cannot resolve {' '.join(packages)}: {proc.stderr.strip()[-600:]}")
    out = []
    for line in proc.stdout.splitlines():
        m = re.match(r"Inst (\S+) (?:\[[^\]]*\] )?\((\S+) ", line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def download_debs(packages: list[tuple[str, str]], cache: Path) -> list[Path]:
    """The .debs of ``packages`` from the cache, downloading the missing ones in one apt-get call."""
    cache.mkdir(parents=True, exist_ok=True)

    def cached(p: str, v: str) -> Path:
        return cache / f"{p}_{v.replace(':', '%3a')}.deb"
    missing = [(p, v) for p, v in packages if not cached(p, v).is_file()]
    if missing:
        tmp = Path(tempfile.mkdtemp(prefix=f".download-{os.getpid()}-", dir=cache))
        try:
            proc = _run(["apt-get", "download", "-q", *[f"{p}={v}" for p, v in missing]], "apt", cwd=tmp)
            if proc.returncode != 0:
                raise ImageBuildError(f"apt-get download failed: {proc.stderr.strip()[-600:]} (check access to the "
                                      "Debian mirror)")
            for p, v in missing:
                arch = [d for d in tmp.glob(f"{p}_*.deb")]
                if not arch:
                    raise ImageBuildError(f"apt-get download gave no .deb for {p}={v}")
                fsync_file(arch[0])
                os.replace(arch[0], cached(p, v))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [cached(p, v) for p, v in packages]


def install_deb(deb: Path, root: Path) -> None:
    """Unpack ``deb`` into ``root`` (merged /usr) and record it in the root's dpkg status."""
    control = _run(["dpkg-deb", "-f", str(deb)], f"dpkg-deb {deb.name}")
    if control.returncode != 0:
        raise ImageBuildError(f"{deb.name} is not a Debian package: {control.stderr.strip()[:300]}")
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        extract_tar(proc.stdout, root, stream=True, merged_usr=(root / "bin").is_symlink())
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.wait() != 0:
            raise ImageBuildError(f"dpkg-deb --fsys-tarfile {deb.name} failed: {err.strip()[:300]}")
    stanza = control.stdout.strip().splitlines()
    stanza.insert(1, "Status: install ok installed")
    write_guarded(root, DPKG_STATUS, ("\n".join(stanza) + "\n\n").encode(), append=True)


_ALT_PATH = r"(/[A-Za-z0-9._+@/-]+)"
_ALT_INSTALL = re.compile(rf"update-alternatives\s+--install\s+{_ALT_PATH}\s+([A-Za-z0-9._+@-]+)\s+{_ALT_PATH}"
                          r"\s+(\d+)((?:\s+--slave\s+\S+\s+\S+\s+\S+)*)")
_ALT_SLAVE = re.compile(rf"--slave\s+{_ALT_PATH}\s+([A-Za-z0-9._+@-]+)\s+{_ALT_PATH}")


@dataclass(frozen=True)
class Alternative:
    """One ``update-alternatives --install`` of a package's postinst: ``link`` -> ``path`` (and slaves)."""

    name: str
    link: str
    path: str
    priority: int
    slaves: tuple[tuple[str, str], ...] = ()


def deb_alternatives(deb: Path) -> list[Alternative]:
    """The alternatives ``deb``'s postinst registers with literal paths (read, never run). Maintainer
    scripts are not run in an image build; without this, libblas3's libblas.so.3 (which numpy links)
    or mawk's /usr/bin/awk would be missing."""
    proc = _run(["dpkg-deb", "--info", str(deb), "postinst"], f"dpkg-deb {deb.name}")
    if proc.returncode != 0:
        return []
    text = proc.stdout[:1 << 20].replace("\\\n", " ")
    out = []
    for m in _ALT_INSTALL.finditer(text):
        slaves = tuple((s.group(1), s.group(3)) for s in _ALT_SLAVE.finditer(m.group(5) or ""))
        out.append(Alternative(m.group(2), m.group(1), m.group(3), int(m.group(4)), slaves))
    return out


def apply_alternatives(alternatives: list[Alternative], root: Path) -> list[str]:
    """Make each alternative's link (the highest priority per name whose target the tree has) point at
    its target, as update-alternatives would (directly, without /etc/alternatives). Returns the links."""
    best: dict[str, Alternative] = {}
    for alt in alternatives:
        if resolve_in(root, alt.path) is None:
            continue
        if alt.name not in best or alt.priority > best[alt.name].priority:
            best[alt.name] = alt
    made = []
    for alt in best.values():
        for link, path in ((alt.link, alt.path), *alt.slaves):
            if resolve_in(root, path) is None or ".." in link.split("/"):
                continue
            target = guarded(root, link)
            if target.exists() and not target.is_symlink():
                continue  # a real file is there already: the package set provides it
            os.symlink(path, target)
            made.append(link)
    return made


def install_debs(debs: list[Path], root: Path) -> None:
    """Unpack every package into ``root``, then apply the alternatives their postinsts register."""
    alternatives: list[Alternative] = []
    for deb in debs:
        install_deb(deb, root)
        alternatives += deb_alternatives(deb)
    apply_alternatives(alternatives, root)


def merged_usr_skeleton(root: Path) -> None:
    """The /bin -> usr/bin style links of a Debian 12 root (when the root has no /bin yet)."""
    for d in MERGED_USR:
        if not (root / d).exists() and not (root / d).is_symlink():
            mkdir_guarded(root, f"usr/{d}")
            os.symlink(f"usr/{d}", root / d)


MAX_STATUS = 64 << 20


def read_status(root: Path) -> bytes:
    """The tree's dpkg status (at most 64 MiB), never read through a link."""
    cur = root
    for part in PurePosixPath(DPKG_STATUS).parts:
        cur = cur / part
        if cur.is_symlink():
            return b""
    try:
        with open(cur, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            return f.read(MAX_STATUS) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else b""
    except OSError:
        return b""


# ---------------------------------------------------------------------------------------------
# Python and pip
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestPython:
    path: str              # as the guest sees it: /usr/bin/python3.11
    version: tuple[int, int]
    glibc: tuple[int, int] | None


def resolve_in(root: Path, guest_path: str, depth: int = 0) -> str | None:
    """Follow ``guest_path``'s symlinks as the guest would, inside ``root``; the final guest path."""
    if depth > 16:
        return None
    p = root / guest_path.lstrip("/")
    # the directories on the way may be symlinks too (/bin -> usr/bin)
    parts = PurePosixPath(guest_path).parts[1:]
    cur = PurePosixPath("/")
    for i, part in enumerate(parts):
        nxt = cur / part
        host = root / str(nxt).lstrip("/")
        if host.is_symlink():
            link = os.readlink(host)
            target = PurePosixPath(link) if link.startswith("/") else cur / link
            rest = PurePosixPath(*parts[i + 1:]) if i + 1 < len(parts) else None
            full = os.path.normpath(str(target / rest) if rest else str(target))
            return resolve_in(root, full, depth + 1)
        cur = nxt
    return str(cur) if (root / str(cur).lstrip("/")).is_file() or p.is_file() else None


CANDIDATES = ("/usr/local/bin/python3", "/usr/bin/python3")


def find_python(root: Path) -> GuestPython:
    """The image's Python 3.9..3.13 with its standard library; ImageBuildError saying what was looked for."""
    looked = list(CANDIDATES)
    names = [*CANDIDATES]
    for d in ("usr/local/bin", "usr/bin"):
        if (root / d).is_dir():
            names += sorted(f"/{d}/{p.name}" for p in (root / d).glob("python3.*")
                            if re.fullmatch(r"python3\.\d+", p.name))
    found_versions = []
    for cand in names:
        real = resolve_in(root, cand)
        if real is None:
            continue
        m = re.search(r"python(3)\.(\d+)$", real) or re.search(r"python(3)\.(\d+)$", cand)
        if not m:
            continue
        version = (3, int(m.group(2)))
        found_versions.append(f"{cand} ({version[0]}.{version[1]})")
        if not PYTHON_MIN <= version <= PYTHON_MAX:
            continue
        prefix = str(PurePosixPath(real).parent.parent).lstrip("/")
        stdlib = root / prefix / "lib" / f"python3.{version[1]}"
        if not (stdlib / "json" / "__init__.py").is_file() and not list(stdlib.glob("json/__init__.*")):
            found_versions[-1] += " without its standard library"
            continue
        return GuestPython(real, version, find_glibc(root))
    seen = f"; found {', '.join(found_versions)}" if found_versions else ""
    raise ImageBuildError(f"the root file system has no usable Python: looked for {', '.join(looked)} and "
                          f"python3.N next to them (CPython 3.9 to 3.13 with its standard library){seen}. "
                          "Add one with --apt python3 or use a rootfs that has it")


def find_glibc(root: Path) -> tuple[int, int] | None:
    """The glibc version of the root (from libc.so.6's banner), or None (musl, none)."""
    for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "lib64", "usr/lib"):
        p = root / d / "libc.so.6"
        try:
            if p.is_symlink():
                real = resolve_in(root, "/" + str(p.relative_to(root)))
                if real is None:
                    continue
                p = root / real.lstrip("/")
            with open(p, "rb") as f:
                data = f.read(16 << 20)
        except OSError:
            continue
        m = re.search(rb"GNU C Library [^\n]*?version (\d+)\.(\d+)", data)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def check_pip_spec(spec: str) -> str:
    """A requirement specifier (``pyyaml``, ``numpy>=1.26``); never an option."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        if not isinstance(spec, str) or spec.startswith("-"):
            raise InvalidRequirement("options are not accepted")
        req = Requirement(spec)
        if req.url is not None and not req.url.startswith("https://"):
            raise InvalidRequirement("a direct reference must be an https:// URL (no local files)")
    except InvalidRequirement as e:
        raise ImageBuildError(f"pip: {spec!r} is not a requirement specifier (such as pyyaml or "
                              f"numpy>=1.26): {e}") from e
    return spec


MUSL_LOADERS = ("lib/ld-musl-x86_64.so.1", "usr/lib/ld-musl-x86_64.so.1")


def wheel_platforms(root: Path, py: GuestPython) -> tuple[list[str], str]:
    """pip's ``--platform`` tags for the guest's C library, and how to name it; ImageBuildError when the
    root has neither glibc nor musl (no binary wheel could load)."""
    if py.glibc is not None and py.glibc[0] == 2:
        minor = py.glibc[1]
        return ([f"manylinux_2_{m}_x86_64" for m in range(minor, 4, -1)] + ["manylinux2014_x86_64"],
                f"glibc 2.{minor}")
    if any((root / p).exists() or (root / p).is_symlink() for p in MUSL_LOADERS):
        return ["musllinux_1_2_x86_64", "musllinux_1_1_x86_64"], "musl"
    raise ImageBuildError("pip: the image has neither glibc (libc.so.6) nor musl (ld-musl-x86_64.so.1), so no "
                          "binary wheel would load in it")


def pip_install(root: Path, py: GuestPython, specs: list[str], requirements: list[Path]) -> None:
    """Install wheels for the guest's CPython and C library into ``root/opt/forkd/python`` (pip writes
    into a directory next to the tree, then the files are placed through :func:`guarded`)."""
    major, minor = py.version
    platforms, libc = wheel_platforms(root, py)
    target = Path(tempfile.mkdtemp(prefix=".pip-", dir=root.parent))
    try:
        _pip(target, major, minor, platforms, libc, specs, requirements)
        os.chmod(target, 0o755)
        place_tree(target, root, "/" + PIP_TARGET)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _pip(target: Path, major: int, minor: int, platforms: list[str], libc: str, specs: list[str],
         requirements: list[Path]) -> None:
    argv = [shutil.which("python3") or "python3", "-m", "pip", "install", "-q", "--no-input",
            "--disable-pip-version-check", "--no-warn-script-location", "--target", str(target),
            "--only-binary=:all:", "--implementation", "cp", "--python-version", f"{major}.{minor}",
            "--abi", f"cp{major}{minor}"]
    for p in platforms:
        argv += ["--platform", p]
    for r in requirements:
        argv += ["-r", str(r)]
    argv += specs
    proc = _run(argv, "pip")
    if proc.returncode != 0:
        err = proc.stderr
        missing = re.findall(r"No matching distribution found for (\S+)", err)
        what = f"CPython {major}.{minor}, {libc} x86_64"
        if missing:
            raise ImageBuildError(f"pip: no wheel of {', '.join(missing)} for the guest ({what}): the package does "
                                  "not exist, or has no binary build for that Python and platform")
        raise ImageBuildError(f"pip install for the guest ({what}) failed: {err.strip()[-800:]}")


# ---------------------------------------------------------------------------------------------
# Files, and the file system image
# ---------------------------------------------------------------------------------------------


def copy_in(src: Path, dst: str, root: Path) -> None:
    """``--copy SRC:DST``: a host file or directory to guest path DST (absolute)."""
    if not dst.startswith("/"):
        raise ImageBuildError(f"--copy {src}:{dst}: the destination must be an absolute guest path")
    if not src.exists():
        raise ImageBuildError(f"--copy {src}:{dst}: {src} does not exist")
    try:
        place_tree(src, root, dst)
    except ImageBuildError as e:
        raise ImageBuildError(f"--copy {src}:{dst}: {e}") from None


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def make_ext4(root: Path, out: Path, size_mib: int) -> None:
    """``out``: an ext4 file system of ``size_mib`` holding ``root`` (sparse; no journal: a sandbox's disk
    is thrown away with it, so crash recovery buys nothing and every journal write would cost a layer)."""
    need = tree_bytes(root)
    if need > (size_mib << 20) * 0.85:
        raise ImageBuildError(f"the image's files need {need >> 20} MiB, too much for a {size_mib} MiB disk; "
                              "raise --disk-mib")
    proc = _run(["mkfs.ext4", "-q", "-F", "-L", "forkd-root", "-O", "^has_journal", "-E", "root_owner=0:0",
                 "-d", str(root), str(out), f"{size_mib}M"], "mkfs.ext4")
    if proc.returncode != 0:
        raise ImageBuildError(f"mkfs.ext4 failed: {proc.stderr.strip()[-600:]} (apt-get install -y e2fsprogs)")
    os.chmod(out, 0o600)  # QEMU opens it before it drops root; no VM uid reads it by name
    fsync_file(out)
