"""``forkd pack`` and ``forkd unpack``: a snapshot (with the chain it depends on) as one portable ``.tar.zst``
file."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

from forkd.cli.common import daemon_options, json_option, make_engine, remote_controller
from forkd.cli.output import console, err_console, handle_errors, print_json

ByteProgress = Callable[[int, int], None]


@contextmanager
def byte_progress(description: str, enabled: bool) -> Iterator[ByteProgress | None]:
    """A rich progress bar counting bytes (only on a terminal); yields the callback to feed it, or None."""
    if not enabled or not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(description, total=None)

        def cb(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        yield cb


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@click.command("pack")
@click.option("--tag", required=True, help="The snapshot to pack (with every snapshot it depends on).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write, e.g. TAG.tar.zst.")
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True, help="zstd compression level.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@daemon_options
@json_option
@handle_errors
def pack_command(tag: str, out: Path, level: int, force: bool, url: str | None, token_file: Path | None,
                 as_json: bool) -> None:
    """Pack snapshot TAG, and the chain of snapshots it depends on, into one portable .tar.zst file
    (unpack it elsewhere with forkd unpack). With --url, the daemon packs it and OUT is written here."""
    if url:
        with remote_controller(url, token_file) as ctl:
            r = ctl.pack_snapshot(tag, out, level=level, force=force)
        if as_json:
            print_json({"tag": tag, "chain": r.chain, "path": r.path, "bytes_out": r.bytes})
        else:
            console.print(f"packed {tag} (chain {' -> '.join(r.chain)}) into {out}: {_mib(r.bytes)}", highlight=False)
        return
    from forkd.engine.pack import pack

    store = make_engine().store
    with byte_progress(f"pack {tag}", not as_json) as cb:
        res = pack(store, tag, out, progress=cb, level=level, force=force)
    if as_json:
        print_json(res)
        return
    what = tag if len(res["chain"]) == 1 else f"{tag} (chain {' -> '.join(res['chain'])})"
    console.print(f"packed {what} into {out}: {_mib(res['bytes_in'])} -> {_mib(res['bytes_out'])} "
                  f"({res['ratio']:.1f}x) in {res['seconds']:.1f} s", highlight=False)


@click.command("unpack")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tag", default=None,
              help="Register the snapshot under this tag instead of its own (a pack of one snapshot only).")
@click.option("--force", is_flag=True, help="Replace existing snapshots with the same tags but other content.")
@daemon_options
@json_option
@handle_errors
def unpack_command(file: Path, tag: str | None, force: bool, url: str | None, token_file: Path | None,
                   as_json: bool) -> None:
    """Verify a pack made by forkd pack and register its snapshots here (a chain: every link, root first;
    a link already here with the same files is reused). With --url, FILE is uploaded to that daemon."""
    warnings: list[str] = []
    if url:
        with remote_controller(url, token_file) as ctl:
            r = ctl.unpack_snapshot(file, tag=tag, force=force)
        tags, reused, replaced, warnings, seconds = r.tags, r.reused, r.replaced, r.warnings, r.seconds
        where = url
        if as_json:
            print_json({"tags": tags, "registered": r.registered, "reused": reused, "replaced": replaced,
                        "warnings": warnings, "seconds": seconds})
            return
    else:
        from forkd.engine.pack import unpack_chain

        store = make_engine().store
        t0 = time.monotonic()
        with byte_progress("unpack", not as_json) as cb:
            res = unpack_chain(store, file, tag=tag, force=force, progress=cb, warn=warnings.append)
        seconds = round(time.monotonic() - t0, 3)
        if as_json:
            print_json({"tags": res.tags, "registered": res.registered, "reused": res.reused,
                        "replaced": res.replaced, "path": str(store.path(res.tags[-1])), "warnings": warnings,
                        "seconds": seconds})
            return
        tags, reused, replaced, where = res.tags, res.reused, res.replaced, str(store.root)
    for w in warnings:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {w}", highlight=False)
    for t in tags:
        how = ("reused (already here with the same files)" if t in reused
               else "registered (replaced the one here)" if t in replaced else "registered")
        console.print(f"{t}: {how}", highlight=False)
    console.print(f"unpacked {' -> '.join(tags)} into {where} in {seconds:.1f} s", highlight=False)
