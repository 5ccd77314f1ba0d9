"""``state.json``: the sandboxes the daemon owns, rewritten atomically on every change."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from forkd.fsutil import atomic_write_json, read_versioned_json

VERSION = 1


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        """The recorded sandboxes by id (empty when there is no state yet)."""
        sb = read_versioned_json(self.path, VERSION, "state").get("sandboxes", {})
        return {k: v for k, v in sb.items() if isinstance(v, dict)}

    def load_ended(self) -> dict[str, dict[str, Any]]:
        """The sandboxes that ended (killed, expired) and why, oldest first."""
        try:
            d = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        ended = d.get("ended", {}) if isinstance(d, dict) else {}
        return {k: v for k, v in ended.items() if isinstance(v, dict) and isinstance(v.get("reason"), str)} \
            if isinstance(ended, dict) else {}

    def save(self, sandboxes: dict[str, dict[str, Any]], ended: dict[str, dict[str, Any]] | None = None) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"version": VERSION, "sandboxes": sandboxes, "ended": ended or {}},
                              mode=0o600)
