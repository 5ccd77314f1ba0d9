"""SDK calls on one sandbox, turned into the tools' bounded results (shared by the tools and explore)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from forkd.mcp.models import CodeErrorInfo, CodeOutcome, CommandOutcome, EvalOutcome
from forkd.mcp.output import cap_text, notes
from forkd.sdk import CodeError, Controller, MultiController, Sandbox


def sandbox(ctl: Controller | MultiController, sandbox_id: str) -> Sandbox:
    """A handle on ``sandbox_id`` without a round trip to it: a wrong id fails at its first call with the
    daemon's 404 message (several daemons: ``NODE~sb-...`` goes to that node's, a plain id is looked for)."""
    return ctl.sandbox(sandbox_id)


def code_error(e: CodeError) -> CodeErrorInfo:
    return CodeErrorInfo(type=e.type, message=e.message, traceback=e.traceback)


def run_code(sb: Sandbox, code: str, timeout_s: float, max_output_chars: int) -> CodeOutcome:
    """Python statements in the sandbox's interpreter; an exception in them is ``ok: false``, not a tool
    error (the daemon's own errors still raise)."""
    try:
        ex = sb.run_code(code, timeout=timeout_s)
    except CodeError as e:
        out, err = cap_text(e.stdout, max_output_chars), cap_text(e.stderr, max_output_chars)
        return CodeOutcome(ok=False, stdout=out.text, stderr=err.text, error=code_error(e),
                           note=notes(stdout=out, stderr=err))
    out, err = cap_text(ex.stdout, max_output_chars), cap_text(ex.stderr, max_output_chars)
    streams = {"stdout": out, "stderr": err}
    rep = None
    if ex.repr is not None:
        rep = streams["repr"] = cap_text(ex.repr, max_output_chars)
    cut_value = rep is not None and rep.cut  # a value too long to show in full is left out (repr has its head)
    return CodeOutcome(ok=True, stdout=out.text, stderr=err.text, value=None if cut_value else ex.value,
                       repr=None if rep is None else rep.text, note=notes(**streams))


def eval_expr(sb: Sandbox, expr: str, timeout_s: float) -> EvalOutcome:
    try:
        res = sb.eval_result(expr, timeout=timeout_s)
    except CodeError as e:
        return EvalOutcome(ok=False, error=code_error(e))
    return EvalOutcome(ok=True, value=res.value, repr=res.repr, type=res.type)


class _Counter:
    """Counts the UTF-8 bytes of a stream as it arrives (the SDK keeps only the first characters)."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, data: str) -> None:
        self.bytes += len(data.encode("utf-8", "surrogatepass"))


def run_command(sb: Sandbox, command: str | Sequence[str], timeout_s: float, max_output_chars: int,
                cwd: str | None = None, env: Mapping[str, str] | None = None,
                stdin: str | None = None) -> CommandOutcome:
    """A command, its output streamed so that the whole size is known while only ``max_output_chars``
    characters of each stream are kept."""
    counts = {"stdout": _Counter(), "stderr": _Counter()}
    res = sb.commands.run(command if isinstance(command, str) else list(command), on_stdout=counts["stdout"],
                          on_stderr=counts["stderr"], cwd=cwd, env=env, stdin=stdin, timeout=timeout_s,
                          max_output=max_output_chars)
    out = cap_text(res.stdout, max_output_chars, counts["stdout"].bytes)
    err = cap_text(res.stderr, max_output_chars, counts["stderr"].bytes)
    return CommandOutcome(exit_code=res.exit_code, stdout=out.text, stderr=err.text, timed_out=res.timed_out,
                          duration_s=res.duration_s, note=notes(stdout=out, stderr=err))
