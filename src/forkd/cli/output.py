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
err_console = Console(stderr=True)
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

    return wrapper  # type: ignore[return-value]


def error(msg: str) -> None:
    err_console.print(Text.assemble(("error: ", "bold red"), msg), highlight=False)


def mib(kib: int | None) -> str:
    return "" if kib is None else f"{kib / 1024:.1f}"


def echo(msg: str) -> None:
    click.echo(msg)
