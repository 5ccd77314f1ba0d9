"""``forkd image build|list|info|rm``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from forkd.cli.common import json_option
from forkd.cli.output import console, handle_errors, print_json, table


def _progress(label: str, run: Any) -> Any:
    with Progress(TextColumn("{task.description:<32}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(label, total=None)

        def cb(step: str, done: int, total: int) -> None:
            progress.update(task, description=step[:32], completed=done, total=total or None)

        return run(cb)


def build_with_progress(force: bool = False) -> Any:
    """Build (or find) the default guest image, drawing a progress bar on the terminal."""
    from forkd.guest.image import build_image

    return _progress("guest image", lambda cb: build_image(force=force, progress=cb))


def _kv(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"expected KEY=VALUE; got {v!r}", param_hint=what)
        out[k] = val
    return out


def _copies(values: tuple[str, ...]) -> list[tuple[Path, str]]:
    out = []
    for v in values:
        src, sep, dst = v.rpartition(":")
        if not sep or not src or not dst:
            raise click.BadParameter(f"expected SRC:DST; got {v!r}", param_hint="--copy")
        out.append((Path(src), dst))
    return out


@click.group()
def image() -> None:
    """Guest images: the default one (Python + numpy in an initramfs) and your own recipes."""


@image.command("build")
@click.option("--name", default=None, help="Name of a recipe image (^[a-z0-9][a-z0-9._-]{0,63}$). Without any "
              "recipe option, the default image is built.")
@click.option("--file", "recipe_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A TOML recipe with the same fields (name, apt, pip, requirements, rootfs, oci, copy, env, "
                   "workdir, disk_mib); options given here add to it.")
@click.option("--apt", multiple=True, help="A Debian package (with its dependencies), downloaded, never installed "
              "on the host. Repeatable.")
@click.option("--pip", multiple=True, help="A pip requirement (wheels for the guest's Python). Repeatable.")
@click.option("--requirements", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A pip requirements file. Repeatable.")
@click.option("--rootfs", type=click.Path(exists=True, path_type=Path), default=None,
              help="A root file system: a tar (e.g. docker export) or a directory.")
@click.option("--oci", type=click.Path(exists=True, path_type=Path), default=None,
              help="An OCI image layout (directory or tar) or a docker save archive.")
@click.option("--copy", multiple=True, help="SRC:DST, a host file or directory copied to guest path DST.")
@click.option("--env", multiple=True, help="K=V in the guest's environment. Repeatable.")
@click.option("--workdir", default=None, help="The guest's working directory (absolute).")
@click.option("--disk-mib", type=int, default=None, help="Size of the root file system in MiB (default 2048).")
@click.option("--force", is_flag=True, help="Rebuild even if an image for the current inputs exists.")
@json_option
@handle_errors
def build(name: str | None, recipe_file: Path | None, apt: tuple[str, ...], pip: tuple[str, ...],
          requirements: tuple[Path, ...], rootfs: Path | None, oci: Path | None, copy: tuple[str, ...],
          env: tuple[str, ...], workdir: str | None, disk_mib: int | None, force: bool, as_json: bool) -> None:
    """Build the default guest image, or a recipe image with --name/--file (cached by its inputs)."""
    t0 = time.monotonic()
    if name is None and recipe_file is None:
        if any((apt, pip, requirements, rootfs, oci, copy, env, workdir, disk_mib)):
            raise click.UsageError("a recipe image needs --name (or --file with a name)")
        from forkd.guest.image import build_image

        info = build_image(force=force) if as_json else build_with_progress(force)
        if as_json:
            print_json(info.to_json())
            return
        console.print(f"image {info.image_id}: kernel {info.kernel_version}, "
                      f"{info.size_bytes / 2**20:.1f} MiB, at {info.path} ({time.monotonic() - t0:.1f} s)")
        return
    from forkd.engine.snapshot import SnapshotStore
    from forkd.guest.recipe import DEFAULT_DISK_MIB, Recipe, build_recipe

    fields: dict[str, Any] = {"apt": list(apt), "pip": list(pip), "requirements": list(requirements),
                              "rootfs": rootfs, "oci": oci, "copy": _copies(copy), "env": _kv(env, "--env"),
                              "workdir": workdir, "disk_mib": disk_mib}
    if recipe_file is not None:
        recipe = Recipe.from_toml(recipe_file, **fields, name=name)
    else:
        fields["disk_mib"] = disk_mib or DEFAULT_DISK_MIB
        recipe = Recipe(name=name or "", **fields)
    users = SnapshotStore().using_image
    if as_json:
        print_json(build_recipe(recipe, force=force, in_use=users).to_json())
        return
    info = _progress(f"image {recipe.name}",
                     lambda cb: build_recipe(recipe, force=force, progress=cb, in_use=users))
    console.print(f"image {recipe.name} = {info.image_id}: Python {info.python}, {info.disk_mib} MiB disk, "
                  f"{info.size_bytes / 2**20:.1f} MiB on the host, at {info.path} ({time.monotonic() - t0:.1f} s)")


@image.command("list")
@json_option
@handle_errors
def list_cmd(as_json: bool) -> None:
    """The built images, with their names."""
    from forkd.guest.image import list_images
    from forkd.guest.recipe import named_images

    names: dict[str, list[str]] = {}
    for n, i in named_images().items():
        names.setdefault(i, []).append(n)
    images = list_images()
    if as_json:
        print_json([{**i.to_json(), "names": names.get(i.image_id, [])} for i in images])
        return
    rows = [(i.image_id, ",".join(names.get(i.image_id, [])) or ("(default)" if i.rootfs is None else ""),
             i.python or "/usr/bin/python3.11 (initramfs)", f"{i.size_bytes / 2**20:.1f}",
             time.strftime("%Y-%m-%d %H:%M", time.localtime(i.built_at))) for i in images]
    table("guest images", ["ID", "NAME", "PYTHON", "MIB", "BUILT"], rows)


@image.command("info")
@click.argument("name", required=False)
@json_option
@handle_errors
def info(name: str | None, as_json: bool) -> None:
    """Show image NAME, or the default images and whether one matches the current inputs."""
    if name is not None:
        from forkd.guest.recipe import describe, find_named

        d = describe(find_named(name))
        if as_json:
            print_json(d)
            return
        for k in ("image_id", "name", "python", "disk_mib", "size_bytes", "kernel_version", "path", "cmdline"):
            console.print(f"{k}: {d.get(k)}", highlight=False)
        console.print(f"recipe: {d['recipe']}", highlight=False)
        console.print(f"apt: {' '.join(d['apt'])}", highlight=False)
        return
    from forkd.guest.image import find_image, image_id_for, image_inputs, list_images

    inputs = image_inputs()
    current_id = image_id_for(inputs)
    current = find_image()
    images = [i for i in list_images() if i.rootfs is None]
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


@image.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove even if snapshots were made from it.")
@json_option
@handle_errors
def rm(name: str, force: bool, as_json: bool) -> None:
    """Remove image NAME (refused while snapshots use it, unless --force)."""
    from forkd.engine.snapshot import SnapshotStore
    from forkd.guest.recipe import find_named, remove_named

    image_id = find_named(name).image_id
    users = SnapshotStore().using_image(image_id)
    removed = remove_named(name, users, force=force)
    if as_json:
        print_json({"name": name, "image_id": removed})
        return
    console.print(f"removed image {name} ({removed})")
