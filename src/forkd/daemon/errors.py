"""One table from the errors of the controller and the engine to HTTP statuses, and the handlers that
answer them as ``{"error": "..."}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from forkd.daemon.pull import SourceError
from forkd.daemon.service import Busy, Conflict, NotFound
from forkd.errors import (
    AgentError,
    AgentTimeoutError,
    BusyError,
    DependentsError,
    FileTooLargeError,
    ForkdError,
    ImageNotFoundError,
    PackError,
    SnapshotExistsError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    ValidationError,
)

log = logging.getLogger("forkd.controller")

#: first match wins
STATUS: tuple[tuple[tuple[type[Exception], ...], int], ...] = (
    ((Busy,), 503),
    ((NotFound, SnapshotNotFoundError, ImageNotFoundError), 404),
    ((Conflict, SnapshotExistsError, SnapshotInvalidError, DependentsError, BusyError), 409),
    ((ValidationError, PackError), 400),
    ((FileTooLargeError,), 413),
    ((AgentTimeoutError,), 504),
    ((SourceError,), 502),
)
#: an error the guest agent answered, by its exception type (others are 400)
AGENT_STATUS = {"FileNotFoundError": 404, "FileExistsError": 409, "ProcessLookupError": 404}


def status_for(exc: Exception) -> int:
    for types, status in STATUS:
        if isinstance(exc, types):
            return status
    if isinstance(exc, AgentError):
        return AGENT_STATUS.get(exc.type, 400)
    return 500


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc if x not in ("body",)) or "body"


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

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
