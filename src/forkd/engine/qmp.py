"""A small synchronous QMP client over an already-connected socket.

Commands carry an ``id`` so several can be written ahead (even before QEMU has started: the socket is
connected to a listening socket QEMU inherits) and their replies collected later.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from typing import Any

from forkd.engine.jsonlines import LineReader, encode
from forkd.errors import VMError


class QMPError(VMError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {cls}: {desc}")
        self.command = command
        self.error_class = cls
        self.desc = desc


class QMPClient:
    def __init__(self, sock: socket.socket, name: str = "qemu") -> None:
        self.sock = sock
        self.name = name
        self.reader = LineReader(sock)
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.commands: dict[int, str] = {}
        self.greeting: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    def send(self, command: str, args: dict[str, Any] | None = None, fds: list[int] | None = None) -> int:
        """Write one command without waiting; returns its id."""
        with self._lock:
            cid = next(self._ids)
            msg: dict[str, Any] = {"execute": command, "id": cid}
            if args:
                msg["arguments"] = args
            data = encode(msg)
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.sendall(data)
            except OSError as e:
                raise VMError(f"{self.name}: QMP send of {command} failed: {e}") from e
            self.commands[cid] = command
            return cid

    def wait(self, cid: int, timeout: float = 60.0) -> Any:
        """The return value of command ``cid``; QMPError if QEMU refused it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while cid not in self.replies:
                self._read_one(deadline)
            reply = self.replies.pop(cid)
            command = self.commands.pop(cid, "?")
        if "error" in reply:
            err = reply["error"]
            raise QMPError(command, str(err.get("class")), str(err.get("desc")))
        return reply.get("return")

    def execute(self, command: str, args: dict[str, Any] | None = None, *, fds: list[int] | None = None,
                timeout: float = 60.0) -> Any:
        return self.wait(self.send(command, args, fds), timeout)

    def wait_event(self, name: str, timeout: float = 60.0,
                   match: dict[str, Any] | None = None) -> dict[str, Any]:
        """Wait for (and consume) the first event ``name`` whose data contains ``match``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for ev in self.events:
                    data = ev.get("data") or {}
                    if ev.get("event") == name and all(data.get(k) == v for k, v in (match or {}).items()):
                        self.events.remove(ev)
                        return ev
                self._read_one(deadline)

    def _read_one(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VMError(f"{self.name}: timed out waiting for QMP")
        self.sock.settimeout(remaining)
        try:
            line = self.reader.readline()
        except TimeoutError as e:
            raise VMError(f"{self.name}: timed out waiting for QMP") from e
        except OSError as e:
            raise VMError(f"{self.name}: QMP connection failed: {e}") from e
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(None)
        if not line:
            raise VMError(f"{self.name}: QEMU closed its QMP connection (the process exited)")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise VMError(f"{self.name}: malformed QMP line {line[:200]!r}") from e
        if "QMP" in msg:
            self.greeting = msg
        elif "event" in msg:
            self.events.append(msg)
            del self.events[:-256]
        elif isinstance(msg.get("id"), int):
            self.replies[msg["id"]] = msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
