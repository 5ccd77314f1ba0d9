"""``forkd image build|info``."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from forkd.cli.common import json_option
from forkd.cli.output import console, handle_errors, print_json, table


def build_with_progress(force: bool = False) -> Any:
    """Build (or find) the guest image, drawing a progress bar on the terminal."""
    from forkd.guest.image import build_image

    with Progress(TextColumn("{task.description:<32}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("guest image", total=None)

        def cb(step: str, done: int, total: int) -> None:
            progress.update(task, description=step[:32], completed=done, total=total or None)

        return build_image(force=force, progress=cb)


@click.group()
def image() -> None:
    """The guest image (kernel + initramfs with Python, numpy and the agent)."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if an image for the current inputs exists.")
@json_option
@handle_errors
def build(force: bool, as_json: bool) -> None:
    """Build the guest image from Debian packages (cached; rebuilt only when its inputs change)."""
    t0 = time.monotonic()
    if as_json:
        from forkd.guest.image import build_image

        info = build_image(force=force)
        print_json(info.to_json())
        return
    info = build_with_progress(force)
    console.print(f"image {info.image_id}: kernel {info.kernel_version}, "
                  f"{info.size_bytes / 2**20:.1f} MiB, at {info.path} ({time.monotonic() - t0:.1f} s)")


@image.command("info")
@json_option
@handle_errors
def info(as_json: bool) -> None:
    """Show the built images and whether one matches the current inputs."""
    from forkd.guest.image import find_image, image_id_for, image_inputs, list_images

    inputs = image_inputs()
    current_id = image_id_for(inputs)
    current = find_image()
    images = list_images()
    if as_json:
        print_json({"current_id": current_id, "current_built": current is not None, "inputs": inputs,
                    "images": [i.to_json() for i in images]})
        return
    rows = [(i.image_id, "yes" if i.image_id == current_id else "", i.kernel_version,
             f"{i.size_bytes / 2**20:.1f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(i.built_at)),
             str(i.path)) for i in images]
    table("guest images", ["ID", "CURRENT", "KERNEL", "MIB", "BUILT", "PATH"], rows)
    if current is None:
        console.print(f"no image built for the current inputs ({current_id}); run: forkd image build")
    for k, v in inputs.items():
        console.print(f"  {k}: {v}", highlight=False)
