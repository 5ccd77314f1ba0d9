"""``forkd mcp``: serve forkd's sandboxes to agents as MCP tools (``docs/mcp.md``)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from forkd.cli.common import daemon_options, read_token
from forkd.limits import MAX_LIFETIME_S


@click.command("mcp")
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True,
              envvar="FORKD_MCP_TRANSPORT", help="stdio (an MCP client starts this command) or streamable HTTP.")
@click.option("--bind", default="127.0.0.1:8765", show_default=True, envvar="FORKD_MCP_BIND",
              help="HOST:PORT for --transport http (served at /mcp; non-loopback needs --http-token-file).")
@click.option("--http-token-file", type=click.Path(path_type=Path), default=None, envvar="FORKD_MCP_HTTP_TOKEN_FILE",
              help="With --transport http: clients must send 'Authorization: Bearer <the file's token>'.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME[:PORT]",
              help="With --transport http: another Host (and Origin) clients may use, e.g. the real address "
                   "behind a 0.0.0.0 bind, a DNS name or a proxy's; repeat it. Others get 421.")
@daemon_options
@click.option("--snapshot-root", type=click.Path(path_type=Path), default=None, envvar="FORKD_SNAPSHOT_ROOT",
              help="Local engine only: the snapshots to serve (default $FORKD_HOME/snapshots).")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default=None, envvar="FORKD_ACCEL",
              help="Local engine only: the accelerator.")
@click.option("--insecure-no-jail", is_flag=True, envvar="FORKD_INSECURE_NO_JAIL",
              help="Local engine only: run QEMU unjailed (when not root). Only for trusted code.")
@click.option("--sandbox-lifetime", type=click.FloatRange(min=0, max=MAX_LIFETIME_S), default=3600.0, show_default=True,
              envvar="FORKD_MCP_SANDBOX_LIFETIME",
              help="Seconds a sandbox spawned through MCP lives unless the call says otherwise (0: the daemon's "
                   "default).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, envvar="FORKD_MCP_LOG_LEVEL", help="Logging on stderr.")
def mcp_command(transport: str, bind: str, http_token_file: Path | None, allow_hosts: tuple[str, ...],
                url: str | None, token_file: Path | None,
                snapshot_root: Path | None, accel: str | None, insecure_no_jail: bool, sandbox_lifetime: float,
                log_level: str) -> None:
    """Serve forkd as an MCP server: tools to spawn sandboxes, run code and commands, read and write
    files, branch, and explore in parallel (fork N children from one sandbox's state, run a different
    variant in each, compare).

    With --url / FORKD_URL it talks to that forkd-controller (token from --token-file or FORKD_TOKEN).
    Without one it starts a private forkd-controller on a Unix socket (the local engine) and stops it,
    with every sandbox it started, when it exits.
    """
    from forkd.mcp.backend import LocalOptions, make_backend
    from forkd.mcp.http import parse_bind, serve_http
    from forkd.mcp.server import build_server

    logging.basicConfig(stream=sys.stderr, level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if transport == "http":
        try:
            parse_bind(bind)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    token = read_token(token_file) if token_file else os.environ.get("FORKD_TOKEN")
    http_token = read_token(http_token_file)
    local = LocalOptions(snapshot_root=snapshot_root, accel=accel, insecure_no_jail=insecure_no_jail)
    try:
        backend = make_backend(url, token, local)
    except ValueError as e:  # a malformed URL or token
        raise click.UsageError(str(e)) from None
    server = build_server(backend, default_lifetime_s=sandbox_lifetime or None)
    try:
        if transport == "stdio":
            server.run("stdio")
        else:
            serve_http(server, bind, http_token, log_level, allow_hosts)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
