"""The REST API v1 (FastAPI). Handlers validate at the edge and call the Controller."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from forkd import __version__
from forkd.daemon import models as m
from forkd.daemon.metrics import Metrics
from forkd.daemon.service import Busy, Conflict, Controller, NotFound
from forkd.errors import (
    AgentError,
    AgentTimeoutError,
    BusyError,
    DependentsError,
    FileTooLargeError,
    ForkdError,
    ImageNotFoundError,
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    ValidationError,
)

log = logging.getLogger("forkd.controller")
MAX_UPLOAD = 256 << 20
MAX_DOWNLOAD = 256 << 20
OCTET = "application/octet-stream"

Tag = Annotated[str, Path(pattern=m.TAG_PATTERN, description="Snapshot tag.")]
SandboxId = Annotated[str, Path(pattern=m.ID_PATTERN, description="Sandbox id.")]
GuestPath = Annotated[str, Query(min_length=1, max_length=4096, description="Absolute path in the guest.")]
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": m.ErrorBody} for s in (400, 401, 404, 409, 422, 500, 503)}


def status_for(exc: Exception) -> int:
    if isinstance(exc, Busy):
        return 503
    if isinstance(exc, (NotFound, SnapshotNotFoundError, ImageNotFoundError)):
        return 404
    if isinstance(exc, (Conflict, SnapshotExistsError, SnapshotInvalidError, DependentsError, BusyError)):
        return 409
    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, FileTooLargeError):
        return 413
    if isinstance(exc, AgentTimeoutError):
        return 504
    if isinstance(exc, AgentError):
        return {"FileNotFoundError": 404, "FileExistsError": 409}.get(exc.type, 400)
    return 500


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc if x not in ("body",)) or "body"


def create_app(ctl: Controller, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="forkd-controller", version=__version__,
                  description="Fork warmed microVMs copy-on-write. Errors are {\"error\": \"...\"}.",
                  docs_url=None, redoc_url=None)
    eng = ctl.engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = [f"{_field(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:5]]
        return JSONResponse({"error": "; ".join(msgs)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(ForkdError)
    async def _forkd(_: Request, exc: ForkdError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.warning("request failed: %s", exc)
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    # -- service
    @app.get("/healthz", response_model=m.Health, tags=["service"])
    def healthz() -> dict[str, bool]:
        """Liveness; never needs the token."""
        return {"ok": True}

    @app.get("/version", response_model=m.Version, responses=ERRORS, tags=["service"])
    def version() -> dict[str, str]:
        return {"version": __version__, "api": "v1", "accelerator": eng.accel.name,
                "accelerator_reason": eng.accel.reason, "qemu_version": eng.qemu.version}

    @app.get("/metrics", tags=["service"], response_class=Response, responses=ERRORS)
    def metrics_() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- snapshots
    @app.get("/v1/snapshots", response_model=list[m.SnapshotInfo], responses=ERRORS, tags=["snapshots"])
    def list_snapshots() -> list[dict[str, Any]]:
        return ctl.list_snapshots()

    @app.post("/v1/snapshots", status_code=201, response_model=m.SnapshotInfo, responses=ERRORS,
              tags=["snapshots"])
    def create_snapshot(req: m.CreateSnapshotRequest) -> dict[str, Any]:
        """Boot a parent from the guest image, warm it and save it (takes seconds)."""
        return ctl.create_snapshot(req.tag, req.memory_mib, req.vcpus, req.warm_code, req.boot_timeout_s, req.image)

    @app.get("/v1/snapshots/{tag}/info", response_model=m.SnapshotInfo, responses=ERRORS, tags=["snapshots"])
    def snapshot_info(tag: Tag) -> dict[str, Any]:
        return ctl.snapshot_info(tag)

    @app.get("/v1/snapshots/pending", response_model=list[m.PendingSnapshot], responses=ERRORS,
             tags=["snapshots"])
    def pending_snapshots() -> list[dict[str, Any]]:
        """Branch snapshots being written (``wait: false``) or that failed."""
        return ctl.pending_snapshots()

    @app.delete("/v1/snapshots/{tag}", status_code=204, responses=ERRORS, tags=["snapshots"])
    def delete_snapshot(tag: Tag, force: bool = False, cascade: bool = False) -> Response:
        """409 while live sandboxes use it or other snapshots depend on it (named in the error), unless
        ``cascade`` (delete the whole subtree) or ``force`` (orphan them); both together is 400."""
        if force and cascade:
            raise ValidationError("cascade and force cannot be used together")
        ctl.delete_snapshot(tag, force=force, cascade=cascade)
        return Response(status_code=204)

    @app.post("/v1/snapshots/{tag}/compact", status_code=201, response_model=m.SnapshotInfo, responses=ERRORS,
              tags=["snapshots"])
    def compact(tag: Tag, req: m.CompactRequest) -> dict[str, Any]:
        """Write ``to``: a flat, parentless copy (its own memory.bin), through a staging directory."""
        return ctl.compact(tag, req.to)

    # -- sandboxes
    @app.post("/v1/sandboxes", status_code=201, response_model=list[m.SpawnEntry], responses=ERRORS,
              tags=["sandboxes"])
    def create_sandboxes(req: m.CreateSandboxesRequest) -> list[dict[str, Any]]:
        """Fork ``n`` children; each entry is a sandbox or the error that stopped that child."""
        for port in req.expose:
            if not 1 <= port <= 65535:
                raise ValidationError(f"expose: ports must be in 1..65535; got {port}")
        return ctl.spawn(req.snapshot_tag, req.n, req.network, req.memory_limit_mib, req.per_child_netns,
                         req.timeout_s, tuple(req.expose))

    @app.get("/v1/sandboxes", response_model=list[m.SandboxInfo], responses=ERRORS, tags=["sandboxes"])
    def list_sandboxes() -> list[dict[str, Any]]:
        return ctl.list_sandboxes()

    @app.get("/v1/sandboxes/{sid}", response_model=m.SandboxInfo, responses=ERRORS, tags=["sandboxes"])
    def get_sandbox(sid: SandboxId) -> dict[str, Any]:
        return ctl.get(sid).info()

    @app.delete("/v1/sandboxes/{sid}", status_code=204, responses=ERRORS, tags=["sandboxes"])
    def delete_sandbox(sid: SandboxId) -> Response:
        """Kill the VM and remove its work dir."""
        ctl.delete(sid)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sid}/branch", status_code=201, response_model=m.BranchResponse,
              responses={**ERRORS, 202: {"model": m.BranchResponse}}, tags=["sandboxes"])
    def branch(sid: SandboxId, response: Response,
               req: Annotated[m.BranchRequest | None, Body()] = None) -> dict[str, Any]:
        """Snapshot the running sandbox (it keeps running); the answer reports the pause in ms, the mode
        chosen and the bytes written. 409 if the tag exists, 503 past --branch-concurrency."""
        req = req or m.BranchRequest.model_validate({})
        out, finished = ctl.branch(sid, req.tag, req.mode, req.wait)
        if not finished:
            response.status_code = 202
        return out

    @app.post("/v1/sandboxes/{sid}/ping", response_model=m.PingResponse, responses=ERRORS, tags=["sandboxes"])
    def ping(sid: SandboxId) -> dict[str, Any]:
        return ctl.call(sid, lambda c: c.ping())

    @app.post("/v1/sandboxes/{sid}/eval", response_model=m.EvalResponse, responses=ERRORS, tags=["sandboxes"])
    def eval_(sid: SandboxId, req: m.EvalRequest) -> dict[str, Any]:
        """Evaluate an expression; an exception in it is ``ok: false`` with its traceback (status 200)."""
        return _code(lambda: ctl.call(sid, lambda c: c.eval(req.expr, timeout=req.timeout_s)))

    @app.post("/v1/sandboxes/{sid}/run_code", response_model=m.RunCodeResponse, responses=ERRORS,
              tags=["sandboxes"])
    def run_code(sid: SandboxId, req: m.RunCodeRequest) -> dict[str, Any]:
        """Run statements with state kept between calls; stdout, stderr and the last expression's value."""
        return _code(lambda: ctl.call(sid, lambda c: c.run_code(req.code, timeout=req.timeout_s)))

    @app.post("/v1/sandboxes/{sid}/exec", response_model=m.ExecResponse, responses=ERRORS, tags=["sandboxes"])
    def exec_(sid: SandboxId, req: m.ExecRequest) -> dict[str, Any]:
        """Run a program (no shell). A program or cwd that does not exist is a 400, not a 404."""
        try:
            r = ctl.call(sid, lambda c: c.exec(req.argv, env=req.env, cwd=req.cwd, stdin=req.stdin,
                                               timeout=req.timeout_s, max_output=req.max_output))
        except AgentError as e:
            raise ValidationError(f"exec {req.argv[0]!r}: {e.type}: {e.message}") from e
        return r.__dict__

    # -- files
    @app.get("/v1/sandboxes/{sid}/files", response_class=Response,
             responses={**ERRORS, 413: {"model": m.ErrorBody}}, tags=["files"])
    def read_file(sid: SandboxId, path: GuestPath) -> Response:
        """The file's bytes (application/octet-stream), streamed. 413 for a file larger than 256 MiB, or
        for a device or special file that gives more."""
        chunks = ctl.call(sid, lambda c: c.iter_file(path, MAX_DOWNLOAD))  # 404/413 before the body starts
        if chunks.size is None:  # its length shows only at the end, and a 413 must precede the body
            return Response(ctl.call(sid, lambda _c: b"".join(chunks)), media_type=OCTET)
        return StreamingResponse(_logged(sid, chunks), media_type=OCTET,
                                 headers={"Content-Length": str(chunks.size)})

    @app.put("/v1/sandboxes/{sid}/files", response_model=m.WriteResult, responses=ERRORS, tags=["files"])
    async def write_file(sid: SandboxId, path: GuestPath, request: Request,
                         mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644) -> dict[str, int]:
        """Write the request body to ``path`` (replaced atomically)."""
        await run_in_threadpool(ctl.running, sid)  # 404/409 before reading a large body
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD:
                return JSONResponse({"error": f"body larger than {MAX_UPLOAD} bytes"}, status_code=413)  # type: ignore[return-value]
        n = await run_in_threadpool(ctl.call, sid, lambda c: c.write_file(path, bytes(body), mode=mode))
        return {"bytes_written": n}

    @app.get("/v1/sandboxes/{sid}/files/list", response_model=m.FileList, responses=ERRORS, tags=["files"])
    def list_files(sid: SandboxId, path: GuestPath) -> dict[str, Any]:
        return {"entries": ctl.call(sid, lambda c: c.list_dir(path))}

    @app.get("/v1/sandboxes/{sid}/files/stat", response_model=m.FileEntry, responses=ERRORS, tags=["files"])
    def stat_file(sid: SandboxId, path: GuestPath) -> dict[str, Any]:
        return ctl.call(sid, lambda c: c.stat(path))

    @app.post("/v1/sandboxes/{sid}/files/mkdir", status_code=204, responses=ERRORS, tags=["files"])
    def mkdir(sid: SandboxId, req: m.MkdirRequest) -> Response:
        ctl.call(sid, lambda c: c.mkdir(req.path, parents=req.parents))
        return Response(status_code=204)

    @app.delete("/v1/sandboxes/{sid}/files", status_code=204, responses=ERRORS, tags=["files"])
    def remove_file(sid: SandboxId, path: GuestPath, recursive: bool = False) -> Response:
        ctl.call(sid, lambda c: c.remove(path, recursive=recursive))
        return Response(status_code=204)

    metrics.set_routes(path for r in app.routes if isinstance(path := getattr(r, "path", None), str))
    return app


def _logged(sid: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks of a streamed file; a failure once the body has started can only cut the connection."""
    try:
        yield from chunks
    except ForkdError as e:
        log.warning("sandbox %s: reading a file failed after its first chunk: %s", sid, e)
        raise


def _code(fn: Any) -> dict[str, Any]:
    """An exception raised by the user's code is a result (``ok: false``), not an HTTP error."""
    try:
        r = fn()
    except AgentError as e:
        if e.type in ("BadRequest", "UnknownOp"):
            raise
        return {"ok": False, "error": {"type": e.type, "message": e.message, "traceback": e.traceback},
                "stdout": e.details.get("stdout", ""), "stderr": e.details.get("stderr", "")}
    return {"ok": True, **r}
