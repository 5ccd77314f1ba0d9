"""``/v1/snapshots``: create (boot + warm + save), list, info, pending branches, delete, compact."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from forkd.daemon import models as m
from forkd.daemon.deps import ERRORS, Ctl, Tag
from forkd.errors import ValidationError

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
