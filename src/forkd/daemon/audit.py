"""The append-only audit log: one JSON line per request (401s included), reopened on SIGHUP."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Every client-controlled string in a line is cut to its cap, so a line stays small (a few KiB) whatever a
# client sends, authenticated or not. The query string, headers other than User-Agent and bodies are never
# written.
MAX_METHOD_CHARS = 16
MAX_PATH_CHARS = 1024
MAX_UA_CHARS = 256
MAX_REMOTE_CHARS = 128  # a host from proxy headers is the client's word too
ELLIPSIS = "..."


def cap(text: str, limit: int) -> str:
    """``text``, cut to at most ``limit`` characters (ending in "..." when cut)."""
    return text if len(text) <= limit else text[:max(limit - len(ELLIPSIS), 0)] + ELLIPSIS


def _header(scope: Scope, name: bytes, limit: int) -> str:
    """The first ``name`` header of the request, decoded and capped at ``limit`` characters."""
    for k, v in scope.get("headers", ()):
        if k == name:
            return cap(v[:limit * 4 + 4].decode(errors="replace"), limit)  # at most 4 bytes per character
    return ""


def _remote(scope: Scope) -> str | None:
    client = scope.get("client")
    return cap(f"{client[0]}:{client[1]}", MAX_REMOTE_CHARS) if client else None


def record(scope: Scope, status: int, latency: float) -> dict[str, Any]:
    """The audit line of one request, every client-controlled value capped."""
    return {
        "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "method": cap(str(scope.get("method", "")), MAX_METHOD_CHARS),
        "path": cap(str(scope.get("path", "")), MAX_PATH_CHARS),
        "status": status, "latency_us": int(latency * 1e6),
        "ua": _header(scope, b"user-agent", MAX_UA_CHARS), "remote": _remote(scope),
    }


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._open()

    def _open(self) -> None:
        assert self.path is not None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def reopen(self) -> None:
        """Close and reopen the file (after logrotate moved it away)."""
        if self.path is None:
            return
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._open()

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)  # one write per line: O_APPEND keeps lines whole

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class AuditMiddleware:
    """Outermost ASGI middleware, so requests refused by auth are recorded too."""

    def __init__(self, app: ASGIApp, log: AuditLog, observe: Any = None) -> None:
        self.app = app
        self.log = log
        self.observe = observe  # callback(method, route template or None, status, seconds) for metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            latency = time.perf_counter() - t0
            self.log.write(record(scope, status, latency))
            if self.observe is not None:  # the route's template (None: no route matched), never the raw path
                route = getattr(scope.get("route"), "path", None)
                self.observe(scope["method"], route if isinstance(route, str) else None, status, latency)
