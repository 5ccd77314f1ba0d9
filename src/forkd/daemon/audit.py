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
        self.observe = observe  # callback(method, path, status, seconds) for metrics

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
            headers = dict(scope.get("headers", []))
            client = scope.get("client")
            self.log.write({
                "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "method": scope["method"], "path": scope["path"], "status": status,
                "latency_us": int(latency * 1e6), "ua": headers.get(b"user-agent", b"").decode(errors="replace"),
                "remote": f"{client[0]}:{client[1]}" if client else None,
            })
            if self.observe is not None:
                route = scope.get("route")
                self.observe(scope["method"], getattr(route, "path", "unmatched"), status, latency)
