"""What the three parts of the E2B surface share: the bounded body reader, the sandbox's E2B state
kept by this layer (env vars given at create, execution counts), and the template aliases."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from forkd.daemon.service import Controller
from forkd.e2b.auth import Keys
from forkd.e2b.errors import E2BError

#: the envd version reported: the SDK then sends no ``username``/Basic auth (>= 0.4.0), may close
#: stdin (>= 0.5.2) and uploads file objects as octet-stream (>= 0.5.7). Above it the SDK would use
#: file metadata (xattrs) and watch features this layer does not have.
ENVD_VERSION = "0.5.7"
#: the template E2B's SDKs ask for by default; they map to ``--e2b-template`` when no snapshot has the name
DEFAULT_TEMPLATES = ("base", "code-interpreter-v1")
MAX_JSON_BODY = 1 << 20


@dataclass
class SandboxExtra:
    """What E2B has and a forkd sandbox has not: env vars for every command (lost on a daemon restart)."""

    envs: dict[str, str] = field(default_factory=dict)
    executions: int = 0


class E2BState:
    def __init__(self, ctl: Controller, keys: Keys, default_template: str | None) -> None:
        self.ctl = ctl
        self.keys = keys
        self.default_template = default_template
        self._lock = threading.Lock()
        self._extra: dict[str, SandboxExtra] = {}
        self.paused_envs: dict[str, dict[str, str]] = {}  # E2B identity -> env vars while paused (e2b/pause.py)
        self._specs: dict[str, dict[str, Any]] = {}
        self._has_bash: dict[str, bool] = {}

    def extra(self, sid: str) -> SandboxExtra:
        with self._lock:
            if len(self._extra) > 10_000:  # forget sandboxes that are gone
                live = {sb["id"] for sb in self.ctl.list_sandboxes()}
                self._extra = {k: v for k, v in self._extra.items() if k in live}
            return self._extra.setdefault(sid, SandboxExtra())

    def forget(self, sid: str) -> None:
        with self._lock:
            self._extra.pop(sid, None)

    def spec(self, tag: str) -> dict[str, Any]:
        """The snapshot's vcpus and memory (cached: a snapshot never changes)."""
        with self._lock:
            if tag in self._specs:
                return self._specs[tag]
        try:
            info = self.ctl.snapshot_info(tag)
            spec = {"vcpus": int(info.get("vcpus") or 1), "memory_mib": int(info.get("memory_mib") or 0)}
        except Exception:  # noqa: BLE001 - deleted since (force): report what is known
            return {"vcpus": 1, "memory_mib": 0}
        with self._lock:
            self._specs[tag] = spec
        return spec

    def has_bash(self, sid: str, tag: str) -> bool:
        """Whether this sandbox's guest has /bin/bash (looked up once per sandbox: a guest can add or
        remove it, and must not decide for other sandboxes of its snapshot)."""
        with self._lock:
            if sid in self._has_bash:
                return self._has_bash[sid]
            if len(self._has_bash) > 10_000:
                self._has_bash.clear()
        from forkd.errors import AgentError

        try:
            self.ctl.call(sid, lambda c: c.stat("/bin/bash"))
            found = True
        except AgentError:
            found = False
        with self._lock:
            self._has_bash[sid] = found
        return found

    def template_tag(self, template: str) -> str:
        """The snapshot tag of an E2B template id (itself, or --e2b-template for E2B's default names)."""
        if template in DEFAULT_TEMPLATES and self.default_template and not self.ctl.engine.store.exists(template):
            return self.default_template
        return template


#: E2B streams (process output, /execute) open at once: each holds one of the daemon's worker threads
#: (shared with REST API v1) while it waits, so the holder of one sandbox's token cannot take them all
MAX_STREAMS = 64


class StreamSlot:
    """One of MAX_STREAMS; ``release`` may be called more than once."""

    def __init__(self, pool: threading.BoundedSemaphore) -> None:
        self._pool, self._held = pool, True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._pool.release()

    def guard(self, events: Iterator[bytes]) -> Iterator[bytes]:
        """``events``, the slot freed when they end, fail, or are dropped unread (a client that left)."""
        def run() -> Iterator[bytes]:
            try:
                yield from events
            finally:
                self.release()
        gen = run()
        weakref.finalize(gen, self.release)
        return gen


STREAM_SLOTS = threading.BoundedSemaphore(MAX_STREAMS)


def stream_slot() -> StreamSlot:
    """A stream slot, or E2BError 429 when MAX_STREAMS are open."""
    if not STREAM_SLOTS.acquire(blocking=False):
        raise E2BError(429, f"{MAX_STREAMS} E2B streams (commands, run_code) are open: wait for some to end")
    return StreamSlot(STREAM_SLOTS)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413-shaped E2BError past ``limit`` bytes (never read further)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise E2BError(413, f"request body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise E2BError(413, f"request body larger than {limit} bytes")
    return bytes(body)


def state(request: Request) -> E2BState:
    st: E2BState = request.app.state.e2b
    return st
