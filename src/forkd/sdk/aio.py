"""The asyncio client: :class:`AsyncController` and :class:`AsyncSandbox`.

This file mirrors ``sync.py`` class for class and method for method (every method is ``async``, the
context managers are ``async with``); the request building and response parsing live in ``_base.py``.

Example::

    import asyncio
    from forkd import AsyncController

    async def main() -> None:
        async with AsyncController() as ctl:
            sandboxes = await ctl.spawn_sandboxes("py", 3)
            try:
                print(await asyncio.gather(*(sb.eval("2 ** 10") for sb in sandboxes)))
            finally:
                await asyncio.gather(*(sb.kill() for sb in sandboxes))

    asyncio.run(main())
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import httpx

from forkd.sdk import _base as b
from forkd.sdk._config import Verify, async_client
from forkd.sdk.errors import ForkdAPIError, NotFoundError, SpawnError
from forkd.sdk.models import (
    BranchResult,
    CapacityInfo,
    CommandResult,
    EvalResult,
    Execution,
    FileEntry,
    InterruptResult,
    PackResult,
    PendingSnapshot,
    PingResult,
    ProcessInfo,
    PullResult,
    SandboxInfo,
    SnapshotInfo,
    UnpackResult,
    VersionInfo,
    WorkspaceInfo,
)

__all__ = ["AsyncCommandHandle", "AsyncCommands", "AsyncController", "AsyncFiles", "AsyncSandbox",
           "AsyncWorkspace"]

T = TypeVar("T")


class AsyncController(b.BaseController):
    """An asyncio client of ``forkd-controller``'s REST API (see :class:`forkd.Controller`).

    ``url`` and ``token`` default to ``$FORKD_URL`` (else ``http://127.0.0.1:8889``) and ``$FORKD_TOKEN``;
    ``timeout`` is the default HTTP request timeout in seconds (``None``: no limit); ``verify`` applies
    to https URLs; ``transport`` replaces httpx's async transport.

    Use it as an async context manager to close its connections; that does not kill any sandbox.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float | None = 60.0,
                 verify: Verify = True, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, token, timeout, verify)
        self._client = async_client(self._endpoint, timeout, transport)

    async def _request(self, call: b.Call[T]) -> T:
        try:
            resp = await self._client.request(call.method, call.path, params=call.params, json=call.json,
                                              content=call.achunks(), headers=call.headers,
                                              timeout=self._timeout_of(call))
        except httpx.RequestError as e:
            raise self._failed(e, call) from e
        return self._finish(call, resp)

    async def _events(self, call: b.StreamCall) -> AsyncIterator[dict[str, object]]:
        """The NDJSON events of a streamed answer, as they arrive."""
        try:
            async with self._client.stream(call.method, call.path, json=call.json,
                                           timeout=b.timeout_config(call.timeout)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise b.error_from_response(resp, self._endpoint.token)
                async for line in resp.aiter_lines():
                    if line.strip():
                        yield b.event_of(line)
        except httpx.RequestError as e:
            raise self._failed(e, b.Call(call.method, call.path, b.nothing)) from e

    async def close(self) -> None:
        """Close the HTTP connections (sandboxes keep running)."""
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- service
    async def health(self) -> bool:
        """Whether the controller is up (``/healthz`` needs no token)."""
        return await self._request(b.op_health())

    async def version(self) -> VersionInfo:
        """The controller's version, API version, accelerator (kvm/tcg) and QEMU version."""
        return await self._request(b.op_version())

    async def metrics(self) -> str:
        """The Prometheus metrics, as text."""
        return await self._request(b.op_metrics())

    # -- snapshots
    async def list_snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot; one that cannot be restored here has ``bootable`` False and a ``warning``."""
        return await self._request(b.op_list_snapshots())

    async def create_snapshot(self, tag: str, *, memory_mib: int = 512, vcpus: int = 1,
                              warm_code: str | None = None, boot_timeout: float = 300.0,
                              image: str | None = None) -> SnapshotInfo:
        """Boot a parent VM, run ``warm_code`` (Python) in it, and save it as snapshot ``tag``.

        ``memory_mib`` is the guest RAM in MiB; ``boot_timeout`` the seconds allowed for the guest agent
        to come up (the request may take up to ``boot_timeout`` + 300 s); ``image`` a recipe image's name
        (``forkd image build --name``; default: the built-in image). ConflictError if ``tag`` exists.
        """
        return await self._request(b.op_create_snapshot(tag, memory_mib, vcpus, warm_code, boot_timeout, image))

    async def snapshot_info(self, tag: str) -> SnapshotInfo:
        """One snapshot; NotFoundError if there is none with that tag."""
        return await self._request(b.op_snapshot_info(tag))

    async def delete_snapshot(self, tag: str, *, force: bool = False, cascade: bool = False) -> None:
        """Delete a snapshot. ConflictError while live sandboxes use it or branches depend on it, unless
        ``force`` (orphan them) or ``cascade`` (delete the branches too)."""
        await self._request(b.op_delete_snapshot(tag, force, cascade))

    async def compact_snapshot(self, tag: str, to: str) -> SnapshotInfo:
        """Write ``to``: a flat, parentless copy of snapshot ``tag``."""
        return await self._request(b.op_compact(tag, to))

    # -- sandboxes
    @overload
    async def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, network: str = "internet",
                              memory_limit_mib: int | None = None, per_child_netns: bool = False,
                              timeout: float = 120.0,
                              expose: Sequence[int] = (), lifetime: float | None = None,
                              metadata: Mapping[str, str] | None = None,
                              return_exceptions: Literal[False] = False) -> list[AsyncSandbox]: ...

    @overload
    async def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, network: str = "internet",
                              memory_limit_mib: int | None = None, per_child_netns: bool = False,
                              timeout: float = 120.0,
                              expose: Sequence[int] = (), lifetime: float | None = None,
                              metadata: Mapping[str, str] | None = None,
                              return_exceptions: Literal[True]) -> list[AsyncSandbox | SpawnError[AsyncSandbox]]: ...

    @overload
    async def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, network: str = "internet",
                              memory_limit_mib: int | None = None, per_child_netns: bool = False,
                              timeout: float = 120.0,
                              expose: Sequence[int] = (), lifetime: float | None = None,
                              metadata: Mapping[str, str] | None = None, return_exceptions: bool
                              ) -> list[AsyncSandbox] | list[AsyncSandbox | SpawnError[AsyncSandbox]]: ...

    async def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, network: str = "internet",
                              memory_limit_mib: int | None = None, per_child_netns: bool = False,
                              timeout: float = 120.0,
                              expose: Sequence[int] = (), lifetime: float | None = None,
                              metadata: Mapping[str, str] | None = None, return_exceptions: bool = False
                              ) -> list[AsyncSandbox] | list[AsyncSandbox | SpawnError[AsyncSandbox]]:
        """Fork ``n`` (1..1000) sandboxes from snapshot ``snapshot_tag``, in one request.

        ``network`` is ``"internet"`` (public addresses only, with DNS; never this host or private ranges)
        or ``"none"``; ``timeout`` the seconds allowed for
        each child's restore (children restore a few at a time, so the request may take up to
        ``n * timeout + 30`` seconds). ``expose`` lists guest TCP ports to forward from host loopback ports
        (``info.ports``); ``lifetime`` is the seconds each sandbox lives before the controller kills it
        (None: the controller's default, until killed unless configured; extend it with
        :meth:`Sandbox.set_timeout`); ``metadata`` labels them (``list_sandboxes(metadata=...)`` finds them).
        Each child succeeds or fails on its own: if any fails, :class:`SpawnError` is raised with the ones
        that started in ``.sandboxes`` (still running: kill them or use them) and ``(index, message)`` pairs
        in ``.errors``. With ``return_exceptions=True`` nothing is raised for
        failed children: the list holds a ``SpawnError`` in place of each, in request order.
        """
        call = b.op_spawn(snapshot_tag, n, network, memory_limit_mib, per_child_netns, timeout, expose,
                          lifetime, metadata)
        results = b.spawn_results(await self._request(call), lambda info: AsyncSandbox(self, info))
        return results if return_exceptions else b.spawn_or_raise(results)

    async def spawn_sandbox(self, snapshot_tag: str, *, network: str = "internet",
                      memory_limit_mib: int | None = None, per_child_netns: bool = False, timeout: float = 120.0,
                      expose: Sequence[int] = (), lifetime: float | None = None,
                      metadata: Mapping[str, str] | None = None) -> AsyncSandbox:
        """Fork one sandbox (see :meth:`spawn_sandboxes`); SpawnError if it failed to start."""
        return (await self.spawn_sandboxes(snapshot_tag, 1, network=network, memory_limit_mib=memory_limit_mib,
                                    per_child_netns=per_child_netns, timeout=timeout, expose=expose,
                                    lifetime=lifetime, metadata=metadata))[0]

    async def list_sandboxes(self, *, metadata: Mapping[str, str] | None = None) -> list[AsyncSandbox]:
        """Every sandbox the controller manages, or those labelled with all of ``metadata``."""
        return [AsyncSandbox(self, info) for info in await self._request(b.op_list_sandboxes(metadata))]

    async def pack_snapshot(self, tag: str, out: str | os.PathLike[str], *, level: int = 3,
                      force: bool = False) -> PackResult:
        """Download snapshot ``tag`` and the chain it depends on as one .tar.zst (``forkd pack``) to
        ``out``, written to ``out.partial`` and renamed when complete. ``level`` is zstd's (1..22).
        The controller packs first, then sends: large snapshots take a while to start."""
        call = b.op_pack(tag, level)
        dest = b.PackFile(out, force)
        try:
            async with self._client.stream(call.method, call.path, params=call.params,
                                           timeout=b.timeout_config(call.timeout)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise b.error_from_response(resp, self._endpoint.token)
                async for chunk in resp.aiter_bytes(b.UPLOAD_CHUNK):
                    dest.write(chunk)
                return dest.commit(resp)
        except httpx.RequestError as e:
            dest.abort()
            raise self._failed(e, b.Call(call.method, call.path, b.nothing)) from e
        except BaseException:
            dest.abort()
            raise

    async def unpack_snapshot(self, archive: str | os.PathLike[str], *, tag: str | None = None,
                        force: bool = False) -> UnpackResult:
        """Upload a pack (``forkd pack``'s .tar.zst) and register its snapshots on the controller, every
        link verified first. ``tag`` renames a one-snapshot pack; ``force`` replaces snapshots with the
        same tags but other content (else ConflictError). A corrupt pack is BadRequestError."""
        return await self._request(b.op_unpack(archive, tag, force))

    async def list_pending_snapshots(self) -> list[PendingSnapshot]:
        """Branch snapshots being written (``wait=False``) or that failed."""
        return await self._request(b.op_pending_snapshots())

    async def get_sandbox(self, sandbox_id: str) -> AsyncSandbox:
        """The sandbox with that id; NotFoundError if there is none."""
        return AsyncSandbox(self, await self._request(b.op_get_sandbox(sandbox_id)))

    async def capacity(self) -> CapacityInfo:
        """What the controller's node can still take: memory (bytes), vCPUs, sandboxes running and their
        limit, the pools, and ``free_slots`` (what a multi-controller spawn gives it at most)."""
        return await self._request(b.op_capacity())

    async def pull_snapshot(self, url: str, *, sha256: str | None = None, tag: str | None = None,
                            force: bool = False, token: str | None = None, timeout: float = 3600.0) -> PullResult:
        """Make the controller fetch a pack from ``url`` (another controller's pack URL, or any http(s)
        URL) and register it, verified first, as :meth:`unpack_snapshot` does. ``sha256`` (hex) is checked
        before anything is registered; ``token`` is sent to the URL's own origin only; ``timeout`` is the
        seconds the download may take. A source that fails is an InternalServerError (502)."""
        return await self._request(b.op_pull(url, sha256, tag, force, token, timeout))

    async def push_snapshot(self, tag: str, to: AsyncController | Sequence[AsyncController], *,
                            force: bool = False, timeout: float = 3600.0) -> list[PullResult]:
        """Copy snapshot ``tag`` (with its chain) to the controller(s) ``to``: each pulls it from this
        one's pack URL with this client's token, one after the other (this controller packs it each time)."""
        url, token = self._pack_source(tag)
        targets = [to] if isinstance(to, AsyncController) else list(to)
        return [await t.pull_snapshot(url, force=force, token=token, timeout=timeout) for t in targets]

    async def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        """A handle on sandbox ``sandbox_id`` without a round trip (a wrong id fails at its first call)."""
        b.segment(sandbox_id, "sandbox_id")
        return AsyncSandbox(self, SandboxInfo(id=sandbox_id, snapshot_tag=""))

    # -- workspaces
    async def create_workspace(self, name: str, snapshot_tag: str, *, network: str = "internet",
                         memory_limit_mib: int | None = None, lifetime: float | None = None,
                         metadata: Mapping[str, str] | None = None, idle_suspend: float | None = None,
                         timeout: float = 120.0) -> AsyncWorkspace:
        """Start a sandbox under ``name`` (ConflictError if the name exists). ``idle_suspend``: seconds
        without a request after which the daemon suspends it."""
        info = await self._request(b.op_create_workspace(name, snapshot_tag, network, memory_limit_mib, lifetime,
                                                       metadata, idle_suspend, timeout))
        return AsyncWorkspace(self, name, info)

    async def workspace(self, name: str) -> AsyncWorkspace:
        """A handle on the workspace ``name`` (nothing is asked until it is used)."""
        b.segment(name, "name")
        return AsyncWorkspace(self, name)

    async def list_workspaces(self) -> list[WorkspaceInfo]:
        return await self._request(b.op_list_workspaces())


class AsyncSandbox(b.BaseSandbox):
    """One sandbox (see :class:`forkd.Sandbox`). ``async with`` kills it on exit."""

    def __init__(self, controller: AsyncController, info: SandboxInfo) -> None:
        super().__init__(info, controller.node)
        self._controller = controller
        self.commands = AsyncCommands(self)
        """Processes in the guest."""
        self.files = AsyncFiles(self)
        """The guest's file system."""

    @property
    def controller(self) -> AsyncController:
        return self._controller

    async def _request(self, call: b.Call[T]) -> T:
        return await self._controller._request(call)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is None:
            await self.kill()
            return
        with contextlib.suppress(ForkdAPIError):  # the exception in flight matters more
            await self.kill()

    async def refresh(self) -> SandboxInfo:
        """Fetch the sandbox's info again (``.info``), e.g. to see whether it is still running."""
        self._info = await self._request(b.op_get_sandbox(self.local_id))
        return self._info

    async def set_timeout(self, lifetime: float) -> SandboxInfo:
        """Kill this sandbox ``lifetime`` seconds from now (instead of when it was due); the new
        ``info.expires_at`` is returned."""
        self._info = await self._request(b.op_set_timeout(self.local_id, lifetime))
        return self._info

    async def kill(self) -> None:
        """Kill the VM and remove its files. Idempotent: killing a sandbox that is gone is not an error."""
        with contextlib.suppress(NotFoundError):
            await self._request(b.op_kill(self.local_id))

    async def branch(self, tag: str | None = None, *, mode: str = "auto", wait: bool = True) -> BranchResult:
        """Snapshot this running sandbox as ``tag`` (generated when None); it keeps running. ``mode`` is
        delta, flat or auto; with ``wait=False`` the call returns at once (status ``writing``)."""
        return await self._request(b.op_branch(self.local_id, tag, mode, wait))

    async def interrupt(self) -> InterruptResult:
        """Interrupt the running ``eval``/``run_code`` calls (KeyboardInterrupt in the guest); the daemon
        waits up to 2 seconds for them to stop. Code blocked in C is counted as ``stuck``: it keeps
        running, and the sandbox still answers new calls."""
        return await self._request(b.op_interrupt(self.local_id))

    async def ping(self) -> PingResult:
        """Ask the guest agent for its versions and uptime."""
        return await self._request(b.op_ping(self.local_id))

    async def eval(self, expr: str, *, timeout: float = 60.0) -> Any:
        """Evaluate a Python expression: its JSON value if serializable, else its ``repr`` (see
        :meth:`forkd.Sandbox.eval`). Raises :class:`CodeError` if it raised. ``timeout`` is in seconds:
        after it the code is interrupted and GatewayTimeoutError says whether it stopped."""
        return (await self.eval_result(expr, timeout=timeout)).python_value()

    async def eval_result(self, expr: str, *, timeout: float = 60.0) -> EvalResult:
        """Like :meth:`eval`, but the whole result: ``value``, ``repr`` and ``type``."""
        return await self._request(b.op_eval(self.local_id, expr, timeout))

    async def run_code(self, code: str, *, timeout: float = 60.0, on_stdout: Callable[[str], object] | None = None,
                   on_stderr: Callable[[str], object] | None = None) -> Execution:
        """Run Python statements (state persists between calls): stdout, stderr and the last expression.

        Raises :class:`CodeError` (with the traceback and the output so far) if the code raised.
        ``timeout`` is in seconds, as for :meth:`eval` (interrupted, then GatewayTimeoutError).
        ``on_stdout``/``on_stderr`` are called with each piece of output (text) as the code writes it;
        the result still has all of it.
        """
        if on_stdout is None and on_stderr is None:
            return await self._request(b.op_run_code(self.local_id, code, timeout))
        out = b.CodeCollector(on_stdout, on_stderr)
        async for event in self._controller._events(b.op_run_code_stream(self.local_id, code, timeout)):
            out.feed(event)
        return out.finish()


class AsyncCommands:
    """Processes in a sandbox (``sandbox.commands``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @overload
    async def run(self, cmd: str | Sequence[str], *, background: Literal[False] = False,
                  on_stdout: Callable[[str], object] | None = None, on_stderr: Callable[[str], object] | None = None,
                  env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: str | bytes | None = None,
                  timeout: float | None = 60.0, max_output: int = 1 << 20) -> CommandResult: ...

    @overload
    async def run(self, cmd: str | Sequence[str], *, background: Literal[True],
                  on_stdout: Callable[[str], object] | None = None, on_stderr: Callable[[str], object] | None = None,
                  env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: str | bytes | None = None,
                  timeout: float | None = 60.0, max_output: int = 1 << 20) -> AsyncCommandHandle: ...

    async def run(self, cmd: str | Sequence[str], *, background: bool = False,
                  on_stdout: Callable[[str], object] | None = None, on_stderr: Callable[[str], object] | None = None,
                  env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: str | bytes | None = None,
                  timeout: float | None = 60.0, max_output: int = 1 << 20) -> CommandResult | AsyncCommandHandle:
        """Run a command and wait for it, or start it in the background (see
        :meth:`forkd.sdk.sync.Commands.run`). ``on_stdout``/``on_stderr`` get the output as it is written;
        ``timeout`` is in seconds (``None``: no limit); ``max_output`` the bytes kept per stream."""
        sb = self._sandbox
        if background:
            info = await sb._request(b.op_start_process(sb.local_id, cmd, env, cwd, stdin, timeout, stdin_open=True))
            return AsyncCommandHandle(sb, info.pid, on_stdout, on_stderr, max_output)
        if on_stdout is None and on_stderr is None:
            return await sb._request(b.op_exec(sb.local_id, cmd, env, cwd, stdin, timeout, max_output))
        out = b.OutputCollector(on_stdout, on_stderr, max_output)
        async for event in sb._controller._events(b.op_exec_stream(sb.local_id, cmd, env, cwd, stdin, timeout)):
            out.feed(event)
        return out.finish()

    async def list(self) -> builtins.list[ProcessInfo]:
        """Background processes running, or ended with output not yet read."""
        sb = self._sandbox
        return await sb._request(b.op_list_processes(sb.local_id))

    async def connect(self, pid: int, *, on_stdout: Callable[[str], object] | None = None,
                      on_stderr: Callable[[str], object] | None = None) -> AsyncCommandHandle:
        """A handle on background process ``pid`` (NotFoundError if the sandbox has no such process)."""
        if not any(p.pid == pid for p in await self.list()):
            raise NotFoundError(f"no process {pid} in sandbox {self._sandbox.id}", status=404)
        return AsyncCommandHandle(self._sandbox, pid, on_stdout, on_stderr)


class AsyncCommandHandle:
    """A background process (see :class:`forkd.sdk.sync.CommandHandle`)."""

    def __init__(self, sandbox: AsyncSandbox, pid: int, on_stdout: Callable[[str], object] | None = None,
                 on_stderr: Callable[[str], object] | None = None, max_output: int = 1 << 20) -> None:
        self._sandbox = sandbox
        self.pid = pid
        self._out = b.OutputCollector(on_stdout, on_stderr, max_output)

    async def wait(self) -> CommandResult:
        """Wait until the process ends: its exit code and the output not read before."""
        sb = self._sandbox
        if self._out.result is None:
            async for event in sb._controller._events(b.op_process_stream(sb.local_id, self.pid)):
                self._out.feed(event)
        return self._out.finish()

    async def send_stdin(self, data: str | bytes, *, eof: bool = False) -> int:
        """Write to the process's stdin (``eof=True`` closes it after); the bytes written."""
        sb = self._sandbox
        return await sb._request(b.op_process_stdin(sb.local_id, self.pid, data, eof))

    async def kill(self, signal: str = "KILL") -> bool:
        """Signal the process's group (KILL, TERM, INT, HUP); False if it had already ended."""
        sb = self._sandbox
        return await sb._request(b.op_process_kill(sb.local_id, self.pid, signal))


class AsyncFiles:
    """The file system of a sandbox (``sandbox.files``). Paths are absolute guest paths."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def read(self, path: str) -> bytes:
        """The file's bytes; NotFoundError if it does not exist, PayloadTooLargeError if it is larger
        than the controller serves (256 MiB)."""
        sb = self._sandbox
        return await sb._request(b.op_read_file(sb.local_id, path))

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The file decoded as ``encoding``."""
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: bytes | bytearray | memoryview | str, *, mode: int = 0o644) -> int:
        """Write ``data`` (a str is UTF-8 encoded) to ``path``, replacing it atomically; missing parent
        directories are created. ``mode`` is the permission bits. Returns the bytes written.
        The controller accepts at most 256 MiB (PayloadTooLargeError)."""
        sb = self._sandbox
        return await sb._request(b.op_write_file(sb.local_id, path, data, mode))

    async def list(self, path: str) -> builtins.list[FileEntry]:
        """The entries of a directory, sorted by name."""
        sb = self._sandbox
        return await sb._request(b.op_list_files(sb.local_id, path))

    async def stat(self, path: str) -> FileEntry:
        """One file's type, size, mode and mtime; NotFoundError if it does not exist."""
        sb = self._sandbox
        return await sb._request(b.op_stat(sb.local_id, path))

    async def make_dir(self, path: str) -> None:
        """Create a directory and its missing parents (no error if it exists)."""
        sb = self._sandbox
        await sb._request(b.op_mkdir(sb.local_id, path))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory (which must be empty unless ``recursive``)."""
        sb = self._sandbox
        await sb._request(b.op_remove(sb.local_id, path, recursive))

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists. NotFoundError still means the *sandbox* is gone."""
        sb = self._sandbox
        try:
            await sb._request(b.op_stat(sb.local_id, path))
        except NotFoundError:
            # 404 is both "no such file" and "no such sandbox": tell them apart.
            await sb._request(b.op_get_sandbox(sb.local_id))
            return False
        return True


class AsyncWorkspace:
    """A workspace by name: ``suspend()`` stores its sandbox (memory, processes, files) on disk and stops
    it; ``resume()`` starts a new sandbox from that state and returns it."""

    def __init__(self, controller: AsyncController, name: str, info: WorkspaceInfo | None = None) -> None:
        self._ctl = controller
        self.name = name
        self._info = info

    def __repr__(self) -> str:
        return f"AsyncWorkspace(name={self.name!r})"

    async def info(self) -> WorkspaceInfo:
        """Its status, state and options now (NotFoundError if there is none)."""
        self._info = await self._ctl._request(b.op_get_workspace(self.name))
        return self._info

    async def sandbox(self) -> AsyncSandbox:
        """Its running sandbox (ConflictError if it is not running)."""
        info = await self.info()
        if info.status != "running" or not info.sandbox_id:
            from forkd.sdk.errors import ConflictError

            raise ConflictError(f"workspace {self.name} is {info.status}", status=409)
        return await self._ctl.get_sandbox(info.sandbox_id)

    async def suspend(self) -> WorkspaceInfo:
        """Save its sandbox's whole state to disk and stop it (ConflictError if it is not running)."""
        self._info = await self._ctl._request(b.op_suspend_workspace(self.name))
        return self._info

    async def resume(self) -> AsyncSandbox:
        """Start it again from its last state, with its options: a new sandbox (ConflictError if running)."""
        self._info = await self._ctl._request(b.op_resume_workspace(self.name))
        assert self._info.sandbox_id is not None
        return await self._ctl.get_sandbox(self._info.sandbox_id)

    async def delete(self) -> None:
        """Kill its sandbox and delete its states."""
        await self._ctl._request(b.op_delete_workspace(self.name))
