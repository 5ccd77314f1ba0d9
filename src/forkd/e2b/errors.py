"""forkd's errors in E2B's shapes: the control plane's ``{"code": <status>, "message"}`` (which the
SDK turns into NotFoundException, InvalidArgumentException, AuthenticationException, ...), and the
Connect codes of envd (``not_found`` -> NotFoundException, ``deadline_exceeded`` -> TimeoutException)."""

from __future__ import annotations

import json
import logging

from starlette.responses import Response

from forkd.daemon.errors import status_for
from forkd.e2b.connect import ConnectError
from forkd.errors import ForkdError

log = logging.getLogger("forkd.e2b")

#: forkd's HTTP status -> the Connect code of the same error
CONNECT_CODE = {400: "invalid_argument", 401: "unauthenticated", 404: "not_found", 409: "failed_precondition",
                413: "resource_exhausted", 422: "invalid_argument", 429: "resource_exhausted", 503: "unavailable",
                504: "deadline_exceeded"}


class E2BError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def rest_error(status: int, message: str) -> Response:
    return Response(json.dumps({"code": status, "message": message}), status_code=status,
                    media_type="application/json")


def rest_status(e: Exception) -> tuple[int, str]:
    if isinstance(e, E2BError):
        return e.status, e.message
    if isinstance(e, ForkdError):
        status = status_for(e)
        if status == 413:
            status = 400
        if status >= 500:
            log.warning("e2b request failed: %s", e)
        return status, str(e)
    log.exception("unexpected error in an e2b request")
    return 500, f"internal error: {type(e).__name__}"


def connect_error(e: Exception) -> ConnectError:
    if isinstance(e, ConnectError):
        return e
    status, message = rest_status(e)
    if status == 409 and ("not running" in message or "stopped" in message):
        return ConnectError("unavailable", f"The sandbox was not found: {message}")
    return ConnectError(CONNECT_CODE.get(status, "internal" if status >= 500 else "unknown"), message)
