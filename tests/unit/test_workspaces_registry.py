"""The workspace registry file and names (no VM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forkd.daemon import models as m
from forkd.daemon.workspaces import NAME_RE, Registry, state_tag_for, validate_name
from forkd.errors import ValidationError
from forkd.paths import validate_tag


def test_round_trip_is_atomic_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(tmp_path / "sub" / "workspaces.json")
    assert reg.load() == {}
    recs = {"a": {"name": "a", "snapshot_tag": "s", "state_tag": None, "links": []}}
    reg.save(recs)
    assert reg.load() == recs
    assert (reg.path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in reg.path.parent.iterdir()] == ["workspaces.json"]  # no temp file left

    def boom(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        reg.save({"b": {"name": "b"}})
    assert reg.load() == recs  # the old file is intact
    assert [p.name for p in reg.path.parent.iterdir()] == ["workspaces.json"]


def test_corrupt_or_foreign_files_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "workspaces.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Registry(p).load()
    p.write_text(json.dumps({"version": 99, "workspaces": {}}))
    with pytest.raises(ValueError, match="unsupported"):
        Registry(p).load()
    p.write_text(json.dumps({"version": 1, "workspaces": {"ok": {"name": "ok"}, "../x": {"name": "../x"},
                                                          "bad": "not a record"}}))
    assert list(Registry(p).load()) == ["ok"]


@pytest.mark.parametrize("name", ["", "a b", "../x", "x" * 65, "a.b", "é", None, 5])
def test_bad_names(name: object) -> None:
    with pytest.raises(ValidationError, match="workspace name"):
        validate_name(name)


def test_names_are_tags_and_state_tags_are_valid() -> None:
    assert NAME_RE.pattern == m.TAG_PATTERN
    for name in ("a", "x" * 64, "my_ws-1"):
        validate_name(name)
        for n in (1, 12345):
            validate_tag(state_tag_for(name, n))
    assert state_tag_for("a", 3) == "ws-a-3"
    assert state_tag_for("x" * 64, 1) != state_tag_for("x" * 63 + "y", 1)
