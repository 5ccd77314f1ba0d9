"""Where forkd keeps its files, and the rules for names that become path components."""

from __future__ import annotations

import os
import re
from pathlib import Path

from forkd.errors import ValidationError

TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHILD_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def data_dir() -> Path:
    """Root of forkd's data: ``$FORKD_HOME``, else ``$XDG_DATA_HOME/forkd``, else ``~/.local/share/forkd``."""
    if env := os.environ.get("FORKD_HOME"):
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "forkd"


def snapshot_root() -> Path:
    """Directory holding one sub-directory per snapshot tag (``$FORKD_SNAPSHOT_ROOT`` overrides)."""
    if env := os.environ.get("FORKD_SNAPSHOT_ROOT"):
        return Path(env)
    return data_dir() / "snapshots"


def run_dir() -> Path:
    """Directory holding one work dir per live child VM (``$FORKD_RUN_DIR`` overrides)."""
    if env := os.environ.get("FORKD_RUN_DIR"):
        return Path(env)
    return data_dir() / "run"


def image_root() -> Path:
    """Directory holding built guest images, one per image id (``$FORKD_IMAGE_ROOT`` overrides)."""
    if env := os.environ.get("FORKD_IMAGE_ROOT"):
        return Path(env)
    return data_dir() / "images"


def cache_dir() -> Path:
    """Download cache (guest kernel packages); ``$FORKD_CACHE_DIR`` overrides."""
    if env := os.environ.get("FORKD_CACHE_DIR"):
        return Path(env)
    return data_dir() / "cache"


def validate_tag(tag: object, field: str = "tag") -> str:
    """Return ``tag`` if it matches ``^[A-Za-z0-9_-]{1,64}$``, else raise ValidationError naming ``field``."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise ValidationError(
            f"{field} must match ^[A-Za-z0-9_-]{{1,64}}$ (letters, digits, '_' and '-', 1-64 characters); "
            f"got {tag!r}"
        )
    return tag


def validate_child_id(child_id: object, field: str = "id") -> str:
    """Return ``child_id`` if it is a safe path component, else raise ValidationError."""
    if not isinstance(child_id, str) or not CHILD_ID_RE.fullmatch(child_id):
        raise ValidationError(f"{field} must match ^[A-Za-z0-9_-]{{1,64}}$; got {child_id!r}")
    return child_id
