"""``/v1/snapshots``: create (boot + warm + save), list, info, pending branches, delete, compact."""

from __future__ import annotations

import logging
import os
import shutil
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from forkd.daemon import models as m
from forkd.daemon.deps import ERRORS, Ctl, Tag
from forkd.daemon.service import Controller
from forkd.errors import ValidationError

log = logging.getLogger("forkd.controller")
ZSTD = "application/zstd"
#: bytes of free disk an upload leaves (unpacking needs room of its own, checked by the unpack)
UPLOAD_RESERVE = 1 << 30
BINARY = {"schema": {"type": "string", "format": "binary"}}
CHUNK = 1 << 20

router = APIRouter(prefix="/v1/snapshots", tags=["snapshots"], responses=ERRORS)


@router.get("", response_model=list[m.SnapshotInfo])
def list_snapshots(ctl: Ctl) -> list[dict[str, Any]]:
    return ctl.list_snapshots()


@router.post("", status_code=201, response_model=m.SnapshotInfo)
def create_snapshot(ctl: Ctl, req: m.CreateSnapshotRequest) -> dict[str, Any]:
    """Boot a parent from the guest image, warm it and save it (takes seconds)."""
    return ctl.create_snapshot(req.tag, req.memory_mib, req.vcpus, req.warm_code, req.boot_timeout_s, req.image)


@router.get("/{tag}/info", response_model=m.SnapshotInfo)
def snapshot_info(ctl: Ctl, tag: Tag) -> dict[str, Any]:
    return ctl.snapshot_info(tag)


@router.get("/{tag}/pack", response_class=StreamingResponse,
            responses={200: {"content": {ZSTD: BINARY}, "description": "The pack (.tar.zst)."}})
def pack_snapshot(ctl: Ctl, tag: Tag, level: Annotated[int, Query(ge=1, le=22, description="zstd level.")] = 3
                  ) -> StreamingResponse:
    """The snapshot and the chain it depends on as one portable .tar.zst (what ``forkd pack`` writes),
    made first in the store's scratch area, then sent, then removed; ``X-Forkd-Chain`` names the chain,
    root first. 503 when two packs or unpacks are already in flight."""
    path, res = ctl.pack(tag, level)
    body = _send_then_remove(ctl, path)
    weakref.finalize(body, ctl.done_with, path)  # a body never iterated (the client left first) still frees it
    headers = {"X-Forkd-Chain": ",".join(res["chain"]), "Content-Length": str(path.stat().st_size),
               "Content-Disposition": f'attachment; filename="{tag}.tar.zst"'}
    return StreamingResponse(body, media_type=ZSTD, headers=headers)


async def _send_then_remove(ctl: Controller, path: Path) -> AsyncIterator[bytes]:
    try:
        with open(path, "rb") as f:
            while chunk := await run_in_threadpool(f.read, CHUNK):
                yield chunk
    finally:  # sent, failed or the client went away: the file goes, the slot is free
        ctl.done_with(path)


@router.post("/unpack", status_code=201, response_model=m.UnpackResponse,
             responses={413: {"model": m.ErrorBody}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": BINARY}}})
async def unpack_snapshot(ctl: Ctl, request: Request, tag: Annotated[str | None, Query(
        pattern=m.TAG_PATTERN, description="Register under this tag (a pack of one snapshot only).")] = None,
                          force: bool = False) -> Any:
    """Verify a pack (the body: a .tar.zst of ``forkd pack``) and register its snapshots, as ``forkd
    unpack`` does: every link checked before any is registered; a link here with the same files is
    reused, one with other content is a 409 unless ``force``. A corrupt or unsafe pack is a 400 and
    registers nothing. The body may use the disk's free space less 1 GiB (413 beyond); 503 when two
    packs or unpacks are already in flight (checked before the body is read)."""
    area = await run_in_threadpool(ctl.upload_area)
    path = area / "upload.tar.zst"
    try:
        limit = max(0, shutil.disk_usage(area).free - UPLOAD_RESERVE)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _too_large(limit)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            got = 0
            async for chunk in request.stream():
                got += len(chunk)
                if got > limit:
                    return _too_large(limit)
                await run_in_threadpool(f.write, chunk)
        if got == 0:
            raise ValidationError("body: empty; send the pack's bytes (application/octet-stream)")
        return await run_in_threadpool(ctl.unpack, path, tag, force)
    finally:
        await run_in_threadpool(ctl.done_with, path)


@router.post("/pull", status_code=201, response_model=m.PullResponse,
             responses={413: {"model": m.ErrorBody}, 502: {"model": m.ErrorBody}})
def pull_snapshot(ctl: Ctl, req: m.PullRequest) -> dict[str, Any]:
    """Fetch a pack from ``url`` (another controller's ``/v1/snapshots/{tag}/pack``, or any http(s) URL),
    check its ``sha256`` if given, then verify and register it as ``/unpack`` does (``forkd pull``,
    ``forkd push``). ``token`` goes to the URL's own origin only. The pack may use the disk's free space
    less 1 GiB (413 beyond); a source that fails or is too slow is a 502; 503 when two packs or unpacks
    are already in flight. See pull.py for the rules a URL and its redirects follow."""
    from forkd.daemon.pull import check_url, display, fetch

    check_url(req.url)
    area = ctl.upload_area()
    path = area / "pull.tar.zst"
    try:
        limit = max(0, shutil.disk_usage(area).free - UPLOAD_RESERVE)
        got = fetch(req.url, path, limit=limit, deadline_s=req.timeout_s, token=req.token)
        if req.sha256 is not None and got.sha256 != req.sha256:
            raise ValidationError(f"sha256: the pack fetched from {got.source} has sha256 {got.sha256}, not "
                                  f"{req.sha256}; nothing was registered")
        res = ctl.unpack(path, req.tag, req.force)
        log.info("pulled %s (%d bytes, sha256 %s): %s", display(req.url), got.bytes, got.sha256, res["tags"])
        return {**res, "source": got.source, "bytes": got.bytes, "sha256": got.sha256}
    finally:
        ctl.done_with(path)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"body: the pack is larger than the {limit} bytes this disk can take now "
                                  "(its free space less 1 GiB)"}, status_code=413)


@router.get("/pending", response_model=list[m.PendingSnapshot])
def pending_snapshots(ctl: Ctl) -> list[dict[str, Any]]:
    """Branch snapshots being written (``wait: false``) or that failed."""
    return ctl.pending_snapshots()


@router.delete("/{tag}", status_code=204)
def delete_snapshot(ctl: Ctl, tag: Tag, force: bool = False, cascade: bool = False) -> Response:
    """409 while live sandboxes use it or other snapshots depend on it (named in the error), unless
    ``cascade`` (delete the whole subtree) or ``force`` (orphan them); both together is 400."""
    if force and cascade:
        raise ValidationError("cascade and force cannot be used together")
    ctl.delete_snapshot(tag, force=force, cascade=cascade)
    return Response(status_code=204)


@router.post("/{tag}/compact", status_code=201, response_model=m.SnapshotInfo)
def compact(ctl: Ctl, tag: Tag, req: m.CompactRequest) -> dict[str, Any]:
    """Write ``to``: a flat, parentless copy (its own memory.bin), through a staging directory."""
    return ctl.compact(tag, req.to)
