"""envd, E2B's in-sandbox daemon, served from the host over the Controller: ``GET /health``,
``GET``/``POST /files`` and the Connect services ``process.Process`` and ``filesystem.Filesystem``
(JSON codec). Commands arrive as ``/bin/bash -l -c CMD``; a guest without bash runs ``/bin/sh -c CMD``."""

from __future__ import annotations

import base64
import binascii
import email.message
import posixpath
import stat as stat_mod
import time
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from forkd.e2b import connect as cx
from forkd.e2b.common import E2BState, read_body, state, stream_slot
from forkd.e2b.errors import E2BError, connect_error
from forkd.errors import AgentError
from forkd.limits import MAX_PATH

MAX_UPLOAD = 256 << 20
MAX_DOWNLOAD = 256 << 20
MAX_RPC_BODY = 8 << 20          # a Connect request (SendInput carries stdin)
MAX_FILES = 1000                # parts of one multipart upload
MAX_LIST_ENTRIES = 10_000
MAX_DEPTH = 16
#: relative paths are resolved against this (E2B's is the user's home; the forkd guest's user is root)
HOME = "/"
SIGNALS = {"SIGNAL_SIGKILL": "KILL", "SIGNAL_SIGTERM": "TERM", 9: "KILL", 15: "TERM"}
FILE_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}


def sid_of(request: Request) -> str:
    sid: str = request.scope["forkd.sid"]
    return sid


def guest_path(p: object, what: str = "path") -> str:
    if not isinstance(p, str) or not p:
        raise cx.ConnectError("invalid_argument", f"{what}: required, a string")
    if len(p) > MAX_PATH or "\0" in p:
        raise cx.ConnectError("invalid_argument", f"{what}: at most {MAX_PATH} characters, no NUL")
    if p.startswith("~/") or p == "~":
        p = p[1:].lstrip("/") or "."
    return posixpath.normpath(posixpath.join(HOME, p))


# ------------------------------------------------------------------ HTTP: health, files
async def health(request: Request) -> Response:
    st = state(request)
    await run_in_threadpool(st.ctl.running, sid_of(request))
    return Response(status_code=204)


def _http_error(e: Exception) -> Response:
    ce = connect_error(e)
    status = {"not_found": 404, "invalid_argument": 400, "unauthenticated": 401, "resource_exhausted": 507,
              "already_exists": 409, "unavailable": 502}.get(ce.code, 500)
    if isinstance(e, E2BError):
        status = e.status
    return JSONResponse({"code": status, "message": ce.message}, status_code=status)


async def read_file(request: Request) -> Response:
    st = state(request)
    sid = sid_of(request)
    try:
        path = guest_path(request.query_params.get("path"))
        chunks = await run_in_threadpool(st.ctl.call, sid, lambda c: c.iter_file(path, MAX_DOWNLOAD))
        data = await run_in_threadpool(lambda: b"".join(chunks))
    except Exception as e:  # noqa: BLE001 - answered in envd's shape
        return _http_error(e)
    return Response(data, media_type="application/octet-stream")


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str | None, bytes]]:
    """The ``file`` parts of a multipart/form-data body: (filename, bytes) each."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise E2BError(400, "multipart body without a boundary")
    delim = b"\r\n--" + boundary.encode()
    segments = (b"\r\n" + body).split(delim)
    if len(segments) < 3 or segments[0] != b"":
        raise E2BError(400, "malformed multipart body")
    out: list[tuple[str | None, bytes]] = []
    for seg in segments[1:]:
        if seg.startswith(b"--"):
            return out
        if not seg.startswith(b"\r\n"):
            raise E2BError(400, "malformed multipart part")
        head, sep, data = seg[2:].partition(b"\r\n\r\n")
        if not sep:
            raise E2BError(400, "multipart part without headers")
        part = email.message.Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-disposition":
                part["content-disposition"] = v.strip()
        name = part.get_param("name", header="content-disposition")
        filename = part.get_param("filename", header="content-disposition")
        if name == "file":
            out.append((filename if isinstance(filename, str) else None, data))
        if len(out) > MAX_FILES:
            raise E2BError(400, f"more than {MAX_FILES} files in one upload")
    raise E2BError(400, "multipart body without its closing boundary")


def _gunzip(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise E2BError(400, f"the gzip body is corrupt: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise E2BError(413, f"the uncompressed body is larger than {limit} bytes")
    if not d.eof or d.unused_data:
        raise E2BError(400, "the gzip body is truncated, or has data after its end")
    return out


async def write_files(request: Request) -> Response:
    st = state(request)
    sid = sid_of(request)
    try:
        await run_in_threadpool(st.ctl.running, sid)  # 502 before a large body is read
        body = await read_body(request, MAX_UPLOAD)
        ctype = request.headers.get("content-type", "")
        query_path = request.query_params.get("path")
        if ctype.startswith("multipart/form-data"):
            parts = await run_in_threadpool(parse_multipart, body, ctype)
            files = [(guest_path(query_path or name or "", "path"), data) for name, data in parts]
            if query_path and len(files) > 1:
                raise E2BError(400, "path= names one file, and the upload has several")
        else:
            if request.headers.get("content-encoding", "identity") == "gzip":
                body = await run_in_threadpool(_gunzip, body, MAX_UPLOAD)
            elif request.headers.get("content-encoding", "identity") != "identity":
                raise E2BError(400, "Content-Encoding: only gzip or identity")
            files = [(guest_path(query_path), body)]
        if not files:
            raise E2BError(400, "the upload has no file part")
        for path, data in files:
            await run_in_threadpool(st.ctl.call, sid, lambda c, p=path, d=data: c.write_file(p, d))
    except Exception as e:  # noqa: BLE001 - answered in envd's shape
        return _http_error(e)
    return JSONResponse([{"name": posixpath.basename(p), "type": "file", "path": p} for p, _ in files])


# ------------------------------------------------------------------ Connect: process.Process
def _command(st: E2BState, sid: str, proc: object) -> tuple[list[str], dict[str, str], str | None]:
    if not isinstance(proc, dict) or not isinstance(proc.get("cmd"), str) or not proc["cmd"]:
        raise cx.ConnectError("invalid_argument", "process.cmd: required, a string")
    args = proc.get("args") or []
    envs = proc.get("envs") or {}
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or len(args) > 4096:
        raise cx.ConnectError("invalid_argument", "process.args: a list of at most 4096 strings")
    if not isinstance(envs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in envs.items()):
        raise cx.ConnectError("invalid_argument", "process.envs: an object of strings")
    cwd = proc.get("cwd")
    cwd = guest_path(cwd, "process.cwd") if cwd else None
    argv = [proc["cmd"], *args]
    if argv[0] in ("/bin/bash", "bash"):
        tag = st.ctl.get(sid).child.snapshot
        if not st.has_bash(sid, tag):
            argv = shell_fallback(args)
    return argv, {**st.extra(sid).envs, **envs}, cwd


def shell_fallback(args: list[str]) -> list[str]:
    """``bash [-l] -c CMD ...`` as ``/bin/sh -c CMD ...`` (busybox sh; no login profile is read)."""
    if "-c" in args:
        return ["/bin/sh", "-c", *args[args.index("-c") + 1:]]
    return ["/bin/sh", *(a for a in args if a != "-l")]


def _event(kind: str, value: dict[str, Any]) -> bytes:
    return cx.envelope({"event": {kind: value}})


def process_events(st: E2BState, sid: str, pid: int) -> Iterator[bytes]:
    """The Connect stream of process ``pid``: start, data..., end, then the end of stream. A read that
    brings nothing (it waits up to 10 s) sends a keepalive."""
    yield _event("start", {"pid": pid})
    try:
        while True:
            chunk = st.ctl.call(sid, lambda c: c.read_process(pid, wait=10.0))
            for name, data in (("stdout", chunk.stdout), ("stderr", chunk.stderr)):
                if data:
                    yield _event("data", {name: base64.b64encode(data).decode()})
            if chunk.exited:
                if chunk.timed_out:
                    yield cx.end_stream(cx.ConnectError("deadline_exceeded", "the command's timeout ran out: killed"))
                    return
                code = chunk.exit_code if chunk.exit_code is not None else -1
                status = f"exit status {code}" if code >= 0 else f"signal: {-code}"
                yield _event("end", {"exitCode": code, "exited": True, "status": status})
                yield cx.end_stream()
                return
            if not (chunk.stdout or chunk.stderr):
                yield _event("keepalive", {})
    except Exception as e:  # noqa: BLE001 - the status is sent: the trailer says what happened
        yield cx.end_stream(connect_error(e))


def _stream(events: Iterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type=cx.STREAM_CONTENT_TYPE, headers={"Cache-Control": "no-store"})


def _timeout_s(request: Request) -> float | None:
    raw = request.headers.get("connect-timeout-ms")
    if raw is None or not raw.isdigit() or len(raw) > 12 or int(raw) == 0:
        return None
    return min(int(raw) / 1000.0, 86400.0)


def _pid(msg: dict[str, Any]) -> int:
    sel = msg.get("process")
    pid = sel.get("pid") if isinstance(sel, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or not 1 <= pid <= 1 << 22:
        if isinstance(sel, dict) and "tag" in sel:
            raise cx.ConnectError("unimplemented", "selecting a process by tag is not supported by forkd")
        raise cx.ConnectError("invalid_argument", "process.pid: required, a positive integer")
    return pid


def _start_sync(st: E2BState, sid: str, msg: dict[str, Any], timeout: float | None) -> int:
    if msg.get("pty"):
        raise cx.ConnectError("unimplemented", "PTYs are not supported by forkd")
    argv, envs, cwd = _command(st, sid, msg.get("process"))
    stdin = msg.get("stdin", True) is not False
    try:
        info = st.ctl.call(sid, lambda c: c.start_process(argv, env=envs or None, cwd=cwd, stdin_open=stdin,
                                                          timeout=timeout))
    except AgentError as e:
        raise cx.ConnectError("invalid_argument", f"{argv[0]!r}: {e.type}: {e.message}") from e
    return int(info["pid"])


def _exists_sync(st: E2BState, sid: str, pid: int) -> None:
    if not any(p["pid"] == pid for p in st.ctl.call(sid, lambda c: c.list_processes())):
        raise cx.ConnectError("not_found", f"process with pid {pid} not found")


async def _rpc_message(request: Request, streaming: bool) -> dict[str, Any]:
    body = await read_body(request, MAX_RPC_BODY)
    if streaming:
        msgs = cx.parse_envelopes(body, max_messages=1)
        return msgs[0] if msgs else {}
    return cx.parse_json(body)


async def process_rpc(request: Request) -> Response:
    st = state(request)
    sid = sid_of(request)
    method = request.path_params["method"]
    streaming = method in ("Start", "Connect")
    try:
        msg = await _rpc_message(request, streaming)
        if method in ("Start", "Connect"):
            slot = stream_slot()  # before a process is started that could not be streamed
            try:
                if method == "Start":
                    pid = await run_in_threadpool(_start_sync, st, sid, msg, _timeout_s(request))
                else:
                    pid = _pid(msg)
                    await run_in_threadpool(_exists_sync, st, sid, pid)
            except BaseException:
                slot.release()
                raise
            return _stream(slot.guard(process_events(st, sid, pid)))
        return cx.unary(await run_in_threadpool(_process_unary, st, sid, method, msg))
    except Exception as e:  # noqa: BLE001 - answered in Connect's shape
        err = connect_error(e)
        return cx.stream_error(err) if streaming else cx.unary_error(err)


def _process_unary(st: E2BState, sid: str, method: str, msg: dict[str, Any]) -> dict[str, Any]:
    call: Callable[[Callable[[Any], Any]], Any] = lambda fn: st.ctl.call(sid, fn)  # noqa: E731
    if method == "List":
        procs = [p for p in call(lambda c: c.list_processes()) if p["running"]]
        return {"processes": [{"pid": p["pid"], "config": {"cmd": p["argv"][0] if p["argv"] else "",
                                                           "args": p["argv"][1:], "envs": {}}} for p in procs]}
    if method == "SendSignal":
        pid = _pid(msg)
        sig = SIGNALS.get(msg.get("signal"))
        if sig is None:
            raise cx.ConnectError("invalid_argument", "signal: SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        if not call(lambda c: c.kill_process(pid, sig)):
            raise cx.ConnectError("not_found", f"process with pid {pid} not found (it has ended)")
        return {}
    if method == "SendInput":
        pid = _pid(msg)
        inp = msg.get("input")
        raw = inp.get("stdin") if isinstance(inp, dict) else None
        if not isinstance(raw, str):
            raise cx.ConnectError("invalid_argument", "input.stdin: required, base64 bytes "
                                  "(PTY input is not supported)")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise cx.ConnectError("invalid_argument", "input.stdin: not base64") from None
        call(lambda c: c.write_process(pid, data))
        return {}
    if method == "CloseStdin":
        pid = _pid(msg)
        call(lambda c: c.write_process(pid, b"", eof=True))
        return {}
    raise cx.ConnectError("unimplemented", f"process.Process/{method} is not supported by forkd")


# ------------------------------------------------------------------ Connect: filesystem.Filesystem
def entry_info(e: dict[str, Any]) -> dict[str, Any]:
    kind = str(e.get("type"))
    mode = int(e.get("mode") or 0)
    type_bits = {"dir": stat_mod.S_IFDIR, "symlink": stat_mod.S_IFLNK}.get(kind, stat_mod.S_IFREG)
    mtime = float(e.get("mtime") or 0)
    return {"name": str(e.get("name", "")), "type": FILE_TYPES.get(kind, "FILE_TYPE_UNSPECIFIED"),
            "path": str(e.get("path", "")), "size": str(int(e.get("size") or 0)), "mode": mode,
            "permissions": stat_mod.filemode(type_bits | mode), "owner": "root", "group": "root",
            "modifiedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))}


def _not_found(fn: Callable[[], Any], path: str) -> Any:
    try:
        return fn()
    except AgentError as e:
        if e.type == "FileNotFoundError":
            raise cx.ConnectError("not_found", f"path {path!r} does not exist") from None
        if e.type in ("NotADirectoryError", "IsADirectoryError", "PermissionError", "OSError", "FileExistsError"):
            raise cx.ConnectError("invalid_argument", f"{path!r}: {e.type}: {e.message}") from None
        raise


def _list(st: E2BState, sid: str, path: str, depth: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    todo = [(path, 1)]
    while todo:
        d, level = todo.pop(0)
        entries: list[dict[str, Any]] = _not_found(partial(st.ctl.call, sid, lambda c, d=d: c.list_dir(d)), d)
        for e in entries:
            out.append(entry_info(e))
            if len(out) > MAX_LIST_ENTRIES:
                raise cx.ConnectError("resource_exhausted", f"more than {MAX_LIST_ENTRIES} entries")
            if e.get("type") == "dir" and level < depth:
                todo.append((str(e["path"]), level + 1))
    return out


def _fs_unary(st: E2BState, sid: str, method: str, msg: dict[str, Any]) -> dict[str, Any]:
    def stat(p: str) -> dict[str, Any]:
        return entry_info(_not_found(lambda: st.ctl.call(sid, lambda c: c.stat(p)), p))

    if method == "Stat":
        return {"entry": stat(guest_path(msg.get("path")))}
    if method == "ListDir":
        depth = msg.get("depth") or 1
        if not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
            raise cx.ConnectError("invalid_argument", f"depth: 1..{MAX_DEPTH}")
        path = guest_path(msg.get("path"))
        return {"entries": _list(st, sid, path, depth)}
    if method == "MakeDir":
        path = guest_path(msg.get("path"))
        try:
            stat(path)
        except cx.ConnectError as e:
            if e.code != "not_found":
                raise
        else:
            raise cx.ConnectError("already_exists", f"directory {path!r} already exists")
        _not_found(lambda: st.ctl.call(sid, lambda c: c.mkdir(path, parents=True)), path)
        return {"entry": stat(path)}
    if method == "Remove":
        path = guest_path(msg.get("path"))
        _not_found(lambda: st.ctl.call(sid, lambda c: c.remove(path, recursive=True)), path)
        return {}
    if method == "Move":
        src, dst = guest_path(msg.get("source"), "source"), guest_path(msg.get("destination"), "destination")
        stat(src)
        r = st.ctl.call(sid, lambda c: c.exec(["mv", "-f", "--", src, dst], timeout=60))
        if r.exit_code != 0:
            raise cx.ConnectError("invalid_argument", f"move {src!r} -> {dst!r}: {r.stderr.strip()[:500]}")
        return {"entry": stat(dst)}
    raise cx.ConnectError("unimplemented", f"filesystem.Filesystem/{method} is not supported by forkd")


async def filesystem_rpc(request: Request) -> Response:
    st = state(request)
    sid = sid_of(request)
    method = request.path_params["method"]
    if method == "WatchDir":
        return cx.stream_error(cx.ConnectError("unimplemented", "watching directories is not supported by forkd"))
    try:
        msg = await _rpc_message(request, streaming=False)
        return cx.unary(await run_in_threadpool(_fs_unary, st, sid, method, msg))
    except Exception as e:  # noqa: BLE001 - answered in Connect's shape
        return cx.unary_error(connect_error(e))


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/files", read_file, methods=["GET"]),
    Route("/files", write_files, methods=["POST"]),
    Route("/process.Process/{method}", process_rpc, methods=["POST"]),
    Route("/filesystem.Filesystem/{method}", filesystem_rpc, methods=["POST"]),
]

