"""Content checks of snapshot files, cached by file identity so a spawn never re-hashes a memory image
that has not changed since it was last verified."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from forkd.errors import SnapshotInvalidError
from forkd.fsutil import atomic_write_json, sha256_file

CACHE_NAME = ".verified.json"
_lock = threading.Lock()
_memo: dict[str, tuple[list[int], str]] = {}


def file_identity(path: Path) -> list[int]:
    """What changes whenever the file's content may have changed: device, inode, size, mtime, ctime."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load_cache(cache: Path) -> dict[str, dict[str, object]]:
    try:
        d = json.loads(cache.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise SnapshotInvalidError unless ``path`` hashes to ``expected``; skip the hash when the file's
    identity matches the one recorded at its last successful check."""
    try:
        ident = file_identity(path)
    except FileNotFoundError as e:
        raise SnapshotInvalidError(f"{what}: {path} is missing") from e
    key = str(path)
    cache = path.parent / CACHE_NAME
    with _lock:
        memo = _memo.get(key)
        if memo and memo[0] == ident and memo[1] == expected:
            return
        entry = _load_cache(cache).get(path.name)
        if isinstance(entry, dict) and entry.get("identity") == ident and entry.get("sha256") == expected:
            _memo[key] = (ident, expected)
            return
    digest = sha256_file(path)
    if digest != expected:
        raise SnapshotInvalidError(
            f"{what}: {path} is corrupt: sha256 {digest[:16]}... does not match the recorded {expected[:16]}..."
        )
    with _lock:
        _memo[key] = (ident, expected)
        data = _load_cache(cache)
        data[path.name] = {"identity": ident, "sha256": expected}
        # a read-only snapshot root still works; it just re-hashes in the next process
        with contextlib.suppress(OSError):
            atomic_write_json(cache, data, mode=0o600)


def remember_verified(path: Path, digest: str) -> None:
    """Record that ``path`` (just written by us) hashes to ``digest``."""
    with _lock:
        ident = file_identity(path)
        _memo[str(path)] = (ident, digest)
        cache = path.parent / CACHE_NAME
        data = _load_cache(cache)
        data[path.name] = {"identity": ident, "sha256": digest}
        atomic_write_json(cache, data, mode=0o600)
