"""Shared pytest fixtures: real QEMU VMs (TCG here, KVM where the host has it) and a real daemon.

A session-wide fixture builds the guest image (cached in the user's image root, so it is built once
per machine) and creates one snapshot in a temporary FORKD_HOME; tests fork children from it. The
integration and hostile-guest suites share them.
"""
from __future__ import annotations

import contextlib
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
    kill_vms_under(home)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(home, ignore_errors=True)


def kill_vms_under(home: Path) -> None:
    """Kill every QEMU whose memory file lives under ``home`` (a failed test must not leak VMs)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"qemu-system-x86_64") and any(str(home).encode() in a for a in args):
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), 9)


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


# ---------------------------------------------------------------- the daemon
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import httpx  # noqa: E402


def kill_run_dir(run: Path) -> None:
    """Kill the VMs recorded in a daemon's run dir (a daemon leaves them running on purpose) and sweep it."""
    from forkd.engine.cleanup import sweep
    from forkd.engine.vm import VMProcess, WorkDir, process_matches

    if not run.is_dir():
        return
    for w in run.iterdir():
        meta = WorkDir(w).read_meta()
        if meta and process_matches(int(meta["pid"]), str(meta["id"])):
            try:
                VMProcess.adopt(w).kill()
            except Exception:  # noqa: BLE001
                os.kill(int(meta["pid"]), signal.SIGKILL)
    sweep(run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    """A real ``forkd-controller serve`` process on a free loopback port."""

    url: str
    token: str
    dir: Path
    proc: subprocess.Popen[bytes]
    args: list[str]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def audit(self) -> Path:
        return self.dir / "audit.log"

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=600, **kw)  # type: ignore[arg-type]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def restart(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        self.proc = start_daemon_process(self.args, self.dir)
        wait_healthy(self.url, self.proc)


def start_daemon_process(args: list[str], d: Path) -> subprocess.Popen[bytes]:
    log = open(d / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-m", "forkd.daemon", "serve", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=os.environ.copy())


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0, **kw: object) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"forkd-controller exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2, **kw).status_code == 200:  # type: ignore[arg-type]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("forkd-controller did not become healthy")


def make_token_file(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def daemon(engine: Engine, snapshot: str, forkd_home: Path) -> Iterator[Daemon]:
    d = forkd_home / "daemon"
    d.mkdir()
    token = "t0k3n-" + os.urandom(12).hex()
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--state", str(d / "state.json"), "--audit-log", str(d / "audit.log"),
            "--token-file", str(make_token_file(d / "token", token)), "--snapshot-root", str(engine.store.root)]
    proc = start_daemon_process(args, d)
    dm = Daemon(url=f"http://127.0.0.1:{port}", token=token, dir=d, proc=proc, args=args)
    wait_healthy(dm.url, proc)
    yield dm
    if dm.proc.poll() is None:
        dm.stop()
    # the daemon leaves sandboxes running on purpose; the tests' ones go now
    kill_run_dir(d / "run")
