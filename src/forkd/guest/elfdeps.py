"""The shared libraries a set of ELF files needs, resolved inside a root file system (not the host's).

``ldd`` would run the host's loader and answer with the host's libraries; the default image is made of
Debian packages unpacked into a staging tree, so its libraries are looked up there, as the guest's
loader will: the ELF's interpreter, then each ``DT_NEEDED`` name in ``DT_RUNPATH``/``DT_RPATH`` (with
``$ORIGIN``) and the multiarch system directories, transitively. Parsing is pyelftools'.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from forkd.errors import ImageBuildError
from forkd.guest.rootfs import resolve_in

#: glibc's default search path on Debian x86-64 (multiarch first), used when no ld.so.cache is there
SYSTEM_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")


@dataclass(frozen=True)
class ElfLinks:
    interpreter: str | None
    needed: tuple[str, ...]
    search: tuple[str, ...]   # RUNPATH / RPATH entries, as written


def read_links(path: Path) -> ElfLinks | None:
    """The dynamic-linking facts of ``path``, or None if it is not a dynamic ELF file."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            elf = ELFFile(f)
            interp = None
            for seg in elf.iter_segments():
                if isinstance(seg, InterpSegment):
                    interp = str(seg.get_interp_name())
            needed: list[str] = []
            search: list[str] = []
            for sec in elf.iter_sections():
                if isinstance(sec, DynamicSection):
                    for tag in sec.iter_tags():
                        kind = tag.entry.d_tag
                        if kind == "DT_NEEDED":
                            needed.append(str(getattr(tag, "needed")))  # noqa: B009 (set per tag kind)
                        elif kind in ("DT_RUNPATH", "DT_RPATH"):
                            search += str(getattr(tag, kind[3:].lower())).split(":")
            return ElfLinks(interp, tuple(needed), tuple(search))
    except (OSError, ELFError, ValueError) as e:
        raise ImageBuildError(f"{path}: not a readable ELF file: {e}") from e


def libraries(root: Path, elf_guest_paths: Iterable[str]) -> dict[str, str]:
    """loader-visible guest path -> guest path of the real file, for every library (and interpreter)
    the given ELF files need, transitively; ImageBuildError naming a library the tree lacks."""
    found: dict[str, str] = {}
    todo = list(elf_guest_paths)
    seen: set[str] = set()
    while todo:
        guest = todo.pop()
        real = resolve_in(root, guest)
        if real is None or real in seen:
            continue
        seen.add(real)
        links = read_links(root / real.lstrip("/"))
        if links is None:
            continue
        if links.interpreter:
            target = resolve_in(root, links.interpreter)
            if target is None:
                raise ImageBuildError(f"{guest} needs the loader {links.interpreter}, which the image lacks")
            found[links.interpreter] = target
            todo.append(links.interpreter)
        origin = posixpath.dirname(guest)
        dirs = [d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin) for d in links.search if d]
        dirs += SYSTEM_DIRS
        for name in links.needed:
            loader_path = _find(root, name, dirs)
            if loader_path is None:
                raise ImageBuildError(f"{guest} needs {name}, which is in none of {', '.join(dirs)} of the image")
            if loader_path not in found:
                found[loader_path] = str(resolve_in(root, loader_path))
                todo.append(loader_path)
    return found


def _find(root: Path, name: str, dirs: list[str]) -> str | None:
    if "/" in name:
        return name if resolve_in(root, name) is not None else None
    for d in dirs:
        cand = posixpath.normpath(f"{d}/{name}")
        if resolve_in(root, cand) is not None:
            return cand
    return None
