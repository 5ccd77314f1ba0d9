"""The code interpreter's ``POST /execute`` (port 49999) over the sandbox's warm interpreter
(``Child.run_code_stream``, state kept between calls): NDJSON lines ``stdout``/``stderr`` as the code
writes them, then ``result`` (the last expression's repr as ``text``) or ``error`` (name, value,
traceback), ``number_of_executions`` and ``end_of_execution``."""

from __future__ import annotations

import codecs
import datetime
import json
from collections.abc import Iterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from forkd.e2b.common import E2BState, read_body, state, stream_slot
from forkd.e2b.envd import sid_of
from forkd.e2b.errors import E2BError
from forkd.engine.child import CodeOutput
from forkd.errors import AgentError, AgentTimeoutError, ForkdError
from forkd.limits import MAX_CODE_BYTES

#: seconds a cell may run (the SDK's own default timeout of run_code)
EXECUTE_TIMEOUT_S = 300.0
LANGUAGES = (None, "python", "python3")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def execute_events(st: E2BState, sid: str, code: str) -> Iterator[bytes]:
    decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in ("stdout", "stderr")}
    try:
        for item in st.ctl.call(sid, lambda c: c.run_code_stream(code, timeout=EXECUTE_TIMEOUT_S)):
            if isinstance(item, CodeOutput):
                for name, data in (("stdout", item.stdout), ("stderr", item.stderr)):
                    text = decoders[name].decode(data)
                    if text:
                        yield _line({"type": name, "text": text, "timestamp": _now()})
            elif item.get("repr") is not None:
                yield _line({"type": "result", "text": item["repr"], "is_main_result": True})
    except AgentTimeoutError as e:
        yield _line({"type": "error", "name": "TimeoutError", "value": str(e), "traceback": ""})
    except AgentError as e:
        if e.type in ("BadRequest", "UnknownOp"):
            yield _line({"type": "error", "name": "SandboxError", "value": f"{e.type}: {e.message}", "traceback": ""})
        else:
            yield _line({"type": "error", "name": e.type, "value": e.message, "traceback": e.traceback or ""})
    except ForkdError as e:
        yield _line({"type": "error", "name": "SandboxError", "value": str(e), "traceback": ""})
    for name, dec in decoders.items():
        text = dec.decode(b"", final=True)
        if text:
            yield _line({"type": name, "text": text, "timestamp": _now()})
    extra = st.extra(sid)
    extra.executions += 1
    yield _line({"type": "number_of_executions", "execution_count": extra.executions})
    yield _line({"type": "end_of_execution"})


async def execute(request: Request) -> Response:
    st = state(request)
    sid = sid_of(request)
    try:
        # JSON escapes: a character may take 6 bytes
        body = json.loads(await read_body(request, 6 * MAX_CODE_BYTES + 4096))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise E2BError(400, f"the body is not JSON: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        raise E2BError(400, "code: required, a string")
    if body.get("language") not in LANGUAGES:
        raise E2BError(400, f"language {str(body.get('language'))[:40]!r} is not supported by forkd (python only)")
    if body.get("context_id") is not None:
        raise E2BError(404, "contexts are not supported by forkd: each sandbox has one Python namespace")
    if body.get("env_vars"):
        raise E2BError(400, "env_vars are not supported by forkd's run_code")
    await run_in_threadpool(st.ctl.running, sid)  # a 404/409 before the stream starts
    events = stream_slot().guard(execute_events(st, sid, body["code"]))
    return StreamingResponse(events, media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})


async def health(request: Request) -> Response:
    await run_in_threadpool(state(request).ctl.running, sid_of(request))
    return JSONResponse("OK")


async def contexts(request: Request) -> Response:
    raise E2BError(400, "contexts are not supported by forkd: each sandbox has one Python namespace")


ROUTES = [
    Route("/execute", execute, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/contexts", contexts, methods=["GET", "POST"]),
    Route("/contexts/{rest:path}", contexts, methods=["GET", "POST", "DELETE", "PATCH"]),
]
