"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from forkd.engine import Engine


def accel_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default=None,
                        envvar="FORKD_ACCEL", help="Accelerator (default auto: KVM if usable, else TCG).")(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def make_engine(accel: str | None = None) -> Engine:
    return Engine(accel=accel)


def daemon_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--url`` and ``--token-file``: the command goes to that forkd-controller through the SDK."""
    fn = click.option("--token-file", envvar="FORKD_TOKEN_FILE", default=None, type=click.Path(path_type=Path),
                      help="File holding the bearer token (else $FORKD_TOKEN).")(fn)
    return click.option("--url", envvar="FORKD_URL", default=None,
                        help="forkd-controller URL (http(s)://host:port or unix:/path); local engine when absent.")(fn)


def remote_controller(url: str, token_file: Path | None) -> Any:
    """An SDK Controller for ``url`` (the token from ``token_file``, else $FORKD_TOKEN)."""
    from forkd.sdk import Controller

    token = token_file.read_text().strip() if token_file else None
    return Controller(url, token, timeout=600.0)
