"""A pool of QEMU processes started ahead of time for one snapshot.

A member is a QEMU started in ``-incoming defer``; a *warm* member (the default) has also loaded the
snapshot and answered a ``fresh`` and an ``eval`` (``restore.warm_member``), so a spawn that takes
it pays neither QEMU's start-up nor the first run of the agent's code paths (under TCG, their
translation: most of a child's CPU up to its first answer). A cold member (``warm=False``) waits for
state and can take any snapshot sharing this one's memory (a branch). A background thread keeps
``size`` members ready.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from pathlib import Path

from forkd.engine.qemu import QemuBinary
from forkd.engine.restore import launch_child, wait_waiting, warm_member
from forkd.engine.snapshot import Snapshot
from forkd.engine.vm import VMProcess
from forkd.errors import ForkdError

log = logging.getLogger(__name__)
REFILL_QUIET_S = 0.5  # seconds without a take before the pool refills


class Pool:
    """Pre-started QEMUs for snapshot ``snap``; ``take()`` hands one out, the refill thread replaces it."""

    def __init__(self, snap: Snapshot, qemu: QemuBinary, run_dir: Path, size: int,
                 network: str = "internet", start: bool = True, warm: bool = True) -> None:
        if size < 0:
            raise ValueError("pool size must be >= 0")
        self.snap = snap
        self.qemu = qemu
        self.run_dir = run_dir
        self.size = size
        self.network = network
        self.warm = warm
        self._ready: deque[VMProcess] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._last_take = 0.0
        self.started = 0
        self.failures = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._refill_loop, name=f"pool-{snap.tag}", daemon=True)
        if start:
            self._thread.start()

    # -- consumer side
    def take(self) -> VMProcess | None:
        """A waiting QEMU, or None when none is ready (the caller then launches one cold)."""
        with self._cond:
            self._last_take = time.monotonic()
            while self._ready:
                vm = self._ready.popleft()
                self._cond.notify_all()
                if vm.alive():
                    return vm
                vm.kill()
            self._cond.notify_all()
            return None

    def ready_count(self) -> int:
        with self._cond:
            return len(self._ready)

    def wait_full(self, timeout: float = 600.0) -> bool:
        """Block until ``size`` members are waiting (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < self.size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return len(self._ready) >= self.size

    def resize(self, size: int) -> None:
        with self._cond:
            self.size = max(0, size)
            extra = []
            while len(self._ready) > self.size:
                extra.append(self._ready.pop())
            self._cond.notify_all()
        for vm in extra:
            vm.kill()

    def close(self) -> None:
        """Stop refilling and kill every waiting member."""
        with self._cond:
            self._closed = True
            members = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for vm in members:
            with contextlib.suppress(ForkdError, OSError):
                vm.kill()

    def stats(self) -> dict[str, object]:
        return {"snapshot": self.snap.tag, "size": self.size, "ready": self.ready_count(),
                "started": self.started, "warm": self.warm, "failures": self.failures, "last_error": self.last_error}

    # -- refill thread
    def _refill_loop(self) -> None:
        backoff = 0.1
        while True:
            with self._cond:
                # Refill only between bursts: starting QEMUs while a fan-out is being served would
                # take CPU from the children being restored.
                while not self._closed and (len(self._ready) >= self.size
                                            or time.monotonic() - self._last_take < REFILL_QUIET_S):
                    self._cond.wait(0.1)
                if self._closed:
                    return
            vm = None
            try:
                vm = launch_child(self.snap, self.qemu, self.run_dir, network=self.network, preload=False,
                                  meta={"pool": True})
                wait_waiting(vm, timeout=60)
                if self.warm:
                    warm_member(vm, self.snap)
            except Exception as e:  # noqa: BLE001 - a refill thread that dies would leave the pool empty for good
                if vm is not None:
                    with contextlib.suppress(ForkdError, OSError):
                        vm.kill()
                self.failures += 1
                self.last_error = str(e)
                log.warning("pool %s: starting a member failed: %s", self.snap.tag, e)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.1
            with self._cond:
                if self._closed:
                    vm.kill()
                    return
                self._ready.append(vm)
                self.started += 1
                self._cond.notify_all()
