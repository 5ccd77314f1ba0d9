"""``/v1/workspaces``: a sandbox under a name, suspended to disk and resumed (daemon/workspaces.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from forkd.daemon import models as m
from forkd.daemon.deps import ERRORS, Ctl
from forkd.daemon.service import Controller
from forkd.daemon.workspaces import Workspaces
from forkd.errors import ForkdError

Name = Annotated[str, Path(pattern=m.TAG_PATTERN, description="Workspace name.")]
router = APIRouter(prefix="/v1/workspaces", tags=["workspaces"], responses=ERRORS)


def _ws(ctl: Controller) -> Workspaces:
    if ctl.workspaces is None:
        raise ForkdError("workspaces are not enabled on this daemon")
    ws: Workspaces = ctl.workspaces
    return ws


@router.get("", response_model=list[m.WorkspaceInfo])
def list_workspaces(ctl: Ctl) -> list[dict[str, Any]]:
    return _ws(ctl).list_all()


@router.post("", status_code=201, response_model=m.WorkspaceInfo)
def create_workspace(ctl: Ctl, req: m.CreateWorkspaceRequest) -> dict[str, Any]:
    """Start a sandbox under a name. 409 if the name exists, 404 for an unknown snapshot."""
    return _ws(ctl).create(req.name, req.snapshot_tag, req.network, req.memory_limit_mib, req.lifetime_s,
                           dict(req.metadata), req.idle_suspend_s, req.timeout_s)


@router.get("/{name}", response_model=m.WorkspaceInfo)
def get_workspace(ctl: Ctl, name: Name) -> dict[str, Any]:
    return _ws(ctl).get(name)


@router.post("/{name}/suspend", response_model=m.WorkspaceInfo)
def suspend_workspace(ctl: Ctl, name: Name) -> dict[str, Any]:
    """Branch its sandbox (memory, devices, disk layer) and stop it; the previous state goes. 409 if it
    is not running."""
    return _ws(ctl).suspend(name)


@router.post("/{name}/resume", response_model=m.WorkspaceInfo)
def resume_workspace(ctl: Ctl, name: Name) -> dict[str, Any]:
    """Start a new sandbox from its last state (or its snapshot, if never suspended) with its options.
    409 if it is running."""
    return _ws(ctl).resume(name)


@router.delete("/{name}", status_code=204)
def delete_workspace(ctl: Ctl, name: Name) -> Response:
    """Kill its sandbox and delete its states."""
    _ws(ctl).delete(name)
    return Response(status_code=204)
