"""Printing for the CLI: JSON for machines, rich tables for people, errors on stderr."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from forkd.errors import ForkdError, ValidationError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error is one line, however long
F = TypeVar("F", bound=Callable[..., Any])


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    console.print(t)


def handle_errors(fn: F) -> F:
    """Turn forkd errors into a one-line message on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationError as e:
            error(str(e))
            raise SystemExit(2) from e
        except ForkdError as e:
            error(str(e))
            raise SystemExit(1) from e
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise SystemExit(130) from None
        except Exception as e:
            # the SDK's errors (a command talking to a daemon): status and message on one line. Looked up
            # only if the SDK was imported (it imports httpx, which every command would pay for otherwise)
            sdk = sys.modules.get("forkd.sdk.errors")
            if sdk is None or not isinstance(e, sdk.ForkdAPIError):
                raise
            error(str(e))
            bad_input = isinstance(e, (sdk.BadRequestError, sdk.UnprocessableEntityError))
            raise SystemExit(2 if bad_input else 1) from e

    return wrapper  # type: ignore[return-value]


def error(msg: str) -> None:
    err_console.print(Text.assemble(("error: ", "bold red"), msg), highlight=False)


def mib(kib: int | None) -> str:
    return "" if kib is None else f"{kib / 1024:.1f}"


def echo(msg: str) -> None:
    click.echo(msg)
