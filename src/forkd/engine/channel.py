"""The host end of a guest agent's channel: JSON lines with request ids, pipelined, thread-safe.

A reader thread matches replies to waiting requests by ``id``. When the peer goes away (the VM exited
or was killed) every pending request fails at once with ChannelClosedError instead of hanging.

The guest is hostile. It may send one ``{"event": "ready"}`` line, and only where one is expected (a
VM booting; a restored VM announced itself when its parent booted), and replies only to requests in
flight (or ones we stopped waiting for). Anything else (another event, a reply to an id never asked,
a line that is not a JSON object, a line longer than MAX_REPLY_LINE, raw bytes after a reply to a request
that did not ask for them or more than RAW_MAX) is a protocol violation: the
channel closes, every pending request fails with ChannelClosedError naming it, and ``on_violation``
is called once so that the owner can kill the VM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from forkd.engine.jsonlines import LineReader, LineTooLong, encode
from forkd.errors import AgentError, AgentTimeoutError, ChannelClosedError, ValidationError

log = logging.getLogger(__name__)


def base64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


# Bytes of file data asked per file_read request (Child.read_file).
READ_CHUNK = 8 << 20
# Output kept per stream of an exec (Child.exec clamps max_output to it). The agent's JSON escapes
# (ensure_ascii) can turn one byte into six ("\u0000", "\ufffd").
EXEC_OUTPUT_MAX = 1 << 20
JSON_ESCAPE = 6
REPLY_SLACK = 1 << 20  # field names, numbers, an error's traceback
# The longest line a well-behaved agent sends: a file_read chunk in base64, or an exec's two streams.
MAX_REPLY_LINE = max(base64_len(READ_CHUNK), 2 * JSON_ESCAPE * EXEC_OUTPUT_MAX) + REPLY_SLACK  # 13 MiB
# The most raw bytes a reply may carry after its line (requests sent with ``raw=True``: output reads,
# the agent's PROC_READ_MAX); the reply's ``raw`` field announces them, Channel results carry them as RAW.
RAW_MAX = 4 << 20
RAW = "raw_bytes"
# The agent refuses longer request lines (agent.MAX_LINE) with an id-less error; we never send them.
AGENT_MAX_REQUEST = 64 << 20
# Ids of requests we stopped waiting for, kept so that their late replies are not violations.
ABANDONED_MAX = 4096
# A channel re-opened to a running agent (adopt) may first get what was meant for the previous
# connection: replies to its requests, the tail of a line. That many bad lines are forgiven.
ADOPT_LEFTOVER_LINES = 256


class _Violation(Exception):
    """A line from the guest that breaks the protocol (the message says how)."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class AgentChannel:
    def __init__(self, sock: socket.socket, name: str,
                 describe_exit: Callable[[], str] | None = None, *,
                 on_violation: Callable[[str], None] | None = None, expect_ready: bool = False,
                 leftover_lines: int = 0, max_line: int = MAX_REPLY_LINE) -> None:
        self.sock = sock
        self.name = name
        self._describe_exit = describe_exit
        self._on_violation = on_violation
        self._ready_allowed = expect_ready
        self._leftovers = leftover_lines
        self.max_line = max_line
        # A random start: a late reply meant for an earlier connection (before a controller restart)
        # can never match a request of ours.
        self._first_id = self._next_id = secrets.randbits(40) + 1
        self._pending: dict[int, tuple[str, Future[dict[str, Any]], bool]] = {}  # op, reply, raw allowed
        self._abandoned: OrderedDict[int, bool] = OrderedDict()  # raw allowed
        self._forgotten_below = self._first_id  # abandoned ids evicted from _abandoned are all below
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.closed = False
        self.close_reason = ""
        self.violation: str | None = None
        self.ready_event: dict[str, Any] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name=f"agent-{name}", daemon=True)
        self._thread.start()

    # -- sending
    def submit(self, op: str, **args: Any) -> Future[dict[str, Any]]:
        """Send a request now; the Future resolves to the raw reply ``{"id","ok",...}``."""
        with self._lock:
            if self.closed:
                raise ChannelClosedError(self._closed_message(op))
            rid = self._next_id
            self._next_id += 1
        data = encode({"id": rid, "op": op, **args})
        if len(data) > AGENT_MAX_REQUEST:
            raise ValidationError(f"{op}: the request is {len(data)} bytes as JSON; the guest agent accepts "
                                  f"at most {AGENT_MAX_REQUEST}")
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            if self.closed:
                raise ChannelClosedError(self._closed_message(op))
            self._pending[rid] = (op, fut, args.get("raw") is True)
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
            self._abandon(fut)
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
            return self.ready_event
        return None

    def protocol_violation(self, op: str, what: str) -> ChannelClosedError:
        """Declare a violation found above the framing (e.g. a reply of the wrong shape): the channel
        closes as for one found here. Returns the error to raise."""
        self._violate(what)
        return ChannelClosedError(self._closed_message(op))

    def _abandon(self, fut: Future[dict[str, Any]]) -> None:
        """Stop waiting for ``fut``: its reply, should it still come, is dropped (not a violation)."""
        with self._lock:
            rid = next((r for r, (_, f, _) in self._pending.items() if f is fut), None)
            if rid is None:
                return
            self._abandoned[rid] = self._pending.pop(rid)[2]
            while len(self._abandoned) > ABANDONED_MAX:
                old, _ = self._abandoned.popitem(last=False)
                self._forgotten_below = max(self._forgotten_below, old + 1)

    # -- receiving
    def _read_loop(self) -> None:
        reader = self._reader = LineReader(self.sock, self.max_line)
        reason = "the agent closed the channel"
        try:
            while not self.closed:
                try:
                    line = reader.readline()
                except LineTooLong:
                    self._violate(f"a line longer than {self.max_line} bytes")
                    break
                except EOFError:
                    break
                if not line:
                    break
                try:
                    self._dispatch(line)
                except EOFError:  # the peer went away inside a raw frame
                    break
                except _Violation as e:
                    if self._leftovers <= 0:
                        self._violate(str(e))
                        break
                    self._leftovers -= 1
        except OSError as e:
            reason = f"channel error: {e}"
        finally:
            self._close(reason)

    def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            raise _Violation("a line that is not JSON") from None
        if not isinstance(msg, dict):
            raise _Violation(f"a line that is not a JSON object ({type(msg).__name__})")
        if "event" in msg:
            self._on_event(msg)
        else:
            self._on_reply(msg)

    def _on_event(self, msg: dict[str, Any]) -> None:
        if msg["event"] != "ready":
            raise _Violation(f"unknown event {_short(msg['event'])}")
        with self._lock:
            if not self._ready_allowed:
                raise _Violation("a second ready event (an agent announces itself once, at boot)")
            self._ready_allowed = False
            self.ready_event = msg
        self._ready.set()

    def _on_reply(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise _Violation(f"a reply without an integer id (id {_short(rid)})")
        if not isinstance(msg.get("ok"), bool):
            raise _Violation(f"a reply to id {rid} without a boolean 'ok'")
        with self._lock:
            entry = self._pending.get(rid)
            late = self._late(rid) if entry is None else None
            if entry is None and late is None:
                asked = self._first_id <= rid < self._next_id
                what = f"reply to id {rid} " + ("that is not in flight" if asked else "that was never asked")
        if entry is None and late is None:
            n = msg.get("raw")  # a leftover of an adopted channel may carry a frame: the next line is after it
            if self._leftovers > 0 and isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= RAW_MAX:
                self._reader.read_exact(n)
            raise _Violation(what)
        raw_ok = entry[2] if entry is not None else bool(late)
        if "raw" in msg:  # the frame is read even for a late reply: the next line starts after it
            n = msg.pop("raw")
            if not raw_ok or not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= RAW_MAX:
                raise _Violation(f"a reply to id {rid} announcing {_short(n)} raw bytes "
                                 + (f"(at most {RAW_MAX})" if raw_ok else "that it was not asked for"))
            data = self._reader.read_exact(n)  # EOFError: the request is still in flight, the close fails it
            if isinstance(msg.get("result"), dict):
                msg["result"][RAW] = data
        elif isinstance(msg.get("result"), dict):
            msg["result"].pop(RAW, None)
        if entry is None:
            return
        with self._lock:
            if self._pending.pop(rid, None) is None:  # abandoned while its frame was read
                self._abandoned.pop(rid, None)
        if not entry[1].done():
            entry[1].set_result(msg)

    def _late(self, rid: int) -> bool | None:
        """For the reply to a request we stopped waiting for (once): whether it may carry raw bytes;
        None if ``rid`` is no such request. Called with the lock held."""
        if rid in self._abandoned:
            return self._abandoned.pop(rid)
        return True if self._first_id <= rid < self._forgotten_below else None

    def _violate(self, what: str) -> None:
        """Close the channel for a protocol violation and tell the owner (once)."""
        reason = f"protocol violation: {what}"
        with self._lock:
            if self.closed or self.violation is not None:
                return
            self.violation = reason
        log.warning("%s: %s", self.name, reason)
        if self._on_violation is not None:
            try:
                self._on_violation(reason)
            except Exception:  # the channel closes regardless
                log.exception("%s: the protocol violation handler failed", self.name)
        self._close(reason)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _closed_message(self, op: str) -> str:
        if self.violation is not None:
            return f"{self.name}: the channel closed before the reply to {op}: {self.violation}"
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
        for op, fut, _ in pending:
            if not fut.done():
                fut.set_exception(ChannelClosedError(self._closed_message(op)))

    def close(self) -> None:
        """Close our end; pending requests fail with ChannelClosedError."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._close("the host closed the channel")
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.sock.close()
