"""Request and response bodies of REST API v1 (the OpenAPI document is generated from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from forkd.engine.specguard import MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, MIN_VCPUS

TAG_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    warm_code: str | None = Field(None, max_length=1 << 20, description="Python run in the parent before saving.")
    boot_timeout_s: float = Field(300.0, gt=0, le=3600, description="Seconds to wait for the guest agent.")
    image: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                              description="A recipe image built with forkd image build --name (default: the "
                                          "built-in Python + numpy image).")


class SnapshotInfo(BaseModel):
    tag: str
    status: Literal["ready", "writing", "failed"] = "ready"
    created_at: float
    memory_mib: int
    vcpus: int
    accel: str
    cpu: str
    machine: str
    qemu_version: str | None
    image_id: str | None
    vmstate_bytes: int
    memory_bytes: int
    memory_allocated_bytes: int
    guest: dict[str, Any]
    timings: dict[str, float]
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
    mode: Literal["auto", "delta", "flat"] = Field(
        "auto", description="delta: pages in the vmstate, maps the base memory.bin; flat: a new memory.bin; "
                            "auto: delta up to 32 MiB of dirty pages, flat above.")
    wait: bool = Field(True, description="false: answer 202 at once; the snapshot's status is `writing` until ready.")


class BranchResponse(BaseModel):
    tag: str
    status: Literal["ready", "writing"]
    mode: str | None = None
    pause_ms: float | None = None
    total_ms: float | None = None
    dirty_bytes: int | None = None
    bytes_written: int | None = None


class CompactRequest(Strict):
    to: str = Field(pattern=TAG_PATTERN, description="Tag of the flat, parentless copy.")


class CreateSandboxesRequest(Strict):
    snapshot_tag: str = Field(pattern=TAG_PATTERN)
    n: int = Field(1, ge=1, le=1000, description="Number of children.")
    memory_limit_mib: int | None = Field(None, ge=64, le=1 << 20, description="Memory limit per child, MiB.")
    per_child_netns: bool = Field(False, description="Run child i in network namespace forkd-child-<i>.")
    live_fork: bool = Field(False, description="Accepted for compatibility; every forkd sandbox can be branched.")
    network: Literal["internet", "none", "user"] = Field(
        "internet", description="internet: outbound to public addresses only, with DNS (never this host, private "
        "or link-local ranges, other sandboxes); none: no network; user: old name of internet.")
    expose: list[int] = Field(default_factory=list, max_length=16,
                              description="Guest TCP ports to forward from host loopback ports (see `ports`).")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Seconds allowed for each child's restore.")


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


class SpawnEntry(BaseModel):
    index: int
    sandbox: SandboxInfo | None = None
    error: str | None = None


class EvalRequest(Strict):
    expr: str = Field(max_length=16 << 20, description="Python expression, evaluated in the warmed interpreter.")
    timeout_s: float = Field(60.0, gt=0, le=3600)


class CodeError(BaseModel):
    type: str
    message: str
    traceback: str | None = None


class EvalResponse(BaseModel):
    ok: bool
    repr: str | None = None
    value: Any = None
    type: str | None = None
    error: CodeError | None = None


class RunCodeRequest(Strict):
    code: str = Field(max_length=16 << 20, description="Python statements; state persists between calls.")
    timeout_s: float = Field(60.0, gt=0, le=3600)


class RunCodeResponse(BaseModel):
    ok: bool
    stdout: str = ""
    stderr: str = ""
    repr: str | None = None
    value: Any = None
    error: CodeError | None = None


class ExecRequest(Strict):
    argv: list[str] = Field(min_length=1, max_length=4096, description="Program and arguments (no shell).")
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = Field(None, max_length=64 << 20)
    timeout_s: float | None = Field(30.0, gt=0, le=86400, description="Seconds; the process group is killed after.")
    max_output: int = Field(1 << 20, ge=0, le=1 << 20, description="Bytes kept per stream (at most 1 MiB).")


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
    path: str = Field(min_length=1, max_length=4096)
    parents: bool = True
