"""Request and response bodies of REST API v1 (the OpenAPI document is generated from these)."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from forkd.limits import (
    ID_PATTERN,
    IMAGE_NAME_PATTERN,
    MAX_ARGV,
    MAX_CHILDREN,
    MAX_CODE_BYTES,
    MAX_EXEC_OUTPUT,
    MAX_EXEC_TIMEOUT_S,
    MAX_EXPOSE,
    MAX_LIFETIME_S,
    MAX_MEMORY_LIMIT_MIB,
    MAX_MEMORY_MIB,
    MAX_METADATA,
    MAX_METADATA_VALUE,
    MAX_PATH,
    MAX_STDIN_BYTES,
    MAX_TIMEOUT_S,
    MAX_VCPUS,
    MAX_WARM_CODE_BYTES,
    METADATA_KEY_PATTERN,
    MIN_MEMORY_LIMIT_MIB,
    MIN_MEMORY_MIB,
    MIN_VCPUS,
    ORIGINAL_BRANCH_MODES,
    TAG_PATTERN,
)

__all__ = ["ID_PATTERN", "TAG_PATTERN"]  # re-exported for the routers


Metadata = Annotated[
    dict[Annotated[str, StringConstraints(pattern=METADATA_KEY_PATTERN)],
         Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE)]],
    Field(max_length=MAX_METADATA)]


class Strict(BaseModel):
    """A request body: unknown fields refused, and no coercion (``"5"`` is not an integer, ``1`` is
    not a boolean); an integer is still a number for a float field."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorBody(BaseModel):
    error: str


class Health(BaseModel):
    ok: bool = True


class Version(BaseModel):
    version: str
    api: str = "v1"
    accelerator: str
    accelerator_reason: str
    qemu_version: str


class CreateSnapshotRequest(Strict):
    tag: str = Field(pattern=TAG_PATTERN, description="Snapshot name.")
    memory_mib: int = Field(512, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB, description="Guest RAM in MiB.")
    vcpus: int = Field(1, ge=MIN_VCPUS, le=MAX_VCPUS)
    warm_code: str | None = Field(None, max_length=MAX_WARM_CODE_BYTES,
                                  description="Python run in the parent before saving.")
    boot_timeout_s: float = Field(300.0, gt=0, le=MAX_TIMEOUT_S, description="Seconds to wait for the guest agent.")
    image: str | None = Field(None, pattern=IMAGE_NAME_PATTERN,
                              description="A recipe image built with forkd image build --name (default: the "
                                          "built-in Python + numpy image).")


class SnapshotInfo(BaseModel):
    """A snapshot. One that cannot be restored here (damaged, or from another QEMU/CPU) is still
    listed, with ``bootable: false``, ``status: failed`` and a ``warning`` that says why."""

    tag: str
    status: Literal["ready", "writing", "failed"] = "ready"
    bootable: bool = True
    warning: str | None = None
    created_at: float = 0.0
    created_at_unix: int | None = None
    memory_mib: int = 0
    vcpus: int = 0
    accel: str = ""
    cpu: str = ""
    machine: str = ""
    qemu_version: str | None = None
    image_id: str | None = None
    vmstate_bytes: int = 0
    memory_bytes: int = 0
    memory_allocated_bytes: int = 0
    guest: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    parent: str | None = None
    sandboxes: int = Field(0, description="Live sandboxes forked from it.")
    kind: Literal["root", "flat", "delta"] = "root"
    memory_source: str | None = Field(None, description="A delta: the snapshot whose memory.bin it maps.")
    branch: dict[str, Any] = Field(default_factory=dict)
    depth: int | None = None
    ancestors: list[str] | None = Field(None, description="Root first.")
    dependents: list[str] | None = None
    logical_bytes: int | None = None
    physical_bytes: int | None = None


class PendingSnapshot(BaseModel):
    tag: str
    status: Literal["writing", "failed"]
    error: str | None = None


class BranchRequest(Strict):
    tag: str | None = Field(None, pattern=TAG_PATTERN, description="Name of the new snapshot (generated if absent).")
    mode: Literal["auto", "delta", "flat", "full", "diff", "live"] = Field(
        "auto", description="delta: pages in the vmstate, maps the base memory.bin; flat: a new memory.bin; "
                            "auto: delta up to 32 MiB of dirty pages, flat above. The original API's full, diff and "
                            "live are flat, delta and auto.")
    wait: bool = Field(True, description="false: answer 202 at once; the snapshot's status is `writing` until ready.")
    diff: bool | None = Field(None, description="The original API's legacy form of mode=diff.")
    measure_diff: bool | None = Field(None, description="Accepted from the original API; forkd always reports "
                                                        "dirty_bytes.")

    @model_validator(mode="after")
    def _original_modes(self) -> BranchRequest:
        if self.diff and "mode" in self.model_fields_set:
            raise ValueError("mode and diff cannot be used together")
        if self.diff:
            self.mode = "delta"
        self.mode = ORIGINAL_BRANCH_MODES.get(self.mode, self.mode)  # type: ignore[assignment]  # one of ours
        return self


class BranchResponse(BaseModel):
    tag: str
    status: Literal["ready", "writing"]
    branched_from: str | None = Field(None, description="The sandbox it was taken from.")
    bootable: bool = Field(True, description="false while it is being written.")
    mode: str | None = None
    pause_ms: float | None = None
    total_ms: float | None = None
    dirty_bytes: int | None = None
    bytes_written: int | None = None


class CompactRequest(Strict):
    to: str = Field(pattern=TAG_PATTERN, description="Tag of the flat, parentless copy.")


class UnpackResponse(BaseModel):
    """What an unpack registered: the pack's chain as it now is here, root first (its snapshot last)."""

    tags: list[str]
    registered: list[str] = Field(description="Written now (new, or replaced with force).")
    reused: list[str] = Field(description="Already here with the same files: left as they were.")
    replaced: list[str] = Field(description="Among registered: were here with other content.")
    warnings: list[str] = Field(description="Why this host might refuse to restore them (QEMU, accelerator).")
    seconds: float


class CreateSandboxesRequest(Strict):
    snapshot_tag: str = Field(pattern=TAG_PATTERN)
    n: int = Field(1, ge=1, le=MAX_CHILDREN, description="Number of children.")
    memory_limit_mib: int | None = Field(None, ge=MIN_MEMORY_LIMIT_MIB, le=MAX_MEMORY_LIMIT_MIB,
                                         description="Memory limit per child, MiB.")
    per_child_netns: bool = Field(False, description="Run child i in network namespace forkd-child-<i>.")
    live_fork: bool = Field(False, description="Accepted for compatibility; every forkd sandbox can be branched.")
    hugepages: bool = Field(False, description="Accepted for compatibility (the original's live_fork memfd backing); "
                                               "children map the snapshot's memory file, see docs/api.md.")
    prewarm: bool = Field(False, description="Accepted for compatibility: a forkd child's first BRANCH is not "
                                             "slower than its second, see docs/api.md.")
    network: Literal["internet", "none", "user"] = Field(
        "internet", description="internet: outbound to public addresses only, with DNS (never this host, private "
        "or link-local ranges, other sandboxes); none: no network; user: old name of internet.")
    expose: list[int] = Field(default_factory=list, max_length=MAX_EXPOSE,
                              description="Guest TCP ports to forward from host loopback ports (see `ports`).")
    timeout_s: float = Field(120.0, gt=0, le=MAX_TIMEOUT_S, description="Seconds allowed for each child's restore.")
    lifetime_s: float | None = Field(
        None, gt=0, le=MAX_LIFETIME_S,
        description="Seconds each sandbox lives before it is killed (extend with POST .../timeout). Default: the "
                    "daemon's --sandbox-timeout, which is none (until killed) unless configured.")
    metadata: Metadata = Field(default_factory=dict, description="Labels (string to string) to find sandboxes by.")


class TimeoutRequest(Strict):
    lifetime_s: float = Field(gt=0, le=MAX_LIFETIME_S, description="The sandbox now ends this many seconds from now.")


class SandboxInfo(BaseModel):
    id: str
    snapshot_tag: str
    status: Literal["running", "exited"]
    exit_reason: str | None = None
    pid: int
    created_at: float
    ready_ms: float | None = None
    from_pool: bool = False
    network: str = "internet"
    memory_limit_mib: int | None = None
    netns: str | None = None
    ports: dict[str, int] = Field(default_factory=dict, description="Guest TCP port -> host loopback port.")
    metadata: dict[str, str] = Field(default_factory=dict)
    expires_at: float | None = Field(None, description="Unix time the sandbox will be killed; null: never.")
    # what clients of the original API read
    created_at_unix: int | None = None
    guest_addr: str | None = Field(None, description="Always null: the agent is reached through the daemon.")
    has_branched: bool = False
    branch_count: int = 0


class SpawnEntry(BaseModel):
    """One child of a spawn. A started one also carries its sandbox's fields at the top level (``id``,
    ``pid``, ...), which is what the original API answered for each child."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})
    index: int
    sandbox: SandboxInfo | None = None
    error: str | None = None
    id: str | None = Field(None, description="The sandbox's id (as sandbox.id), for clients of the original API.")


class EvalRequest(Strict):
    expr: str | None = Field(None, max_length=MAX_CODE_BYTES,
                             description="Python expression, evaluated in the warmed interpreter.")
    code: str | None = Field(None, max_length=MAX_CODE_BYTES,
                             description="The original API's name for expr; the answer then also carries its fields "
                                         "(result, error as a string, exit_code).")
    timeout_s: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S)

    @model_validator(mode="after")
    def _one_expression(self) -> EvalRequest:
        if (self.expr is None) == (self.code is None):
            raise ValueError("give exactly one of expr and code")
        return self

    @property
    def expression(self) -> str:
        return self.expr if self.expr is not None else str(self.code)


class CodeError(BaseModel):
    type: str
    message: str
    traceback: str | None = None


class EvalResponse(BaseModel):
    ok: bool
    repr: str | None = None
    value: Any = None
    type: str | None = None
    error: CodeError | str | None = Field(
        None, description="What the code raised; a string \"Type: message\" when the request used `code`.")
    result: str | None = Field(None, description="The original API's answer: the repr (requests with `code`).")
    exit_code: int | None = Field(None, description="The original API's answer: 0, or 1 if it raised.")
    traceback: str | None = None


class RunCodeRequest(Strict):
    code: str = Field(max_length=MAX_CODE_BYTES, description="Python statements; state persists between calls.")
    timeout_s: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S)
    stream: bool = Field(False, description="true: answer with the output as the code writes it, NDJSON "
                                            "RunCodeEvents (application/x-ndjson), the result last.")


class RunCodeResponse(BaseModel):
    ok: bool
    stdout: str = ""
    stderr: str = ""
    repr: str | None = None
    value: Any = None
    error: CodeError | None = None


class RunCodeEvent(BaseModel):
    """One line of a streamed run_code: ``stdout``/``stderr`` chunks, then one ``result`` (its
    ``stdout``/``stderr`` empty: they were streamed) or, when the stream cannot go on, ``error``."""

    type: Literal["stdout", "stderr", "result", "error"]
    data: str | None = Field(None, description="stdout, stderr: text (UTF-8, invalid bytes replaced)")
    ok: bool | None = Field(None, description="result: false if the code raised (see error)")
    stdout: str | None = Field(None, description="result: empty")
    stderr: str | None = Field(None, description="result: empty")
    repr: str | None = Field(None, description="result: the last expression's repr")
    value: Any = Field(None, description="result: the last expression's value, when it is JSON")
    error: CodeError | str | None = Field(
        None, description="result: what the code raised; error: why the stream ends (a string)")
    status: int | None = Field(None, description="error: the HTTP status the failure would have had (504: "
                                                 "the code timed out and was interrupted)")


class ExecRequest(Strict):
    argv: list[str] | None = Field(None, min_length=1, max_length=MAX_ARGV,
                                   description="Program and arguments (no shell).")
    args: list[str] | None = Field(None, min_length=1, max_length=MAX_ARGV, description="The original API's argv.")
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = Field(None, max_length=MAX_STDIN_BYTES)
    timeout_s: float | None = Field(30.0, gt=0, le=MAX_EXEC_TIMEOUT_S,
                                     description="Seconds; the process group is killed after.")
    timeout_secs: int | None = Field(None, gt=0, le=int(MAX_EXEC_TIMEOUT_S),
                                     description="The original API's timeout_s.")
    max_output: int = Field(MAX_EXEC_OUTPUT, ge=0, le=MAX_EXEC_OUTPUT,
                            description="Bytes kept per stream (at most 1 MiB).")
    stream: bool = Field(False, description="true: answer with the output as it comes, NDJSON ProcessEvents "
                                            "(application/x-ndjson) instead of one ExecResponse at the end.")

    @model_validator(mode="after")
    def _original_names(self) -> ExecRequest:
        if (self.argv is None) == (self.args is None):
            raise ValueError("give exactly one of argv and args")
        if self.timeout_secs is not None:
            if "timeout_s" in self.model_fields_set:
                raise ValueError("timeout_s and timeout_secs cannot be used together")
            self.timeout_s = float(self.timeout_secs)
        return self

    @property
    def command(self) -> list[str]:
        return list(self.argv if self.argv is not None else self.args or [])


class StartProcessRequest(Strict):
    argv: list[str] = Field(min_length=1, max_length=MAX_ARGV, description="Program and arguments (no shell).")
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = Field(None, max_length=MAX_STDIN_BYTES, description="Written to its stdin first.")
    stdin_open: bool = Field(False, description="Keep stdin open for POST .../stdin (else it is closed).")
    timeout_s: float | None = Field(None, gt=0, le=MAX_EXEC_TIMEOUT_S,
                                    description="Seconds; the process group is killed after. null: no limit.")

    @property
    def command(self) -> list[str]:
        return list(self.argv)


class ProcessInfo(BaseModel):
    pid: int
    argv: list[str]
    started_at: float
    running: bool
    exit_code: int | None = None
    timed_out: bool = False


class ProcessEvent(BaseModel):
    """One line of a process's NDJSON stream."""

    type: Literal["start", "stdout", "stderr", "exit", "error"]
    pid: int | None = Field(None, description="start")
    data: str | None = Field(None, description="stdout, stderr: text (UTF-8, invalid bytes replaced)")
    exit_code: int | None = Field(None, description="exit: negative for a signal")
    timed_out: bool | None = Field(None, description="exit")
    duration_s: float | None = Field(None, description="exit")
    error: str | None = Field(None, description="error: the stream ends here")
    status: int | None = Field(None, description="error: the HTTP status the failure would have had")


class StdinRequest(Strict):
    data: str | None = Field(None, max_length=MAX_STDIN_BYTES, description="Text (UTF-8).")
    data_b64: str | None = Field(None, max_length=MAX_STDIN_BYTES * 4 // 3 + 4, description="Bytes, base64.")
    eof: bool = Field(False, description="Close stdin after writing.")

    @model_validator(mode="after")
    def _one_payload(self) -> StdinRequest:
        if self.data is not None and self.data_b64 is not None:
            raise ValueError("data and data_b64 cannot be used together")
        if self.data_b64 is not None:
            try:
                base64.b64decode(self.data_b64, validate=True)
            except ValueError as e:
                raise ValueError(f"data_b64 is not base64: {e}") from None
        return self

    @property
    def payload(self) -> bytes:
        if self.data_b64 is not None:
            return base64.b64decode(self.data_b64, validate=True)
        return (self.data or "").encode()


class StdinResult(BaseModel):
    written: int


class KillRequest(Strict):
    signal: Literal["KILL", "TERM", "INT", "HUP"] = "KILL"


class KillResult(BaseModel):
    signalled: bool


class ExecResponse(BaseModel):
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float


class PingResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    agent_version: str | None = None
    python: str | None = None
    numpy: str | None = None
    uptime_s: float | None = None
    pid: int | None = Field(None, description="The agent's pid in the guest (1: it is the init).")
    time: float | None = Field(None, description="The guest's clock, unix seconds.")
    # what clients of the original API read
    pong: bool = True
    numpy_version: str | None = Field(None, description="numpy's version, or \"not-installed\".")
    agent_lang: str = "python"
    warmup_ready: bool = True


class InterruptResponse(BaseModel):
    """What ``interrupt`` reached: running eval/run_code calls, how many stopped within the grace
    time, how many did not (blocked in C code; the sandbox answers new requests all the same)."""

    found: int
    stopped: int
    stuck: int


class FileEntry(BaseModel):
    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float


class FileList(BaseModel):
    entries: list[FileEntry]


class WriteResult(BaseModel):
    bytes_written: int


class MkdirRequest(Strict):
    path: str = Field(min_length=1, max_length=MAX_PATH)
    parents: bool = True


class CreateWorkspaceRequest(Strict):
    name: str = Field(pattern=TAG_PATTERN, description="The workspace's name (letters, digits, '_' and '-').")
    snapshot_tag: str = Field(pattern=TAG_PATTERN, description="The snapshot its first sandbox is forked from.")
    network: Literal["internet", "none", "user"] = Field("internet", description="As for POST /v1/sandboxes.")
    memory_limit_mib: int | None = Field(None, ge=MIN_MEMORY_LIMIT_MIB, le=MAX_MEMORY_LIMIT_MIB)
    lifetime_s: float | None = Field(None, gt=0, le=MAX_LIFETIME_S,
                                     description="Each of its sandboxes' lifetime, from its start or resume.")
    metadata: Metadata = Field(default_factory=dict, description="Labels of its sandboxes (plus forkd.workspace).")
    idle_suspend_s: float | None = Field(
        None, gt=0, le=MAX_LIFETIME_S,
        description="Suspend it after this many seconds without a request to its sandbox (default: the daemon's "
                    "--workspace-idle-suspend, none unless configured).")
    timeout_s: float = Field(120.0, gt=0, le=MAX_TIMEOUT_S, description="Seconds allowed for the restore.")


class WorkspaceOptions(BaseModel):
    network: str = "internet"
    memory_limit_mib: int | None = None
    lifetime_s: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    idle_suspend_s: float | None = None


class WorkspaceInfo(BaseModel):
    name: str
    snapshot_tag: str = Field(description="The snapshot it was created from.")
    state_tag: str | None = Field(None, description="Its last suspended state (null: never suspended).")
    sandbox_id: str | None = Field(None, description="Its sandbox while running.")
    status: Literal["running", "suspended", "stale"] = Field(
        description="stale: it was running but its sandbox is gone (a reboot, a kill); resume it.")
    options: WorkspaceOptions
    created_at: float
    last_active: float = Field(description="Unix time of the last request to its sandbox (or of its suspend).")
    suspended_at: float | None = None
    state_bytes: int = Field(0, description="Bytes on disk of its state (the snapshots of its own it needs).")
    depth: int = Field(0, description="Links of its own in its state's chain.")
    links: list[str] = Field(default_factory=list, description="The snapshots it owns, oldest first.")
    suspends: int = 0
    last_suspend: dict[str, Any] | None = Field(None, description="The last suspend's branch: mode, pause_ms, "
                                                                  "total_ms, dirty_bytes, bytes_written.")


class Capacity(BaseModel):
    """What this node can still take (``GET /v1/capacity``): a client spreading a spawn over several
    controllers divides it by ``free_slots``. Bytes, unix CPUs; ``free_slots`` is an estimate."""

    node: str = Field(description="This controller's node name (--node-name, default the hostname).")
    memory_total_bytes: int = Field(description="The host's MemTotal, or this daemon's cgroup limit if lower.")
    memory_available_bytes: int = Field(description="The host's MemAvailable, or what the daemon's cgroup limit "
                                                    "leaves if less.")
    memory_limit_bytes: int | None = Field(None, description="The daemon's cgroup v2 memory.max (null: none).")
    vcpus: int = Field(description="CPUs the daemon may run on.")
    sandboxes_running: int
    sandboxes_starting: int = Field(0, description="Children of spawns in flight.")
    max_sandboxes: int | None = Field(None, description="--max-sandboxes (null: no limit).")
    sandbox_cost_bytes: int = Field(description="Memory a sandbox is counted at for free_slots.")
    memory_reserve_bytes: int = Field(description="Memory left free for the host when counting free_slots.")
    pool_ready: dict[str, int] = Field(default_factory=dict,
                                       description="Snapshot tag -> QEMUs waiting in its pool (--pool-size).")
    free_slots: int = Field(description="Sandboxes that fit now: (available - reserve) / cost, at most "
                                        "max_sandboxes - sandboxes_running - sandboxes_starting.")


class PullRequest(Strict):
    url: str = Field(min_length=1, max_length=4096,
                     description="http(s) URL of a pack: another controller's /v1/snapshots/{tag}/pack, or any "
                                 "server's .tar.zst. Redirects: at most 5, http(s) only, never https to http.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="The pack file's sha256 (hex): checked before anything is registered.")
    tag: str | None = Field(None, pattern=TAG_PATTERN,
                            description="Register under this tag (a pack of one snapshot only).")
    force: bool = Field(False, description="Replace snapshots with the same tags but other content (else 409).")
    token: str | None = Field(None, min_length=1, max_length=4096, pattern=r"^[\x21-\x7E]+$", repr=False,
                              description="Bearer token (visible ASCII) sent with the request to the URL's own "
                                          "origin only (scheme, host and port; never again once a redirect left "
                                          "it), e.g. the peer controller's. Never logged.")
    timeout_s: float = Field(3600.0, gt=0, le=MAX_TIMEOUT_S,
                             description="Seconds the whole download may take (connecting: at most 30).")


class PullResponse(UnpackResponse):
    """What a pull registered (as an unpack), and what was fetched."""

    source: str = Field(description="The URL fetched last (after redirects), without its query or credentials.")
    bytes: int = Field(description="Bytes of the pack.")
    sha256: str = Field(description="The pack file's sha256 (hex).")
