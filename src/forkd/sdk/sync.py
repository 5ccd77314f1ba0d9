"""The synchronous client: :class:`Controller` (the API) and :class:`Sandbox` (one child VM).

``aio.py`` mirrors this file class for class and method for method; the request building and response
parsing both use live in ``_base.py``.

Example::

    from forkd import Controller

    with Controller() as ctl, ctl.spawn_sandbox("py") as sb:   # the sandbox is killed on exit
        print(sb.eval("1 + 1"))
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import httpx

from forkd.sdk import _base as b
from forkd.sdk._config import Verify, sync_client
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

__all__ = ["CommandHandle", "Commands", "Controller", "Files", "Sandbox", "Workspace"]

T = TypeVar("T")


class Controller(b.BaseController):
    """A client of ``forkd-controller``'s REST API.

    ``url`` and ``token`` default to ``$FORKD_URL`` (else ``http://127.0.0.1:8889``) and ``$FORKD_TOKEN``;
    ``url`` may be ``http(s)://host:port``, ``unix:/path/to.sock`` or ``http+unix://%2Fpath%2Fto.sock``.
    ``timeout`` is the default HTTP request timeout in seconds (``None``: no limit); operations with
    their own ``timeout`` wait that long plus 30 s. ``verify`` applies to https URLs: ``True`` (system
    CAs), ``False``, a CA bundle path or an ``ssl.SSLContext``. ``transport`` replaces httpx's transport
    (tests, custom networking).

    Use it as a context manager to close its connections; that does not kill any sandbox.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float | None = 60.0,
                 verify: Verify = True, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, token, timeout, verify)
        self._client = sync_client(self._endpoint, timeout, transport)

    def _request(self, call: b.Call[T]) -> T:
        try:
            resp = self._client.request(call.method, call.path, params=call.params, json=call.json,
                                        content=call.chunks(), headers=call.headers,
                                        timeout=self._timeout_of(call))
        except httpx.RequestError as e:
            raise self._failed(e, call) from e
        return self._finish(call, resp)

    def _events(self, call: b.StreamCall) -> Iterator[dict[str, object]]:
        """The NDJSON events of a streamed answer, as they arrive."""
        try:
            with self._client.stream(call.method, call.path, json=call.json,
                                     timeout=b.timeout_config(call.timeout)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise b.error_from_response(resp, self._endpoint.token)
                for line in resp.iter_lines():
                    if line.strip():
                        yield b.event_of(line)
        except httpx.RequestError as e:
            raise self._failed(e, b.Call(call.method, call.path, b.nothing)) from e

    def close(self) -> None:
        """Close the HTTP connections (sandboxes keep running)."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- service
    def health(self) -> bool:
        """Whether the controller is up (``/healthz`` needs no token)."""
        return self._request(b.op_health())

    def version(self) -> VersionInfo:
        """The controller's version, API version, accelerator (kvm/tcg) and QEMU version."""
        return self._request(b.op_version())

    def metrics(self) -> str:
        """The Prometheus metrics, as text."""
        return self._request(b.op_metrics())

    # -- snapshots
    def list_snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot; one that cannot be restored here has ``bootable`` False and a ``warning``."""
        return self._request(b.op_list_snapshots())

    def create_snapshot(self, tag: str, *, memory_mib: int = 512, vcpus: int = 1, warm_code: str | None = None,
                        boot_timeout: float = 300.0, image: str | None = None) -> SnapshotInfo:
        """Boot a parent VM, run ``warm_code`` (Python) in it, and save it as snapshot ``tag``.

        ``memory_mib`` is the guest RAM in MiB; ``boot_timeout`` the seconds allowed for the guest agent
        to come up (the request may take up to ``boot_timeout`` + 300 s); ``image`` a recipe image's name
        (``forkd image build --name``; default: the built-in image). ConflictError if ``tag`` exists.
        """
        return self._request(b.op_create_snapshot(tag, memory_mib, vcpus, warm_code, boot_timeout, image))

    def snapshot_info(self, tag: str) -> SnapshotInfo:
        """One snapshot; NotFoundError if there is none with that tag."""
        return self._request(b.op_snapshot_info(tag))

    def delete_snapshot(self, tag: str, *, force: bool = False, cascade: bool = False) -> None:
        """Delete a snapshot. ConflictError while live sandboxes use it or branches depend on it, unless
        ``force`` (orphan them) or ``cascade`` (delete the branches too)."""
        self._request(b.op_delete_snapshot(tag, force, cascade))

    def compact_snapshot(self, tag: str, to: str) -> SnapshotInfo:
        """Write ``to``: a flat, parentless copy of snapshot ``tag``."""
        return self._request(b.op_compact(tag, to))

    # -- sandboxes
    @overload
    def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, network: str = "internet",
                        memory_limit_mib: int | None = None, per_child_netns: bool = False, timeout: float = 120.0,
                        expose: Sequence[int] = (), lifetime: float | None = None,
                        metadata: Mapping[str, str] | None = None,
                        return_exceptions: Literal[False] = False) -> list[Sandbox]: ...

    @overload
    def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, network: str = "internet",
                        memory_limit_mib: int | None = None, per_child_netns: bool = False, timeout: float = 120.0,
                        expose: Sequence[int] = (), lifetime: float | None = None,
                        metadata: Mapping[str, str] | None = None,
                        return_exceptions: Literal[True]) -> list[Sandbox | SpawnError[Sandbox]]: ...

    @overload
    def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, network: str = "internet",
                        memory_limit_mib: int | None = None, per_child_netns: bool = False, timeout: float = 120.0,
                        expose: Sequence[int] = (), lifetime: float | None = None,
                        metadata: Mapping[str, str] | None = None,
                        return_exceptions: bool) -> list[Sandbox] | list[Sandbox | SpawnError[Sandbox]]: ...

    def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, network: str = "internet",
                        memory_limit_mib: int | None = None, per_child_netns: bool = False, timeout: float = 120.0,
                        expose: Sequence[int] = (), lifetime: float | None = None,
                        metadata: Mapping[str, str] | None = None,
                        return_exceptions: bool = False) -> list[Sandbox] | list[Sandbox | SpawnError[Sandbox]]:
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
        results = b.spawn_results(self._request(call), lambda info: Sandbox(self, info))
        return results if return_exceptions else b.spawn_or_raise(results)

    def spawn_sandbox(self, snapshot_tag: str, *, network: str = "internet",
                      memory_limit_mib: int | None = None, per_child_netns: bool = False, timeout: float = 120.0,
                      expose: Sequence[int] = (), lifetime: float | None = None,
                      metadata: Mapping[str, str] | None = None) -> Sandbox:
        """Fork one sandbox (see :meth:`spawn_sandboxes`); SpawnError if it failed to start."""
        return (self.spawn_sandboxes(snapshot_tag, 1, network=network, memory_limit_mib=memory_limit_mib,
                                    per_child_netns=per_child_netns, timeout=timeout, expose=expose,
                                    lifetime=lifetime, metadata=metadata))[0]

    def list_sandboxes(self, *, metadata: Mapping[str, str] | None = None) -> list[Sandbox]:
        """Every sandbox the controller manages, or those labelled with all of ``metadata``."""
        return [Sandbox(self, info) for info in self._request(b.op_list_sandboxes(metadata))]

    def pack_snapshot(self, tag: str, out: str | os.PathLike[str], *, level: int = 3,
                      force: bool = False) -> PackResult:
        """Download snapshot ``tag`` and the chain it depends on as one .tar.zst (``forkd pack``) to
        ``out``, written to ``out.partial`` and renamed when complete. ``level`` is zstd's (1..22).
        The controller packs first, then sends: large snapshots take a while to start."""
        call = b.op_pack(tag, level)
        dest = b.PackFile(out, force)
        try:
            with self._client.stream(call.method, call.path, params=call.params,
                                           timeout=b.timeout_config(call.timeout)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise b.error_from_response(resp, self._endpoint.token)
                for chunk in resp.iter_bytes(b.UPLOAD_CHUNK):
                    dest.write(chunk)
                return dest.commit(resp)
        except httpx.RequestError as e:
            dest.abort()
            raise self._failed(e, b.Call(call.method, call.path, b.nothing)) from e
        except BaseException:
            dest.abort()
            raise

    def unpack_snapshot(self, archive: str | os.PathLike[str], *, tag: str | None = None,
                        force: bool = False) -> UnpackResult:
        """Upload a pack (``forkd pack``'s .tar.zst) and register its snapshots on the controller, every
        link verified first. ``tag`` renames a one-snapshot pack; ``force`` replaces snapshots with the
        same tags but other content (else ConflictError). A corrupt pack is BadRequestError."""
        return self._request(b.op_unpack(archive, tag, force))

    def list_pending_snapshots(self) -> list[PendingSnapshot]:
        """Branch snapshots being written (``wait=False``) or that failed."""
        return self._request(b.op_pending_snapshots())

    def get_sandbox(self, sandbox_id: str) -> Sandbox:
        """The sandbox with that id; NotFoundError if there is none."""
        return Sandbox(self, self._request(b.op_get_sandbox(sandbox_id)))

    def capacity(self) -> CapacityInfo:
        """What the controller's node can still take: memory (bytes), vCPUs, sandboxes running and their
        limit, the pools, and ``free_slots`` (what a multi-controller spawn gives it at most)."""
        return self._request(b.op_capacity())

    def pull_snapshot(self, url: str, *, sha256: str | None = None, tag: str | None = None, force: bool = False,
                      token: str | None = None, timeout: float = 3600.0) -> PullResult:
        """Make the controller fetch a pack from ``url`` (another controller's pack URL, or any http(s)
        URL) and register it, verified first, as :meth:`unpack_snapshot` does. ``sha256`` (hex) is checked
        before anything is registered; ``token`` is sent to the URL's own origin only; ``timeout`` is the
        seconds the download may take. A source that fails is an InternalServerError (502)."""
        return self._request(b.op_pull(url, sha256, tag, force, token, timeout))

    def push_snapshot(self, tag: str, to: Controller | Sequence[Controller], *, force: bool = False,
                      timeout: float = 3600.0) -> list[PullResult]:
        """Copy snapshot ``tag`` (with its chain) to the controller(s) ``to``: each pulls it from this
        one's pack URL with this client's token, one after the other (this controller packs it each time)."""
        url, token = self._pack_source(tag)
        targets = [to] if isinstance(to, Controller) else list(to)
        return [t.pull_snapshot(url, force=force, token=token, timeout=timeout) for t in targets]

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle on sandbox ``sandbox_id`` without a round trip (a wrong id fails at its first call)."""
        b.segment(sandbox_id, "sandbox_id")
        return Sandbox(self, SandboxInfo(id=sandbox_id, snapshot_tag=""))

    # -- workspaces
    def create_workspace(self, name: str, snapshot_tag: str, *, network: str = "internet",
                         memory_limit_mib: int | None = None, lifetime: float | None = None,
                         metadata: Mapping[str, str] | None = None, idle_suspend: float | None = None,
                         timeout: float = 120.0) -> Workspace:
        """Start a sandbox under ``name`` (ConflictError if the name exists). ``idle_suspend``: seconds
        without a request after which the daemon suspends it."""
        info = self._request(b.op_create_workspace(name, snapshot_tag, network, memory_limit_mib, lifetime,
                                                       metadata, idle_suspend, timeout))
        return Workspace(self, name, info)

    def workspace(self, name: str) -> Workspace:
        """A handle on the workspace ``name`` (nothing is asked until it is used)."""
        b.segment(name, "name")
        return Workspace(self, name)

    def list_workspaces(self) -> list[WorkspaceInfo]:
        return self._request(b.op_list_workspaces())


class Sandbox(b.BaseSandbox):
    """One sandbox: a microVM forked from a snapshot, with a warmed Python interpreter and a shell.

    Use it as a context manager to kill it on exit. ``commands`` runs processes, ``files`` reaches
    the guest's file system.
    """

    def __init__(self, controller: Controller, info: SandboxInfo) -> None:
        super().__init__(info, controller.node)
        self._controller = controller
        self.commands = Commands(self)
        """Processes in the guest."""
        self.files = Files(self)
        """The guest's file system."""

    @property
    def controller(self) -> Controller:
        return self._controller

    def _request(self, call: b.Call[T]) -> T:
        return self._controller._request(call)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.kill()
            return
        with contextlib.suppress(ForkdAPIError):  # the exception in flight matters more
            self.kill()

    def refresh(self) -> SandboxInfo:
        """Fetch the sandbox's info again (``.info``), e.g. to see whether it is still running."""
        self._info = self._request(b.op_get_sandbox(self.local_id))
        return self._info

    def set_timeout(self, lifetime: float) -> SandboxInfo:
        """Kill this sandbox ``lifetime`` seconds from now (instead of when it was due); the new
        ``info.expires_at`` is returned."""
        self._info = self._request(b.op_set_timeout(self.local_id, lifetime))
        return self._info

    def kill(self) -> None:
        """Kill the VM and remove its files. Idempotent: killing a sandbox that is gone is not an error."""
        with contextlib.suppress(NotFoundError):
            self._request(b.op_kill(self.local_id))

    def branch(self, tag: str | None = None, *, mode: str = "auto", wait: bool = True) -> BranchResult:
        """Snapshot this running sandbox as ``tag`` (generated when None); it keeps running. ``mode`` is
        delta, flat or auto; with ``wait=False`` the call returns at once (status ``writing``)."""
        return self._request(b.op_branch(self.local_id, tag, mode, wait))

    def interrupt(self) -> InterruptResult:
        """Interrupt the running ``eval``/``run_code`` calls (KeyboardInterrupt in the guest); the daemon
        waits up to 2 seconds for them to stop. Code blocked in C is counted as ``stuck``: it keeps
        running, and the sandbox still answers new calls."""
        return self._request(b.op_interrupt(self.local_id))

    def ping(self) -> PingResult:
        """Ask the guest agent for its versions and uptime."""
        return self._request(b.op_ping(self.local_id))

    def eval(self, expr: str, *, timeout: float = 60.0) -> Any:
        """Evaluate a Python expression in the sandbox's interpreter (state shared with ``run_code``).

        Returns the value as JSON (lists for tuples and arrays' ``.tolist()``, ...) when the guest could
        serialize it, else its ``repr`` string. Raises :class:`CodeError` if the expression raised.

        ``timeout`` is in seconds: after it the code is interrupted in the guest (KeyboardInterrupt) and
        GatewayTimeoutError says whether it stopped; the sandbox answers the next call either way.
        """
        return self.eval_result(expr, timeout=timeout).python_value()

    def eval_result(self, expr: str, *, timeout: float = 60.0) -> EvalResult:
        """Like :meth:`eval`, but the whole result: ``value``, ``repr`` and ``type``."""
        return self._request(b.op_eval(self.local_id, expr, timeout))

    def run_code(self, code: str, *, timeout: float = 60.0, on_stdout: Callable[[str], object] | None = None,
                   on_stderr: Callable[[str], object] | None = None) -> Execution:
        """Run Python statements (state persists between calls): stdout, stderr and the last expression.

        Raises :class:`CodeError` (with the traceback and the output so far) if the code raised.
        ``timeout`` is in seconds, as for :meth:`eval` (interrupted, then GatewayTimeoutError).
        ``on_stdout``/``on_stderr`` are called with each piece of output (text) as the code writes it;
        the result still has all of it.
        """
        if on_stdout is None and on_stderr is None:
            return self._request(b.op_run_code(self.local_id, code, timeout))
        out = b.CodeCollector(on_stdout, on_stderr)
        for event in self._controller._events(b.op_run_code_stream(self.local_id, code, timeout)):
            out.feed(event)
        return out.finish()


class Commands:
    """Processes in a sandbox (``sandbox.commands``)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @overload
    def run(self, cmd: str | Sequence[str], *, background: Literal[False] = False,
            on_stdout: Callable[[str], object] | None = None, on_stderr: Callable[[str], object] | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: str | bytes | None = None,
            timeout: float | None = 60.0, max_output: int = 1 << 20) -> CommandResult: ...

    @overload
    def run(self, cmd: str | Sequence[str], *, background: Literal[True],
            on_stdout: Callable[[str], object] | None = None, on_stderr: Callable[[str], object] | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: str | bytes | None = None,
            timeout: float | None = 60.0, max_output: int = 1 << 20) -> CommandHandle: ...

    def run(self, cmd: str | Sequence[str], *, background: bool = False,
            on_stdout: Callable[[str], object] | None = None, on_stderr: Callable[[str], object] | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None, stdin: str | bytes | None = None,
            timeout: float | None = 60.0, max_output: int = 1 << 20) -> CommandResult | CommandHandle:
        """Run a command and wait for it, or (``background=True``) start it and return a
        :class:`CommandHandle` at once.

        A ``str`` runs under ``/bin/sh -c``; a list is the program and its arguments (no shell). ``env``
        is merged over the guest's environment; ``stdin`` is text (bytes must be UTF-8). After ``timeout``
        seconds (``None``: no limit) the process group is killed and ``timed_out`` is set. ``on_stdout``
        and ``on_stderr`` are called with each piece of output (text) as it is written; without them the
        output arrives at the end. ``max_output`` is the bytes (characters, when streamed) kept per
        stream in the result. A non-zero exit is a result, not an exception; a program that does not
        exist is NotFoundError (BadRequestError for a background start).
        """
        sb = self._sandbox
        if background:
            info = sb._request(b.op_start_process(sb.local_id, cmd, env, cwd, stdin, timeout, stdin_open=True))
            return CommandHandle(sb, info.pid, on_stdout, on_stderr, max_output)
        if on_stdout is None and on_stderr is None:
            return sb._request(b.op_exec(sb.local_id, cmd, env, cwd, stdin, timeout, max_output))
        out = b.OutputCollector(on_stdout, on_stderr, max_output)
        for event in sb._controller._events(b.op_exec_stream(sb.local_id, cmd, env, cwd, stdin, timeout)):
            out.feed(event)
        return out.finish()

    def list(self) -> builtins.list[ProcessInfo]:
        """Background processes running, or ended with output not yet read."""
        sb = self._sandbox
        return sb._request(b.op_list_processes(sb.local_id))

    def connect(self, pid: int, *, on_stdout: Callable[[str], object] | None = None,
                on_stderr: Callable[[str], object] | None = None) -> CommandHandle:
        """A handle on background process ``pid``, for instance one started by another client
        (NotFoundError if the sandbox has no such process)."""
        if not any(p.pid == pid for p in self.list()):
            raise NotFoundError(f"no process {pid} in sandbox {self._sandbox.id}", status=404)
        return CommandHandle(self._sandbox, pid, on_stdout, on_stderr)


class CommandHandle:
    """A background process (``commands.run(..., background=True)``): ``wait()`` for its result (its
    output is delivered to the callbacks as it comes), ``send_stdin()``, ``kill()``. One reader at a time:
    output read by one handle is not seen by another."""

    def __init__(self, sandbox: Sandbox, pid: int, on_stdout: Callable[[str], object] | None = None,
                 on_stderr: Callable[[str], object] | None = None, max_output: int = 1 << 20) -> None:
        self._sandbox = sandbox
        self.pid = pid
        self._out = b.OutputCollector(on_stdout, on_stderr, max_output)

    def wait(self) -> CommandResult:
        """Block until the process ends: its exit code and the output not read before."""
        sb = self._sandbox
        if self._out.result is None:
            for event in sb._controller._events(b.op_process_stream(sb.local_id, self.pid)):
                self._out.feed(event)
        return self._out.finish()

    def send_stdin(self, data: str | bytes, *, eof: bool = False) -> int:
        """Write to the process's stdin (``eof=True`` closes it after); the bytes written."""
        sb = self._sandbox
        return sb._request(b.op_process_stdin(sb.local_id, self.pid, data, eof))

    def kill(self, signal: str = "KILL") -> bool:
        """Signal the process's group (KILL, TERM, INT, HUP); False if it had already ended."""
        sb = self._sandbox
        return sb._request(b.op_process_kill(sb.local_id, self.pid, signal))


class Files:
    """The file system of a sandbox (``sandbox.files``). Paths are absolute guest paths."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def read(self, path: str) -> bytes:
        """The file's bytes; NotFoundError if it does not exist, PayloadTooLargeError if it is larger
        than the controller serves (256 MiB)."""
        sb = self._sandbox
        return sb._request(b.op_read_file(sb.local_id, path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The file decoded as ``encoding``."""
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | bytearray | memoryview | str, *, mode: int = 0o644) -> int:
        """Write ``data`` (a str is UTF-8 encoded) to ``path``, replacing it atomically; missing parent
        directories are created. ``mode`` is the permission bits. Returns the bytes written.
        The controller accepts at most 256 MiB (PayloadTooLargeError)."""
        sb = self._sandbox
        return sb._request(b.op_write_file(sb.local_id, path, data, mode))

    def list(self, path: str) -> builtins.list[FileEntry]:
        """The entries of a directory, sorted by name."""
        sb = self._sandbox
        return sb._request(b.op_list_files(sb.local_id, path))

    def stat(self, path: str) -> FileEntry:
        """One file's type, size, mode and mtime; NotFoundError if it does not exist."""
        sb = self._sandbox
        return sb._request(b.op_stat(sb.local_id, path))

    def make_dir(self, path: str) -> None:
        """Create a directory and its missing parents (no error if it exists)."""
        sb = self._sandbox
        sb._request(b.op_mkdir(sb.local_id, path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory (which must be empty unless ``recursive``)."""
        sb = self._sandbox
        sb._request(b.op_remove(sb.local_id, path, recursive))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists. NotFoundError still means the *sandbox* is gone."""
        sb = self._sandbox
        try:
            sb._request(b.op_stat(sb.local_id, path))
        except NotFoundError:
            # 404 is both "no such file" and "no such sandbox": tell them apart.
            sb._request(b.op_get_sandbox(sb.local_id))
            return False
        return True


class Workspace:
    """A workspace by name: ``suspend()`` stores its sandbox (memory, processes, files) on disk and stops
    it; ``resume()`` starts a new sandbox from that state and returns it."""

    def __init__(self, controller: Controller, name: str, info: WorkspaceInfo | None = None) -> None:
        self._ctl = controller
        self.name = name
        self._info = info

    def __repr__(self) -> str:
        return f"Workspace(name={self.name!r})"

    def info(self) -> WorkspaceInfo:
        """Its status, state and options now (NotFoundError if there is none)."""
        self._info = self._ctl._request(b.op_get_workspace(self.name))
        return self._info

    def sandbox(self) -> Sandbox:
        """Its running sandbox (ConflictError if it is not running)."""
        info = self.info()
        if info.status != "running" or not info.sandbox_id:
            from forkd.sdk.errors import ConflictError

            raise ConflictError(f"workspace {self.name} is {info.status}", status=409)
        return self._ctl.get_sandbox(info.sandbox_id)

    def suspend(self) -> WorkspaceInfo:
        """Save its sandbox's whole state to disk and stop it (ConflictError if it is not running)."""
        self._info = self._ctl._request(b.op_suspend_workspace(self.name))
        return self._info

    def resume(self) -> Sandbox:
        """Start it again from its last state, with its options: a new sandbox (ConflictError if running)."""
        self._info = self._ctl._request(b.op_resume_workspace(self.name))
        assert self._info.sandbox_id is not None
        return self._ctl.get_sandbox(self._info.sandbox_id)

    def delete(self) -> None:
        """Kill its sandbox and delete its states."""
        self._ctl._request(b.op_delete_workspace(self.name))
