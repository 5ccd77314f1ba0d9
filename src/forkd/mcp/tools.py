"""The MCP tools: one method each, whose signature is the tool's JSON schema and whose docstring is what
the agent reads. They call the Python SDK; :mod:`forkd.mcp.server` registers them and turns the SDK's
errors into MCP tool errors."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from pydantic import Field

from forkd.limits import (
    MAX_CHILDREN,
    MAX_CODE_BYTES,
    MAX_LIFETIME_S,
    MAX_MEMORY_MIB,
    MAX_METADATA,
    MAX_PATH,
    MAX_STDIN_BYTES,
    MAX_TIMEOUT_S,
    MAX_VCPUS,
    MAX_WARM_CODE_BYTES,
    MIN_MEMORY_MIB,
    TAG_PATTERN,
)
from forkd.mcp import calls
from forkd.mcp.backend import Backend
from forkd.mcp.explore import explore as explore_variants
from forkd.mcp.models import (
    MAX_VARIANTS,
    BranchOutcome,
    CodeOutcome,
    CodeTimeout,
    Command,
    CommandOutcome,
    CommandTimeout,
    EvalOutcome,
    ExploreOutcome,
    FileInfo,
    FileRead,
    FileWritten,
    KillOutcome,
    SandboxSummary,
    SnapshotSummary,
    SpawnOutcome,
    Variant,
)
from forkd.mcp.output import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_OUTPUT_CHARS,
    MAX_FILE_BYTES,
    MAX_OUTPUT_CHARS,
    decode_upload,
    file_content,
)
from forkd.sdk import Controller, MultiController, SandboxInfo, SnapshotInfo, SpawnError

DEFAULT_LIFETIME_S = 3600.0
"""Seconds a sandbox spawned through MCP lives unless the call says otherwise (``--sandbox-lifetime``)."""

SandboxId = Annotated[str, Field(min_length=1, max_length=160,
                                 description="A sandbox id from spawn (sb-..., or NODE~sb-... with several daemons).")]
Tag = Annotated[str, Field(pattern=TAG_PATTERN, description="A snapshot tag: letters, digits, '_' and '-'.")]
GuestPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH, description="An absolute path in the guest.")]
Labels = Annotated[dict[str, str] | None, Field(max_length=MAX_METADATA,
                                                description="Labels (string keys and values).")]
MaxChars = Annotated[int, Field(ge=0, le=MAX_OUTPUT_CHARS,
                                description="Characters of stdout and of stderr returned; the rest is cut, "
                                            "and `note` says how many bytes were shown of how many.")]
Lifetime = Annotated[float | None, Field(gt=0, le=MAX_LIFETIME_S,
                                         description="Seconds each sandbox lives before the daemon kills it "
                                                     "(default: the server's, normally 3600).")]


def snapshot_summary(s: SnapshotInfo) -> SnapshotSummary:
    return SnapshotSummary(tag=s.tag, kind=s.kind, parent=s.parent, bootable=s.bootable, warning=s.warning,
                           sandboxes=s.sandboxes, memory_mib=s.memory_mib, image_id=s.image_id, created_at=s.created_at)


def sandbox_summary(s: SandboxInfo, sandbox_id: str | None = None) -> SandboxSummary:
    return SandboxSummary(id=sandbox_id or s.id, snapshot_tag=s.snapshot_tag, status=s.status, metadata=s.metadata,
                          created_at=s.created_at, expires_at=s.expires_at)


class Tools:
    """The tool implementations, bound to one backend."""

    def __init__(self, backend: Backend, default_lifetime_s: float | None = DEFAULT_LIFETIME_S) -> None:
        self.backend = backend
        self.default_lifetime_s = default_lifetime_s

    def _ctl(self) -> Controller | MultiController:
        return self.backend.controller()

    def _lifetime(self, lifetime_s: float | None) -> float | None:
        return self.default_lifetime_s if lifetime_s is None else lifetime_s

    # ------------------------------------------------------------ service and snapshots

    def info(self) -> dict[str, Any]:
        """Which forkd this server talks to: mode (`daemon`: FORKD_URL; `local`: a private daemon it
        started), the daemon's address, version, accelerator (kvm, or tcg: software emulation, slower)
        and QEMU version."""
        v = self._ctl().version()
        return {"mode": self.backend.mode, "url": self.backend.url, "version": v.version, "api": v.api,
                "accelerator": v.accelerator, "qemu_version": v.qemu_version}

    def list_snapshots(self) -> list[SnapshotSummary]:
        """List the snapshots sandboxes can be spawned from. A snapshot is a booted, warmed Python VM saved
        to disk; `bootable: false` ones cannot be restored on this host (`warning` says why)."""
        return [snapshot_summary(s) for s in self._ctl().list_snapshots()]

    def create_snapshot(
        self, tag: Tag,
        image: Annotated[str | None, Field(description="A recipe image built with `forkd image build --name` "
                                                       "(default: the built-in Python + numpy image).")] = None,
        warm_code: Annotated[str | None, Field(max_length=MAX_WARM_CODE_BYTES,
                                               description="Python run in the VM before it is saved: imports "
                                                           "and data every sandbox should start with.")] = None,
        memory_mib: Annotated[int, Field(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB, description="Guest RAM, MiB.")] = 512,
        vcpus: Annotated[int, Field(ge=1, le=MAX_VCPUS)] = 1,
        boot_timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S,
                                               description="Seconds allowed for the guest to boot.")] = 300.0,
    ) -> SnapshotSummary:
        """Create a snapshot: boot a VM, run `warm_code` in it, save it as `tag`. Slow (seconds to minutes;
        the call waits). Sandboxes spawned from it start in milliseconds with that state. Fails if `tag`
        exists."""
        return snapshot_summary(self._ctl().create_snapshot(tag, memory_mib=memory_mib, vcpus=vcpus,
                                                            warm_code=warm_code, boot_timeout=boot_timeout_s,
                                                            image=image))

    def delete_snapshot(
        self, tag: Tag,
        cascade: Annotated[bool, Field(description="Also delete the branches made from it.")] = False,
    ) -> dict[str, str]:
        """Delete a snapshot (for instance a branch kept by `explore`). Refused while live sandboxes came
        from it or other snapshots depend on it (unless `cascade`): kill them first."""
        self._ctl().delete_snapshot(tag, cascade=cascade)
        return {"deleted": tag}

    # ------------------------------------------------------------ sandboxes

    def spawn(
        self, tag: Annotated[str, Field(min_length=1, description="The snapshot to fork from (list_snapshots).")],
        n: Annotated[int, Field(ge=1, le=MAX_CHILDREN, description="How many sandboxes.")] = 1,
        lifetime_s: Lifetime = None,
        metadata: Labels = None,
        network: Annotated[str, Field(pattern="^(internet|none)$",
                                      description="internet (public addresses only) or none.")] = "internet",
    ) -> SpawnOutcome:
        """Start `n` sandboxes from snapshot `tag`, each a copy-on-write fork of the saved VM: a Python
        interpreter (state kept between run_code/eval calls) and a shell. Returns their ids. They are
        killed after `lifetime_s` seconds, or by `kill`. Children that failed to start are listed in
        `errors` (the others still run)."""
        results = self._ctl().spawn_sandboxes(tag, n, lifetime=self._lifetime(lifetime_s), metadata=metadata,
                                              network=network, return_exceptions=True)
        ids = [r.id for r in results if not isinstance(r, SpawnError)]
        errors = [str(r) for r in results if isinstance(r, SpawnError)]
        if not ids:
            raise SpawnError(f"no sandbox started: {'; '.join(errors[:5])}")
        return SpawnOutcome(sandbox_ids=ids, errors=errors)

    def list_sandboxes(
        self, metadata: Annotated[dict[str, str] | None,
                                  Field(description="Only sandboxes with all of these labels.")] = None,
    ) -> list[SandboxSummary]:
        """List the daemon's sandboxes (status running or exited), optionally those with all `metadata`
        labels."""
        return [sandbox_summary(s.info, s.id) for s in self._ctl().list_sandboxes(metadata=metadata)]

    def kill(self, sandbox_ids: Annotated[list[SandboxId], Field(min_length=1, max_length=MAX_CHILDREN)],
             ) -> KillOutcome:
        """Kill sandboxes (their VMs and files go). A sandbox that is already gone counts as killed."""
        ctl = self._ctl()
        handles = [calls.sandbox(ctl, sid) for sid in dict.fromkeys(sandbox_ids)]
        killed: list[str] = []
        errors: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(8, len(handles))) as pool:
            for sb, fut in [(sb, pool.submit(sb.kill)) for sb in handles]:
                try:
                    fut.result()
                    killed.append(sb.id)
                except Exception as e:  # noqa: BLE001 - reported per sandbox
                    errors[sb.id] = self.backend.redact(str(e))
        return KillOutcome(killed=killed, errors=errors)

    def branch(
        self, sandbox_id: SandboxId,
        tag: Annotated[str | None, Field(pattern=TAG_PATTERN,
                                         description="The new snapshot's tag (default: generated).")] = None,
    ) -> BranchOutcome:
        """Snapshot a running sandbox as it is now (memory, Python state, files); it keeps running. Spawn
        from the returned tag to get copies. For a one-call fork-run-compare, use `explore`."""
        r = calls.sandbox(self._ctl(), sandbox_id).branch(tag)
        return BranchOutcome(tag=r.tag, mode=r.mode, pause_ms=r.pause_ms, dirty_bytes=r.dirty_bytes)

    # ------------------------------------------------------------ code and commands

    def run_code(
        self, sandbox_id: SandboxId,
        code: Annotated[str, Field(max_length=MAX_CODE_BYTES, description="Python statements.")],
        timeout_s: CodeTimeout = 60.0,
        max_output_chars: MaxChars = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> CodeOutcome:
        """Run Python statements in the sandbox's interpreter. State persists between calls (variables,
        imports; shared with `eval`). Returns stdout, stderr and the last expression's value (`value` as
        JSON, `repr`). If the code raises, `ok` is false and `error` has the type, message and traceback.
        After `timeout_s` seconds the code is interrupted; the sandbox keeps answering."""
        return calls.run_code(calls.sandbox(self._ctl(), sandbox_id), code, timeout_s, max_output_chars)

    def eval(
        self, sandbox_id: SandboxId,
        expr: Annotated[str, Field(min_length=1, max_length=MAX_CODE_BYTES, description="One Python expression.")],
        timeout_s: CodeTimeout = 60.0,
    ) -> EvalOutcome:
        """Evaluate one Python expression in the sandbox's interpreter (same state as `run_code`): its value
        as JSON when serializable, its repr and type. `ok` is false with `error` if it raised."""
        return calls.eval_expr(calls.sandbox(self._ctl(), sandbox_id), expr, timeout_s)

    def run_command(
        self, sandbox_id: SandboxId, command: Command,
        timeout_s: CommandTimeout = 60.0,
        max_output_chars: MaxChars = DEFAULT_MAX_OUTPUT_CHARS,
        cwd: Annotated[str | None, Field(max_length=MAX_PATH, description="Working directory.")] = None,
        env: Annotated[dict[str, str] | None, Field(description="Environment variables to add.")] = None,
        stdin: Annotated[str | None, Field(max_length=MAX_STDIN_BYTES, description="Text fed to stdin.")] = None,
    ) -> CommandOutcome:
        """Run a command in the sandbox and wait for it: exit code, stdout, stderr. A string runs under
        /bin/sh -c; a list is the program and its arguments. Output beyond `max_output_chars` characters
        per stream is cut, and `note` says so ("[output cut: N of M bytes shown]"). After `timeout_s`
        seconds the process group is killed (`timed_out`). A non-zero exit is a result, not an error."""
        return calls.run_command(calls.sandbox(self._ctl(), sandbox_id), command, timeout_s, max_output_chars,
                                 cwd=cwd, env=env, stdin=stdin)

    # ------------------------------------------------------------ files

    def read_file(
        self, sandbox_id: SandboxId, path: GuestPath,
        max_bytes: Annotated[int, Field(ge=0, le=MAX_FILE_BYTES, description="Bytes returned at most.")]
        = DEFAULT_MAX_FILE_BYTES,
        base64: Annotated[bool, Field(description="Return base64 even if the file is text.")] = False,
    ) -> FileRead:
        """Read a file in the sandbox. Text (UTF-8) comes back as is (`encoding: utf-8`); binary files as
        base64 (`encoding: base64`). Files longer than `max_bytes` are cut (`truncated`, `note`)."""
        data = calls.sandbox(self._ctl(), sandbox_id).files.read(path)
        fc = file_content(data, max_bytes, base64)
        return FileRead(path=path, content=fc.content, encoding=fc.encoding, size=fc.size, truncated=fc.truncated,
                        note=fc.note)

    def write_file(
        self, sandbox_id: SandboxId, path: GuestPath,
        content: Annotated[str, Field(description="The file's text, or its bytes in base64 with base64=true.")],
        base64: Annotated[bool, Field(description="`content` is base64 (for binary files).")] = False,
        mode: Annotated[int, Field(ge=0, le=0o7777, description="Permission bits as a number: 420 is 0644, "
                                                                "493 is 0755.")] = 0o644,
    ) -> FileWritten:
        """Write a file in the sandbox (replaced atomically; missing parent directories are created)."""
        n = calls.sandbox(self._ctl(), sandbox_id).files.write(path, decode_upload(content, base64), mode=mode)
        return FileWritten(path=path, bytes_written=n)

    def list_files(
        self, sandbox_id: SandboxId, path: GuestPath = "/",
        max_entries: Annotated[int, Field(ge=1, le=10_000, description="Entries returned at most.")] = 1000,
    ) -> dict[str, Any]:
        """List a directory in the sandbox: each entry's name, path, type (file, dir, symlink, other), size
        in bytes, permission bits and mtime (unix seconds), sorted by name."""
        entries = calls.sandbox(self._ctl(), sandbox_id).files.list(path)
        shown = [FileInfo(name=e.name, path=e.path or os.path.join(path, e.name), type=e.type, size=e.size,
                          mode=e.mode, mtime=e.mtime).model_dump() for e in entries[:max_entries]]
        return {"path": path, "entries": shown, "total": len(entries), "truncated": len(entries) > max_entries}

    # ------------------------------------------------------------ explore

    def explore(
        self, sandbox_id: SandboxId,
        variants: Annotated[list[Variant], Field(min_length=1, max_length=MAX_VARIANTS,
                                                 description="What to try: each {\"code\": ...} (Python) or "
                                                             "{\"command\": ...} (shell string or argv).")],
        keep: Annotated[int | None, Field(ge=0, lt=MAX_VARIANTS,
                                          description="Index of the child to keep running; null: kill all.")]
        = None,
        timeout_s: CodeTimeout = 60.0,
        max_output_chars: Annotated[int, Field(ge=0, le=MAX_OUTPUT_CHARS,
                                               description="Characters of each child's stdout and of its "
                                                           "stderr returned.")] = 4000,
        lifetime_s: Lifetime = None,
    ) -> ExploreOutcome:
        """Explore in parallel: fork one child per variant from the sandbox's CURRENT state (its variables,
        imports and files as they are now), run each variant in its own child at the same time, and return
        every child's result side by side (`results[i]` is variant i: ok, stdout, stderr, value/repr or
        exit_code, error). The sandbox itself is untouched. Afterwards every child is killed except
        `keep`, which keeps running with its variant's effects (use its `sandbox_id`). Use it to try
        alternatives (approaches, parameters, fixes) without redoing the setup. At most 16 variants;
        `timeout_s` is per variant."""
        return explore_variants(self._ctl(), sandbox_id, variants, keep, timeout_s, max_output_chars,
                                self._lifetime(lifetime_s))


#: tool name -> method name (``eval`` is a method name too, but never a bare builtin here)
TOOL_NAMES = ("info", "list_snapshots", "create_snapshot", "delete_snapshot", "spawn", "list_sandboxes", "kill",
              "branch", "run_code", "eval", "run_command", "read_file", "write_file", "list_files", "explore")
