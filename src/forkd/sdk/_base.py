"""The I/O-free half of the SDK, shared by the sync and async clients.

Each API operation is a function returning a :class:`Call`: the HTTP request to make and how to turn
its response into a result. ``sync.py`` and ``aio.py`` only send calls (``httpx.Client`` vs
``httpx.AsyncClient``) and hand the response back to :meth:`BaseController._finish`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from forkd.limits import (
    BRANCH_MODES,
    ID_PATTERN,
    MAX_CHILDREN,
    MAX_EXPOSE,
    MAX_LIFETIME_S,
    MAX_METADATA,
    MAX_METADATA_VALUE,
    METADATA_KEY_PATTERN,
    NETWORKS,
)
from forkd.sdk._config import Endpoint, Verify, resolve, timeout_config
from forkd.sdk.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    CodeError,
    ForkdAPIError,
    SpawnError,
    error_for_status,
)
from forkd.sdk.models import (
    BranchResult,
    CapacityInfo,
    CommandResult,
    EvalResult,
    Execution,
    FileEntry,
    InterruptResult,
    Model,
    PackResult,
    PendingSnapshot,
    PingResult,
    ProcessInfo,
    PullResult,
    SandboxInfo,
    SnapshotInfo,
    SpawnEntry,
    UnpackResult,
    VersionInfo,
    WorkspaceInfo,
)

T = TypeVar("T")
M = TypeVar("M", bound=Model)
S = TypeVar("S")

MARGIN = 30.0
"""Seconds added to an operation's own timeout to get its HTTP request timeout."""
SNAPSHOT_MARGIN = 300.0
"""Seconds added to ``boot_timeout`` for the rest of a snapshot's creation (warming, saving memory)."""
UPLOAD_CHUNK = 1 << 20
"""Bytes per write of a request body (one big write is quadratic in httpcore's sync socket stream)."""
Params = dict[str, str | int | float | bool | list[str]]  # a list: the parameter repeated


class _UseDefault:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _UseDefault()
"""Marker: use the controller's default request timeout."""


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and the parser of its (successful) response."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Params | None = None
    json: object = None
    content: bytes | None = None
    """A raw request body, sent in chunks of UPLOAD_CHUNK bytes with a Content-Length header."""
    upload: Path | None = None
    """A file sent as the raw request body (read in chunks as it is sent)."""
    timeout: float | None | _UseDefault = DEFAULT
    """Request timeout in seconds (``None``: no limit)."""

    @property
    def headers(self) -> dict[str, str] | None:
        if self.upload is not None:
            size = self.upload.stat().st_size
        elif self.content is not None:
            size = len(self.content)
        else:
            return None
        return {"Content-Length": str(size), "Content-Type": "application/octet-stream"}

    def chunks(self) -> Iterator[bytes] | None:
        """The body for httpx.Client (None without one)."""
        if self.upload is not None:
            return _file_chunks(self.upload)
        if self.content is None:
            return None
        view = memoryview(self.content)
        return (bytes(view[i:i + UPLOAD_CHUNK]) for i in range(0, len(view), UPLOAD_CHUNK))

    def achunks(self) -> AsyncIterator[bytes] | None:
        """The body for httpx.AsyncClient (None without one)."""
        chunks = self.chunks()
        if chunks is None:
            return None

        async def gen() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return gen()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            yield chunk


# ---------------------------------------------------------------- errors and parsing


def redact(value: T, token: str | None) -> T:
    """``value`` with every occurrence of ``token`` in its strings replaced (recursively)."""
    if not token:
        return value
    out: Any = value
    if isinstance(value, str):
        out = value.replace(token, "[REDACTED]")
    elif isinstance(value, Mapping):
        out = {redact(k, token): redact(v, token) for k, v in value.items()}
    elif isinstance(value, list):
        out = [redact(v, token) for v in value]
    return out


def error_from_response(resp: httpx.Response, token: str | None) -> APIStatusError:
    """The SDK exception for an error response (``{"error": "..."}`` when it comes from forkd)."""
    body: object
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    if isinstance(body, Mapping) and isinstance(body.get("error"), str):
        message = str(body["error"])
    else:
        text = body if isinstance(body, str) else resp.text
        message = resp.reason_phrase or "error"
        if text.strip():
            message += f": {text.strip()[:500]}"
    return error_for_status(resp.status_code, redact(message, token), redact(body, token))


def transport_error(exc: httpx.RequestError, call: Call[Any], ep: Endpoint) -> APIConnectionError:
    """The SDK exception for a request that got no response."""
    detail = redact(str(exc) or type(exc).__name__, ep.token)
    if isinstance(exc, httpx.TimeoutException):
        limit = "" if isinstance(call.timeout, _UseDefault) or call.timeout is None else f" after {call.timeout:g} s"
        return APITimeoutError(f"{call.method} {call.path} timed out{limit} ({detail})")
    return APIConnectionError(f"cannot reach forkd-controller at {ep.url}: {detail}")


def json_of(resp: httpx.Response) -> object:
    try:
        return resp.json()
    except ValueError as e:
        raise ValueError(f"the body is not JSON: {resp.text[:200]!r}") from e


def obj_of(resp: httpx.Response) -> Mapping[str, object]:
    data = json_of(resp)
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def list_of(data: object, key: str | None = None) -> Sequence[Mapping[str, object]]:
    if key is not None:
        data = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(data, list) or not all(isinstance(x, Mapping) for x in data):
        raise ValueError("expected a JSON list of objects" + (f" in {key!r}" if key else ""))
    return data


def model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda resp: cls.from_dict(obj_of(resp))


def models(cls: type[M], key: str | None = None) -> Callable[[httpx.Response], list[M]]:
    return lambda resp: [cls.from_dict(x) for x in list_of(json_of(resp), key)]


def nothing(_: httpx.Response) -> None:
    return None


def raw_bytes(resp: httpx.Response) -> bytes:
    return resp.content


def raw_text(resp: httpx.Response) -> str:
    return resp.text


def code_outcome(resp: httpx.Response) -> Mapping[str, object]:
    """An eval/run_code response body; ``ok: false`` (the user's code raised) becomes :class:`CodeError`."""
    data = obj_of(resp)
    if data.get("ok") is False:
        err = data.get("error")
        err = err if isinstance(err, Mapping) else {}
        tb = err.get("traceback")
        raise CodeError(str(err.get("type") or "Error"), str(err.get("message") or ""),
                        tb if isinstance(tb, str) else None, stdout=str(data.get("stdout") or ""),
                        stderr=str(data.get("stderr") or ""))
    return data


# ---------------------------------------------------------------- argument checks


def segment(value: object, name: str) -> str:
    """``value`` as one URL path segment (percent-encoded); ValueError if it is not a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: must be a non-empty string, got {value!r}")
    if value in (".", ".."):  # a dot segment: the URL would be normalised to another path
        raise ValueError(f"{name}: {value!r} is not a valid value")
    return quote(value, safe="")


def check_str(value: object, name: str, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type(value).__name__}")
    if not empty and not value:
        raise ValueError(f"{name}: must not be empty")
    return value


def check_int(value: object, name: str, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}: must be in {lo}..{'' if hi is None else hi}, got {value}")
    return value


def seconds(value: object, name: str = "timeout", most: float | None = None) -> float:
    """A positive, finite number of seconds (at most ``most``)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name}: expected seconds as a number, got {type(value).__name__}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name}: must be a positive number of seconds, got {value!r}")
    if most is not None and value > most:
        raise ValueError(f"{name}: at most {most:g} seconds, got {value!r}")
    return float(value)


def seconds_or_none(value: object, name: str = "timeout") -> float | None:
    """Like :func:`seconds`, but ``None`` (no limit) is allowed."""
    return None if value is None else seconds(value, name)


def guest_path(path: object) -> str:
    if isinstance(path, bytes) or not isinstance(path, str):
        raise TypeError(f"path: expected a string, got {type(path).__name__}")
    if not path:
        raise ValueError("path: must not be empty")
    return path


# ---------------------------------------------------------------- service and snapshots


def op_health() -> Call[bool]:
    return Call("GET", "/healthz", lambda r: obj_of(r).get("ok") is True)


def op_version() -> Call[VersionInfo]:
    return Call("GET", "/version", model(VersionInfo))


def op_metrics() -> Call[str]:
    return Call("GET", "/metrics", raw_text)


def op_list_snapshots() -> Call[list[SnapshotInfo]]:
    return Call("GET", "/v1/snapshots", models(SnapshotInfo))


def op_create_snapshot(tag: str, memory_mib: int, vcpus: int, warm_code: str | None,
                       boot_timeout: float, image: str | None = None) -> Call[SnapshotInfo]:
    check_str(tag, "tag", empty=False)
    check_int(memory_mib, "memory_mib", 1)
    check_int(vcpus, "vcpus", 1)
    if warm_code is not None:
        check_str(warm_code, "warm_code")
    bt = seconds(boot_timeout, "boot_timeout")
    body: dict[str, Any] = {"tag": tag, "memory_mib": memory_mib, "vcpus": vcpus, "warm_code": warm_code,
                            "boot_timeout_s": bt}
    if image is not None:
        body["image"] = check_str(image, "image", empty=False)
    return Call("POST", "/v1/snapshots", model(SnapshotInfo), json=body, timeout=bt + SNAPSHOT_MARGIN)


def op_snapshot_info(tag: str) -> Call[SnapshotInfo]:
    return Call("GET", f"/v1/snapshots/{segment(tag, 'tag')}/info", model(SnapshotInfo))


def op_delete_snapshot(tag: str, force: bool, cascade: bool = False) -> Call[None]:
    if force and cascade:
        raise ValueError("force and cascade cannot be used together")
    return Call("DELETE", f"/v1/snapshots/{segment(tag, 'tag')}", nothing,
                params={"force": bool(force), "cascade": bool(cascade)})


def op_compact(tag: str, to: str) -> Call[SnapshotInfo]:
    check_str(to, "to", empty=False)
    return Call("POST", f"/v1/snapshots/{segment(tag, 'tag')}/compact", model(SnapshotInfo), json={"to": to},
                timeout=600.0)


@dataclass(frozen=True)
class Download:
    """An HTTP GET whose (large) answer goes to a file."""

    method: str
    path: str
    params: Params | None = None
    json: object = None
    timeout: float | None = 3600.0
    """Seconds between two received chunks (the server packs before it sends)."""


def op_pack(tag: str, level: int) -> Download:
    check_int(level, "level", 1, 22)
    return Download("GET", f"/v1/snapshots/{segment(tag, 'tag')}/pack", params={"level": level})


def op_unpack(archive: str | os.PathLike[str], tag: str | None, force: bool) -> Call[UnpackResult]:
    path = Path(archive)
    if not path.is_file():
        raise ValueError(f"archive: {path} is not a file")
    params: Params = {"force": bool(force)}
    if tag is not None:
        params["tag"] = check_str(tag, "tag", empty=False)
    return Call("POST", "/v1/snapshots/unpack", model(UnpackResult), params=params, upload=path, timeout=3600.0)


class PackFile:
    """Where a downloaded pack goes: ``<out>.<unique>.partial``, fsynced and renamed to ``out`` when complete (an
    existing ``out`` only replaced with ``force``); removed again on failure."""

    def __init__(self, out: str | os.PathLike[str], force: bool) -> None:
        self.out = Path(out)
        if self.out.exists() and not force:
            raise FileExistsError(f"{self.out} exists (force=True replaces it)")
        # a name of its own: two downloads to one ``out`` never write into one file; not through a link
        self.partial = self.out.with_name(f"{self.out.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.f = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.f.write(chunk)
        self.size += len(chunk)

    def commit(self, resp: httpx.Response) -> PackResult:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.partial, self.out)
        chain = [t for t in resp.headers.get("X-Forkd-Chain", "").split(",") if t]
        return PackResult(path=str(self.out), chain=chain, bytes=self.size)

    def abort(self) -> None:
        self.f.close()
        self.partial.unlink(missing_ok=True)


def op_branch(sandbox_id: str, tag: str | None, mode: str, wait: bool) -> Call[BranchResult]:
    if mode not in BRANCH_MODES:
        raise ValueError(f"mode: must be one of {', '.join(map(repr, BRANCH_MODES))}, got {mode!r}")
    body: dict[str, Any] = {"mode": mode, "wait": bool(wait)}
    if tag is not None:
        check_str(tag, "tag", empty=False)
        body["tag"] = tag
    return Call("POST", sandbox_path(sandbox_id, "/branch"), model(BranchResult), json=body, timeout=600.0)


# ---------------------------------------------------------------- sandboxes


def op_spawn(snapshot_tag: str, n: int, network: str, memory_limit_mib: int | None, per_child_netns: bool,
             timeout: float, expose: Sequence[int] = (), lifetime: float | None = None,
             metadata: Mapping[str, str] | None = None) -> Call[list[SpawnEntry]]:
    check_str(snapshot_tag, "snapshot_tag", empty=False)
    check_int(n, "n", 1, MAX_CHILDREN)
    if network not in NETWORKS:
        raise ValueError(f"network: must be one of {', '.join(map(repr, NETWORKS))}, got {network!r}")
    if memory_limit_mib is not None:
        check_int(memory_limit_mib, "memory_limit_mib", 1)
    t = seconds(timeout)
    ports = list(expose)
    for port in ports:
        check_int(port, "expose", 1, 65535)
    if len(ports) > MAX_EXPOSE:
        raise ValueError(f"expose: at most {MAX_EXPOSE} ports")
    body: dict[str, object] = {"snapshot_tag": snapshot_tag, "n": n, "network": network,
                               "memory_limit_mib": memory_limit_mib, "per_child_netns": bool(per_child_netns),
                               "timeout_s": t}
    if ports:
        body["expose"] = ports
    if metadata:
        body["metadata"] = labels(metadata)
    if lifetime is not None:
        body["lifetime_s"] = seconds(lifetime, "lifetime", MAX_LIFETIME_S)
    # ``timeout`` bounds each child's restore and children restore a few at a time, so n * timeout bounds
    # the request: giving up earlier would leave started sandboxes that nobody knows the ids of.
    return Call("POST", "/v1/sandboxes", lambda r: [SpawnEntry.from_dict(x) for x in list_of(json_of(r))],
                json=body, timeout=n * t + MARGIN)


def spawn_results(entries: list[SpawnEntry], make: Callable[[SandboxInfo], S]) -> list[S | SpawnError[S]]:
    """One sandbox object or one per-child :class:`SpawnError` per entry, in request order."""
    out: list[S | SpawnError[S]] = []
    for e in sorted(entries, key=lambda x: x.index):
        if e.sandbox is not None:
            out.append(make(e.sandbox))
        else:
            msg = e.error or "unknown error"
            out.append(SpawnError(f"sandbox {e.index} failed to start: {msg}", errors=[(e.index, msg)]))
    return out


def spawn_or_raise(results: Sequence[S | SpawnError[S]]) -> list[S]:
    """The sandboxes, or :class:`SpawnError` carrying the started ones if any child failed."""
    started: list[S] = []
    errors: list[tuple[int, str]] = []
    for r in results:
        if isinstance(r, SpawnError):
            errors.extend(r.errors)
        else:
            started.append(r)
    if errors:
        shown = "; ".join(f"[{i}] {m}" for i, m in errors[:5]) + ("; ..." if len(errors) > 5 else "")
        raise SpawnError(f"{len(errors)} of {len(results)} sandboxes failed to start "
                         f"({len(started)} started and still running): {shown}", sandboxes=started, errors=errors)
    return started


def labels(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """``metadata`` checked as the controller will (string keys and values within the limits)."""
    out = dict(metadata or {})
    if len(out) > MAX_METADATA:
        raise ValueError(f"metadata: at most {MAX_METADATA} labels")
    for k, v in out.items():
        if not isinstance(k, str) or not re.fullmatch(METADATA_KEY_PATTERN, k):
            raise ValueError(f"metadata: key {k!r} must match {METADATA_KEY_PATTERN}")
        if not isinstance(v, str) or len(v) > MAX_METADATA_VALUE:
            raise ValueError(f"metadata: the value of {k} must be a string of at most {MAX_METADATA_VALUE} characters")
    return out


def op_list_sandboxes(metadata: Mapping[str, str] | None = None) -> Call[list[SandboxInfo]]:
    want = labels(metadata)
    params: Params | None = {"metadata": [f"{k}:{v}" for k, v in want.items()]} if want else None
    return Call("GET", "/v1/sandboxes", models(SandboxInfo), params=params)


def op_pending_snapshots() -> Call[list[PendingSnapshot]]:
    return Call("GET", "/v1/snapshots/pending", models(PendingSnapshot))


def op_set_timeout(sandbox_id: str, lifetime: float) -> Call[SandboxInfo]:
    return Call("POST", sandbox_path(sandbox_id, "/timeout"), model(SandboxInfo),
                json={"lifetime_s": seconds(lifetime, "lifetime", MAX_LIFETIME_S)})


def sandbox_path(sandbox_id: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{segment(sandbox_id, 'sandbox_id')}{rest}"


def op_get_sandbox(sandbox_id: str) -> Call[SandboxInfo]:
    return Call("GET", sandbox_path(sandbox_id), model(SandboxInfo))


def op_kill(sandbox_id: str) -> Call[None]:
    return Call("DELETE", sandbox_path(sandbox_id), nothing)


def op_ping(sandbox_id: str) -> Call[PingResult]:
    return Call("POST", sandbox_path(sandbox_id, "/ping"), model(PingResult))


def op_interrupt(sandbox_id: str) -> Call[InterruptResult]:
    return Call("POST", sandbox_path(sandbox_id, "/interrupt"), model(InterruptResult))


def op_eval(sandbox_id: str, expr: str, timeout: float) -> Call[EvalResult]:
    check_str(expr, "expr", empty=False)
    t = seconds(timeout)
    return Call("POST", sandbox_path(sandbox_id, "/eval"), lambda r: EvalResult.from_dict(code_outcome(r)),
                json={"expr": expr, "timeout_s": t}, timeout=t + MARGIN)


def op_run_code(sandbox_id: str, code: str, timeout: float) -> Call[Execution]:
    check_str(code, "code")
    t = seconds(timeout)
    return Call("POST", sandbox_path(sandbox_id, "/run_code"), lambda r: Execution.from_dict(code_outcome(r)),
                json={"code": code, "timeout_s": t}, timeout=t + MARGIN)


def argv_of(cmd: str | Sequence[str]) -> list[str]:
    """A str runs under ``/bin/sh -c``; a list is the program and its arguments (no shell)."""
    if isinstance(cmd, str):
        if not cmd.strip():
            raise ValueError("cmd: the command is empty")
        return ["/bin/sh", "-c", cmd]
    if isinstance(cmd, bytes) or not isinstance(cmd, Sequence):
        raise TypeError(f"cmd: expected a str or a list of str, got {type(cmd).__name__}")
    argv = list(cmd)
    if not argv:
        raise ValueError("cmd: the argument list is empty")
    bad = [i for i, a in enumerate(argv) if not isinstance(a, str)]
    if bad:
        raise TypeError(f"cmd: every argument must be a str; cmd[{bad[0]}] is {type(argv[bad[0]]).__name__}")
    if not argv[0]:
        raise ValueError("cmd: the program name (cmd[0]) is empty")
    return argv


def exec_body(cmd: str | Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
              stdin: str | bytes | None) -> dict[str, object]:
    """The fields of a command shared by exec and process starts (checked)."""
    body: dict[str, object] = {"argv": argv_of(cmd)}
    if env is not None:
        if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError("env: expected a mapping of str to str")
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = check_str(cwd, "cwd", empty=False)
    if isinstance(stdin, bytes | bytearray | memoryview):
        try:
            body["stdin"] = bytes(stdin).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError("stdin: bytes must be valid UTF-8 (the API carries stdin as text)") from e
    elif stdin is not None:
        body["stdin"] = check_str(stdin, "stdin")
    return body


def op_exec(sandbox_id: str, cmd: str | Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
            stdin: str | bytes | None, timeout: float | None, max_output: int) -> Call[CommandResult]:
    t = seconds_or_none(timeout)
    body = {**exec_body(cmd, env, cwd, stdin), "timeout_s": t, "max_output": check_int(max_output, "max_output", 0)}
    return Call("POST", sandbox_path(sandbox_id, "/exec"), model(CommandResult), json=body,
                timeout=None if t is None else t + MARGIN)


#: the longest NDJSON line the SDK accepts from the controller (a 4 MiB chunk of text, escaped)
MAX_EVENT_LINE = 32 << 20


@dataclass(frozen=True)
class StreamCall:
    """An HTTP request whose answer is NDJSON events, one per line."""

    method: str
    path: str
    json: object = None
    timeout: float | None = None
    """Seconds between two events (``None``: no limit)."""


def op_exec_stream(sandbox_id: str, cmd: str | Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
                   stdin: str | bytes | None, timeout: float | None) -> StreamCall:
    body = {**exec_body(cmd, env, cwd, stdin), "timeout_s": seconds_or_none(timeout), "stream": True}
    return StreamCall("POST", sandbox_path(sandbox_id, "/exec"), body, None if timeout is None else timeout + MARGIN)


def op_run_code_stream(sandbox_id: str, code: str, timeout: float) -> StreamCall:
    check_str(code, "code")
    t = seconds(timeout)
    return StreamCall("POST", sandbox_path(sandbox_id, "/run_code"), {"code": code, "timeout_s": t, "stream": True},
                      t + MARGIN)


def op_start_process(sandbox_id: str, cmd: str | Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
                     stdin: str | bytes | None, timeout: float | None, stdin_open: bool) -> Call[ProcessInfo]:
    body = {**exec_body(cmd, env, cwd, stdin), "timeout_s": seconds_or_none(timeout), "stdin_open": bool(stdin_open)}
    return Call("POST", sandbox_path(sandbox_id, "/processes"), model(ProcessInfo), json=body)


def op_list_processes(sandbox_id: str) -> Call[list[ProcessInfo]]:
    return Call("GET", sandbox_path(sandbox_id, "/processes"), models(ProcessInfo))


def op_process_stream(sandbox_id: str, pid: int) -> StreamCall:
    check_int(pid, "pid", 1)
    return StreamCall("GET", sandbox_path(sandbox_id, f"/processes/{pid}/stream"))


def op_process_stdin(sandbox_id: str, pid: int, data: str | bytes, eof: bool) -> Call[int]:
    check_int(pid, "pid", 1)
    body: dict[str, object] = {"eof": bool(eof)}
    if isinstance(data, bytes | bytearray | memoryview):
        body["data_b64"] = base64.b64encode(bytes(data)).decode()
    else:
        body["data"] = check_str(data, "data")
    return Call("POST", sandbox_path(sandbox_id, f"/processes/{pid}/stdin"),
                lambda r: int(str(obj_of(r)["written"])), json=body)


def op_process_kill(sandbox_id: str, pid: int, signal: str) -> Call[bool]:
    check_int(pid, "pid", 1)
    if signal not in SIGNALS:
        raise ValueError(f"signal: must be one of {', '.join(SIGNALS)}, got {signal!r}")
    return Call("POST", sandbox_path(sandbox_id, f"/processes/{pid}/kill"),
                lambda r: bool(obj_of(r)["signalled"]), json={"signal": signal})


SIGNALS = ("KILL", "TERM", "INT", "HUP")


class OutputCollector:
    """Turns a process's events into callbacks and, at the end, a :class:`CommandResult` (keeping at
    most ``max_output`` characters per stream)."""

    def __init__(self, on_stdout: Callable[[str], object] | None, on_stderr: Callable[[str], object] | None,
                 max_output: int = 1 << 20) -> None:
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self.kept: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.sizes = {"stdout": 0, "stderr": 0}
        self.truncated = {"stdout": False, "stderr": False}
        self.max_output = max_output
        self.pid: int | None = None
        self.result: CommandResult | None = None

    def feed(self, event: Mapping[str, object]) -> None:
        kind = event.get("type")
        if kind == "start" and isinstance(event.get("pid"), int):
            self.pid = int(str(event["pid"]))
        elif kind in ("stdout", "stderr"):
            name, data = str(kind), str(event.get("data", ""))
            cb = self.callbacks[name]
            if cb is not None:
                cb(data)
            room = self.max_output - self.sizes[name]
            if room > 0:
                self.kept[name].append(data[:room])
                self.sizes[name] += min(room, len(data))
            self.truncated[name] = self.truncated[name] or len(data) > room
        elif kind == "exit":
            code = event.get("exit_code")
            duration = event.get("duration_s")
            self.result = CommandResult(
                exit_code=code if isinstance(code, int) else None, stdout="".join(self.kept["stdout"]),
                stderr="".join(self.kept["stderr"]), timed_out=bool(event.get("timed_out")),
                stdout_truncated=self.truncated["stdout"], stderr_truncated=self.truncated["stderr"],
                duration_s=float(duration) if isinstance(duration, int | float) else 0.0)
        elif kind == "error":
            raise stream_failure("the command's output stream", event)

    def finish(self) -> CommandResult:
        if self.result is None:
            raise ForkdAPIError("the command's output stream ended before the command did")
        return self.result


def stream_failure(what: str, event: Mapping[str, object]) -> ForkdAPIError:
    """The exception for an ``error`` event: by its ``status`` when it has one (a timeout is a 504)."""
    status, message = event.get("status"), f"{what} failed: {event.get('error')}"
    if isinstance(status, int) and 400 <= status <= 599:
        return error_for_status(status, message, dict(event))
    return ForkdAPIError(message)


class CodeCollector:
    """Turns a streamed run_code's events into callbacks and, at the end, an :class:`Execution` (its
    output kept whole: the guest cannot write more than the code's timeout allows) or CodeError."""

    def __init__(self, on_stdout: Callable[[str], object] | None, on_stderr: Callable[[str], object] | None
                 ) -> None:
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self.kept: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.result: Mapping[str, object] | None = None

    def feed(self, event: Mapping[str, object]) -> None:
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            name, data = str(kind), str(event.get("data", ""))
            cb = self.callbacks[name]
            if cb is not None:
                cb(data)
            self.kept[name].append(data)
        elif kind == "result":
            self.result = event
        elif kind == "error":
            raise stream_failure("run_code's output stream", event)

    def finish(self) -> Execution:
        if self.result is None:
            raise ForkdAPIError("run_code's output stream ended before the code did")
        out, err = "".join(self.kept["stdout"]), "".join(self.kept["stderr"])
        r = self.result
        if r.get("ok") is False:
            e = r.get("error")
            e = e if isinstance(e, Mapping) else {}
            tb = e.get("traceback")
            raise CodeError(str(e.get("type") or "Error"), str(e.get("message") or ""),
                            tb if isinstance(tb, str) else None, stdout=out, stderr=err)
        return Execution.from_dict({**r, "stdout": out, "stderr": err})


def event_of(line: bytes | str) -> dict[str, object]:
    """One NDJSON line of a stream, as a dict (ForkdAPIError if it is not one)."""
    if len(line) > MAX_EVENT_LINE:
        raise ForkdAPIError(f"an event line longer than {MAX_EVENT_LINE} bytes in the controller's stream")
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ForkdAPIError(f"a line of the controller's stream is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ForkdAPIError("a line of the controller's stream is not a JSON object")
    return obj


# ---------------------------------------------------------------- files


def op_read_file(sandbox_id: str, path: str) -> Call[bytes]:
    return Call("GET", sandbox_path(sandbox_id, "/files"), raw_bytes, params={"path": guest_path(path)})


def op_write_file(sandbox_id: str, path: str, data: bytes | bytearray | memoryview | str, mode: int) -> Call[int]:
    if isinstance(data, str):
        raw = data.encode("utf-8")
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise TypeError(f"data: expected bytes or str, got {type(data).__name__}")
    check_int(mode, "mode", 0, 0o7777)

    def parse(resp: httpx.Response) -> int:
        n = obj_of(resp).get("bytes_written")
        if not isinstance(n, int):
            raise ValueError("no integer 'bytes_written'")
        return n

    return Call("PUT", sandbox_path(sandbox_id, "/files"), parse, params={"path": guest_path(path), "mode": mode},
                content=raw)


def op_list_files(sandbox_id: str, path: str) -> Call[list[FileEntry]]:
    return Call("GET", sandbox_path(sandbox_id, "/files/list"), models(FileEntry, "entries"),
                params={"path": guest_path(path)})


def op_stat(sandbox_id: str, path: str) -> Call[FileEntry]:
    return Call("GET", sandbox_path(sandbox_id, "/files/stat"), model(FileEntry), params={"path": guest_path(path)})


def op_mkdir(sandbox_id: str, path: str) -> Call[None]:
    return Call("POST", sandbox_path(sandbox_id, "/files/mkdir"), nothing,
                json={"path": guest_path(path), "parents": True})


def op_remove(sandbox_id: str, path: str, recursive: bool) -> Call[None]:
    return Call("DELETE", sandbox_path(sandbox_id, "/files"), nothing,
                params={"path": guest_path(path), "recursive": bool(recursive)})


# ---------------------------------------------------------------- nodes: capacity, pull

QUALIFIER = "~"
"""Separates the node from the sandbox id in a qualified id (``NODE~sb-...``): URL-safe, and never in a
plain sandbox id (``^[A-Za-z0-9_-]{1,64}$``) or a node name."""


def qualify(node: str | None, sandbox_id: str) -> str:
    """``NODE~ID`` (``ID`` when there is no node)."""
    return sandbox_id if node is None else f"{node}{QUALIFIER}{sandbox_id}"


NODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
"""A node name as the daemon checks it (``--node-name``)."""


def split_id(value: object) -> tuple[str | None, str]:
    """A qualified id -> (node, sandbox id); a plain id -> (None, id). ValueError names what is wrong:
    a qualified id's node must be a node name and its id a sandbox id (``ID_PATTERN``), so neither part
    can carry a ``/``, ``..`` or an escape into a URL."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"sandbox_id: must be a non-empty string, got {value!r}")
    node, sep, sid = value.rpartition(QUALIFIER)
    if not sep:
        return None, value
    if not node or not sid:
        raise ValueError(f"sandbox_id {value!r}: a qualified id is NODE~ID, with both parts")
    if not re.fullmatch(NODE_PATTERN, node) or not re.fullmatch(ID_PATTERN, sid):
        raise ValueError(f"sandbox_id {value[:200]!r}: a qualified id is NODE~ID, NODE a node name (letters, "
                         "digits, '.', '_', '-') and ID a sandbox id (letters, digits, '_', '-')")
    return node, sid


PROBE_TIMEOUT_S = 15.0
"""Seconds a multi-controller client waits for one controller's ``GET /v1/capacity`` at most (a
controller that hangs is then counted as down instead of holding up the spawn on the others)."""


def op_capacity(timeout: float | None | _UseDefault = DEFAULT) -> Call[CapacityInfo]:
    return Call("GET", "/v1/capacity", model(CapacityInfo), timeout=timeout)


def probe_timeout(default: httpx.Timeout) -> float:
    """The timeout of a capacity probe: the client's own if shorter, else PROBE_TIMEOUT_S."""
    return PROBE_TIMEOUT_S if default.read is None else min(default.read, PROBE_TIMEOUT_S)


def op_pull(url: str, sha256: str | None, tag: str | None, force: bool, token: str | None,
            timeout: float) -> Call[PullResult]:
    check_str(url, "url", empty=False)
    t = seconds(timeout, "timeout", 3600.0)
    body: dict[str, Any] = {"url": url, "force": bool(force), "timeout_s": t}
    if sha256 is not None:
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"sha256: 64 lowercase hex digits, got {sha256!r}")
        body["sha256"] = sha256
    if tag is not None:
        body["tag"] = check_str(tag, "tag", empty=False)
    if token is not None:
        body["token"] = check_str(token, "token", empty=False)
    return Call("POST", "/v1/snapshots/pull", model(PullResult), json=body, timeout=t + MARGIN)


def pack_url(base_url: str, tag: str) -> str:
    """The URL of snapshot ``tag``'s pack on the controller at ``base_url`` (what a peer pulls)."""
    return f"{base_url}/v1/snapshots/{segment(tag, 'tag')}/pack"


# ---------------------------------------------------------------- workspaces


def workspace_path(name: str, rest: str = "") -> str:
    return f"/v1/workspaces/{segment(name, 'name')}{rest}"


def op_create_workspace(name: str, snapshot_tag: str, network: str, memory_limit_mib: int | None,
                        lifetime: float | None, metadata: Mapping[str, str] | None, idle_suspend: float | None,
                        timeout: float) -> Call[WorkspaceInfo]:
    check_str(name, "name", empty=False)
    check_str(snapshot_tag, "snapshot_tag", empty=False)
    if network not in NETWORKS:
        raise ValueError(f"network: must be one of {', '.join(map(repr, NETWORKS))}, got {network!r}")
    body: dict[str, Any] = {"name": name, "snapshot_tag": snapshot_tag, "network": network,
                            "timeout_s": seconds(timeout)}
    if memory_limit_mib is not None:
        body["memory_limit_mib"] = check_int(memory_limit_mib, "memory_limit_mib", 1)
    if lifetime is not None:
        body["lifetime_s"] = seconds(lifetime, "lifetime", MAX_LIFETIME_S)
    if metadata:
        body["metadata"] = labels(metadata)
    if idle_suspend is not None:
        body["idle_suspend_s"] = seconds(idle_suspend, "idle_suspend", MAX_LIFETIME_S)
    return Call("POST", "/v1/workspaces", model(WorkspaceInfo), json=body, timeout=body["timeout_s"] + MARGIN)


def op_list_workspaces() -> Call[list[WorkspaceInfo]]:
    return Call("GET", "/v1/workspaces", models(WorkspaceInfo))


def op_get_workspace(name: str) -> Call[WorkspaceInfo]:
    return Call("GET", workspace_path(name), model(WorkspaceInfo))


def op_suspend_workspace(name: str) -> Call[WorkspaceInfo]:
    return Call("POST", workspace_path(name, "/suspend"), model(WorkspaceInfo), timeout=600.0)


def op_resume_workspace(name: str) -> Call[WorkspaceInfo]:
    return Call("POST", workspace_path(name, "/resume"), model(WorkspaceInfo), timeout=600.0)


def op_delete_workspace(name: str) -> Call[None]:
    return Call("DELETE", workspace_path(name), nothing, timeout=600.0)


# ---------------------------------------------------------------- shared state of the client objects


class BaseController:
    """What the sync and async controllers share: the endpoint, timeouts and response handling."""

    def __init__(self, url: str | None, token: str | None, timeout: float | None, verify: Verify) -> None:
        self._endpoint = resolve(url, token, verify)
        self._timeout = timeout_config(timeout)
        self._node: str | None = None
        """Set by a multi-controller client: the node name its sandboxes' ids are qualified with."""

    @property
    def node(self) -> str | None:
        """The node name this controller's sandbox ids carry (set by a multi-controller client), or None."""
        return self._node

    @property
    def url(self) -> str:
        """The controller URL this client talks to."""
        return self._endpoint.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self._endpoint.url!r})"

    def _pack_source(self, tag: str) -> tuple[str, str | None]:
        """(the URL a peer controller pulls snapshot ``tag``'s pack from, the token it sends there)."""
        if self._endpoint.uds is not None:
            raise ValueError(f"push: {self._endpoint.url} is a Unix socket, which another controller cannot "
                             "reach; use its http(s) address")
        return pack_url(self._endpoint.base_url, tag), self._endpoint.token

    def _timeout_of(self, call: Call[Any]) -> httpx.Timeout:
        if isinstance(call.timeout, _UseDefault):
            return self._timeout
        return timeout_config(call.timeout)

    def _failed(self, exc: httpx.RequestError, call: Call[Any]) -> APIConnectionError:
        return transport_error(exc, call, self._endpoint)

    def _finish(self, call: Call[T], resp: httpx.Response) -> T:
        """Raise the mapped exception for an error status, else parse the response."""
        if resp.status_code >= 400:
            raise error_from_response(resp, self._endpoint.token)
        try:
            return call.parse(resp)
        except (ValueError, TypeError, KeyError) as e:
            raise ForkdAPIError(redact(f"unexpected response to {call.method} {call.path}: {e}",
                                       self._endpoint.token), status=resp.status_code) from None


class BaseSandbox:
    """What the sync and async sandbox objects share: identity and the last known info."""

    def __init__(self, info: SandboxInfo, node: str | None = None) -> None:
        self._info = info
        self._node = node

    @property
    def id(self) -> str:
        """The sandbox id: ``sb-...``, or ``NODE~sb-...`` when it came through a multi-controller client
        (the node that holds it; give it back to that client)."""
        return qualify(self._node, self._info.id)

    @property
    def local_id(self) -> str:
        """The id on its own controller (``sb-...``), what the REST API takes."""
        return self._info.id

    @property
    def node(self) -> str | None:
        """The node (controller) holding it, when it came through a multi-controller client."""
        return self._node

    @property
    def snapshot_tag(self) -> str:
        """The snapshot this sandbox was forked from."""
        return self._info.snapshot_tag

    @property
    def info(self) -> SandboxInfo:
        """The info as of the spawn or the last ``refresh()``."""
        return self._info

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, snapshot_tag={self.snapshot_tag!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BaseSandbox) and type(other) is type(self) and other.id == self.id

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.id))
