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
                        help=URL_HELP)(fn)


URL_HELP = ("forkd-controller URL (http(s)://host:port or unix:/path; for the commands that span controllers "
            "a comma-separated list or dns+http://NAME:PORT); local engine when absent.")


MAX_TOKEN_FILE = 4096
"""Bytes a token file may hold (a token is at most 4096 characters; a larger file is a mistake, e.g. a
device or a log named by accident, and is not read whole)."""


def read_token(token_file: Path | None) -> str | None:
    """The token in ``token_file`` (None: the SDK reads $FORKD_TOKEN): at most MAX_TOKEN_FILE bytes,
    not empty; a usage error names the file otherwise."""
    if token_file is None:
        return None
    try:
        with open(token_file, "rb") as f:
            data = f.read(MAX_TOKEN_FILE + 1)
    except OSError as e:
        raise click.UsageError(f"token file {token_file}: {e.strerror or e}") from None
    if len(data) > MAX_TOKEN_FILE:
        raise click.UsageError(f"token file {token_file}: larger than {MAX_TOKEN_FILE} bytes; it should hold "
                               "only the token")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise click.UsageError(f"token file {token_file}: not ASCII text") from None
    if not token:
        raise click.UsageError(f"token file {token_file}: empty")
    return token


def remote_controller(url: str, token_file: Path | None, multi: bool = False) -> Any:
    """An SDK Controller for ``url`` (the token from ``token_file``, else $FORKD_TOKEN); with ``multi``, a
    MultiController when ``url`` names several controllers (a list, commas, dns+); without it such a URL
    is a usage error."""
    from forkd.sdk import Controller, MultiController
    from forkd.sdk._multi import is_multi

    token = read_token(token_file)
    if is_multi(url):
        if not multi:
            raise click.UsageError(f"--url {url}: this command takes one controller, not a list")
        try:
            return MultiController(url, token, timeout=600.0)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    return Controller(url, token, timeout=600.0)
