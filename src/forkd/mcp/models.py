"""The typed inputs and results of the MCP tools. MCP publishes their JSON schemas (``inputSchema`` and
``outputSchema``), so what an agent sends is checked before any tool runs."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from forkd.limits import MAX_ARGV, MAX_CODE_BYTES, MAX_EXEC_TIMEOUT_S, MAX_TIMEOUT_S

MAX_VARIANTS = 16
"""Children one ``explore`` call may fork."""

Command = Annotated[
    str | Annotated[list[str], Field(min_length=1, max_length=MAX_ARGV)],
    Field(description="A shell command line (run with /bin/sh -c), or a program and its arguments (no shell)."),
]
CodeTimeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S,
                                     description="Seconds before the code is interrupted in the guest.")]
CommandTimeout = Annotated[float, Field(gt=0, le=MAX_EXEC_TIMEOUT_S,
                                        description="Seconds before the command's process group is killed.")]


class Variant(BaseModel):
    """One branch of an ``explore``: Python ``code`` (run like ``run_code``) or a shell ``command``."""

    model_config = ConfigDict(extra="forbid")

    code: Annotated[str | None, Field(max_length=MAX_CODE_BYTES,
                                      description="Python statements, run in the child's interpreter.")] = None
    command: Command | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Variant:
        if (self.code is None) == (self.command is None):
            raise ValueError("each variant needs exactly one of 'code' or 'command'")
        if isinstance(self.command, str) and not self.command.strip():
            raise ValueError("command: the command is empty")
        return self


class CodeErrorInfo(BaseModel):
    """An exception raised by the code in the sandbox."""

    type: str
    message: str
    traceback: str | None = None


class CodeOutcome(BaseModel):
    """The result of Python code run in a sandbox. ``ok`` is false when the code raised (``error``)."""

    ok: bool
    stdout: str = ""
    stderr: str = ""
    value: Any = None
    """The last expression's value as JSON, when it had one that could be serialized."""
    repr: str | None = None
    """The last expression's repr(), like a REPL shows it."""
    error: CodeErrorInfo | None = None
    note: str | None = None
    """Says which output was cut, and how much of it is shown."""


class EvalOutcome(BaseModel):
    """The value of an expression (``value`` as JSON when serializable; ``repr`` always), or its ``error``."""

    ok: bool
    value: Any = None
    repr: str | None = None
    type: str | None = None
    error: CodeErrorInfo | None = None


class CommandOutcome(BaseModel):
    """The result of a command: a non-zero ``exit_code`` is a result, not a tool error."""

    exit_code: int | None
    """Negative: killed by that signal; null: unknown."""
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    note: str | None = None
    """Present when output was cut: ``stdout [output cut: N of M bytes shown]``."""


class SnapshotSummary(BaseModel):
    tag: str
    kind: str
    """root, flat or delta (a branch)."""
    parent: str | None = None
    bootable: bool = True
    warning: str | None = None
    sandboxes: int = 0
    """Live sandboxes forked from it."""
    memory_mib: int = 0
    image_id: str | None = None
    created_at: float = 0.0


class SandboxSummary(BaseModel):
    id: str
    snapshot_tag: str
    status: str
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None
    """Unix time the daemon kills it (null: when killed)."""


class SpawnOutcome(BaseModel):
    sandbox_ids: list[str]
    """The sandboxes that started, in request order."""
    errors: list[str] = Field(default_factory=list)
    """One message per child that failed to start."""


class KillOutcome(BaseModel):
    killed: list[str]
    """Killed now, or already gone."""
    errors: dict[str, str] = Field(default_factory=dict)


class BranchOutcome(BaseModel):
    tag: str
    """The new snapshot: spawn from it to get copies of the sandbox as it was."""
    mode: str | None = None
    pause_ms: float | None = None
    dirty_bytes: int | None = None


class FileRead(BaseModel):
    path: str
    content: str
    encoding: str
    """``utf-8`` (text) or ``base64`` (binary, or asked for)."""
    size: int
    truncated: bool
    note: str | None = None


class FileWritten(BaseModel):
    path: str
    bytes_written: int


class FileInfo(BaseModel):
    name: str
    path: str
    type: str
    """file, dir, symlink or other."""
    size: int
    mode: int
    mtime: float


class VariantResult(BaseModel):
    """One child of an ``explore``: what its variant printed and returned, or why it failed."""

    index: int
    sandbox_id: str | None
    """Null when the child failed to start."""
    kind: str
    """code or command."""
    ok: bool
    """code: it did not raise; command: exit code 0 and no timeout."""
    stdout: str = ""
    stderr: str = ""
    value: Any = None
    repr: str | None = None
    exit_code: int | None = None
    timed_out: bool = False
    error: str | None = None
    note: str | None = None
    kept: bool = False


class ExploreOutcome(BaseModel):
    branch_tag: str
    """The snapshot the children were forked from (the explored sandbox's state when the call began)."""
    branch_deleted: bool
    """False while the kept child uses it: delete it with delete_snapshot once that child is killed."""
    kept: str | None
    """The id of the child kept running (``keep``), or null."""
    results: list[VariantResult]
