"""``forkd snapshot create|list|info|rm|compact``, on this machine or (``--url``) on a forkd-controller."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from forkd.cli.common import accel_option, daemon_options, json_option, make_engine, remote_controller
from forkd.cli.image_cmd import build_with_progress
from forkd.cli.output import console, handle_errors, print_json, table


@click.group()
@daemon_options
@click.pass_context
def snapshot(ctx: click.Context, url: str | None, token_file: Path | None) -> None:
    """Warmed parent snapshots that children are forked from (on a forkd-controller with --url)."""
    ctx.obj = {"url": url, "token_file": token_file}


def _remote(ctx: click.Context) -> Any:
    o = ctx.obj or {}
    return remote_controller(o["url"], o["token_file"]) if o.get("url") else None


def _summary(info: Any) -> dict[str, Any]:
    return dict(info.__dict__)


@snapshot.command("create")
@click.option("--tag", required=True, help="Name of the snapshot: ^[A-Za-z0-9_-]{1,64}$.")
@click.option("--memory-mib", type=int, default=512, show_default=True, help="Guest RAM in MiB.")
@click.option("--vcpus", type=int, default=1, show_default=True, help="Guest vCPUs.")
@click.option("--warm", "warm_code", default=None, help="Python code run in the parent before the snapshot.")
@click.option("--boot-timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the agent.")
@click.option("--keep-workdir", is_flag=True, help="Keep the parent's work dir (console log) afterwards.")
@click.option("--image", "image_name", default=None, help="A recipe image (forkd image build --name ...); "
              "default: the built-in Python + numpy image.")
@accel_option
@json_option
@click.pass_context
@handle_errors
def create(ctx: click.Context, tag: str, memory_mib: int, vcpus: int, warm_code: str | None, boot_timeout: float,
           keep_workdir: bool, image_name: str | None, accel: str | None, as_json: bool) -> None:
    """Boot a parent VM from the guest image, warm it, and save it as snapshot TAG."""
    from forkd.guest.image import find_image
    from forkd.guest.recipe import find_named

    remote = _remote(ctx)
    if remote is not None:
        with remote:
            info = remote.create_snapshot(tag, memory_mib=memory_mib, vcpus=vcpus, warm_code=warm_code,
                                          boot_timeout=boot_timeout, image=image_name)
        if as_json:
            print_json(_summary(info))
        else:
            console.print(f"snapshot {tag} created on {ctx.obj['url']}: {info.memory_mib} MiB RAM, "
                          f"accel {info.accel}", highlight=False)
        return
    eng = make_engine(accel)
    image = find_named(image_name) if image_name else find_image()
    if image is None:
        if not as_json:
            console.print("no guest image for the current inputs: building it first")
        image = build_with_progress() if not as_json else None
    t0 = time.monotonic()

    def step(msg: str) -> None:
        if not as_json:
            console.print(f"[dim]{time.monotonic() - t0:6.2f}s[/dim] {msg}")

    snap = eng.create_snapshot(tag, memory_mib=memory_mib, vcpus=vcpus, warm_code=warm_code,
                               boot_timeout=boot_timeout, keep_workdir=keep_workdir, step=step, image=image)
    if as_json:
        print_json(snap.summary())
        return
    s = snap.summary()
    console.print(f"snapshot {tag} created in {time.monotonic() - t0:.1f} s: accel {s['accel']}, "
                  f"{s['memory_mib']} MiB RAM ({s['memory_allocated_bytes'] / 2**20:.0f} MiB on disk), "
                  f"vmstate {s['vmstate_bytes'] / 1024:.0f} KiB, boot {s['timings'].get('boot_s')} s, "
                  f"save {s['timings'].get('save_ms')} ms")


@snapshot.command("list")
@json_option
@click.pass_context
@handle_errors
def list_(ctx: click.Context, as_json: bool) -> None:
    """List snapshots."""
    remote = _remote(ctx)
    if remote is not None:
        with remote:
            snaps = remote.list_snapshots()
        if as_json:
            print_json([_summary(s) for s in snaps])
            return
        table(f"snapshots on {ctx.obj['url']}", ["TAG", "ACCEL", "RAM MIB", "CREATED", "STATUS"],
              [(s.tag, s.accel, s.memory_mib or "", time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created_at))
                if s.created_at else "", "ok" if s.bootable else f"NOT BOOTABLE: {s.warning}") for s in snaps])
        return
    eng = make_engine()
    entries = eng.store.list()
    if as_json:
        print_json([snap.summary() if snap else {"tag": tag, "error": err} for tag, snap, err in entries])
        return
    rows = []
    for tag, snap, err in entries:
        if snap is None:
            rows.append((tag, "", "", "", "", f"INVALID: {err}"))
            continue
        s = snap.summary()
        rows.append((tag, s["accel"], s["memory_mib"], f"{s['memory_allocated_bytes'] / 2**20:.0f}",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created_at"])), "ok"))
    table(f"snapshots in {eng.store.root}", ["TAG", "ACCEL", "RAM MIB", "DISK MIB", "CREATED", "STATUS"], rows)


@snapshot.command("info")
@click.argument("tag")
@json_option
@click.pass_context
@handle_errors
def info(ctx: click.Context, tag: str, as_json: bool) -> None:
    """Show one snapshot's metadata."""
    remote = _remote(ctx)
    if remote is not None:
        with remote:
            s = _summary(remote.snapshot_info(tag))
    else:
        s = make_engine().store.open(tag).summary()
    if as_json:
        print_json(s)
        return
    for k, v in s.items():
        console.print(f"{k:>24}: {v}", highlight=False)


@snapshot.command("rm")
@click.argument("tags", nargs=-1, required=True)
@click.option("--cascade", is_flag=True, help="Also delete the branches that depend on it.")
@click.option("--force", is_flag=True, help="Delete it even though branches depend on it (orphans them).")
@click.pass_context
@handle_errors
def rm(ctx: click.Context, tags: tuple[str, ...], cascade: bool, force: bool) -> None:
    """Delete snapshots."""
    remote = _remote(ctx)
    if remote is not None:
        with remote:
            for tag in tags:
                remote.delete_snapshot(tag, force=force, cascade=cascade)
                console.print(f"deleted {tag}", highlight=False)
        return
    eng = make_engine()
    for tag in tags:
        for t in eng.delete_snapshot(tag, cascade=cascade, force=force):
            console.print(f"deleted {t}", highlight=False)


@snapshot.command("compact")
@click.argument("tag")
@click.option("--to", "to", required=True, help="Tag of the flat, parentless copy.")
@json_option
@click.pass_context
@handle_errors
def compact(ctx: click.Context, tag: str, to: str, as_json: bool) -> None:
    """Write a flat, parentless copy of a branch snapshot."""
    remote = _remote(ctx)
    if remote is not None:
        with remote:
            out = _summary(remote.compact_snapshot(tag, to))
    else:
        out = make_engine().compact(tag, to).summary()
    if as_json:
        print_json(out)
    else:
        console.print(f"snapshot {to} written (from {tag})", highlight=False)
