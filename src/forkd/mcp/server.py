"""``forkd mcp`` / ``forkd-mcp``: an MCP server (the official ``mcp`` package's :class:`MCPServer`) whose
tools drive forkd sandboxes through the Python SDK, over stdio or streamable HTTP (``docs/mcp.md``).

Every error a tool meets (the daemon's answer, a refused argument, an unreachable daemon) comes back as an
MCP tool error (``isError``) carrying the daemon's message; the server keeps serving.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

from forkd import __version__
from forkd.mcp.backend import Backend, BackendError
from forkd.mcp.tools import DEFAULT_LIFETIME_S, TOOL_NAMES, Tools
from forkd.sdk import ForkdAPIError

log = logging.getLogger("forkd.mcp")

INSTRUCTIONS = """\
forkd runs Python sandboxes as microVMs forked copy-on-write from snapshots (saved, warmed VMs).
Typical use: list_snapshots, spawn a sandbox from one, run_code / eval (Python state persists between
calls) and run_command in it, read_file / write_file, then kill it. explore forks N children from a
sandbox's current state and runs a different snippet or command in each, returning all results side by
side: use it to try alternatives after an expensive setup. Times are in seconds. Sandboxes spawned here
are killed after their lifetime (default 3600 s) if you do not kill them.
"""

READ_ONLY = {"info", "list_snapshots", "list_sandboxes", "read_file", "list_files"}
DESTRUCTIVE = {"delete_snapshot", "kill"}


def tool_errors(fn: Callable[..., Any], backend: Backend) -> Callable[..., Any]:
    """``fn`` with forkd's errors raised as :class:`ToolError` (an MCP ``isError`` result with the
    message). Anything else is a bug: MCP reports it as a crash of that call only."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ForkdAPIError, BackendError, ValueError, TypeError) as e:
            raise ToolError(backend.redact(str(e) or type(e).__name__)) from None

    return call


def build_server(backend: Backend, default_lifetime_s: float | None = DEFAULT_LIFETIME_S,
                 start_backend: bool = True) -> MCPServer[Any]:
    """The MCP server with every tool registered. With ``start_backend`` a local engine starts in the
    background as soon as the server runs (tools wait for it); the backend is closed when the server stops."""
    tools = Tools(backend, default_lifetime_s)

    @contextlib.asynccontextmanager
    async def lifespan(_server: MCPServer[Any]) -> AsyncIterator[None]:
        if start_backend and hasattr(backend, "start"):
            threading.Thread(target=_start_quietly, args=(backend,), name="forkd-mcp-start", daemon=True).start()
        try:
            yield
        finally:
            import anyio.to_thread

            await anyio.to_thread.run_sync(backend.close)

    server: MCPServer[Any] = MCPServer("forkd", title="forkd sandboxes", version=__version__,
                                       instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING")
    for name in TOOL_NAMES:
        annotations = ToolAnnotations(read_only_hint=name in READ_ONLY, destructive_hint=name in DESTRUCTIVE,
                                      open_world_hint=False)
        server.add_tool(tool_errors(getattr(tools, name), backend), name=name, annotations=annotations)
    return server


def _start_quietly(backend: Any) -> None:
    try:
        backend.start()
    except BackendError as e:  # the tools report it, call by call
        log.warning("forkd mcp: %s", e)


def main() -> None:
    """The ``forkd-mcp`` console script: the same options as ``forkd mcp``."""
    from forkd.cli.mcp_cmd import mcp_command

    mcp_command(prog_name="forkd-mcp")
