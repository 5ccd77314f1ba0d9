"""``forkd bench``: the spawn -> exec -> eval -> branch -> fan-out -> cleanup cycle with per-step timings."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from forkd.cli.common import accel_option, json_option, make_engine
from forkd.cli.output import console, handle_errors, print_json, table
from forkd.errors import ForkdError
from forkd.limits import MAX_CHILDREN

EXPR = "numpy.zeros(5).tolist()"


class Steps:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], Any], note: Callable[[Any], str] = lambda _r: "") -> Any:
        t0 = time.monotonic()
        result = fn()
        self.rows.append({"step": name, "ms": round((time.monotonic() - t0) * 1000, 1), "detail": note(result)})
        return result


def local_cycle(tag: str, n: int, accel: str | None) -> list[dict[str, Any]]:
    eng = make_engine(accel)
    s = Steps()
    kids: list[Any] = []
    branch_tag: str | None = None
    try:
        (first,) = s.run("spawn n=1", lambda: eng.spawn(tag, 1), lambda r: f"ready {r[0].child.ready_s * 1000:.0f} ms"
                         if r[0].child else str(r[0].error))
        if first.child is None:
            raise ForkdError(f"spawn failed: {first.error}")
        kids.append(first.child)
        s.run("exec sh -c 'echo bench'", lambda: first.child.exec(["/bin/sh", "-c", "echo bench"], timeout=30),
              lambda r: f"exit {r.exit_code}")
        s.run(f"eval {EXPR}", lambda: first.child.eval(EXPR), lambda r: r["repr"])
        br = s.run("branch (delta)", lambda: eng.branch(first.child, None, "delta"),
                   lambda r: f"{r.snapshot.tag}: pause {r.pause_ms:.1f} ms, {r.dirty_bytes >> 10} KiB dirty")
        branch_tag = br.snapshot.tag
        fan = s.run(f"fan-out n={n} from the branch (+eval each)",
                    lambda: eng.spawn(branch_tag, n, then=lambda c: c.eval(EXPR)),
                    lambda r: f"{sum(1 for x in r if x.child)}/{n} up")
        kids += [r.child for r in fan if r.child]
        def cleanup() -> int:
            for k in kids:
                k.kill()
            eng.delete_snapshot(br.snapshot.tag)
            return len(kids)
        s.run("cleanup", cleanup, lambda r: f"{r} killed, branch deleted")
        kids = []
    finally:
        for k in kids:
            k.kill()
        if branch_tag is not None and eng.store.exists(branch_tag):
            eng.delete_snapshot(branch_tag)
    return s.rows


def remote_cycle(url: str, token_file: Path | None, tag: str, n: int) -> list[dict[str, Any]]:
    from forkd.cli.common import remote_controller

    s = Steps()
    with remote_controller(url, token_file) as ctl:  # one controller (a list is a usage error)
        kids: list[Any] = []
        branch_tag: str | None = None
        try:
            (sb,) = s.run("spawn n=1", lambda: ctl.spawn_sandboxes(tag, 1), lambda r: r[0].id)
            kids.append(sb)
            s.run("exec sh -c 'echo bench'", lambda: sb.commands.run("echo bench", timeout=30),
                  lambda r: f"exit {r.exit_code}")
            s.run(f"eval {EXPR}", lambda: sb.eval(EXPR), repr)
            br = s.run("branch (delta)", lambda: sb.branch(mode="delta"),
                       lambda r: f"{r.tag}: pause {r.pause_ms} ms")
            branch_tag = str(br.tag)
            fan = s.run(f"fan-out n={n} from the branch", lambda: ctl.spawn_sandboxes(str(br.tag), n),
                        lambda r: f"{len(r)} up")
            kids += fan

            def cleanup() -> int:
                for k in kids:
                    k.kill()
                ctl.delete_snapshot(str(br.tag))
                return len(kids)
            s.run(f"eval x{n}", lambda: [k.eval(EXPR) for k in fan], lambda r: f"{len(r)} answered")
            s.run("cleanup", cleanup, lambda r: f"{r} killed, branch deleted")
            kids = []
            branch_tag = None
        finally:
            for k in kids:
                k.kill()
            if branch_tag is not None:
                with contextlib.suppress(Exception):
                    ctl.delete_snapshot(branch_tag)
    return s.rows


@click.command()
@click.option("--tag", required=True, help="Snapshot to fork from.")
@click.option("-n", "--n", "n", type=click.IntRange(1, MAX_CHILDREN), default=5, show_default=True,
              help="Fan-out size.")
@click.option("--url", envvar="FORKD_URL", default=None, help="Run against this forkd-controller (else locally).")
@click.option("--token-file", envvar="FORKD_TOKEN_FILE", default=None, type=click.Path(path_type=Path))
@accel_option
@json_option
@handle_errors
def bench(tag: str, n: int, url: str | None, token_file: Path | None, accel: str | None, as_json: bool) -> None:
    """Time one spawn -> exec -> eval -> fan-out -> cleanup cycle, step by step."""
    t0 = time.monotonic()
    rows = remote_cycle(url, token_file, tag, n) if url else local_cycle(tag, n, accel)
    total = round((time.monotonic() - t0) * 1000, 1)
    if as_json:
        print_json({"tag": tag, "n": n, "target": url or "local", "steps": rows, "total_ms": total})
        return
    table(f"forkd bench ({url or 'local'})", ["STEP", "MS", "DETAIL"],
          [(r["step"], r["ms"], r["detail"]) for r in rows])
    console.print(f"total {total} ms", highlight=False)
