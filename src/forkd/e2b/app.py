"""The E2B-compatible ASGI app, built from the daemon's Controller. One port: a request with the
``E2b-Sandbox-Id`` header goes to that sandbox's envd (``E2b-Sandbox-Port: 49983``) or code
interpreter (49999), after its ``X-Access-Token`` is checked; any other request is the control plane,
which needs ``X-API-KEY``."""

from __future__ import annotations

import json
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from forkd.daemon.service import Controller, NotFound
from forkd.e2b import connect as cx
from forkd.e2b import control, envd, interpreter, pause
from forkd.e2b.auth import Keys, to_forkd_id
from forkd.e2b.common import E2BState
from forkd.e2b.errors import E2BError, rest_error, rest_status
from forkd.errors import ForkdError

ENVD_PORT = 49983
JUPYTER_PORT = 49999
STREAM_RPCS = ("/process.Process/Start", "/process.Process/Connect", "/filesystem.Filesystem/WatchDir")


async def _error(_: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return rest_error(exc.status_code, str(exc.detail))
    return rest_error(*rest_status(exc))


def _starlette(routes: list[Any], st: E2BState) -> Starlette:
    app = Starlette(routes=routes, exception_handlers={E2BError: _error, ForkdError: _error, HTTPException: _error,
                                                      Exception: _error})
    app.state.e2b = st
    return app


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return str(v.decode("latin-1"))
    return None


async def _send(send: Send, status: int, body: bytes, ctype: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class E2BApp:
    def __init__(self, ctl: Controller, api_key: bytes | None, default_template: str | None = None) -> None:
        self.state = E2BState(ctl, Keys(api_key), default_template)
        self.control = _starlette(control.ROUTES, self.state)
        self.envd = _starlette(envd.ROUTES, self.state)
        self.interpreter = _starlette(interpreter.ROUTES, self.state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":  # the daemon's own app runs the controller's lifespan
                msg = await receive()
                while msg["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                    msg = await receive()
                await send({"type": "lifespan.shutdown.complete"})
            return
        e2b_id = _header(scope, b"e2b-sandbox-id")
        if e2b_id is None:
            await self._control(scope, receive, send)
        else:
            await self._sandbox(scope, receive, send, e2b_id)

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/health":
            await _send(send, 200, b'"OK"', "application/json")
            return
        if not self.state.keys.api_key_ok(_header(scope, b"x-api-key")):
            await self._deny(scope, send, 401, "Invalid API key: give the forkd daemon's E2B key as E2B_API_KEY")
            return
        await self.control(scope, receive, send)

    async def _sandbox(self, scope: Scope, receive: Receive, send: Send, e2b_id: str) -> None:
        port = _header(scope, b"e2b-sandbox-port") or str(ENVD_PORT)
        try:
            sid = to_forkd_id(e2b_id)
        except ForkdError as e:
            await self._deny(scope, send, 400, str(e), connect_code="invalid_argument")
            return
        public = port == str(ENVD_PORT) and scope["path"] == "/health"
        # the token first (an HMAC, no lookup): whether a sandbox exists is told only to its token's holder
        if not public and not self.state.keys.access_token_ok(sid, _header(scope, b"x-access-token")):
            await self._deny(scope, send, 401, "invalid or missing X-Access-Token for this sandbox",
                             connect_code="unauthenticated")
            return
        try:
            sid = await run_in_threadpool(pause.current, self.state, sid)  # a resumed one: its new sandbox
            await run_in_threadpool(self.state.ctl.running, sid)  # may read /proc (an adopted VM)
        except (NotFound, ForkdError) as e:
            missing = isinstance(e, NotFound) or "not running" in str(e)
            msg = f"The sandbox {e2b_id[:80]} was not found" if missing else str(e)
            await self._deny(scope, send, 502 if missing else 400, msg, connect_code="unavailable"
                             if missing else "invalid_argument")
            return
        if port not in (str(ENVD_PORT), str(JUPYTER_PORT)):
            await self._deny(scope, send, 502, f"The sandbox {e2b_id} is running but port is not open: forkd serves "
                             f"only envd ({ENVD_PORT}) and the code interpreter ({JUPYTER_PORT}) here",
                             connect_code="unavailable")
            return
        scope = {**scope, "forkd.sid": sid}
        await (self.envd if port == str(ENVD_PORT) else self.interpreter)(scope, receive, send)

    @staticmethod
    async def _deny(scope: Scope, send: Send, status: int, message: str, connect_code: str = "unauthenticated") -> None:
        path = scope["path"]
        if path in STREAM_RPCS:
            await _send(send, 200, cx.end_stream(cx.ConnectError(connect_code, message)), cx.STREAM_CONTENT_TYPE)
        elif path.startswith(("/process.", "/filesystem.")):
            await _send(send, status, json.dumps({"code": connect_code, "message": message}).encode(),
                        cx.UNARY_CONTENT_TYPE)
        else:
            await _send(send, status, json.dumps({"code": status, "message": message}).encode(), "application/json")


def create_e2b_app(ctl: Controller, api_key: bytes | None, default_template: str | None = None) -> E2BApp:
    return E2BApp(ctl, api_key, default_template)
