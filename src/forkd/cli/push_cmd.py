"""``forkd push`` and ``forkd pull``: move a snapshot's pack between controllers, or from any http(s)
URL, without it passing through this machine: the receiving controller fetches it (``POST
/v1/snapshots/pull``), checks it and registers it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from forkd.cli.common import json_option, read_token, remote_controller
from forkd.cli.output import console, error, handle_errors, print_json


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _report(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(rows)
    for r in rows:
        if as_json:
            continue
        if r.get("error"):
            error(f"{r['controller']}: {r['error']}")
        elif r.get("already"):
            console.print(f"{r['controller']}: already has it", highlight=False)
        else:
            console.print(f"{r['controller']}: {' -> '.join(r['tags'])} registered {r['registered'] or 'nothing new'}"
                          f" ({_mib(r['bytes'])}, sha256 {r['sha256'][:16]}..., {r['seconds']:.1f} s to unpack)",
                          highlight=False)
    if any(r.get("error") for r in rows):
        sys.exit(1)


@click.command("push")
@click.argument("tag")
@click.option("--to", "to", required=True, help="The controllers to copy it to: URL[,URL...] or dns+http://NAME:PORT.")
@click.option("--url", envvar="FORKD_URL", required=True,
              help="The controller that has TAG: http(s)://HOST:PORT (a list or dns+http://NAME:PORT: the first "
                   "that has it).")
@click.option("--token-file", envvar="FORKD_TOKEN_FILE", default=None, type=click.Path(path_type=Path),
              help="File holding the bearer token of every controller involved (else $FORKD_TOKEN).")
@click.option("--force", is_flag=True, help="Replace snapshots with the same tags but other content.")
@click.option("--timeout", type=click.FloatRange(min=1, max=3600), default=3600.0, show_default=True,
              help="Seconds each copy may take.")
@json_option
@handle_errors
def push_command(tag: str, to: str, url: str, token_file: Path | None, force: bool, timeout: float,
                 as_json: bool) -> None:
    """Copy snapshot TAG (with the chain it depends on) from the controller at --url to every controller
    in --to: each of them pulls its pack from the source (or from one that got it already), verifies
    it and registers it. Exits 1 if any copy failed."""
    from forkd.sdk import Controller, MultiController, PullResult

    src = remote_controller(url, token_file, multi=True)
    sources = src.snapshot_holders(tag) if isinstance(src, MultiController) else [src]
    if not sources:
        raise click.UsageError(f"no controller in --url {url} has snapshot {tag}")
    token = read_token(token_file)
    try:
        targets = MultiController(to, token, timeout=600.0).controllers
    except ValueError as e:
        raise click.UsageError(f"--to {to}: {e}") from None
    source: Controller = sources[0]
    source.snapshot_info(tag)  # NotFoundError now, not once per target
    group = MultiController(controllers=[source, *[t for t in targets if t.url != source.url]])
    with group:
        done = group.distribute_snapshot(tag, force=force, timeout=timeout)
    rows: list[dict[str, Any]] = []
    for t in targets:
        r = done.get(t.url)
        if isinstance(r, PullResult):
            rows.append({"controller": t.url, **r.__dict__})
        elif r is None:
            rows.append({"controller": t.url, "already": True})
        else:
            rows.append({"controller": t.url, "error": str(r)})
    _report(rows, as_json)


@click.command("pull")
@click.argument("source")
@click.option("--url", envvar="FORKD_URL", required=True,
              help="The controller(s) that fetch it: URL[,URL...] or dns+http://NAME:PORT.")
@click.option("--token-file", envvar="FORKD_TOKEN_FILE", default=None, type=click.Path(path_type=Path),
              help="File holding the controllers' bearer token (else $FORKD_TOKEN).")
@click.option("--peer-token-file", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding a bearer token for SOURCE's own host (e.g. another controller's); sent there only.")
@click.option("--sha256", default=None, help="The pack's sha256 (hex), checked before anything is registered.")
@click.option("--tag", default=None, help="Register it under this tag (a pack of one snapshot only).")
@click.option("--force", is_flag=True, help="Replace snapshots with the same tags but other content.")
@click.option("--timeout", type=click.FloatRange(min=1, max=3600), default=3600.0, show_default=True,
              help="Seconds the download may take.")
@json_option
@handle_errors
def pull_command(source: str, url: str, token_file: Path | None, peer_token_file: Path | None,
                 sha256: str | None, tag: str | None, force: bool, timeout: float, as_json: bool) -> None:
    """Make the controller(s) at --url fetch the pack at SOURCE (an http(s) URL: a file server's
    .tar.zst, or another controller's /v1/snapshots/TAG/pack with --peer-token-file), verify it and
    register its snapshots. Exits 1 if any failed."""
    from forkd.sdk import ForkdAPIError, MultiController

    peer_token = read_token(peer_token_file)
    ctl = remote_controller(url, token_file, multi=True)
    targets = ctl.controllers if isinstance(ctl, MultiController) else [ctl]
    rows: list[dict[str, Any]] = []
    for t in targets:
        try:
            r = t.pull_snapshot(source, sha256=sha256, tag=tag, force=force, token=peer_token, timeout=timeout)
        except (ForkdAPIError, ValueError) as e:
            rows.append({"controller": t.url, "error": str(e)})
            continue
        rows.append({"controller": t.url, **r.__dict__})
    ctl.close()
    _report(rows, as_json)
