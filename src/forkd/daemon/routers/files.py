"""``/v1/sandboxes/{sid}/files``: read (streamed), write, list, stat, mkdir, remove."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from forkd.daemon import models as m
from forkd.daemon.deps import ERRORS, Ctl, GuestPath, SandboxId
from forkd.errors import ForkdError

log = logging.getLogger("forkd.controller")
MAX_UPLOAD = 256 << 20
MAX_DOWNLOAD = 256 << 20
OCTET = "application/octet-stream"

router = APIRouter(prefix="/v1/sandboxes/{sid}/files", tags=["files"], responses=ERRORS)


@router.get("", response_class=Response, responses={413: {"model": m.ErrorBody}})
def read_file(ctl: Ctl, sid: SandboxId, path: GuestPath) -> Response:
    """The file's bytes (application/octet-stream), streamed. 413 for a file larger than 256 MiB, or
    for a device or special file that gives more."""
    chunks = ctl.call(sid, lambda c: c.iter_file(path, MAX_DOWNLOAD))  # 404/413 before the body starts
    if chunks.size is None:  # its length shows only at the end, and a 413 must precede the body
        return Response(ctl.call(sid, lambda _c: b"".join(chunks)), media_type=OCTET)
    return StreamingResponse(_logged(sid, chunks), media_type=OCTET, headers={"Content-Length": str(chunks.size)})


@router.put("", response_model=m.WriteResult)
async def write_file(ctl: Ctl, sid: SandboxId, path: GuestPath, request: Request,
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


@router.get("/list", response_model=m.FileList)
def list_files(ctl: Ctl, sid: SandboxId, path: GuestPath) -> dict[str, Any]:
    return {"entries": ctl.call(sid, lambda c: c.list_dir(path))}


@router.get("/stat", response_model=m.FileEntry)
def stat_file(ctl: Ctl, sid: SandboxId, path: GuestPath) -> dict[str, Any]:
    return ctl.call(sid, lambda c: c.stat(path))


@router.post("/mkdir", status_code=204)
def mkdir(ctl: Ctl, sid: SandboxId, req: m.MkdirRequest) -> Response:
    ctl.call(sid, lambda c: c.mkdir(req.path, parents=req.parents))
    return Response(status_code=204)


@router.delete("", status_code=204)
def remove_file(ctl: Ctl, sid: SandboxId, path: GuestPath, recursive: bool = False) -> Response:
    ctl.call(sid, lambda c: c.remove(path, recursive=recursive))
    return Response(status_code=204)


def _logged(sid: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks of a streamed file; a failure once the body has started can only cut the connection."""
    try:
        yield from chunks
    except ForkdError as e:
        log.warning("sandbox %s: reading a file failed after its first chunk: %s", sid, e)
        raise
