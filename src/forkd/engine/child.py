"""A child VM restored from a snapshot, and the guest operations it offers."""

from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from forkd.engine.channel import EXEC_OUTPUT_MAX, RAW, RAW_MAX, READ_CHUNK, AgentChannel
from forkd.engine.stats import smaps_rollup
from forkd.engine.vm import VMProcess
from forkd.errors import AgentError, AgentTimeoutError, FileTooLargeError, ForkdError

# Bytes per file_write request: base64 keeps each request line far below the agent's 64 MiB limit.
WRITE_CHUNK = 16 << 20
# Seconds a timed-out eval/run_code is given to stop once interrupted.
INTERRUPT_GRACE = 2.0
# Seconds past its timeout after which the agent interrupts a streamed run_code by itself.
STREAM_BACKSTOP_S = 10.0
# The most read_file / iter_file return by default.
MAX_FILE_BYTES = 256 << 20


#: bytes of output one read_process asks for (both streams), as the agent's proc_read returns at most
PROC_READ_MAX = RAW_MAX


def _command(argv: list[str], env: dict[str, str] | None, cwd: str | None,
             stdin: str | bytes | None) -> dict[str, Any]:
    """The agent's fields for a command (exec, proc_start)."""
    args: dict[str, Any] = {"argv": list(argv)}
    if env is not None:
        args["env"] = env
    if cwd is not None:
        args["cwd"] = cwd
    if isinstance(stdin, bytes):
        args["stdin_b64"] = base64.b64encode(stdin).decode()
    elif stdin is not None:
        args["stdin"] = stdin
    return args


@dataclass(frozen=True)
class CodeOutput:
    """Output of a streamed run_code, as the code wrote it (UTF-8)."""

    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class ProcessOutput:
    """One read of a process's output; ``exited`` (with ``exit_code``) once it ended and all was read."""

    stdout: bytes
    stderr: bytes
    exited: bool
    exit_code: int | None
    timed_out: bool


@dataclass
class ExecResult:
    """What ``exec`` returns: exit code, output, and whether the timeout or the size limit cut it."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = 0.0

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> ExecResult:
        return cls(exit_code=r.get("exit_code"), stdout=r.get("stdout", ""), stderr=r.get("stderr", ""),
                   timed_out=bool(r.get("timed_out")), stdout_truncated=bool(r.get("stdout_truncated")),
                   stderr_truncated=bool(r.get("stderr_truncated")), duration_s=float(r.get("duration_s", 0.0)))


class FileChunks(Iterator[bytes]):
    """The chunks of one guest file (at most READ_CHUNK bytes each), read on demand, never more than
    ``max_bytes`` in all.

    The first chunk is read when the object is made, so a missing file, or a regular file larger than
    ``max_bytes``, fails at once. ``size`` is a regular file's size as the agent first reported it:
    reading stops there, whatever the file does meanwhile. It is None for anything else (a device such
    as /dev/zero, a /proc file, a file that grew past its size), which is read until EOF and fails with
    FileTooLargeError past ``max_bytes``. The agent's numbers are used only as upper stops.
    """

    def __init__(self, channel: AgentChannel, path: str, max_bytes: int, timeout: float) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer; got {max_bytes!r}")
        self.path, self.max_bytes = path, max_bytes
        self._channel, self._timeout = channel, timeout
        self.offset = 0
        self.size: int | None = None
        self._done = False
        first, reported = self._read()
        if len(first) <= reported:  # a regular file, as far as can be told
            if reported > max_bytes:
                self._done = True
                raise FileTooLargeError(f"{path} is {reported} bytes, more than the limit of {max_bytes}")
            self.size = reported
            self._done = self._done or self.offset >= reported
        self._check_limit()
        self._first: bytes | None = first

    def __next__(self) -> bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
            if chunk:
                return chunk
        if self._done:
            raise StopIteration
        chunk, _ = self._read()
        self._check_limit()
        if not chunk:
            raise StopIteration
        return chunk

    def _read(self) -> tuple[bytes, int]:
        """The next chunk and the size the agent reported; sets ``_done`` at the end."""
        stop = self.max_bytes + 1 if self.size is None else self.size  # one byte over the limit tells
        want = min(READ_CHUNK, stop - self.offset)
        r = self._channel.call("file_read", reply_timeout=self._timeout, path=self.path, offset=self.offset,
                               length=want)
        data, reported, eof = self._check(r, want)
        self.offset += len(data)
        self._done = eof or not data or self.offset >= stop
        return data, reported

    def _check_limit(self) -> None:
        if self.offset > self.max_bytes:
            self._done = True
            raise FileTooLargeError(f"{self.path} gave more than {self.max_bytes} bytes (the limit), and is not "
                                    "a regular file of a known size")

    def _check(self, r: dict[str, Any], want: int) -> tuple[bytes, int, bool]:
        """(data, size, eof) of a file_read reply; anything malformed is a protocol violation."""
        raw, size, eof = r.get("data_b64"), r.get("size"), r.get("eof")
        if not isinstance(raw, str) or not isinstance(eof, bool) or not isinstance(size, int) \
                or isinstance(size, bool) or size < 0:
            raise self._violation("a file_read reply without data_b64, size and eof")
        try:
            data = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise self._violation("a file_read reply whose data is not base64") from None
        if len(data) > want:
            raise self._violation(f"{len(data)} bytes of file data for a read of {want}")
        return data, size, eof

    def _violation(self, what: str) -> ForkdError:
        self._done = True
        return self._channel.protocol_violation("file_read", what)


@dataclass
class Child:
    """A running child VM. Timings are host monotonic seconds (``ready_s`` = launch until first reply)."""

    id: str
    snapshot: str
    vm: VMProcess
    created_at: float = field(default_factory=time.time)
    ready_s: float | None = None
    from_pool: bool = False
    fresh: dict[str, Any] = field(default_factory=dict)
    clock_skew_s: float | None = None

    @property
    def pid(self) -> int:
        return self.vm.pid

    def alive(self) -> bool:
        return self.vm.alive()

    # -- guest operations (timeouts in seconds)
    def ping(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.vm.channel.call("ping", reply_timeout=timeout)

    def eval(self, expr: str, timeout: float = 60.0) -> dict[str, Any]:
        """Evaluate an expression in the warmed interpreter: ``{"repr", "value", "type"}``. Past
        ``timeout`` (seconds) the code is interrupted in the guest and AgentTimeoutError says how."""
        return self._interruptible("eval", timeout, expr=expr)

    def run_code(self, code: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run statements with state kept between calls: ``{"stdout", "stderr", "repr", "value"}``.
        Past ``timeout`` (seconds) the code is interrupted, as for :meth:`eval`."""
        return self._interruptible("run_code", timeout, code=code)

    def run_code_stream(self, code: str, timeout: float = 60.0, wait: float = 10.0
                        ) -> Iterator[CodeOutput | dict[str, Any]]:
        """:meth:`run_code` with its output as the code writes it: CodeOutput chunks, then the result
        (as :meth:`run_code` returns it, ``stdout``/``stderr`` empty: they were streamed). The code's
        exception is AgentError with the details, raised after its output. Past ``timeout`` (seconds)
        the code is interrupted and AgentTimeoutError raised once its output is read. A consumer that
        stops early interrupts the code."""
        token = secrets.token_hex(8)
        channel = self.vm.channel
        # the agent stops the code itself a little after the deadline, should this reader go away
        fut = channel.submit("run_code", run=token, code=code, stream=True, deadline_s=timeout + STREAM_BACKSTOP_S)
        deadline = time.monotonic() + timeout
        timed_out: str | None = None
        stopped = False  # the code ended, or was interrupted
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:  # interrupt (waits for it to stop), then what it wrote until then
                    timed_out, stopped = self._interrupt_report("run_code", timeout, token), True
                try:
                    r = channel.call("run_read", reply_timeout=wait + 60.0, run=token, raw=True,
                                     wait=0.5 if timed_out else min(wait, max(left, 0.05)))
                except AgentError as e:
                    if e.type == "LookupError" and fut.done():  # it failed before it started (a bad field)
                        stopped = True
                        break
                    if e.type == "LookupError" and not timed_out:  # not on a worker yet: ask again
                        continue
                    if e.type == "UnknownOp":
                        raise AgentError("run_code", "UnknownOp", "this sandbox's agent predates streamed "
                                         "run_code (its snapshot was made by an older forkd); re-create the "
                                         "snapshot, or run it without streaming") from None
                    raise
                out, err = self._output("run_read", r, PROC_READ_MAX)
                stopped = stopped or r.get("done") is True
                if out or err:
                    yield CodeOutput(out, err)
                if r.get("done") is True or timed_out:
                    break
        finally:
            if not stopped and not channel.closed:  # the consumer went away: stop the code, without waiting
                with contextlib.suppress(ForkdError):
                    channel.result("interrupt", channel.submit("interrupt", run=token, grace=0), 0)
        if timed_out is not None:
            with contextlib.suppress(ForkdError):  # its KeyboardInterrupt, or nothing if it is stuck
                channel.result("run_code", fut, 5.0)
            raise AgentTimeoutError(timed_out)
        yield channel.result("run_code", fut, max(deadline - time.monotonic(), 0) + 30.0)

    def interrupt(self, run: str | None = None, grace: float = INTERRUPT_GRACE) -> dict[str, Any]:
        """Raise KeyboardInterrupt in the guest's running eval/run_code (``run``: one of them; default:
        all) and wait up to ``grace`` seconds: ``{"found", "stopped", "stuck"}``. Stuck code (blocked
        in C) keeps running on its own; the sandbox answers new requests all the same."""
        try:
            return self.vm.channel.call("interrupt", reply_timeout=grace + 30.0, run=run, grace=grace)
        except AgentError as e:
            if e.type == "UnknownOp":
                raise AgentError("interrupt", "UnknownOp", "this sandbox's agent predates interrupts (its "
                                 "snapshot was made by an older forkd); re-create the snapshot") from None
            raise

    def _interruptible(self, op: str, timeout: float, **args: Any) -> dict[str, Any]:
        token = secrets.token_hex(8)
        channel = self.vm.channel
        fut = channel.submit(op, run=token, **args)
        try:
            return channel.result(op, fut, timeout)
        except AgentTimeoutError:
            raise AgentTimeoutError(self._interrupt_report(op, timeout, token)) from None

    def _interrupt_report(self, op: str, timeout: float, token: str) -> str:
        """Interrupt the timed-out call ``token``; what happened, for its AgentTimeoutError."""
        try:
            outcome = self.interrupt(token)
        except ForkdError as e:
            return f"{op} did not finish within {timeout} s and could not be interrupted ({e})"
        if outcome.get("stuck"):
            how = ("it was interrupted but did not stop (blocked in C code?): it keeps running on its own "
                   "thread; the sandbox answers new requests")
        elif outcome.get("stopped"):
            how = "it was interrupted (KeyboardInterrupt); the sandbox is ready for the next request"
        else:
            how = "it had finished by the time it was interrupted"
        return f"{op} did not finish within {timeout} s: {how}"

    def exec(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
             stdin: str | bytes | None = None, timeout: float | None = 30.0,
             max_output: int = EXEC_OUTPUT_MAX) -> ExecResult:
        """Run a process in the guest. ``timeout`` (seconds) kills its process group when it expires.
        ``max_output`` (bytes kept per stream) is at most EXEC_OUTPUT_MAX, so that the reply fits in a line
        the host accepts; beyond, the output is truncated as if asked for that much."""
        args = {**_command(argv, env, cwd, stdin), "timeout": timeout, "max_output": min(max_output, EXEC_OUTPUT_MAX)}
        wait = None if timeout is None else timeout + 30.0
        return ExecResult.from_reply(self.vm.channel.call("exec", reply_timeout=wait, **args))

    # -- processes that outlive one request (streamed output, background, stdin)
    def start_process(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                      stdin: str | bytes | None = None, stdin_open: bool = False, timeout: float | None = None,
                      reply_timeout: float = 60.0) -> dict[str, Any]:
        """Start ``argv`` in the guest and return at once: ``{"pid", "argv", "started_at", "running"}``.
        Its output waits in the guest (1 MiB per stream; then the process blocks) for :meth:`read_process`.
        ``timeout`` (seconds, None: none) kills its process group; ``stdin_open`` keeps stdin for
        :meth:`write_process`."""
        args = {**_command(argv, env, cwd, stdin), "timeout": timeout, "stdin_open": stdin_open}
        return self._checked_proc(self.vm.channel.call("proc_start", reply_timeout=reply_timeout, **args))

    def read_process(self, pid: int, wait: float = 10.0, max_bytes: int = PROC_READ_MAX) -> ProcessOutput:
        """What process ``pid`` wrote since the last read (waiting up to ``wait`` seconds for some), and
        its exit once it ended and all was read."""
        r = self.vm.channel.call("proc_read", reply_timeout=wait + 60.0, pid=pid, wait=wait, max_bytes=max_bytes,
                                 raw=True)
        out, err = self._output("proc_read", r, max_bytes)
        if not isinstance(r.get("exited"), bool):
            raise self.vm.channel.protocol_violation("proc_read", "a proc_read reply without 'exited'")
        code = r.get("exit_code")
        return ProcessOutput(out, err, bool(r["exited"]), code if isinstance(code, int) else None,
                             bool(r.get("timed_out")))

    def _output(self, op: str, r: dict[str, Any], max_bytes: int) -> tuple[bytes, bytes]:
        """The two streams of an output read: the raw bytes split as the reply says (an agent that
        predates raw frames sends base64 fields)."""
        try:
            if RAW in r:
                data, n_out, n_err = r[RAW], r["stdout_len"], r["stderr_len"]
                if not (isinstance(n_out, int) and isinstance(n_err, int) and min(n_out, n_err) >= 0
                        and n_out + n_err == len(data)):
                    raise ValueError("stdout_len and stderr_len do not add up to the raw bytes")
                out, err = data[:n_out], data[n_out:]
            else:
                out, err = (base64.b64decode(str(r[k]), validate=True) for k in ("stdout_b64", "stderr_b64"))
        except (KeyError, ValueError, binascii.Error) as e:
            raise self.vm.channel.protocol_violation(op, f"a {op} reply without valid output: {e}") from None
        if len(out) + len(err) > max_bytes:
            raise self.vm.channel.protocol_violation(op, f"a {op} reply larger than asked")
        return out, err

    def stream_process(self, pid: int, wait: float = 10.0) -> Iterator[ProcessOutput]:
        """Read process ``pid`` to its end: each non-empty chunk as it comes, then the exit."""
        while True:
            chunk = self.read_process(pid, wait)
            if chunk.stdout or chunk.stderr or chunk.exited:
                yield chunk
            if chunk.exited:
                return

    def write_process(self, pid: int, data: bytes = b"", eof: bool = False, timeout: float = 60.0) -> int:
        """Write ``data`` to the process's stdin (``eof`` closes it); the bytes written."""
        r = self.vm.channel.call("proc_write", reply_timeout=timeout, pid=pid,
                                 data_b64=base64.b64encode(data).decode(), eof=eof)
        return int(r.get("written", 0))

    def kill_process(self, pid: int, signal: str = "KILL", timeout: float = 30.0) -> bool:
        """Signal the process's group (KILL, TERM, INT, HUP); False if it had already ended."""
        return bool(self.vm.channel.call("proc_kill", reply_timeout=timeout, pid=pid, signal=signal)["signalled"])

    def list_processes(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The processes of :meth:`start_process` running or not read out yet."""
        procs = self.vm.channel.call("proc_list", reply_timeout=timeout).get("processes")
        if not isinstance(procs, list) or len(procs) > 1024:
            raise self.vm.channel.protocol_violation("proc_list", "a proc_list reply that is not a short list")
        return [self._checked_proc(p) for p in procs]

    def _checked_proc(self, p: object) -> dict[str, Any]:
        ok = isinstance(p, dict) and isinstance(p.get("pid"), int) and isinstance(p.get("argv"), list)
        if not ok:
            raise self.vm.channel.protocol_violation("proc", "a process record without pid and argv")
        assert isinstance(p, dict)
        return {"pid": p["pid"], "argv": [str(a)[:4096] for a in p["argv"][:4096]],
                "started_at": float(p.get("started_at") or 0), "running": bool(p.get("running")),
                "exit_code": p.get("exit_code") if isinstance(p.get("exit_code"), int) else None,
                "timed_out": bool(p.get("timed_out"))}

    def read_file(self, path: str, timeout: float = 60.0, max_bytes: int = MAX_FILE_BYTES) -> bytes:
        """The whole file, read in chunks (binary safe); FileTooLargeError beyond ``max_bytes`` (see
        FileChunks). ``timeout`` is per chunk, in seconds."""
        return b"".join(self.iter_file(path, max_bytes, timeout))

    def iter_file(self, path: str, max_bytes: int = MAX_FILE_BYTES, timeout: float = 60.0) -> FileChunks:
        """The file as an iterator of chunks, to stream it; the first chunk is read now (see FileChunks)."""
        return FileChunks(self.vm.channel, path, max_bytes, timeout)

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644, timeout: float = 60.0) -> int:
        """Write a whole file (binary safe), replacing it atomically. Large files go in chunks to a
        temporary name, renamed into place at the end. ``timeout`` is per chunk, in seconds."""
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) <= WRITE_CHUNK:
            r = self.vm.channel.call("file_write", reply_timeout=timeout, path=path, mode=mode,
                                     data_b64=base64.b64encode(raw).decode())
            return int(r["bytes_written"])
        tmp = f"{path}.forkd-part-{secrets.token_hex(4)}"
        try:
            for off in range(0, len(raw), WRITE_CHUNK):
                self.vm.channel.call("file_write", reply_timeout=timeout, path=tmp, mode=mode, append=off > 0,
                                     data_b64=base64.b64encode(raw[off:off + WRITE_CHUNK]).decode())
            self.vm.channel.call("file_rename", reply_timeout=timeout, path=tmp, dst=path)
        except BaseException:
            with contextlib.suppress(ForkdError):
                self.vm.channel.call("file_remove", reply_timeout=timeout, path=tmp)
            raise
        return len(raw)

    def list_dir(self, path: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        return list(self.vm.channel.call("file_list", reply_timeout=timeout, path=path)["entries"])

    def stat(self, path: str, timeout: float = 30.0) -> dict[str, Any]:
        return dict(self.vm.channel.call("file_stat", reply_timeout=timeout, path=path)["entry"])

    def mkdir(self, path: str, parents: bool = True, timeout: float = 30.0) -> None:
        self.vm.channel.call("file_mkdir", reply_timeout=timeout, path=path, parents=parents, exist_ok=True)

    def remove(self, path: str, recursive: bool = False, timeout: float = 60.0) -> None:
        self.vm.channel.call("file_remove", reply_timeout=timeout, path=path, recursive=recursive)

    # -- host side
    def memory(self) -> dict[str, int]:
        """``/proc/PID/smaps_rollup`` of the QEMU process, in KiB (``Pss``, ``Rss``, ...)."""
        return smaps_rollup(self.pid)

    def kill(self, remove_workdir: bool = True) -> None:
        """End the VM and (by default) remove its work dir."""
        self.vm.kill(remove_workdir=remove_workdir)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "snapshot": self.snapshot, "pid": self.pid, "created_at": self.created_at,
                "ready_ms": None if self.ready_s is None else round(self.ready_s * 1000, 2),
                "from_pool": self.from_pool, "workdir": str(self.vm.workdir.path),
                "clock_skew_ms": None if self.clock_skew_s is None else round(self.clock_skew_s * 1000, 1),
                "alive": self.alive(), "status": self.vm.exit_status() or "running",
                "network": self.vm.meta.get("network"), "netns": self.vm.meta.get("netns"),
                "memory_limit_mib": self.vm.meta.get("memory_limit_mib"), "ports": self.vm.meta.get("ports", {})}
