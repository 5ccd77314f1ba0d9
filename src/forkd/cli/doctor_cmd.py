"""``forkd doctor``: check the host (and, with --url, the controller); exit 1 if anything FAILs."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.markup import escape

from forkd import paths
from forkd.cli.common import json_option
from forkd.cli.output import console, handle_errors, print_json, table

DEFAULT_STATE = Path("/var/lib/forkd/state.json")  # forkd-controller serve's default --state
COLOURS = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}


def _token(token_file: Path | None) -> str | None:
    """FORKD_TOKEN, else the token file's content if the daemon would accept it (never printed)."""
    if tok := os.environ.get("FORKD_TOKEN", "").strip():
        return tok
    if token_file is None:
        return None
    from forkd.daemon.auth import load_token

    try:
        return load_token(token_file).decode()
    except (ValueError, OSError, UnicodeDecodeError):
        return None  # the token-file check reports why


@click.command()
@click.option("--url", envvar="FORKD_URL", default=None,
              help="Controller to check (e.g. http://127.0.0.1:8889); token from $FORKD_TOKEN or --token-file.")
@click.option("--token-file", envvar="FORKD_TOKEN_FILE", default=None, type=click.Path(path_type=Path),
              help="The daemon's token file: checked against its start-up rules.")
@click.option("--tls-cert", envvar="FORKD_TLS_CERT", default=None, type=click.Path(path_type=Path))
@click.option("--tls-key", envvar="FORKD_TLS_KEY", default=None, type=click.Path(path_type=Path))
@click.option("--state", "state_file", envvar="FORKD_STATE", default=None, type=click.Path(path_type=Path),
              help=f"The daemon's state file (default: {DEFAULT_STATE} if it exists).")
@click.option("--snapshot-root", envvar="FORKD_SNAPSHOT_ROOT", default=None, type=click.Path(path_type=Path),
              help="Snapshot directory to measure (default: $FORKD_HOME/snapshots).")
@click.option("--scratch-dir", envvar="FORKD_PREWARM_SCRATCH_DIR", default=None, type=click.Path(path_type=Path),
              help="Where the children's work dirs go (default: run/ beside --state, else $FORKD_HOME/run).")
@json_option
@handle_errors
def doctor(url: str | None, token_file: Path | None, tls_cert: Path | None, tls_key: Path | None,
           state_file: Path | None, snapshot_root: Path | None, scratch_dir: Path | None, as_json: bool) -> None:
    """Check that this host can run forkd, with a fix for everything that is not PASS."""
    from forkd.doctor import run_checks, summary

    if state_file is None and DEFAULT_STATE.exists():
        state_file = DEFAULT_STATE
    if scratch_dir is None:
        scratch_dir = state_file.parent / "run" if state_file is not None else paths.run_dir()
    checks = run_checks(url, _token(token_file), token_file, tls_cert, tls_key, state_file,
                        snapshot_root or paths.snapshot_root(), scratch_dir)
    counts = summary(checks)
    if as_json:
        print_json({"checks": [c.to_json() for c in checks], "summary": counts})
    else:
        rows = [(c.number, escape(c.name), f"[{COLOURS[c.status]}]{c.status}[/]", escape(c.detail), escape(c.hint))
                for c in checks]
        table(None, ["#", "CHECK", "STATUS", "DETAIL", "FIX"], rows)
        verdict = "[bold red]not ready[/]" if counts["fail"] else "[green]ready[/]"
        console.print(f"{len(checks)} checks: [green]{counts['pass']} pass[/], [yellow]{counts['warn']} warn[/], "
                      f"[bold red]{counts['fail']} fail[/] - {verdict}", highlight=False)
    if counts["fail"]:
        raise SystemExit(1)
