"""forkd guest agent: serves the JSON-lines protocol of docs/agent-protocol.md inside the microVM.

Runs as PID 1 (``/usr/bin/python3.11 -S -E /forkd/agent.py``, or in a recipe image the image's own
Python 3.9+ after /init switched to its root file system), stdlib only, self-contained: this file is
copied into the guest image alone. ``--stdio`` serves on stdin/stdout instead of the virtio port.
"""

from __future__ import annotations

import ast
import base64
import builtins
import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import hashlib
import io
import itertools
import json
import linecache
import math
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

AGENT_VERSION = "3"  # 2: interrupt, processes (proc_*); 3: raw output frames, streamed run_code (run_read)
PORT_NAME = "org.forkd.agent"
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
MAX_LINE = MAX_READ = 64 * 1024 * 1024
#: The longest reply line: below the host's line limit (13 MiB: an 8 MiB file chunk in base64, or an
#: exec reply with two 1 MiB streams, fit).
MAX_REPLY = 12 * 1024 * 1024 + 512 * 1024
RNDADDENTROPY, RNDRESEEDCRNG = 0x40085203, 0x5207
START = time.clock_gettime(time.CLOCK_MONOTONIC)
PYTHON = "{}.{}.{}".format(*sys.version_info[:3])
_REQUIRED: Any = object()
NoneType = type(None)
Request = dict[str, Any]

if os.path.isdir(DIST_PACKAGES) and DIST_PACKAGES not in sys.path:
    sys.path.append(DIST_PACKAGES)
try:
    import numpy
except Exception:  # absent or broken: numpy is optional
    numpy = None  # type: ignore[assignment]

# The persistent namespace shared by eval and run_code, pre-loaded with the warm set.
G: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
for _mod in (json, re, math, random, hashlib, base64, collections, itertools, functools, subprocess,
             os, sys, time):
    G[_mod.__name__] = _mod
if numpy is not None:
    G["numpy"] = G["np"] = numpy

EVAL_LOCK = threading.Lock()
MANAGED: set[int] = set()  # pids whose exit status an `exec` request is waiting for
MANAGED_LOCK = threading.Lock()
_cells = itertools.count(1)


class BadRequest(Exception):
    """The request is malformed; the message names the offending field."""


class UnknownOp(Exception):
    """The request names an op the agent does not implement."""


class Raw:
    """An op's result followed by raw bytes (the reply's ``raw`` field says how many): output goes to
    the host as it is, without base64 or JSON escaping (each costs a pass over it, slow when emulated).
    A part is bytes, or a PipeSlice moved from a pipe by the kernel. ``release`` runs once it is sent."""

    def __init__(self, result: dict[str, Any], parts: Sequence[bytes | bytearray | PipeSlice],
                 release: Callable[[], None] | None = None) -> None:
        self.result, self.parts, self.release = result, parts, release


class PipeSlice:
    """``n`` bytes waiting in pipe ``fd`` (its only reader holds them for us), read as they are sent."""

    def __init__(self, fd: int, n: int) -> None:
        self.fd, self.n = fd, n

    def __len__(self) -> int:
        return self.n


class ReplyError(Exception):
    """Carries a ready-made error payload (for errors with extra fields, e.g. captured output)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.error = error


# ---------------------------------------------------------------- helpers
def _arg(req: Request, name: str, types: type | tuple[type, ...], default: Any = _REQUIRED,
         minimum: float | None = None) -> Any:
    """req[name] checked against `types` (a bool never passes for int/float) and `minimum`."""
    if name not in req:
        if default is _REQUIRED:
            raise BadRequest(f"missing required field '{name}'")
        return default
    value: Any = req[name]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("null" if t is NoneType else t.__name__ for t in types)
        raise BadRequest(f"field '{name}' must be {names}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"field '{name}' must be a finite number")
    if minimum is not None and isinstance(value, (int, float)) and value < minimum:
        raise BadRequest(f"field '{name}' must be >= {minimum}")
    return value


def _b64(req: Request, name: str) -> bytes:
    """Decode a required base64 field."""
    try:
        return base64.b64decode(_arg(req, name, str), validate=True)
    except ValueError as e:
        raise BadRequest(f"field '{name}' is not valid base64: {e}") from None


def _path(req: Request) -> str:
    path = _arg(req, "path", str)
    if not path:
        raise BadRequest("field 'path' must not be empty")
    return path


def _json_value(value: Any) -> Any:
    """The value itself if it is JSON-serializable (strictly: no NaN/inf), else None."""
    try:
        json.dumps(value, allow_nan=False)
    except Exception:
        return None
    return value


def _user_tb(exc: BaseException) -> str:
    """Format an exception raised by user code, without the agent's own frames."""
    tb, here = exc.__traceback__, _user_tb.__code__.co_filename
    while tb is not None and tb.tb_frame.f_code.co_filename == here:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _error(exc: BaseException, tb: str | None) -> dict[str, Any]:
    """The error payload for an exception (OSErrors also carry `errno`)."""
    err: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc), "traceback": tb}
    if isinstance(exc, OSError) and exc.errno is not None:
        err["errno"] = exc.errno
    return err


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _move(src: int, dst: int, n: int) -> None:
    """Move ``n`` bytes from pipe ``src`` to ``dst``. Read and write, not splice: the virtio console's
    splice drops what it took from the pipe when the virtqueue has no room for it (it returns 0), and
    the frame the host waits for would never end."""
    while n > 0:
        data = os.read(src, min(n, PIPE_SIZE))
        if not data:
            raise OSError(errno.EPIPE, "the pipe ended before the bytes it held were moved")
        _write_all(dst, data)
        n -= len(data)


# ---------------------------------------------------------------- ping / eval / run_code
def op_ping(req: Request) -> dict[str, Any]:
    """Liveness and identity."""
    return {"agent_version": AGENT_VERSION, "python": PYTHON, "numpy": getattr(numpy, "__version__", None),
            "uptime_s": time.clock_gettime(time.CLOCK_MONOTONIC) - START, "pid": os.getpid(),
            "time": time.time()}


def _read_text(path: str, limit: int = 1 << 16) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace")
    except OSError:
        return ""


def op_clock_info(req: Request) -> dict[str, Any]:
    """The guest's clock and tick state: clocksource, high-resolution timers, tick mode, timer IRQs."""
    timer_list = _read_text("/proc/timer_list", 1 << 20)

    def first_int(pattern: str) -> int | None:
        m = re.search(pattern + r"\s*:\s*(-?\d+)", timer_list, re.M)
        return int(m.group(1)) if m else None

    loc = None
    for line in _read_text("/proc/interrupts").splitlines():
        parts = line.split()
        if parts and parts[0] == "LOC:":
            loc = sum(int(x) for x in parts[1:] if x.isdigit())
    cs = "/sys/devices/system/clocksource/clocksource0/"
    return {"clocksource": _read_text(cs + "current_clocksource").strip(),
            "available": _read_text(cs + "available_clocksource").split(),
            "hres_active": first_int(r"^\s*\.hres_active"), "nohz_mode": first_int(r"^\s*\.nohz_mode"),
            "tick_device_mode": first_int(r"^Tick Device: mode"), "local_timer_interrupts": loc,
            "monotonic_s": time.clock_gettime(time.CLOCK_MONOTONIC),
            "cmdline": _read_text("/proc/cmdline").strip()}


class _Run:
    """User code running on a request thread (eval, run_code): what ``interrupt`` can reach."""

    def __init__(self, token: str | None) -> None:
        self.ident = threading.get_ident()
        self.token = token
        self.done = threading.Event()
        self.interrupted = False


RUNS: dict[int, _Run] = {}
RUNS_LOCK = threading.Lock()
MAX_GRACE = 30.0


def _async_raise(ident: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in thread ``ident`` at its next bytecode (None cancels a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                               ctypes.py_object(exc) if exc is not None else None)


@contextlib.contextmanager
def _user_code(req: Request) -> Iterator[None]:
    """Mark the block as interruptible; the host names it by the request's ``run`` token. With
    ``deadline_s`` the agent interrupts it itself after that many seconds (for a host that went away)."""
    run = _Run(_arg(req, "run", (str, NoneType), None))
    deadline = _arg(req, "deadline_s", (int, float, NoneType), None, minimum=0)
    with RUNS_LOCK:
        RUNS[id(run)] = run
    timer = None
    if deadline is not None:
        timer = threading.Timer(float(deadline), _expire, args=(run,))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        while True:  # an interrupt that arrives as the code ends must not escape into the agent
            try:
                with RUNS_LOCK:
                    RUNS.pop(id(run), None)
                    if run.interrupted:
                        _async_raise(run.ident, None)
                break
            except KeyboardInterrupt:
                continue
        run.done.set()


def _expire(run: _Run) -> None:
    with RUNS_LOCK:
        if id(run) in RUNS and not run.interrupted:
            run.interrupted = True
            _async_raise(run.ident, KeyboardInterrupt)


def op_interrupt(req: Request) -> dict[str, Any]:
    """Raise KeyboardInterrupt in the running eval/run_code (``run``: the one with that token, else
    all), wait ``grace`` seconds for it to stop. Code that does not stop (blocked in C) keeps its
    thread, and later requests get a new namespace lock so the sandbox goes on answering."""
    global EVAL_LOCK
    token = _arg(req, "run", (str, NoneType), None)
    grace = min(float(_arg(req, "grace", (int, float), 2.0, minimum=0)), MAX_GRACE)
    with RUNS_LOCK:
        targets = [r for r in RUNS.values() if token is None or r.token == token]
        for r in targets:
            r.interrupted = True
            _async_raise(r.ident, KeyboardInterrupt)
    deadline = time.monotonic() + grace
    for r in targets:
        r.done.wait(max(0.0, deadline - time.monotonic()))
    stuck = [r for r in targets if not r.done.is_set()]
    if stuck:
        EVAL_LOCK = threading.Lock()  # the stuck code holds the old one
    return {"found": len(targets), "stopped": len(targets) - len(stuck), "stuck": len(stuck)}


def op_eval(req: Request) -> dict[str, Any]:
    """Evaluate one expression in the persistent namespace."""
    expr = _arg(req, "expr", str)
    with _user_code(req):  # before the lock: an interrupt reaches a call still waiting for it
        try:
            with EVAL_LOCK:
                value = eval(compile(expr, "<eval>", "eval"), G)
        except BaseException as e:
            raise ReplyError(_error(e, _user_tb(e))) from None
    return {"repr": repr(value), "value": _json_value(value), "type": type(value).__name__}


def _compile_cell(code: str) -> tuple[Any, Any]:
    """Compile a cell into (statements, trailing expression or None); its source feeds tracebacks."""
    filename = f"<run_code-{next(_cells)}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        expr = tree.body.pop()
        assert isinstance(expr, ast.Expr)
        last = compile(ast.Expression(expr.value), filename, "eval")
    return compile(tree, filename, "exec"), last


def op_run_code(req: Request) -> dict[str, Any]:
    """Run statements in the persistent namespace, capturing output and the last expression's value.
    With ``stream`` (and a ``run`` token) the output is not in the reply: ``run_read`` takes it as the
    code writes it."""
    code = _arg(req, "code", str)
    cell = _open_cell(req) if _arg(req, "stream", bool, False) else None
    out: Any = io.StringIO() if cell is None else CellWriter(cell, "stdout")
    err: Any = io.StringIO() if cell is None else CellWriter(cell, "stderr")
    try:
        with _user_code(req):  # before the lock: an interrupt reaches a call still waiting for it
            try:
                with EVAL_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    body, last = _compile_cell(code)
                    exec(body, G)
                    value = eval(last, G) if last is not None else None
            except BaseException as e:
                error = _error(e, _user_tb(e))
                error.update(stdout=_captured(out), stderr=_captured(err))
                raise ReplyError(error) from None
    finally:
        if cell is not None:
            cell.close()
    shown = value is not None  # like a REPL: a trailing None is not echoed
    return {"stdout": _captured(out), "stderr": _captured(err),
            "repr": repr(value) if shown else None, "value": _json_value(value) if shown else None}


def _captured(f: Any) -> str:
    return f.getvalue() if isinstance(f, io.StringIO) else ""


# ---------------------------------------------------------------- output kept for the host to read
PROC_BUFFER = 1024 * 1024      # output kept per stream until the host reads it; the writer then waits
PROC_READ_MAX = 4 * 1024 * 1024  # bytes of output one proc_read/run_read returns, both streams together
PROC_WAIT_MAX = 30.0           # longest long-poll of one read
PROC_BATCH = 1024 * 1024        # a read with less output waits for more while it keeps coming:
PROC_BATCH_WAIT, PROC_BATCH_GAP = 0.1, 0.02  # up to 100 ms, unless 20 ms pass without any


class Outputs:
    """stdout and stderr kept until the host reads them, bounded per stream: a writer finding its
    stream full waits (as on a terminal nobody reads)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.bufs = {"stdout": bytearray(), "stderr": bytearray()}

    def pending(self) -> int:
        return len(self.bufs["stdout"]) + len(self.bufs["stderr"])

    def ended(self) -> bool:
        """No more output will come (called with ``cond`` held)."""
        raise NotImplementedError

    def _grown(self, had: int) -> Callable[[], bool]:
        return lambda: self.pending() != had or self.ended()

    def read(self, req: Request) -> dict[str, Any] | Raw:
        """What was written since the last read, waiting up to ``wait`` seconds for some; ``done`` once
        the writer ended and all was read. ``raw``: the bytes follow the reply, else base64 fields."""
        wait = min(float(_arg(req, "wait", (int, float), 10.0, minimum=0)), PROC_WAIT_MAX)
        most = min(_arg(req, "max_bytes", int, PROC_READ_MAX, minimum=1), PROC_READ_MAX)
        raw = _arg(req, "raw", bool, False)
        with self.cond:
            self.cond.wait_for(lambda: self.pending() > 0 or self.ended(), wait)
            # More while the writer keeps writing (each reply costs the guest a round trip that the
            # writer's own CPU pays for); a writer that pauses for PROC_BATCH_GAP gets its output now.
            until = time.monotonic() + PROC_BATCH_WAIT
            while self.pending() < PROC_BATCH and not self.ended() and (left := until - time.monotonic()) > 0:
                if not self.cond.wait_for(self._grown(self.pending()), min(PROC_BATCH_GAP, left)):
                    break
            parts: list[bytes | bytearray] = []
            for name in ("stdout", "stderr"):
                buf = self.bufs[name]
                if len(buf) <= most:  # the usual case: hand the buffer over, no copy
                    take, self.bufs[name] = buf, bytearray()
                else:
                    take = buf[:most]
                    del buf[:most]
                most -= len(take)
                parts.append(take)
            self.cond.notify_all()  # room again: the writers go on
            done = self.ended() and self.pending() == 0
        result = {"done": done, "stdout_len": len(parts[0]), "stderr_len": len(parts[1])}
        if raw:
            return Raw(result, parts)
        return {**result, "stdout_b64": base64.b64encode(parts[0]).decode(),
                "stderr_b64": base64.b64encode(parts[1]).decode()}


class Cell(Outputs):
    """The output of one streamed run_code."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.closed_at: float | None = None

    def ended(self) -> bool:
        return self.closed_at is not None

    def put(self, name: str, data: bytes) -> None:
        with self.cond:
            # short waits: KeyboardInterrupt (interrupt, a timeout) reaches code blocked on a full stream
            while len(self.bufs[name]) >= PROC_BUFFER and self.closed_at is None:
                self.cond.wait(0.1)
            if self.closed_at is not None:
                return  # a thread of the cell printing after it ended: nobody will read it
            self.bufs[name] += data
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed_at = time.monotonic()
            self.cond.notify_all()


class CellWriter(io.TextIOBase):
    """sys.stdout/stderr of a streamed run_code: text written goes to the cell at once, as UTF-8."""

    def __init__(self, cell: Cell, name: str) -> None:
        self.cell, self.name = cell, name

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if s:
            self.cell.put(self.name, s.encode("utf-8", "replace"))
        return len(s)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


CELLS: dict[str, Cell] = {}
CELLS_LOCK = threading.Condition()
CELLS_MAX = 16      # streamed run_codes not yet read out
CELL_KEEP_S = 120.0  # the output of an ended run nobody reads is dropped after this long


def _open_cell(req: Request) -> Cell:
    token = _arg(req, "run", str)
    with CELLS_LOCK:
        now = time.monotonic()
        for t in [t for t, c in CELLS.items() if c.closed_at is not None and now - c.closed_at > CELL_KEEP_S]:
            del CELLS[t]
        if token in CELLS:
            raise BadRequest(f"run token {token!r} is in use")
        if len(CELLS) >= CELLS_MAX:
            raise BadRequest(f"{CELLS_MAX} streamed run_code outputs are not read out yet; read them first")
        cell = CELLS[token] = Cell(token)
        CELLS_LOCK.notify_all()
    return cell


def op_run_read(req: Request) -> dict[str, Any] | Raw:
    """The output of the streamed run_code ``run`` (as proc_read); ``done`` once it ended and all was
    read. A run not started yet is waited for (up to 1 s)."""
    token = _arg(req, "run", str)
    wait = min(float(_arg(req, "wait", (int, float), 10.0, minimum=0)), PROC_WAIT_MAX)
    with CELLS_LOCK:  # its run_code may not have reached a worker yet; the host asks again if not
        CELLS_LOCK.wait_for(lambda: token in CELLS, min(wait, 1.0))
        cell = CELLS.get(token)
    if cell is None:
        raise ReplyError({"type": "LookupError", "message": f"no streamed run_code {token!r} (not started, "
                          "or read to the end)", "traceback": None})
    reply = cell.read(req)
    done = (reply.result if isinstance(reply, Raw) else reply)["done"]
    if done:
        with CELLS_LOCK:
            CELLS.pop(token, None)
    return reply


# ---------------------------------------------------------------- exec
def _exec_args(req: Request) -> dict[str, Any]:
    """Validate the arguments of `exec`."""
    argv = _arg(req, "argv", list)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequest("field 'argv' must be a non-empty list of strings")
    env = _arg(req, "env", (dict, NoneType), None)
    if env is not None and not all(isinstance(v, str) for v in env.values()):
        raise BadRequest("field 'env' must map strings to strings")
    stdin = _arg(req, "stdin", (str, NoneType), None)
    data = stdin.encode("utf-8", "surrogatepass") if stdin is not None else None
    if req.get("stdin_b64") is not None:
        if data is not None:
            raise BadRequest("fields 'stdin' and 'stdin_b64' are mutually exclusive")
        data = _b64(req, "stdin_b64")
    return {"argv": argv, "env": {**os.environ, **env} if env else None, "data": data,
            "cwd": _arg(req, "cwd", (str, NoneType), None),
            "timeout": _arg(req, "timeout", (int, float, NoneType), 30.0, minimum=0),
            "max_output": _arg(req, "max_output", int, 1024 * 1024, minimum=0)}


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _pump(proc: subprocess.Popen[bytes], data: bytes | None, deadline: float | None,
          max_output: int) -> tuple[list[bytearray], list[bool], bool]:
    """Feed stdin and drain stdout/stderr until EOF, killing the process group at the deadline.

    Keeps at most `max_output` bytes per stream but always drains the pipes.
    Returns ([stdout, stderr] bytes kept, [stdout, stderr] truncated flags, timed_out).
    """
    assert proc.stdout is not None and proc.stderr is not None
    streams = [proc.stdout.fileno(), proc.stderr.fileno()]
    files: dict[int, Any] = {streams[0]: proc.stdout, streams[1]: proc.stderr}
    bufs, truncated = {fd: bytearray() for fd in streams}, dict.fromkeys(streams, False)
    sel = selectors.DefaultSelector()
    for fd in streams:
        sel.register(fd, selectors.EVENT_READ)
    pos, view = 0, memoryview(data or b"")
    if proc.stdin is not None:
        files[proc.stdin.fileno()] = proc.stdin
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    timed_out = False
    while sel.get_map():
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            if timed_out:
                break  # a process outside the group still holds the pipes: stop waiting for them
            timed_out, deadline = True, time.monotonic() + 2.0
            _killpg(proc)
            continue
        for key, _ in sel.select(wait):
            fd = key.fd
            try:
                if fd in bufs:
                    chunk = os.read(fd, 65536)
                    room = max(0, max_output - len(bufs[fd]))
                    bufs[fd] += chunk[:room]
                    truncated[fd] = truncated[fd] or len(chunk) > room
                    done = not chunk
                else:  # stdin
                    pos += os.write(fd, view[pos:pos + 65536])
                    done = pos >= len(view)
            except BlockingIOError:
                continue
            except OSError:  # EPIPE: the child closed its stdin
                done = True
            if done:
                sel.unregister(fd)
                with contextlib.suppress(OSError):
                    files[fd].close()
    sel.close()
    for f in files.values():
        with contextlib.suppress(OSError):
            f.close()
    return [bufs[fd] for fd in streams], [truncated[fd] for fd in streams], timed_out


def _text(buf: bytearray, truncated: bool, limit: int) -> str:
    text = buf.decode("utf-8", "replace")
    return text + f"\n[forkd: output truncated at {limit} bytes]" if truncated else text


def op_exec(req: Request) -> dict[str, Any]:
    """Run a program in a new session, with a timeout and bounded output capture."""
    a = _exec_args(req)
    start = time.monotonic()
    deadline = None if a["timeout"] is None else start + a["timeout"]
    with MANAGED_LOCK:  # the reaper must not see the child before it is registered
        proc = subprocess.Popen(a["argv"], env=a["env"], cwd=a["cwd"], start_new_session=True,
                                stdin=subprocess.PIPE if a["data"] else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        MANAGED.add(proc.pid)
    try:
        bufs, truncated, timed_out = _pump(proc, a["data"], deadline, a["max_output"])
        try:  # the pipes may close before the process exits
            proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:
        if proc.returncode is None:
            _killpg(proc)
            proc.wait()
        with MANAGED_LOCK:
            MANAGED.discard(proc.pid)
    return {"exit_code": proc.returncode, "timed_out": timed_out,
            "stdout": _text(bufs[0], truncated[0], a["max_output"]),
            "stderr": _text(bufs[1], truncated[1], a["max_output"]),
            "stdout_truncated": truncated[0], "stderr_truncated": truncated[1],
            "duration_s": time.monotonic() - start}


# ---------------------------------------------------------------- processes (streamed, background)
PROC_MAX = 256                 # processes known at once (running, or finished and not yet read out)
PROC_KEEP_S = 600.0            # a finished process nobody reads is forgotten after this long
F_SETPIPE_SZ, PIPE_SIZE = 1031, 1024 * 1024
PROCS: dict[int, Proc] = {}
PROCS_LOCK = threading.Lock()
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT, "HUP": signal.SIGHUP}


FIONREAD = 0x541B


def _available(fd: int) -> int:
    """Bytes waiting in pipe ``fd``."""
    buf = bytearray(4)
    fcntl.ioctl(fd, FIONREAD, buf, True)
    return int.from_bytes(buf, sys.byteorder)


class Proc:
    """A process of proc_start. Its output waits in its own pipes (1 MiB each; then the process waits,
    as on a terminal nobody reads) until proc_read moves it to the host: no buffer in the agent."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: list[str], timeout: float | None) -> None:
        self.popen, self.argv, self.started_at = popen, argv, time.time()
        assert popen.stdout is not None and popen.stderr is not None
        self.fds = {"stdout": popen.stdout.fileno(), "stderr": popen.stderr.fileno()}
        self.eof = {"stdout": False, "stderr": False}
        self.exit_code: int | None = None
        self.timed_out = False
        self.ended_at: float | None = None
        self.exited = threading.Event()
        self.reading = threading.Lock()  # one reader at a time, until its bytes are sent
        for fd in self.fds.values():  # fewer, larger moves: a fast writer blocks less often
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        threading.Thread(target=self._wait, args=(timeout,), name=f"forkd-proc-{popen.pid}", daemon=True).start()

    def _wait(self, timeout: float | None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            _killpg(self.popen)
            self.popen.wait()
        with MANAGED_LOCK:
            MANAGED.discard(self.popen.pid)
        self.exit_code, self.ended_at = self.popen.returncode, time.time()
        self.exited.set()

    def _waiting(self, timeout: float) -> tuple[dict[str, int], set[str]]:
        """Wait up to ``timeout`` for output or for the pipes' ends: (bytes waiting, pipes whose writers
        are gone)."""
        deadline = time.monotonic() + timeout
        while True:
            poller = select.poll()
            live = {fd: name for name, fd in self.fds.items() if not self.eof[name]}
            for fd in live:
                poller.register(fd, select.POLLIN)
            left = max(0.0, deadline - time.monotonic())
            if live:
                events = poller.poll(left * 1000)
            else:  # both pipes ended: only the exit is left to wait for
                self.exited.wait(left)
                events = []
            avail = {name: 0 if self.eof[name] else _available(fd) for name, fd in self.fds.items()}
            hup = {live[fd] for fd, ev in events if ev & (select.POLLHUP | select.POLLERR)}
            if any(avail.values()) or hup or left == 0 or (not live and self.exited.is_set()):
                return avail, hup

    def read(self, req: Request) -> Raw | dict[str, Any]:
        """What was written since the last read (see Outputs.read for ``wait``, ``max_bytes``, ``raw``
        and the batching); ``done`` once the process ended and its pipes were read to their ends."""
        wait = min(float(_arg(req, "wait", (int, float), 10.0, minimum=0)), PROC_WAIT_MAX)
        most = min(_arg(req, "max_bytes", int, PROC_READ_MAX, minimum=1), PROC_READ_MAX)
        raw = _arg(req, "raw", bool, False)
        if not self.reading.acquire(timeout=wait + 1.0):
            raise BadRequest(f"process {self.popen.pid} is being read by another request")
        try:
            avail, hup = self._waiting(wait)
            until = time.monotonic() + PROC_BATCH_WAIT  # more while the writer keeps writing
            while sum(avail.values()) < PROC_BATCH and not hup and (left := until - time.monotonic()) > 0:
                time.sleep(min(PROC_BATCH_GAP, left))
                now = {name: 0 if self.eof[name] else _available(fd) for name, fd in self.fds.items()}
                if now == avail:
                    break
                avail = now
            take: dict[str, int] = {}
            for name in ("stdout", "stderr"):
                take[name] = min(avail[name], most)
                most -= take[name]
            ended = [name for name in hup if take[name] == avail[name]]  # all it held goes now
            done = self.exit_code is not None and all(self.eof[n] or n in ended for n in self.eof)
            result = {"done": done, "stdout_len": take["stdout"], "stderr_len": take["stderr"]}
            if raw:
                parts = [PipeSlice(self.fds[n], take[n]) for n in ("stdout", "stderr")]
                return Raw(result, parts, release=lambda: self._release(ended, done))
            data = {n: _read_exactly(self.fds[n], take[n]) for n in ("stdout", "stderr")}
            self._release(ended, done)
            return {**result, "stdout_b64": base64.b64encode(data["stdout"]).decode(),
                    "stderr_b64": base64.b64encode(data["stderr"]).decode()}
        except BaseException:
            self.reading.release()
            raise

    def _release(self, ended: list[str], done: bool) -> None:
        for name in ended:
            self.eof[name] = True
        if done:  # read to the end: forgotten (op_proc_read), its pipes closed once the bytes are sent
            self.close()
        self.reading.release()

    def close(self) -> None:
        """Close the pipes (the process is forgotten)."""
        for f in (self.popen.stdout, self.popen.stderr):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()

    def info(self) -> dict[str, Any]:
        return {"pid": self.popen.pid, "argv": self.argv, "started_at": self.started_at,
                "running": self.exit_code is None, "exit_code": self.exit_code, "timed_out": self.timed_out}


def _read_exactly(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _proc(req: Request) -> Proc:
    pid = _arg(req, "pid", int)
    with PROCS_LOCK:
        proc = PROCS.get(pid)
    if proc is None:
        raise ReplyError({"type": "ProcessLookupError", "message": f"no process {pid} started by proc_start "
                          "(or its output was read to the end)", "traceback": None})
    return proc


def _forget_old() -> None:
    now = time.time()
    with PROCS_LOCK:
        for pid in [p for p, pr in PROCS.items() if pr.ended_at is not None and now - pr.ended_at > PROC_KEEP_S]:
            PROCS.pop(pid).close()


def op_proc_start(req: Request) -> dict[str, Any]:
    """Start a program (new session) whose output is read with proc_read; answers at once. Its stdin
    gets ``stdin``/``stdin_b64`` and is then closed, unless ``stdin_open`` (proc_write feeds it)."""
    a = _exec_args(req)
    stdin_open = _arg(req, "stdin_open", bool, False)
    _forget_old()
    with PROCS_LOCK:
        if len(PROCS) >= PROC_MAX:
            raise BadRequest(f"{PROC_MAX} processes are running or not read out yet; read or kill some first")
    with MANAGED_LOCK:
        popen = subprocess.Popen(a["argv"], env=a["env"], cwd=a["cwd"], start_new_session=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        MANAGED.add(popen.pid)
    proc = Proc(popen, a["argv"], a["timeout"])
    with PROCS_LOCK:
        PROCS[popen.pid] = proc
    if a["data"]:
        threading.Thread(target=_feed, args=(popen, a["data"], not stdin_open), daemon=True).start()
    elif not stdin_open and popen.stdin is not None:
        popen.stdin.close()
    return proc.info()


def _feed(popen: subprocess.Popen[bytes], data: bytes, close: bool) -> None:
    assert popen.stdin is not None
    try:
        popen.stdin.write(data)
        popen.stdin.flush()
        if close:
            popen.stdin.close()
    except (OSError, ValueError):
        pass  # the process closed its stdin or ended


def op_proc_read(req: Request) -> dict[str, Any] | Raw:
    """The output produced since the last read (see Proc.read); ``exited`` (with the exit code) once
    the process ended and everything was read; then the process is forgotten."""
    proc = _proc(req)
    reply = proc.read(req)
    result = reply.result if isinstance(reply, Raw) else reply
    done = result.pop("done")
    if done:
        with PROCS_LOCK:
            PROCS.pop(proc.popen.pid, None)
    result.update(exited=done, exit_code=proc.exit_code if done else None, timed_out=proc.timed_out)
    return reply


def op_proc_write(req: Request) -> dict[str, Any]:
    """Write to the process's stdin (``data_b64``); ``eof`` closes it."""
    proc = _proc(req)
    data = _b64(req, "data_b64") if "data_b64" in req else b""
    eof = _arg(req, "eof", bool, False)
    stdin = proc.popen.stdin
    if stdin is None or stdin.closed:
        raise BadRequest(f"the stdin of process {proc.popen.pid} is closed")
    try:
        stdin.write(data)
        stdin.flush()
        if eof:
            stdin.close()
    except (OSError, ValueError) as e:
        raise BadRequest(f"process {proc.popen.pid} does not take input any more: {e}") from None
    return {"written": len(data)}


def op_proc_kill(req: Request) -> dict[str, Any]:
    """Send a signal (KILL, TERM, INT, HUP) to the process's group."""
    proc = _proc(req)
    name = _arg(req, "signal", str, "KILL")
    if name not in SIGNALS:
        raise BadRequest(f"field 'signal' must be one of {', '.join(SIGNALS)}")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.popen.pid, SIGNALS[name])
    return {"signalled": proc.exit_code is None}


def op_proc_list(req: Request) -> dict[str, Any]:
    """The processes started by proc_start that are running or not read out yet."""
    _forget_old()
    with PROCS_LOCK:
        return {"processes": [p.info() for p in PROCS.values()]}


# ---------------------------------------------------------------- files
def _entry(path: str, name: str | None = None) -> dict[str, Any]:
    """A stat entry (lstat: a symlink is reported, not followed)."""
    st = os.lstat(path)
    kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
    return {"name": name if name is not None else os.path.basename(path.rstrip("/")) or path,
            "path": path, "type": kind, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
            "mtime": st.st_mtime}


def op_file_read(req: Request) -> dict[str, Any]:
    """Read up to `length` bytes (at most 64 MiB) from `offset`."""
    path, offset = _path(req), _arg(req, "offset", int, 0, minimum=0)
    length = _arg(req, "length", (int, NoneType), None, minimum=0)
    want = MAX_READ if length is None else min(length, MAX_READ)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        f.seek(offset)
        data = f.read(want)
    eof = len(data) < want or (stat.S_ISREG(st.st_mode) and offset + len(data) >= st.st_size)
    return {"data_b64": base64.b64encode(data).decode("ascii"), "size": st.st_size, "eof": eof}


def _finish(fd: int, data: bytes, mode: int | None) -> None:
    """Write everything, set the mode (if given), fsync and close."""
    try:
        _write_all(fd, data)
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def op_file_write(req: Request) -> dict[str, Any]:
    """Write a file atomically (temp file + fsync + rename), or append to it."""
    path, data = _path(req), _b64(req, "data_b64")
    append, mode = _arg(req, "append", bool, False), _arg(req, "mode", int, 0o644, minimum=0)
    if mode > 0o7777:
        raise BadRequest("field 'mode' must be permission bits (at most 0o7777)")
    parent = os.path.dirname(path) or "."
    if _arg(req, "make_parents", bool, True):
        os.makedirs(parent, exist_ok=True)
    if append:  # `mode` applies only if the file is created
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            _finish(os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), data, mode)
        except FileExistsError:
            _finish(os.open(path, flags), data, None)
        return {"bytes_written": len(data)}
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".forkd-tmp", dir=parent)
    try:
        _finish(fd, data, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"bytes_written": len(data)}


def op_file_rename(req: Request) -> dict[str, Any]:
    """Rename `path` to `dst` atomically (os.replace), e.g. to publish a file written in chunks."""
    src, dst = _path(req), _arg(req, "dst", str)
    if not dst.startswith("/"):
        raise BadRequest("field 'dst' must be an absolute path")
    os.replace(src, dst)
    return {}


def op_file_list(req: Request) -> dict[str, Any]:
    """List a directory, sorted by name."""
    path, entries = _path(req), []
    with os.scandir(path) as it:
        for d in it:
            with contextlib.suppress(FileNotFoundError):  # vanished while listing
                entries.append(_entry(os.path.join(path, d.name), d.name))
    return {"entries": sorted(entries, key=lambda e: e["name"])}


def op_file_stat(req: Request) -> dict[str, Any]:
    """Stat one path."""
    return {"entry": _entry(_path(req))}


def op_file_mkdir(req: Request) -> dict[str, Any]:
    """Create a directory."""
    path = _path(req)
    parents, exist_ok = _arg(req, "parents", bool, True), _arg(req, "exist_ok", bool, True)
    try:
        (os.makedirs if parents else os.mkdir)(path)
    except FileExistsError:
        if not (exist_ok and os.path.isdir(path)):
            raise
    return {}


def op_file_remove(req: Request) -> dict[str, Any]:
    """Remove a file, a symlink, an empty directory or (recursive) a directory tree."""
    path, recursive = _path(req), _arg(req, "recursive", bool, False)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
    elif recursive:
        shutil.rmtree(path)
    else:
        os.rmdir(path)
    return {}


# ---------------------------------------------------------------- fresh
def _reseed_kernel(entropy: bytes) -> None:
    """Credit `entropy` to the kernel pool and force a CRNG reseed (needs CAP_SYS_ADMIN)."""
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    steps = (("RNDADDENTROPY", RNDADDENTROPY, info), ("RNDRESEEDCRNG", RNDRESEEDCRNG, 0))
    try:
        for name, request, arg in steps:
            try:
                fcntl.ioctl(fd, request, arg)
            except OSError as e:
                raise OSError(e.errno, f"ioctl {name}: {e.strerror}") from None
    finally:
        os.close(fd)


def op_fresh(req: Request) -> dict[str, Any]:
    """Make a restored clone distinct: set the clock, reseed the kernel CRNG and the Python RNGs."""
    host_time, entropy = _arg(req, "time", (int, float)), _b64(req, "entropy_b64")
    if len(entropy) < 32:
        raise BadRequest("field 'entropy_b64' must hold at least 32 bytes")
    warnings: list[str] = []
    clock_set = rng_reseeded = numpy_reseeded = False
    if os.environ.get("FORKD_AGENT_TEST") != "1":
        try:
            time.clock_settime(time.CLOCK_REALTIME, float(host_time))
            clock_set = True
        except OSError as e:
            warnings.append(f"clock_settime failed: {e}")
        try:
            _reseed_kernel(entropy)
            rng_reseeded = True
        except OSError as e:
            warnings.append(f"kernel RNG reseed failed: {e}")
    random.seed(os.urandom(32))
    np = sys.modules.get("numpy")  # loaded at start, or later by user code
    if np is not None:
        try:
            np.random.seed(int.from_bytes(os.urandom(4), "little"))
            numpy_reseeded = True
        except Exception as e:
            warnings.append(f"numpy reseed failed: {e!r}")
    return {"time": time.time(), "clock_set": clock_set, "rng_reseeded": rng_reseeded,
            "numpy_reseeded": numpy_reseeded, "warnings": warnings}


OPS: dict[str, Callable[[Request], dict[str, Any] | Raw]] = {
    "ping": op_ping, "clock_info": op_clock_info, "eval": op_eval, "run_code": op_run_code, "exec": op_exec,
    "file_read": op_file_read, "file_write": op_file_write, "file_list": op_file_list,
    "file_stat": op_file_stat, "file_mkdir": op_file_mkdir, "file_remove": op_file_remove,
    "file_rename": op_file_rename, "fresh": op_fresh, "interrupt": op_interrupt,
    "proc_start": op_proc_start, "proc_read": op_proc_read, "proc_write": op_proc_write, "proc_kill": op_proc_kill,
    "proc_list": op_proc_list, "run_read": op_run_read,
}


# ---------------------------------------------------------------- transport and serving
class Transport:
    """The byte stream to the host: the virtio port (one O_RDWR fd) or a pair of stdio fds."""

    def __init__(self, rfd: int, wfd: int, stdio: bool) -> None:
        self.rfd, self.wfd, self.stdio = rfd, wfd, stdio
        self.wlock = threading.Lock()

    def read(self) -> bytes:
        """Some bytes; b"" means EOF (stdio) or "host not connected" (virtio: back off, retry)."""
        try:
            return os.read(self.rfd, 1024 * 1024)
        except OSError:
            return b""

    def send(self, obj: dict[str, Any], raw: Sequence[bytes | bytearray | PipeSlice] = ()) -> None:
        """Write one JSON line, whole, and the ``raw`` bytes its ``raw`` field announces; dropped if
        the host is gone (EPIPE/EIO)."""
        try:
            line = json.dumps(obj, separators=(",", ":")) + "\n"
        except Exception as e:  # a result that cannot be encoded: say so instead
            line = json.dumps({"id": obj.get("id"), "ok": False, "error": _error(e, None)}) + "\n"
        if len(line) > MAX_REPLY:  # the host refuses longer lines (and kills the sandbox): say so instead
            err = {"type": "ReplyTooLarge", "message": f"the reply is {len(line)} bytes, more than the channel's "
                   f"{MAX_REPLY}; return less (e.g. write it to a file and read that)", "traceback": None}
            line = json.dumps({"id": obj.get("id"), "ok": False, "error": err}) + "\n"
        with self.wlock, contextlib.suppress(OSError):
            _write_all(self.wfd, line.encode("ascii"))
            for part in raw:
                if isinstance(part, PipeSlice):
                    _move(part.fd, self.wfd, part.n)
                else:
                    _write_all(self.wfd, part)


def handle_line(t: Transport, line: bytes) -> None:
    """Parse, dispatch and answer one request line. Never raises."""
    rid: Any = None
    try:
        try:
            req = json.loads(line)
        except ValueError as e:
            raise BadRequest(f"invalid JSON: {e}") from None
        if not isinstance(req, dict):
            raise BadRequest("request must be a JSON object")
        if not isinstance(req.get("id"), (str, int)) or isinstance(req.get("id"), bool):
            raise BadRequest("field 'id' must be a string or integer")
        rid = req["id"]
        op = _arg(req, "op", str)
        if op not in OPS:
            raise UnknownOp(f"unknown op '{op}'")
        result = OPS[op](req)
        if isinstance(result, Raw):
            try:
                t.send({"id": rid, "ok": True, "result": result.result, "raw": sum(map(len, result.parts))},
                       result.parts)
            finally:
                if result.release is not None:
                    result.release()
            return
        reply = {"id": rid, "ok": True, "result": result}
    except ReplyError as e:
        reply = {"id": rid, "ok": False, "error": e.error}
    except (BadRequest, UnknownOp) as e:
        reply = {"id": rid, "ok": False, "error": _error(e, None)}
    except BaseException as e:  # a bug or an OS error: report it, keep serving
        reply = {"id": rid, "ok": False, "error": _error(e, traceback.format_exc())}
    t.send(reply)


class Workers:
    """Request threads started before the snapshot and kept waiting, so a freshly restored clone does
    not create a thread (clone + stack mmap: cold kernel paths, costly under emulation) to answer its
    first requests. When every worker is busy (long `exec`s), an extra one-off thread is started."""

    def __init__(self, n: int = 4) -> None:
        self.jobs: queue.SimpleQueue[tuple[Transport, bytes]] = queue.SimpleQueue()
        self.idle = n
        self.lock = threading.Lock()
        for _ in range(n):
            threading.Thread(target=self._run, name="forkd-request", daemon=True).start()

    def _run(self) -> None:
        while True:
            t, line = self.jobs.get()
            try:
                handle_line(t, line)
            finally:
                with self.lock:
                    self.idle += 1

    def submit(self, t: Transport, line: bytes) -> None:
        with self.lock:
            if self.idle > 0:
                self.idle -= 1
                self.jobs.put((t, line))
                return
        threading.Thread(target=handle_line, args=(t, line), name="forkd-request-extra", daemon=True).start()


WORKERS: Workers | None = None


def _dispatch(t: Transport, line: bytes | None) -> None:
    """Answer one line on a worker thread; None means "too long". Blank lines are ignored."""
    global WORKERS
    if line is None:
        t.send({"id": None, "ok": False, "error": {
            "type": "BadRequest", "message": "request line longer than 64 MiB", "traceback": None}})
    elif line.strip():
        if WORKERS is None:
            WORKERS = Workers()
        WORKERS.submit(t, line)


def _drain() -> None:
    """Wait until no request is in flight (stdio mode, at end of input)."""
    while WORKERS is not None:
        with WORKERS.lock:
            busy = WORKERS.idle < 4 or not WORKERS.jobs.empty()
        if not busy and not any(th.name == "forkd-request-extra" for th in threading.enumerate()):
            return
        time.sleep(0.01)


def serve(t: Transport) -> None:
    """Split the stream into lines and serve each one. Returns only on EOF in stdio mode."""
    buf, scan, skipping, delay = bytearray(), 0, False, 0.01
    while True:
        chunk = t.read()
        if not chunk:
            if t.stdio:
                _drain()
                return
            buf.clear()  # host not connected: drop any partial line, back off
            scan, skipping = 0, False
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        delay = 0.01
        buf += chunk
        start = 0
        while (nl := buf.find(b"\n", max(start, scan))) >= 0:
            if not skipping:
                _dispatch(t, bytes(buf[start:nl]) if nl - start <= MAX_LINE else None)
            skipping, start = False, nl + 1
        del buf[:start]
        scan = len(buf)
        if len(buf) > MAX_LINE:  # refuse now, then discard up to the next newline
            if not skipping:
                _dispatch(t, None)
            buf.clear()
            skipping, scan = True, 0


# ---------------------------------------------------------------- PID 1 and startup
def _zombie_children() -> set[int]:
    """Pids of our children in state Z, from /proc/*/stat."""
    me, found = os.getpid(), set()
    for p in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(p, "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[0] == b"Z" and int(fields[1]) == me:
            found.add(int(p.split("/")[2]))
    return found


CHILD_EXITED = threading.Event()


def reaper() -> None:
    """PID-1 duty: reap orphaned zombies, never a child an `exec` is waiting for.

    Woken by SIGCHLD (an idle guest does no work at all: under emulation a periodic scan of /proc
    would cost every clone CPU time for nothing). A zombie is reaped only once seen in two scans a
    second apart, so a child that user code (run_code) waits for itself is not stolen in the moment
    between its exit and that wait.
    """
    seen: set[int] = set()
    while True:
        CHILD_EXITED.wait(None if not seen else 1.0)
        CHILD_EXITED.clear()
        time.sleep(1.0)
        try:
            zombies = _zombie_children()
            with MANAGED_LOCK:
                for pid in (zombies & seen) - MANAGED:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
            seen = zombies
        except Exception as e:
            print(f"forkd-agent: reaper: {e!r}", file=sys.stderr)


def open_port(name: str = PORT_NAME, wait_s: float = 20.0) -> int:
    """Find the virtio port called `name` and open it O_RDWR, retrying for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        for p in glob.glob("/sys/class/virtio-ports/*/name"):
            try:
                with open(p) as f:
                    if f.read().strip() == name:
                        return os.open("/dev/" + p.split("/")[-2], os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise SystemExit(f"forkd-agent: virtio port {name!r} not found")
        time.sleep(0.1)


def main(argv: list[str]) -> None:
    """Entry point: pick the transport, announce readiness, serve."""
    if argv not in ([], ["--stdio"]):
        raise SystemExit("usage: agent.py [--stdio]")
    if argv:
        t = Transport(os.dup(0), os.dup(1), stdio=True)
        null = os.open(os.devnull, os.O_RDWR)  # keep stray prints and children off the protocol stream
        os.dup2(null, 0)
        os.dup2(2, 1)
        os.close(null)
    else:
        fd = open_port()
        t = Transport(fd, fd, stdio=False)
    workdir = os.environ.get("FORKD_WORKDIR")  # an image's working directory (set by /init)
    if workdir:
        try:
            os.makedirs(workdir, exist_ok=True)
            os.chdir(workdir)
        except OSError as e:
            print(f"forkd agent: cannot use working directory {workdir}: {e}", file=sys.stderr)
    if os.getpid() == 1:
        signal.signal(signal.SIGCHLD, lambda *_: CHILD_EXITED.set())
        threading.Thread(target=reaper, name="forkd-reaper", daemon=True).start()
    global WORKERS
    WORKERS = Workers()
    t.send({"event": "ready", "agent_version": AGENT_VERSION, "python": PYTHON,
            "numpy": getattr(numpy, "__version__", None), "pid": os.getpid()})
    serve(t)


if __name__ == "__main__":
    main(sys.argv[1:])
