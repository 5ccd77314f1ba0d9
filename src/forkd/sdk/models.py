"""Result types of the SDK (plain dataclasses).

They are built from the controller's JSON with :meth:`Model.from_dict`, which ignores fields it does
not know (a newer controller may add some) and gives missing optional fields their defaults. Times are
unix seconds, durations seconds (``*_ms``: milliseconds), sizes bytes (``*_mib``: MiB).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

__all__ = [
    "CapacityInfo",
    "CommandResult",
    "EvalResult",
    "Execution",
    "FileEntry",
    "InterruptResult",
    "Model",
    "PackResult",
    "PendingSnapshot",
    "PingResult",
    "ProcessInfo",
    "PullResult",
    "SandboxInfo",
    "SnapshotInfo",
    "SpawnEntry",
    "UnpackResult",
    "VersionInfo",
    "WorkspaceInfo",
]


class Model:
    """Mixin: construction from a JSON object, tolerant of unknown fields."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Self:
        """Build from ``data``; unknown keys are ignored. ``ValueError`` if a required field is missing."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        missing = [n for n, f in known.items() if n not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.__name__}: missing field(s) {', '.join(missing)}")
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        return cls(**kwargs)


@dataclass(frozen=True)
class VersionInfo(Model):
    """``GET /version``: the controller's version and how it runs VMs."""

    version: str
    api: str = "v1"
    accelerator: str = ""
    accelerator_reason: str = ""
    qemu_version: str = ""


@dataclass(frozen=True)
class SnapshotInfo(Model):
    """A saved, warmed parent VM that sandboxes are forked from."""

    tag: str
    status: str = "ready"
    bootable: bool = True
    """False for a snapshot that cannot be restored here (``warning`` says why)."""
    warning: str | None = None
    created_at: float = 0.0
    memory_mib: int = 0
    vcpus: int = 1
    accel: str = ""
    cpu: str = ""
    machine: str = ""
    qemu_version: str | None = None
    image_id: str | None = None
    vmstate_bytes: int = 0
    memory_bytes: int = 0
    memory_allocated_bytes: int = 0
    guest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each creation step."""
    parent: str | None = None
    sandboxes: int = 0
    """Live sandboxes forked from this snapshot."""
    kind: str = "root"
    """root, flat (a branch with its own memory.bin) or delta (a branch mapping its base's memory.bin)."""
    memory_source: str | None = None
    depth: int | None = None
    ancestors: list[str] | None = None
    """Root first (only from ``snapshot_info``)."""
    dependents: list[str] | None = None
    logical_bytes: int | None = None
    physical_bytes: int | None = None


@dataclass(frozen=True)
class BranchResult(Model):
    """The answer to a BRANCH: the new snapshot's tag, the pause of the source (milliseconds), the mode
    chosen and the bytes written. ``status`` is ``writing`` when the call did not wait."""

    tag: str
    status: str = "ready"
    mode: str | None = None
    pause_ms: float | None = None
    total_ms: float | None = None
    dirty_bytes: int | None = None
    bytes_written: int | None = None


@dataclass(frozen=True)
class SandboxInfo(Model):
    """What the controller knows about one sandbox (a child VM)."""

    id: str
    snapshot_tag: str
    status: str = "running"
    """``"running"`` or ``"exited"``."""
    exit_reason: str | None = None
    pid: int = 0
    created_at: float = 0.0
    ready_ms: float | None = None
    """Milliseconds from launch until the child's agent answered."""
    from_pool: bool = False
    network: str = "user"
    memory_limit_mib: int | None = None
    netns: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    """Guest TCP port (as a string) -> host loopback port, for the ports asked with ``expose``."""
    metadata: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None
    """Unix time the controller kills it (``None``: never; see :meth:`Sandbox.set_timeout`)."""

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class SpawnEntry:
    """One child of a spawn request: its sandbox, or the error that stopped it."""

    index: int
    sandbox: SandboxInfo | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SpawnEntry:
        index = data.get("index") if isinstance(data, Mapping) else None
        if not isinstance(index, int):
            raise ValueError("SpawnEntry: expected an object with an integer 'index'")
        sb, err = data.get("sandbox"), data.get("error")
        info = SandboxInfo.from_dict(sb) if isinstance(sb, Mapping) else None
        if info is None and err is None:
            err = "the controller reported neither a sandbox nor an error"
        return cls(index=index, sandbox=info, error=None if err is None else str(err))


@dataclass(frozen=True)
class PendingSnapshot(Model):
    """A branch snapshot still being written (``status="writing"``) or that failed (``error``)."""

    tag: str
    status: str = "writing"
    error: str | None = None


@dataclass(frozen=True)
class UnpackResult(Model):
    """What ``unpack_snapshot`` registered: the pack's chain here, root first (its snapshot last)."""

    tags: list[str]
    registered: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class PullResult(UnpackResult):
    """What ``pull_snapshot`` fetched and registered: as an unpack, plus the URL fetched (after redirects,
    without its query), the pack's size in bytes and its sha256."""

    source: str = ""
    bytes: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class CapacityInfo(Model):
    """``GET /v1/capacity``: what a controller's node can still take (bytes; ``free_slots`` sandboxes)."""

    node: str
    free_slots: int
    """Sandboxes that fit now: what a multi-controller spawn gives this node at most."""
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    memory_limit_bytes: int | None = None
    vcpus: int = 0
    sandboxes_running: int = 0
    sandboxes_starting: int = 0
    max_sandboxes: int | None = None
    sandbox_cost_bytes: int = 0
    memory_reserve_bytes: int = 0
    pool_ready: dict[str, int] = field(default_factory=dict)
    """Snapshot tag -> QEMUs waiting in its pool."""


@dataclass(frozen=True)
class PackResult:
    """A pack written by ``pack_snapshot``: where, the chain it holds (root first), its size in bytes."""

    path: str
    chain: list[str]
    bytes: int


@dataclass(frozen=True)
class ProcessInfo(Model):
    """A process started with ``commands.run(..., background=True)``: ``exit_code`` once it ended."""

    pid: int
    argv: list[str] = field(default_factory=list)
    started_at: float = 0.0
    running: bool = True
    exit_code: int | None = None
    timed_out: bool = False


@dataclass(frozen=True)
class InterruptResult(Model):
    """What :meth:`Sandbox.interrupt` reached: running calls found, stopped, and stuck in C code."""

    found: int = 0
    stopped: int = 0
    stuck: int = 0


@dataclass(frozen=True)
class PingResult(Model):
    """The guest agent's answer to ``ping``."""

    agent_version: str | None = None
    python: str | None = None
    numpy: str | None = None
    uptime_s: float | None = None
    """Seconds since the agent started (guest monotonic clock)."""
    pid: int | None = None
    time: float | None = None
    """The guest's wall clock, unix seconds."""


@dataclass(frozen=True)
class EvalResult(Model):
    """The result of evaluating an expression.

    ``value`` is the result as JSON (lists for tuples, ...) when it could be serialized, else ``None``;
    ``repr`` is always the guest's ``repr()`` of it and ``type`` its type name.
    """

    repr: str
    value: Any = None
    type: str = ""

    @property
    def serializable(self) -> bool:
        """Whether ``value`` carries the result (``None`` results count as serializable)."""
        return self.value is not None or self.type == "NoneType"

    def python_value(self) -> Any:
        """``value`` if the result was JSON-serializable, else the ``repr`` string."""
        return self.value if self.serializable else self.repr


@dataclass(frozen=True)
class Execution(Model):
    """The result of ``run_code``: captured output and the last expression statement's value.

    ``repr`` is ``None`` when the code did not end with an expression (or it was ``None``); ``value`` is
    that value as JSON when it could be serialized, else ``None``.
    """

    stdout: str = ""
    stderr: str = ""
    value: Any = None
    repr: str | None = None

    @property
    def text(self) -> str | None:
        """The last expression's ``repr`` (like a REPL shows it), or ``None``."""
        return self.repr


@dataclass(frozen=True)
class CommandResult(Model):
    """The result of ``commands.run``.

    ``exit_code`` is negative (minus the signal number) for a process killed by a signal, ``None`` if
    unknown. Output beyond ``max_output`` bytes per stream is dropped (``*_truncated``); ``timed_out``
    means the process group was killed when the timeout expired. ``duration_s`` is in seconds.
    """

    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Exit code 0 and not timed out."""
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class FileEntry(Model):
    """A file in the guest: ``type`` is ``"file"``, ``"dir"``, ``"symlink"`` or ``"other"``; ``mode`` the
    permission bits; ``size`` bytes; ``mtime`` unix seconds."""

    name: str
    path: str
    type: str
    size: int = 0
    mode: int = 0
    mtime: float = 0.0

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"


@dataclass(frozen=True)
class WorkspaceInfo(Model):
    """A workspace: a sandbox under a name, ``running``, ``suspended`` (its state on disk) or ``stale``
    (it was running and its sandbox is gone, e.g. after a reboot: resume it from its last state)."""

    name: str
    snapshot_tag: str
    status: str
    options: dict[str, Any] = field(default_factory=dict)
    """network, memory_limit_mib, lifetime_s, metadata, idle_suspend_s: what each resume uses."""
    created_at: float = 0.0
    last_active: float = 0.0
    state_tag: str | None = None
    sandbox_id: str | None = None
    suspended_at: float | None = None
    state_bytes: int = 0
    """Bytes on disk of the state (the snapshots of its own it needs)."""
    depth: int = 0
    links: list[str] = field(default_factory=list)
    suspends: int = 0
    last_suspend: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self.status == "running"
