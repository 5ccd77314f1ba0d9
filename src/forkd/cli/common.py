"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
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
