"""``/v1/sandboxes/{sid}/processes``: background processes (start, list, stream their output, stdin,
signals), and the streamed form of ``exec``. Output is NDJSON, one event per line:
``{"type": "start", "pid"}``, ``{"type": "stdout"|"stderr", "data"}`` (text, UTF-8 with replacement),
then ``{"type": "exit", "exit_code", "timed_out", "duration_s"}``; a failure once the stream has
started is a last ``{"type": "error", "error", "status"}`` line (the HTTP status it would have had)."""

from __future__ import annotations

import codecs
import json
import logging
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse

from forkd.daemon import models as m
from forkd.daemon.deps import ERRORS, Ctl, SandboxId
from forkd.daemon.errors import status_for
from forkd.daemon.service import Conflict, Controller
from forkd.errors import AgentError, ChannelClosedError, ForkdError, ValidationError

log = logging.getLogger("forkd.controller")
NDJSON = "application/x-ndjson"
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {  # the event's schema inline: no route returns it as JSON
    200: {"content": {NDJSON: {"schema": m.ProcessEvent.model_json_schema()}},
          "description": "One ProcessEvent per line."}}

router = APIRouter(prefix="/v1/sandboxes/{sid}/processes", tags=["processes"], responses=ERRORS)
Pid = Annotated[int, Path(ge=1, le=1 << 22, description="The process's pid in the guest.")]


def start(ctl: Controller, sid: str, req: m.ExecRequest | m.StartProcessRequest, stdin_open: bool) -> dict[str, Any]:
    """Start ``req``'s command; a program or cwd that does not exist is a 400."""
    try:
        return ctl.call(sid, lambda c: c.start_process(req.command, env=req.env, cwd=req.cwd, stdin=req.stdin,
                                                       stdin_open=stdin_open, timeout=req.timeout_s))
    except AgentError as e:
        if e.type in ("ProcessLookupError",):
            raise
        raise ValidationError(f"{req.command[0]!r}: {e.type}: {e.message}") from e


class Lines:
    """NDJSON lines of streamed output: each stream's bytes decoded as UTF-8 (invalid bytes replaced)
    across chunk boundaries."""

    def __init__(self) -> None:
        self.decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in ("stdout", "stderr")}

    @staticmethod
    def line(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode() + b"\n"

    def error(self, e: ForkdError, sid: str) -> bytes:
        """The last line of a stream that cannot go on: the message and the status it would have had
        (a VM that went away is a 409, as for a call that did not stream)."""
        if isinstance(e, ChannelClosedError):
            e = Conflict(f"sandbox {sid} stopped: {e}")
        return self.line({"type": "error", "error": str(e), "status": status_for(e)})

    def output(self, stdout: bytes, stderr: bytes, final: bool = False) -> Iterator[bytes]:
        for name, data in (("stdout", stdout), ("stderr", stderr)):
            text = self.decoders[name].decode(data, final=final)
            if text:
                yield self.line({"type": name, "data": text})


def events(ctl: Controller, sid: str, pid: int, started: dict[str, Any] | None) -> Iterator[bytes]:
    """The NDJSON lines of process ``pid`` until it ends (``started``: send its start event first)."""
    t0 = time.monotonic()
    lines = Lines()
    if started is not None:
        yield lines.line({"type": "start", "pid": pid})
    try:
        for chunk in ctl.call(sid, lambda c: c.stream_process(pid)):
            yield from lines.output(chunk.stdout, chunk.stderr, final=chunk.exited)
            if chunk.exited:
                yield lines.line({"type": "exit", "exit_code": chunk.exit_code, "timed_out": chunk.timed_out,
                                  "duration_s": round(time.monotonic() - t0, 6)})
    except ForkdError as e:  # the status is sent: the stream can only say so and end
        log.warning("sandbox %s: streaming process %d failed: %s", sid, pid, e)
        yield lines.error(e, sid)


def ndjson(lines: Iterator[bytes]) -> StreamingResponse:
    return StreamingResponse(lines, media_type=NDJSON, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def stream(ctl: Controller, sid: str, pid: int, started: dict[str, Any] | None) -> StreamingResponse:
    return ndjson(events(ctl, sid, pid, started))


@router.post("", status_code=201, response_model=m.ProcessInfo)
def start_process(ctl: Ctl, sid: SandboxId, req: m.StartProcessRequest) -> dict[str, Any]:
    """Start a process in the background (no shell; ``timeout_s`` null: no limit) and answer at once with
    its pid. Its output waits in the guest (1 MiB per stream, then the process blocks) for ``.../stream``."""
    return start(ctl, sid, req, stdin_open=req.stdin_open)


@router.get("", response_model=list[m.ProcessInfo])
def list_processes(ctl: Ctl, sid: SandboxId) -> list[dict[str, Any]]:
    """Processes started here that are running, or ended and not yet read to the end."""
    return ctl.call(sid, lambda c: c.list_processes())


@router.get("/{pid}/stream", response_class=StreamingResponse, responses=STREAM_RESPONSES)
def stream_output(ctl: Ctl, sid: SandboxId, pid: Pid) -> StreamingResponse:
    """The process's output (NDJSON) from where the last reader stopped, until it ends. One reader at a
    time: output read by one is not seen by another."""
    if not any(p["pid"] == pid for p in ctl.call(sid, lambda c: c.list_processes())):
        raise AgentError("stream", "ProcessLookupError", f"no process {pid} (never started here, or read to the end)")
    return stream(ctl, sid, pid, None)


@router.post("/{pid}/stdin", response_model=m.StdinResult)
def write_stdin(ctl: Ctl, sid: SandboxId, pid: Pid, req: m.StdinRequest) -> dict[str, Any]:
    """Write to the process's stdin (started with ``stdin_open``); ``eof`` closes it."""
    return {"written": ctl.call(sid, lambda c: c.write_process(pid, req.payload, eof=req.eof))}


@router.post("/{pid}/kill", response_model=m.KillResult)
def kill_process(ctl: Ctl, sid: SandboxId, pid: Pid, req: m.KillRequest | None = None) -> dict[str, Any]:
    """Signal the process's group (default KILL); ``signalled`` is false if it had already ended."""
    sig = (req or m.KillRequest()).signal
    return {"signalled": ctl.call(sid, lambda c: c.kill_process(pid, sig))}
