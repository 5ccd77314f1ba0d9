"""Integration fixtures: real QEMU VMs (TCG here, KVM where the host has it).

A session-wide fixture builds the guest image (cached in the user's image root, so it is built once
per machine) and creates one snapshot in a temporary FORKD_HOME; tests fork children from it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkd import paths
from forkd.engine import Child, Engine

TAG = "pyagent-test"


@pytest.fixture(scope="session")
def forkd_home() -> Iterator[Path]:
    image_root, cache = paths.image_root(), paths.cache_dir()
    home = Path(tempfile.mkdtemp(prefix="forkd-test-"))
    old = {k: os.environ.get(k) for k in ("FORKD_HOME", "FORKD_IMAGE_ROOT", "FORKD_CACHE_DIR",
                                          "FORKD_SNAPSHOT_ROOT", "FORKD_RUN_DIR")}
    os.environ.update(FORKD_HOME=str(home), FORKD_IMAGE_ROOT=str(image_root), FORKD_CACHE_DIR=str(cache))
    os.environ.pop("FORKD_SNAPSHOT_ROOT", None)
    os.environ.pop("FORKD_RUN_DIR", None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def image(forkd_home: Path) -> object:
    from forkd.guest.image import build_image

    return build_image()


@pytest.fixture(scope="session")
def engine(forkd_home: Path) -> Iterator[Engine]:
    eng = Engine()
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def snapshot(engine: Engine, image: object) -> str:
    engine.create_snapshot(TAG, memory_mib=512, image=image)
    return TAG


@pytest.fixture
def spawn(engine: Engine, snapshot: str) -> Iterator:
    """``spawn(n)`` -> list of children, all killed after the test."""
    made: list[Child] = []

    def _spawn(n: int = 1, **kw: object) -> list[Child]:
        results = engine.spawn(snapshot, n, **kw)
        errors = [r.error for r in results if r.child is None]
        made.extend(r.child for r in results if r.child is not None)
        assert not errors, errors
        return [r.child for r in results if r.child is not None]

    yield _spawn
    for c in made:
        c.kill()
