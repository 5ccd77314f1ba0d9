"""``forkd workspace ...``: sandboxes under a name, suspended to disk and resumed (on a daemon)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import click

from forkd.cli.common import daemon_options, json_option, remote_controller
from forkd.cli.output import handle_errors, print_json, table
from forkd.errors import ValidationError


def _ctl(url: str | None, token_file: Path | None) -> Any:
    if not url:
        raise ValidationError("workspaces live on a daemon: give --url (or FORKD_URL) and --token-file "
                              "(or FORKD_TOKEN)")
    return remote_controller(url, token_file)


def _when(t: float | None) -> str:
    return "" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _show(info: Any, as_json: bool) -> None:
    if as_json:
        print_json(dataclasses.asdict(info))
        return
    table(None, ["name", "status", "sandbox", "state", "state MiB", "last active"],
          [[info.name, info.status, info.sandbox_id, info.state_tag, f"{info.state_bytes / 2**20:.1f}",
            _when(info.last_active)]])


@click.group("workspace")
def workspace() -> None:
    """Workspaces: a sandbox under a name that can be suspended to disk and resumed later."""


@workspace.command("create")
@click.argument("name")
@click.option("--tag", "snapshot_tag", required=True, help="Snapshot to start from.")
@click.option("--network", type=click.Choice(["internet", "none"]), default="internet", show_default=True)
@click.option("--memory-limit-mib", type=int, default=None)
@click.option("--lifetime", type=float, default=None, help="Seconds each of its sandboxes lives.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--idle-suspend", type=float, default=None, help="Suspend it after this many seconds idle.")
@daemon_options
@json_option
@handle_errors
def create(name: str, snapshot_tag: str, network: str, memory_limit_mib: int | None, lifetime: float | None,
           labels: tuple[str, ...], idle_suspend: float | None, url: str | None, token_file: Path | None,
           as_json: bool) -> None:
    """Start a sandbox under NAME."""
    meta = {}
    for item in labels:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValidationError(f"--label: expected KEY=VALUE, got {item!r}")
        meta[k] = v
    with _ctl(url, token_file) as ctl:
        ws = ctl.create_workspace(name, snapshot_tag, network=network, memory_limit_mib=memory_limit_mib,
                                  lifetime=lifetime, metadata=meta, idle_suspend=idle_suspend, timeout=300.0)
        _show(ws.info(), as_json)


@workspace.command("suspend")
@click.argument("name")
@daemon_options
@json_option
@handle_errors
def suspend(name: str, url: str | None, token_file: Path | None, as_json: bool) -> None:
    """Save NAME's sandbox (memory, processes, files) to disk and stop it."""
    with _ctl(url, token_file) as ctl:
        _show(ctl.workspace(name).suspend(), as_json)


@workspace.command("resume")
@click.argument("name")
@daemon_options
@json_option
@handle_errors
def resume(name: str, url: str | None, token_file: Path | None, as_json: bool) -> None:
    """Start NAME again from its last state (a new sandbox id)."""
    with _ctl(url, token_file) as ctl:
        ws = ctl.workspace(name)
        ws.resume()
        _show(ws.info(), as_json)


@workspace.command("info")
@click.argument("name")
@daemon_options
@json_option
@handle_errors
def info(name: str, url: str | None, token_file: Path | None, as_json: bool) -> None:
    """Show one workspace."""
    with _ctl(url, token_file) as ctl:
        _show(ctl.workspace(name).info(), as_json)


@workspace.command("list")
@daemon_options
@json_option
@handle_errors
def list_(url: str | None, token_file: Path | None, as_json: bool) -> None:
    """List workspaces."""
    with _ctl(url, token_file) as ctl:
        rows = ctl.list_workspaces()
    if as_json:
        print_json([dataclasses.asdict(w) for w in rows])
        return
    table(None, ["name", "status", "sandbox", "state", "state MiB", "last active"],
          [[w.name, w.status, w.sandbox_id, w.state_tag, f"{w.state_bytes / 2**20:.1f}", _when(w.last_active)]
           for w in rows])


@workspace.command("rm")
@click.argument("name")
@daemon_options
@handle_errors
def rm(name: str, url: str | None, token_file: Path | None) -> None:
    """Kill NAME's sandbox and delete its states."""
    with _ctl(url, token_file) as ctl:
        ctl.workspace(name).delete()
    click.echo(f"removed workspace {name}")
