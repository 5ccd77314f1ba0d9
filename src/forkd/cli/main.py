"""``forkd``: build the guest image, create snapshots, fork children, clean up."""

from __future__ import annotations

import click

from forkd import __version__
from forkd.cli.bench_cmd import bench
from forkd.cli.cleanup_cmd import cleanup
from forkd.cli.doctor_cmd import doctor
from forkd.cli.fork_cmd import fork
from forkd.cli.image_cmd import image
from forkd.cli.mcp_cmd import mcp_command
from forkd.cli.pack_cmd import pack_command, unpack_command
from forkd.cli.push_cmd import pull_command, push_command
from forkd.cli.sandbox_cmd import branch, sandbox
from forkd.cli.snapshot_cmd import snapshot
from forkd.cli.workspace_cmd import workspace


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="forkd")
def cli() -> None:
    """forkd: fork warmed microVMs copy-on-write.

    Data lives under $FORKD_HOME (default ~/.local/share/forkd); $FORKD_ACCEL (auto|kvm|tcg)
    picks the accelerator.
    """


cli.add_command(image)
cli.add_command(snapshot)
cli.add_command(fork)
cli.add_command(cleanup)
cli.add_command(doctor)
cli.add_command(bench)
cli.add_command(sandbox)
cli.add_command(branch)
cli.add_command(pack_command)
cli.add_command(unpack_command)
cli.add_command(push_command)
cli.add_command(pull_command)
cli.add_command(mcp_command)
cli.add_command(workspace)


def main() -> None:
    cli()
