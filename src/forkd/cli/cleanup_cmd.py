"""``forkd cleanup``."""

from __future__ import annotations

import click

from forkd.cli.common import json_option, make_engine
from forkd.cli.output import console, handle_errors, print_json
from forkd.engine.cleanup import sweep


@click.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@json_option
@handle_errors
def cleanup(dry_run: bool, as_json: bool) -> None:
    """Remove work dirs of children whose QEMU is gone, kill forkd QEMUs whose work dir is gone, and remove
    leftovers of crashed snapshot writes."""
    eng = make_engine()
    rep = sweep(eng.run_dir, eng.store, dry_run=dry_run)
    if as_json:
        print_json(rep.to_json())
        return
    for k in rep.killed:
        console.print(f"{'would kill' if dry_run else 'killed'} orphaned QEMU {k}", highlight=False)
    verb = "would remove" if dry_run else "removed"
    for p in rep.removed:
        console.print(f"{verb} {p}", highlight=False)
    console.print(f"{verb} {len(rep.removed)}; {len(rep.kept_live)} live work dir(s) kept")
