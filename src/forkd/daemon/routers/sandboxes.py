"""``/v1/sandboxes``: spawn, list, info, kill, branch, and the guest operations (ping, interrupt, eval,
run_code, exec)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from forkd.daemon import models as m
from forkd.daemon.deps import ERRORS, Ctl, SandboxId
from forkd.daemon.routers import processes
from forkd.daemon.service import Controller
from forkd.engine.child import CodeOutput
from forkd.errors import AgentError, ForkdError, ValidationError
from forkd.limits import MAX_METADATA

log = logging.getLogger("forkd.controller")
CODE_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {processes.NDJSON: {"schema": {  # its CodeError refers to the document's own component
        k: v for k, v in m.RunCodeEvent.model_json_schema(ref_template="#/components/schemas/{model}").items()
        if k != "$defs"}}},
          "description": "A RunCodeResponse, or with stream: true one RunCodeEvent per line."}}
router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"], responses=ERRORS)


@router.post("", status_code=201, response_model=list[m.SpawnEntry])
def create_sandboxes(ctl: Ctl, req: m.CreateSandboxesRequest) -> list[dict[str, Any]]:
    """Fork ``n`` children; each entry is a sandbox or the error that stopped that child."""
    for port in req.expose:
        if not 1 <= port <= 65535:
            raise ValidationError(f"expose: ports must be in 1..65535; got {port}")
    return ctl.spawn(req.snapshot_tag, req.n, req.network, req.memory_limit_mib, req.per_child_netns,
                     req.timeout_s, tuple(req.expose), req.lifetime_s, dict(req.metadata))


@router.get("", response_model=list[m.SandboxInfo])
def list_sandboxes(ctl: Ctl, metadata: Annotated[list[str] | None, Query(
        max_length=MAX_METADATA, description="KEY:VALUE; repeat it: only sandboxes with all these labels.")] = None,
                   ) -> list[dict[str, Any]]:
    want: dict[str, str] = {}
    for item in metadata or []:
        k, sep, v = item.partition(":")
        if not sep or not k:
            raise ValidationError(f"metadata: filters are KEY:VALUE; got {item!r}")
        want[k] = v
    return ctl.list_sandboxes(want)


@router.get("/{sid}", response_model=m.SandboxInfo)
def get_sandbox(ctl: Ctl, sid: SandboxId) -> dict[str, Any]:
    return ctl.get(sid).info()


@router.delete("/{sid}", status_code=204)
def delete_sandbox(ctl: Ctl, sid: SandboxId) -> Response:
    """Kill the VM and remove its work dir."""
    ctl.delete(sid)
    return Response(status_code=204)


@router.post("/{sid}/timeout", response_model=m.SandboxInfo)
def set_timeout(ctl: Ctl, sid: SandboxId, req: m.TimeoutRequest) -> dict[str, Any]:
    """Set the sandbox's lifetime: it is killed ``lifetime_s`` seconds from now (``expires_at``)."""
    return ctl.set_lifetime(sid, req.lifetime_s)


@router.post("/{sid}/branch", status_code=201, response_model=m.BranchResponse,
             responses={202: {"model": m.BranchResponse}})
def branch(ctl: Ctl, sid: SandboxId, response: Response,
           req: Annotated[m.BranchRequest | None, Body()] = None) -> dict[str, Any]:
    """Snapshot the running sandbox (it keeps running); the answer reports the pause in ms, the mode
    chosen and the bytes written. 409 if the tag exists, 503 past --branch-concurrency."""
    req = req or m.BranchRequest.model_validate({})
    out, finished = ctl.branch(sid, req.tag, req.mode, req.wait)
    if not finished:
        response.status_code = 202
    return out


@router.post("/{sid}/ping", response_model=m.PingResponse)
def ping(ctl: Ctl, sid: SandboxId) -> dict[str, Any]:
    """The agent's versions and uptime (and the fields the original API's ping had)."""
    out: dict[str, Any] = ctl.call(sid, lambda c: c.ping())
    return {**out, "pong": True, "numpy_version": out.get("numpy") or "not-installed"}


@router.post("/{sid}/interrupt", response_model=m.InterruptResponse)
def interrupt(ctl: Ctl, sid: SandboxId) -> dict[str, Any]:
    """Interrupt the sandbox's running eval/run_code calls (KeyboardInterrupt in the guest); waits up
    to 2 s for them to stop. A timed-out eval/run_code is interrupted this way by itself."""
    return ctl.call(sid, lambda c: c.interrupt())


@router.post("/{sid}/eval", response_model=m.EvalResponse, response_model_exclude_none=False)
def eval_(ctl: Ctl, sid: SandboxId, req: m.EvalRequest) -> dict[str, Any]:
    """Evaluate an expression; an exception in it is ``ok: false`` with its traceback (status 200). A
    request with the original API's ``code`` also gets its answer's fields: ``result`` (the repr),
    ``error`` as ``"Type: message"`` and ``exit_code``."""
    out = _code(lambda: ctl.call(sid, lambda c: c.eval(req.expression, timeout=req.timeout_s)))
    if req.code is not None:
        err = out.get("error")
        out.update(result=out.get("repr") if out["ok"] else None, exit_code=0 if out["ok"] else 1,
                   error=f"{err['type']}: {err['message']}" if err else None,
                   traceback=err.get("traceback") if err else None)
    return out


@router.post("/{sid}/run_code", response_model=m.RunCodeResponse, responses=CODE_STREAM_RESPONSES)
def run_code(ctl: Ctl, sid: SandboxId, req: m.RunCodeRequest) -> Any:
    """Run statements with state kept between calls; stdout, stderr and the last expression's value.
    With ``stream: true`` the output comes as the code writes it (NDJSON RunCodeEvents), the result last."""
    if req.stream:
        ctl.running(sid)  # a missing sandbox is a 404 before the stream starts
        return processes.ndjson(_code_events(ctl, sid, req))
    return _code(lambda: ctl.call(sid, lambda c: c.run_code(req.code, timeout=req.timeout_s)))


def _code_events(ctl: Controller, sid: str, req: m.RunCodeRequest) -> Iterator[bytes]:
    lines = processes.Lines()
    result: dict[str, Any] = {}
    try:
        try:
            for item in ctl.call(sid, lambda c: c.run_code_stream(req.code, timeout=req.timeout_s)):
                if isinstance(item, CodeOutput):
                    yield from lines.output(item.stdout, item.stderr)
                else:
                    result = {"ok": True, **item}
        except AgentError as e:
            if e.type in ("BadRequest", "UnknownOp"):
                raise
            result = _code_failure(e)
    except ForkdError as e:  # the status is sent: the stream can only say so and end
        log.warning("sandbox %s: streamed run_code failed: %s", sid, e)
        yield from lines.output(b"", b"", final=True)
        yield lines.error(e, sid)
        return
    yield from lines.output(b"", b"", final=True)
    yield lines.line({"type": "result", **result})


@router.post("/{sid}/exec", response_model=m.ExecResponse, responses=processes.STREAM_RESPONSES)
def exec_(ctl: Ctl, sid: SandboxId, req: m.ExecRequest) -> Any:
    """Run a program (no shell). A program or cwd that does not exist is a 400, not a 404. With
    ``stream: true`` the output comes as it is written (NDJSON ProcessEvents); ``max_output`` then does
    not apply (nothing is kept)."""
    if req.stream:
        started = processes.start(ctl, sid, req, stdin_open=False)
        return processes.stream(ctl, sid, int(started["pid"]), started)
    try:
        r = ctl.call(sid, lambda c: c.exec(req.command, env=req.env, cwd=req.cwd, stdin=req.stdin,
                                           timeout=req.timeout_s, max_output=req.max_output))
    except AgentError as e:
        raise ValidationError(f"exec {req.command[0]!r}: {e.type}: {e.message}") from e
    return r.__dict__


def _code(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """An exception raised by the user's code is a result (``ok: false``), not an HTTP error."""
    try:
        r = fn()
    except AgentError as e:
        if e.type in ("BadRequest", "UnknownOp"):
            raise
        return _code_failure(e)
    return {"ok": True, **r}


def _code_failure(e: AgentError) -> dict[str, Any]:
    return {"ok": False, "error": {"type": e.type, "message": e.message, "traceback": e.traceback},
            "stdout": e.details.get("stdout", ""), "stderr": e.details.get("stderr", "")}
