"""What the routers depend on: the controller (``app.state``), the metrics, and the path and query
parameter types shared by several of them. Auth is not a dependency: it is the ASGI layer around the
app (auth.py), so an unauthenticated request is answered before any body is read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request

from forkd.daemon import models as m
from forkd.daemon.metrics import Metrics
from forkd.daemon.service import Controller

Tag = Annotated[str, Path(pattern=m.TAG_PATTERN, description="Snapshot tag.")]
SandboxId = Annotated[str, Path(pattern=m.ID_PATTERN, description="Sandbox id.")]
GuestPath = Annotated[str, Query(min_length=1, max_length=4096, description="Absolute path in the guest.")]
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": m.ErrorBody} for s in (400, 401, 404, 409, 422, 500, 503)}


def controller(request: Request) -> Controller:
    return request.app.state.controller


def metrics(request: Request) -> Metrics:
    return request.app.state.metrics


Ctl = Annotated[Controller, Depends(controller)]
MetricsDep = Annotated[Metrics, Depends(metrics)]
