"""The host end of a guest agent's channel: JSON lines with request ids, pipelined, thread-safe.

A reader thread matches replies to waiting requests by ``id``. When the peer goes away (the VM exited
or was killed) every pending request fails at once with ChannelClosedError instead of hanging.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from forkd.engine.jsonlines import LineReader, LineTooLong, encode
from forkd.errors import AgentError, AgentTimeoutError, ChannelClosedError


class AgentChannel:
    def __init__(self, sock: socket.socket, name: str,
                 describe_exit: Callable[[], str] | None = None) -> None:
        self.sock = sock
        self.name = name
        self._describe_exit = describe_exit
        # A random start: a late reply meant for an earlier connection (before a controller restart)
        # can never match a request of ours.
        self._ids = itertools.count(secrets.randbits(40) + 1)
        self._pending: dict[int, tuple[str, Future[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.closed = False
        self.close_reason = ""
        self.ready_events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name=f"agent-{name}", daemon=True)
        self._thread.start()

    # -- sending
    def submit(self, op: str, **args: Any) -> Future[dict[str, Any]]:
        """Send a request now; the Future resolves to the raw reply ``{"id","ok",...}``."""
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            if self.closed:
                raise ChannelClosedError(self._closed_message(op))
            rid = next(self._ids)
            self._pending[rid] = (op, fut)
        data = encode({"id": rid, "op": op, **args})
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as e:
            with self._lock:
                self._pending.pop(rid, None)
            raise ChannelClosedError(f"{self.name}: cannot send {op}: {e}") from e
        return fut

    def call(self, op: str, reply_timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """Send a request and return its ``result``; AgentError if the agent answered with an error.

        ``reply_timeout`` is how long to wait for the reply, in seconds (None waits for ever); ``args``
        are the request's fields (which may include the agent's own ``timeout``).
        """
        return self.result(op, self.submit(op, **args), reply_timeout)

    def result(self, op: str, fut: Future[dict[str, Any]], timeout: float | None) -> dict[str, Any]:
        try:
            reply = fut.result(timeout)
        except FutureTimeout as e:
            raise AgentTimeoutError(f"{self.name}: no reply to {op} within {timeout} s") from e
        if reply.get("ok"):
            res = reply.get("result")
            return res if isinstance(res, dict) else {"value": res}
        raw = reply.get("error")
        err: dict[str, Any] = raw if isinstance(raw, dict) else {}
        details = {k: v for k, v in err.items() if k not in ("type", "message", "traceback")}
        raise AgentError(op, str(err.get("type", "Error")), str(err.get("message", "")),
                         err.get("traceback"), details)

    def wait_ready(self, timeout: float) -> dict[str, Any] | None:
        """Wait for the agent's unsolicited ``{"event":"ready"}`` line (sent once, at guest boot)."""
        if self._ready.wait(timeout):
            return self.ready_events[0]
        return None

    # -- receiving
    def _read_loop(self) -> None:
        reader = LineReader(self.sock)
        reason = "the agent closed the channel"
        try:
            while True:
                try:
                    line = reader.readline()
                except LineTooLong:
                    continue  # a hostile or broken guest; drop the line, keep the channel
                if not line:
                    break
                self._dispatch(line)
        except OSError as e:
            reason = f"channel error: {e}"
        finally:
            self._close(reason)

    def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        if msg.get("event") == "ready":
            self.ready_events.append(msg)
            self._ready.set()
            return
        rid = msg.get("id")
        if not isinstance(rid, int):
            return
        with self._lock:
            entry = self._pending.pop(rid, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(msg)

    def _closed_message(self, op: str) -> str:
        extra = ""
        if self._describe_exit is not None:
            try:
                extra = self._describe_exit()
            except Exception:  # noqa: BLE001 - best-effort detail for an error message
                extra = ""
        msg = f"{self.name}: {self.close_reason or 'channel closed'} before the reply to {op}"
        return f"{msg} ({extra})" if extra else msg

    def _close(self, reason: str) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.close_reason = reason
            pending = list(self._pending.values())
            self._pending.clear()
        for op, fut in pending:
            if not fut.done():
                fut.set_exception(ChannelClosedError(self._closed_message(op)))

    def close(self) -> None:
        """Close our end; pending requests fail with ChannelClosedError."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._close("the host closed the channel")
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.sock.close()
