"""A child VM restored from a snapshot, and the guest operations it offers."""

from __future__ import annotations

import base64
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from forkd.engine.stats import smaps_rollup
from forkd.engine.vm import VMProcess
from forkd.errors import ForkdError

# Bytes per file_write request: base64 keeps each request line far below the agent's 64 MiB limit.
WRITE_CHUNK = 16 << 20


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
        """Evaluate an expression in the warmed interpreter: ``{"repr", "value", "type"}``."""
        return self.vm.channel.call("eval", reply_timeout=timeout, expr=expr)

    def run_code(self, code: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run statements with state kept between calls: ``{"stdout", "stderr", "repr", "value"}``."""
        return self.vm.channel.call("run_code", reply_timeout=timeout, code=code)

    def exec(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
             stdin: str | bytes | None = None, timeout: float | None = 30.0,
             max_output: int = 1 << 20) -> ExecResult:
        """Run a process in the guest. ``timeout`` (seconds) kills its process group when it expires."""
        args: dict[str, Any] = {"argv": list(argv), "timeout": timeout, "max_output": max_output}
        if env is not None:
            args["env"] = env
        if cwd is not None:
            args["cwd"] = cwd
        if isinstance(stdin, bytes):
            args["stdin_b64"] = base64.b64encode(stdin).decode()
        elif stdin is not None:
            args["stdin"] = stdin
        wait = None if timeout is None else timeout + 30.0
        return ExecResult.from_reply(self.vm.channel.call("exec", reply_timeout=wait, **args))

    def read_file(self, path: str, timeout: float = 60.0) -> bytes:
        """The whole file, read in chunks (binary safe)."""
        out, offset = bytearray(), 0
        while True:
            r = self.vm.channel.call("file_read", reply_timeout=timeout, path=path, offset=offset, length=8 << 20)
            chunk = base64.b64decode(r["data_b64"])
            out += chunk
            offset += len(chunk)
            if r.get("eof") or not chunk:
                return bytes(out)

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
