"""How the MCP server reaches forkd: a daemon given by URL (``FORKD_URL`` / ``--url``, token from
``FORKD_TOKEN`` or ``--token-file``), or, with none configured, a private ``forkd-controller serve`` it
starts itself (the local engine) and stops, with the sandboxes it started, when it exits.

Either way the tools get an SDK :class:`~forkd.sdk.Controller`. The private daemon listens on a Unix
socket in a fresh 0700 directory, with a random token in a 0600 file there; the token never leaves this
process and that directory. See :mod:`forkd.mcp.keeper` for how the daemon is stopped.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from forkd.mcp import keeper
from forkd.sdk import Controller, ForkdAPIError, MultiController, connect
from forkd.sdk._base import redact

log = logging.getLogger("forkd.mcp")

REQUEST_TIMEOUT_S = 600.0
"""The SDK's default request timeout (operations with their own timeout add it to 30 s)."""
START_TIMEOUT_S = 120.0
"""Seconds the private daemon gets to answer /healthz."""
MAX_SOCKET_PATH = 107
REFRESH_S = 30.0
"""Seconds after which a dns+ list of controllers is resolved again (see RemoteBackend.controller)."""


class BackendError(Exception):
    """forkd cannot be reached (the private daemon did not start, ...): the message says why."""


class Backend(Protocol):
    mode: str
    """``daemon`` or ``local``."""
    url: str
    """Where the daemon is (never with the token)."""

    def controller(self) -> Controller | MultiController: ...

    def redact(self, text: str) -> str: ...

    def close(self) -> None: ...


class RemoteBackend:
    """A daemon that runs anyway: nothing is started or stopped; sandboxes outlive this server. A URL
    list (commas, or a dns+http:// name) is several daemons as one (a MultiController: spawns spread by
    free capacity, ids NODE~sb-...)."""

    mode = "daemon"

    def __init__(self, url: str, token: str | None) -> None:
        self._token = token
        self._ctl = connect(url, token, timeout=REQUEST_TIMEOUT_S)
        self.url = self._ctl.url if isinstance(self._ctl, Controller) else ",".join(self._ctl.urls)
        self._resolved = time.monotonic()
        self._lock = threading.Lock()

    def controller(self) -> Controller | MultiController:
        """The client; a dns+ name is resolved again when the last resolution is older than REFRESH_S
        (controllers that appeared are used, those gone dropped; a failed lookup keeps the old list)."""
        if isinstance(self._ctl, MultiController) and time.monotonic() - self._resolved > REFRESH_S:
            with self._lock:
                if time.monotonic() - self._resolved > REFRESH_S:
                    self._resolved = time.monotonic()
                    try:
                        self._ctl.refresh()
                    except ValueError as e:
                        log.warning("forkd mcp: resolving the controllers again failed: %s", e)
        return self._ctl

    def redact(self, text: str) -> str:
        return redact(text, self._token)

    def close(self) -> None:
        self._ctl.close()


@dataclass(frozen=True)
class LocalOptions:
    """How the private daemon is started."""

    snapshot_root: Path | None = None
    """Snapshots to serve (default: the daemon's, $FORKD_SNAPSHOT_ROOT else $FORKD_HOME/snapshots)."""
    accel: str | None = None
    insecure_no_jail: bool = False
    sandbox_timeout: float | None = None
    log_level: str = "warning"


class LocalBackend:
    """A private ``forkd-controller serve``, started on first use (or by :meth:`start`)."""

    mode = "local"

    def __init__(self, options: LocalOptions | None = None) -> None:
        self.options = options or LocalOptions()
        self.url = "(local engine, not started)"
        self.dir: Path | None = None
        self._token: str | None = None
        self._keeper: subprocess.Popen[bytes] | None = None
        self._ctl: Controller | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the daemon now (idempotent); BackendError if it does not come up."""
        self.controller()

    def controller(self) -> Controller:
        with self._lock:
            if self._closed:
                raise BackendError("the MCP server is shutting down")
            if self._ctl is None and self._error is None:
                try:
                    self._ctl = self._launch()
                except BackendError as e:
                    self._error = str(e)
            if self._error is not None:
                raise BackendError(self._error)
            assert self._ctl is not None
            if self._keeper is not None and self._keeper.poll() is not None:
                raise BackendError("the local forkd daemon is gone (its keeper exited); restart the MCP server")
            return self._ctl

    def redact(self, text: str) -> str:
        return redact(text, self._token)

    def serve_args(self, d: Path) -> list[str]:
        o = self.options
        args = ["--bind", f"unix:{d / 'api.sock'}", "--state", str(d / "state.json"),
                "--audit-log", str(d / "audit.log"), "--token-file", str(d / "token"), "--log-level", o.log_level]
        if o.snapshot_root is not None:
            args += ["--snapshot-root", str(o.snapshot_root)]
        if o.accel is not None:
            args += ["--accel", o.accel]
        if o.sandbox_timeout is not None:
            args += ["--sandbox-timeout", f"{o.sandbox_timeout:g}"]
        if o.insecure_no_jail:
            args.append("--insecure-no-jail")
        return args

    def _launch(self) -> Controller:
        d = Path(tempfile.mkdtemp(prefix="forkd-mcp-"))  # mode 0700
        sock = d / "api.sock"
        if len(str(sock)) > MAX_SOCKET_PATH:
            raise BackendError(f"the socket path {sock} is too long for a Unix socket; set TMPDIR to a shorter path")
        token = secrets.token_urlsafe(32)
        fd = os.open(d / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        self.dir, self._token = d, token
        self._keeper = subprocess.Popen([sys.executable, "-m", "forkd.mcp.keeper", str(d), "--", *self.serve_args(d)],
                                        stdin=subprocess.PIPE, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno(),
                                        start_new_session=True, cwd="/",
                                        env={k: v for k, v in os.environ.items() if k != "FORKD_TOKEN"})
        self.url = f"unix:{sock}"
        ctl = Controller(self.url, token, timeout=REQUEST_TIMEOUT_S)
        try:
            self._wait_healthy(ctl, d)
        except BaseException:
            ctl.close()
            if self._keeper.stdin is not None:
                self._keeper.stdin.close()  # the keeper stops the daemon and removes the directory
            raise
        log.info("forkd mcp: started a private forkd-controller on %s", self.url)
        return ctl

    def _wait_healthy(self, ctl: Controller, d: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        keeper_proc = self._keeper
        assert keeper_proc is not None
        while time.monotonic() < deadline:
            if (d / keeper.EXIT_FILE).exists() or keeper_proc.poll() is not None:
                raise BackendError(self.redact("the local forkd daemon did not start: " + self._log_tail(d)))
            if (d / "api.sock").exists():
                try:
                    if ctl.health():
                        return
                except ForkdAPIError:
                    pass
            time.sleep(0.1)
        raise BackendError(f"the local forkd daemon did not answer /healthz within {START_TIMEOUT_S:g} s: "
                           + self.redact(self._log_tail(d)))

    @staticmethod
    def _log_tail(d: Path, lines: int = 8) -> str:
        try:
            text = (d / keeper.LOG_FILE).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def close(self, wait: float = 90.0) -> None:
        """Let go of the daemon: the keeper kills its sandboxes, stops it and removes its directory. Waits
        up to ``wait`` seconds for that (it goes on by itself if this process is killed meanwhile)."""
        with self._lock:
            self._closed = True
            if self._ctl is not None:
                self._ctl.close()
            proc = self._keeper
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            log.warning("forkd mcp: the local daemon's keeper (pid %d) is still cleaning up", proc.pid)


def make_backend(url: str | None, token: str | None, local: LocalOptions | None = None) -> Backend:
    """A :class:`RemoteBackend` for ``url`` (else ``$FORKD_URL``), else a :class:`LocalBackend`."""
    url = url or os.environ.get("FORKD_URL") or None
    if url:
        return RemoteBackend(url, token if token is not None else os.environ.get("FORKD_TOKEN"))
    return LocalBackend(local)
