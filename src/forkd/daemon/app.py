"""The REST API v1 (FastAPI): the app, its error handlers and one router per resource (routers/). The
handlers validate at the edge and call the Controller, which they get as a dependency."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from forkd import __version__
from forkd.daemon import errors
from forkd.daemon.metrics import Metrics
from forkd.daemon.routers import files, processes, sandboxes, service, snapshots, workspaces
from forkd.daemon.service import Controller

ROUTERS = (service.router, snapshots.router, sandboxes.router, processes.router, files.router,
           workspaces.router)


def create_app(ctl: Controller, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="forkd-controller", version=__version__,
                  description="Fork warmed microVMs copy-on-write. Errors are {\"error\": \"...\"}.",
                  docs_url=None, redoc_url=None)
    app.state.controller = ctl
    app.state.metrics = metrics
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    # the templates a route label may take (an included router's routes carry their full path)
    routes = [*app.routes, *(r for router in ROUTERS for r in router.routes)]
    metrics.set_routes(path for r in routes if isinstance(path := getattr(r, "path", None), str))
    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document the daemon serves (docs/openapi.json is this, committed)."""
    app = create_app(None, Metrics(lambda: 0, lambda: 0))  # type: ignore[arg-type]  # routes are not called
    return app.openapi()
