"""Recipe images: the user's own root file system (apt packages, pip wheels, a rootfs or OCI image,
files, environment) on a disk, booted by forkd's kernel and initramfs.

A recipe's image id is a hash of everything that decides its content: the boot image, the resolved
package versions, the hashes of the rootfs/OCI archive, requirements and copied files, and the
recipe's own fields. A build happens in ``<image_root>/.staging-<id>-<pid>/`` and is renamed into
place once ``image.json`` is written last; the name (``<image_root>/names/<name>.json``) points at an
id and is replaced atomically, so a failed build never leaves a name pointing at a half-built image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkd import paths
from forkd.errors import ImageBuildError, ImageNotFoundError, ValidationError
from forkd.fsutil import atomic_write_json, fsync_dir
from forkd.guest import rootfs
from forkd.guest.image import (
    IMAGE_JSON,
    INITRAMFS_NAME,
    KERNEL_NAME,
    ImageInfo,
    _Steps,
    build_image,
    deb_cache_dir,
    image_id_for,
    list_images,
    load_image,
)

RECIPE_VERSION = "1"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MIN_DISK_MIB, MAX_DISK_MIB, DEFAULT_DISK_MIB = 256, 65536, 2048
#: what an image without --rootfs/--oci starts from (Debian's Python, a shell, and libstdc++, which manylinux
#: wheels such as pandas expect from the system), from Debian's mirror
BASE_APT = ("python3", "dash", "bash", "coreutils", "libstdc++6")
ROOTFS_NAME = "rootfs.ext4"
NAMES_DIR = "names"
STEPS = ("resolve packages", "unpack rootfs", "download packages", "unpack packages", "pip wheels",
         "copy files", "make file system", "hash", "finalize")
RECIPE_FIELDS = ("name", "apt", "pip", "requirements", "rootfs", "oci", "copy", "env", "workdir", "disk_mib")

Progress = Callable[[str, int, int], None]


@dataclass
class Recipe:
    """What goes into an image. Paths are host paths; ``copy`` is (host path, guest path)."""

    name: str
    apt: list[str] = field(default_factory=list)
    pip: list[str] = field(default_factory=list)
    requirements: list[Path] = field(default_factory=list)
    rootfs: Path | None = None
    oci: Path | None = None
    copy: list[tuple[Path, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    disk_mib: int = DEFAULT_DISK_MIB

    def check(self) -> Recipe:
        """Every field valid, or ValidationError naming it and the rule."""
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise ValidationError(f"name must match {NAME_RE.pattern}; got {self.name!r}")
        if self.rootfs is not None and self.oci is not None:
            raise ValidationError("rootfs and oci cannot be used together (one base per image)")
        for spec in self.apt:
            try:
                rootfs.check_apt_name(spec)
            except ImageBuildError as e:
                raise ValidationError(str(e)) from None
        for spec in self.pip:
            try:
                rootfs.check_pip_spec(spec)
            except ImageBuildError as e:
                raise ValidationError(str(e)) from None
        for req in self.requirements:
            if not Path(req).is_file():
                raise ValidationError(f"requirements: {req} is not a file")
        for what, p in (("rootfs", self.rootfs), ("oci", self.oci)):
            if p is not None and not Path(p).exists():
                raise ValidationError(f"{what}: {p} does not exist")
        for src, dst in self.copy:
            if not Path(src).exists():
                raise ValidationError(f"copy: {src} does not exist")
            if not _guest_path(dst):
                raise ValidationError(f"copy: the destination {dst!r} must be an absolute guest path without ..")
        for k, v in self.env.items():
            if not ENV_KEY_RE.fullmatch(k):
                raise ValidationError(f"env: {k!r} is not a variable name ({ENV_KEY_RE.pattern})")
            if not isinstance(v, str) or "\n" in v or "\0" in v or len(v) > 4096:
                raise ValidationError(f"env: the value of {k} must be one line of at most 4096 characters")
        if self.workdir is not None and not _guest_path(self.workdir):
            raise ValidationError(f"workdir must be an absolute guest path without ..; got {self.workdir!r}")
        if isinstance(self.disk_mib, bool) or not isinstance(self.disk_mib, int) \
                or not MIN_DISK_MIB <= self.disk_mib <= MAX_DISK_MIB:
            raise ValidationError(f"disk_mib must be an integer in {MIN_DISK_MIB}..{MAX_DISK_MIB}; "
                                  f"got {self.disk_mib!r}")
        return self

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> Recipe:
        """A recipe file (the same fields as the CLI; paths relative to the file), then ``overrides``."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValidationError(f"recipe {path}: {e}") from e
        unknown = [k for k in data if k not in RECIPE_FIELDS]
        if unknown:
            raise ValidationError(f"recipe {path}: unknown field(s) {', '.join(unknown)} "
                                  f"(known: {', '.join(RECIPE_FIELDS)})")
        base = Path(path).resolve().parent

        def rel(p: object, what: str) -> Path:
            if not isinstance(p, str):
                raise ValidationError(f"recipe {path}: {what} must be a string path")
            return (base / p) if not os.path.isabs(p) else Path(p)

        def strings(key: str) -> list[str]:
            v = data.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ValidationError(f"recipe {path}: {key} must be a list of strings")
            return list(v)
        copy = []
        for item in strings("copy"):
            src, sep, dst = item.rpartition(":")  # as the CLI: a guest path has no colon, a host path may
            if not sep:
                raise ValidationError(f"recipe {path}: copy entries are SRC:DST; got {item!r}")
            copy.append((rel(src, "copy"), dst))
        env = data.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ValidationError(f"recipe {path}: env must be a table of strings")
        fields: dict[str, Any] = {
            "name": data.get("name", ""), "apt": strings("apt"), "pip": strings("pip"),
            "requirements": [rel(p, "requirements") for p in strings("requirements")],
            "rootfs": rel(data["rootfs"], "rootfs") if "rootfs" in data else None,
            "oci": rel(data["oci"], "oci") if "oci" in data else None,
            "copy": copy, "env": dict(env), "workdir": data.get("workdir"),
            "disk_mib": data.get("disk_mib", DEFAULT_DISK_MIB),
        }
        for k, v in overrides.items():
            if v not in (None, [], {}, ()):
                fields[k] = (fields[k] + list(v)) if isinstance(fields.get(k), list) else \
                    ({**fields[k], **v} if isinstance(fields.get(k), dict) else v)
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "apt": self.apt, "pip": self.pip,
                "requirements": [str(p) for p in self.requirements],
                "rootfs": str(self.rootfs) if self.rootfs else None, "oci": str(self.oci) if self.oci else None,
                "copy": [f"{s}:{d}" for s, d in self.copy], "env": self.env, "workdir": self.workdir,
                "disk_mib": self.disk_mib}


def _guest_path(p: object) -> bool:
    return isinstance(p, str) and p.startswith("/") and ".." not in p.split("/") and "\n" not in p \
        and "\0" not in p and len(p) <= 1024


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _hash_path(p: Path) -> str:
    """sha256 of a file, or of a directory tree (names, modes, link targets, contents)."""
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    for dirpath, dirs, files in os.walk(p):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            h.update(f"{os.path.relpath(full, p)}\0{st.st_mode:o}\0{st.st_uid}:{st.st_gid}\0".encode())
            if os.path.islink(full):
                h.update(os.readlink(full).encode())
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
    return h.hexdigest()


def _status_of_base(recipe: Recipe) -> bytes:
    """The dpkg status of the recipe's base (what apt may consider installed)."""
    import tarfile

    if recipe.oci is not None:
        return rootfs.oci_status(recipe.oci)
    if recipe.rootfs is None:
        return b""
    if recipe.rootfs.is_dir():
        return rootfs.read_status(recipe.rootfs)
    try:
        with tarfile.open(recipe.rootfs) as tar:
            for name in (rootfs.DPKG_STATUS, "./" + rootfs.DPKG_STATUS):
                try:
                    f = tar.extractfile(name)
                except KeyError:
                    continue
                if f is not None:
                    return f.read(64 << 20)
    except (OSError, tarfile.TarError) as e:
        raise ImageBuildError(f"rootfs {recipe.rootfs}: not a readable tar archive: {e}") from e
    return b""


def apt_list(recipe: Recipe) -> list[str]:
    """The packages to ask apt for: the recipe's, plus Debian's Python when nothing else provides a base."""
    base = [] if (recipe.rootfs or recipe.oci) else [p for p in BASE_APT if p not in recipe.apt]
    return base + recipe.apt


def recipe_inputs(recipe: Recipe, boot: ImageInfo) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """What the image id is keyed by, and the resolved (package, version) list to install."""
    packages = apt_list(recipe)
    resolved = rootfs.resolve_apt(packages, _status_of_base(recipe)) if packages else []
    inputs = {"recipe_version": RECIPE_VERSION, "boot_image": boot.image_id,
              "recipe": json.dumps({**recipe.to_json(), "name": None, "rootfs": None, "oci": None, "requirements": None,
                                    "copy": [d for _, d in recipe.copy]}, sort_keys=True),
              "apt": " ".join(f"{p}={v}" for p, v in resolved),
              "sha256:agent+init": boot.inputs.get("sha256:agent.py", "") + boot.inputs.get("sha256:init.sh", "")}
    for what, p in (("rootfs", recipe.rootfs), ("oci", recipe.oci)):
        if p is not None:
            inputs[f"sha256:{what}"] = _hash_path(p)
    for i, r in enumerate(recipe.requirements):
        inputs[f"sha256:requirements{i}"] = _hash_path(r)
    for i, (src, _dst) in enumerate(recipe.copy):
        inputs[f"sha256:copy{i}"] = _hash_path(src)
    return inputs, resolved


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def _names(root: Path) -> Path:
    return root / NAMES_DIR


def find_named(name: str, root: Path | None = None) -> ImageInfo:
    """The image called ``name``; ImageNotFoundError if there is none (or it is gone)."""
    root = root or paths.image_root()
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationError(f"image name must match {NAME_RE.pattern}; got {name!r}")
    try:
        image_id = str(json.loads((_names(root) / f"{name}.json").read_text())["image_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ImageNotFoundError(f"no image named {name}; build it with forkd image build --name {name} ...") from e
    info = load_image(root / image_id) if re.fullmatch(r"[0-9a-f]{16}", image_id) else None
    if info is None:
        raise ImageNotFoundError(f"image {name} ({image_id}) is missing or incomplete; rebuild it")
    return info


def named_images(root: Path | None = None) -> dict[str, str]:
    """name -> image id of every named image."""
    root = root or paths.image_root()
    out: dict[str, str] = {}
    d = _names(root)
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            try:
                out[p.stem] = str(json.loads(p.read_text())["image_id"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return out


def remove_named(name: str, in_use: list[str], root: Path | None = None, force: bool = False) -> str:
    """Remove image ``name`` (its name, and its files unless another name points there). ``in_use``
    lists the snapshots made from it: refused unless ``force``. Returns the image id."""
    root = root or paths.image_root()
    info = find_named(name, root)
    if in_use and not force:
        raise ValidationError(f"image {name} is used by snapshot(s) {', '.join(in_use)}; delete them first "
                              "or remove with force (they will no longer restore)")
    (_names(root) / f"{name}.json").unlink()
    fsync_dir(_names(root))
    if info.image_id not in named_images(root).values():
        trash = root / f".trash-{info.image_id}-{os.getpid()}"
        os.rename(info.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return info.image_id


def recipe_images(root: Path | None = None) -> list[ImageInfo]:
    return [i for i in list_images(root) if i.rootfs is not None]


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def build_recipe(recipe: Recipe, *, force: bool = False, progress: Progress | None = None,
                 root: Path | None = None, in_use: Callable[[str], list[str]] | None = None) -> ImageInfo:
    """Build (or find, when its inputs are unchanged) the image of ``recipe`` and name it. ``in_use``
    gives the snapshots made from an image id: an image they use is never replaced in place (a rebuild
    need not give the same bytes, and they would no longer restore)."""
    recipe.check()
    root = root or paths.image_root()
    steps = _Steps(progress, STEPS)
    boot = build_image(root)
    steps("resolve packages")
    inputs, resolved = recipe_inputs(recipe, boot)
    image_id = image_id_for(inputs)
    final = root / image_id
    existing = load_image(final)
    if existing is not None and existing.inputs == inputs and existing.origin == "build" and not force:
        _name(root, recipe.name, image_id)
        steps.finish()
        return existing
    users = in_use(image_id) if in_use is not None and final.exists() else []
    if users:
        how = "it came from a pack" if existing is not None and existing.origin != "build" else "it is being rebuilt"
        raise ImageBuildError(f"image {image_id} would be replaced ({how}), but snapshot(s) {', '.join(users)} use "
                              "it and would no longer restore: delete them first (forkd snapshot rm), or keep "
                              "the image as it is")
    staging = root / f".staging-{image_id}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        info = _build(recipe, boot, inputs, resolved, staging, final, steps)
        if final.exists():
            trash = root / f".trash-{image_id}-{os.getpid()}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(staging, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _name(root, recipe.name, image_id)
    steps.finish()
    return info


def _name(root: Path, name: str, image_id: str) -> None:
    d = _names(root)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / f"{name}.json", {"image_id": image_id, "named_at": time.time()}, mode=0o600)


def _build(recipe: Recipe, boot: ImageInfo, inputs: dict[str, str], resolved: list[tuple[str, str]],
           staging: Path, final: Path, steps: _Steps) -> ImageInfo:
    tree = staging / "root"
    tree.mkdir(mode=0o755)
    steps("unpack rootfs")
    if recipe.rootfs is not None:
        rootfs.unpack_rootfs(recipe.rootfs, tree)
    elif recipe.oci is not None:
        rootfs.unpack_oci(recipe.oci, tree)
    else:
        rootfs.merged_usr_skeleton(tree)
    steps("download packages")
    debs = rootfs.download_debs(resolved, deb_cache_dir())
    steps("unpack packages")
    rootfs.install_debs(debs, tree)
    _skeleton(tree)
    py = rootfs.find_python(tree)
    steps("pip wheels")
    if recipe.pip or recipe.requirements:
        rootfs.pip_install(tree, py, recipe.pip, recipe.requirements)
    steps("copy files")
    for src, dst in recipe.copy:
        rootfs.copy_in(src, dst, tree)
    _forkd_files(tree, recipe)
    steps("make file system")
    rootfs.make_ext4(tree, staging / ROOTFS_NAME, recipe.disk_mib)
    shutil.rmtree(tree)
    steps("hash")
    from forkd.fsutil import sha256_file

    digest = sha256_file(staging / ROOTFS_NAME)
    steps("finalize")
    for name, src in ((KERNEL_NAME, boot.kernel), (INITRAMFS_NAME, boot.initramfs)):
        try:
            os.link(src, staging / name)
        except OSError:
            shutil.copyfile(src, staging / name)
    info = ImageInfo(
        image_id=final.name, path=final, kernel=final / KERNEL_NAME, initramfs=final / INITRAMFS_NAME,
        kernel_version=boot.kernel_version,
        cmdline=f"{boot.cmdline} forkd.root=/dev/vda forkd.python={py.path}", inputs=dict(inputs),
        built_at=time.time(), size_bytes=sum((staging / n).stat().st_blocks * 512
                                             for n in (KERNEL_NAME, INITRAMFS_NAME, ROOTFS_NAME)),
        name=recipe.name, rootfs=final / ROOTFS_NAME, rootfs_sha256=digest, disk_mib=recipe.disk_mib,
        python=py.path)
    atomic_write_json(staging / IMAGE_JSON, info.to_json())
    return info


def _skeleton(tree: Path) -> None:
    """What a root file system needs that no package's files provide (maintainer scripts are not run)."""
    for d, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777),
                    ("root", 0o700), ("etc", 0o755), ("var/tmp", 0o1777), ("home", 0o755)):
        p = tree / d
        if not p.exists() and not p.is_symlink():
            rootfs.mkdir_guarded(tree, d, mode)
    defaults = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
                              "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
                "etc/group": "root:x:0:\nnogroup:x:65534:\n", "etc/hostname": "forkd\n",
                "etc/hosts": "127.0.0.1 localhost forkd\n::1 localhost\n"}
    for rel, text in defaults.items():
        p = tree / rel
        if not p.exists() and not p.is_symlink():
            rootfs.write_guarded(tree, rel, text.encode())


def _forkd_files(tree: Path, recipe: Recipe) -> None:
    rootfs.mkdir_guarded(tree, "etc/forkd")
    rootfs.write_guarded(tree, "etc/forkd/env", "".join(f"{k}={v}\n" for k, v in sorted(recipe.env.items())).encode())
    workdir = rootfs.guarded(tree, "etc/forkd/workdir")
    if recipe.workdir:
        rootfs.write_guarded(tree, "etc/forkd/workdir", recipe.workdir.encode())
    elif workdir.is_dir():
        shutil.rmtree(workdir)
    else:
        workdir.unlink(missing_ok=True)


def describe(info: ImageInfo) -> dict[str, Any]:
    """What ``forkd image info`` shows of a recipe image."""
    return {**info.to_json(), "path": str(info.path),
            "recipe": json.loads(info.inputs.get("recipe", "{}") or "{}"),
            "apt": info.inputs.get("apt", "").split()}

