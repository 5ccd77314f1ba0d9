"""``forkd sandbox ...``: long-lived sandboxes.

With ``--url`` (or ``FORKD_URL``) every command goes to a forkd-controller through the SDK. Without
it the commands run locally on the engine: ``spawn`` leaves the children running in their own session
after the command exits, and later commands reconnect to them through their work dirs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

import click

from forkd.cli.common import URL_HELP, accel_option, json_option, make_engine, remote_controller
from forkd.cli.output import console, error, handle_errors, print_json, table
from forkd.errors import ForkdError, ValidationError
from forkd.limits import BRANCH_MODES, MAX_CHILDREN


class Backend(Protocol):
    def spawn(self, tag: str, n: int, network: str) -> list[dict[str, Any]]: ...
    def list(self) -> list[dict[str, Any]]: ...
    def call(self, sid: str, op: str, **kw: Any) -> dict[str, Any]: ...
    def kill(self, sid: str) -> None: ...
    def branch(self, sid: str, tag: str | None, mode: str, wait: bool) -> dict[str, Any]: ...


class LocalBackend:
    """Children of this machine's engine, found through their work dirs."""

    def __init__(self, accel: str | None) -> None:
        self.engine = make_engine(accel)

    def spawn(self, tag: str, n: int, network: str) -> list[dict[str, Any]]:
        out = []
        for r in self.engine.spawn(tag, n, network=network):
            if r.child is None:
                out.append({"index": r.index, "error": r.error})
            else:
                out.append({"index": r.index, **r.child.info()})
                r.child.vm.disconnect()  # let go; the VM keeps running
        return out

    def list(self) -> list[dict[str, Any]]:
        from forkd.engine.vm import recorded_vms

        return [{"id": r.meta["id"], "snapshot": r.meta.get("snapshot"), "pid": r.meta.get("pid"),
                 "status": "running" if r.alive else "exited", "network": r.meta.get("network")}
                for r in recorded_vms(self.engine.run_dir) if r.meta.get("role") == "child" and not r.meta.get("pool")]

    def _child(self, sid: str) -> Any:
        from forkd.paths import validate_child_id

        validate_child_id(sid, "sandbox id")
        wd = self.engine.run_dir / sid
        if not wd.is_dir():
            raise ForkdError(f"sandbox {sid} not found in {self.engine.run_dir}")
        return self.engine.adopt(wd)

    def call(self, sid: str, op: str, **kw: Any) -> dict[str, Any]:
        child = self._child(sid)
        try:
            if op == "exec":
                return child.exec(kw.pop("argv"), **kw).__dict__
            return dict(getattr(child, op)(**kw))
        finally:
            child.vm.disconnect()

    def kill(self, sid: str) -> None:
        self._child(sid).kill()

    def branch(self, sid: str, tag: str | None, mode: str, wait: bool) -> dict[str, Any]:
        child = self._child(sid)
        try:
            return dict(self.engine.branch(child, tag, mode).to_json(), status="ready")
        finally:
            child.vm.disconnect()


class RemoteBackend:
    """A forkd-controller, or several (a URL list: a MultiController, ids NODE~sb-...), through the SDK."""

    def __init__(self, url: str, token_file: Path | None) -> None:
        self.ctl = remote_controller(url, token_file, multi=True)

    def spawn(self, tag: str, n: int, network: str) -> list[dict[str, Any]]:
        res = self.ctl.spawn_sandboxes(tag, n, network=network, return_exceptions=True)
        out: list[dict[str, Any]] = []
        for i, r in enumerate(res):
            out.append({"index": i, "error": str(r)} if isinstance(r, Exception)
                       else {"index": i, **r.info.__dict__, "id": r.id, "node": r.node})
        return out

    def list(self) -> list[dict[str, Any]]:
        found = self.ctl.list_sandboxes()
        for where, e in getattr(found, "errors", {}).items():  # a MultiController: the controllers that failed
            error(f"{where}: {e}")
        return [{**s.info.__dict__, "id": s.id, "node": s.node, "snapshot": s.info.snapshot_tag} for s in found]

    def call(self, sid: str, op: str, **kw: Any) -> dict[str, Any]:
        from forkd.sdk import CodeError

        sb = self.ctl.get_sandbox(sid)
        if op == "ping":
            return dict(sb.ping().__dict__)
        if op == "eval":
            r = sb.eval_result(kw["expr"])
            return {"repr": r.repr, "value": r.value}
        if op == "run_code":
            try:
                e = sb.run_code(kw["code"])
            except CodeError as ce:
                raise ForkdError(f"{ce.type}: {ce.message}\n{ce.traceback or ''}") from ce
            return {"stdout": e.stdout, "stderr": e.stderr, "repr": e.repr, "value": e.value}
        if op == "exec":
            c = sb.commands.run(list(kw["argv"]), timeout=kw.get("timeout"))
            return dict(c.__dict__)
        raise ValidationError(f"unknown operation {op}")

    def kill(self, sid: str) -> None:
        self.ctl.get_sandbox(sid).kill()

    def branch(self, sid: str, tag: str | None, mode: str, wait: bool) -> dict[str, Any]:
        return dict(self.ctl.get_sandbox(sid).branch(tag, mode=mode, wait=wait).__dict__)


def backend(ctx: click.Context) -> Backend:
    o = ctx.obj
    if o["url"]:
        return RemoteBackend(o["url"], o["token_file"])
    return LocalBackend(o["accel"])


@click.group()
@click.option("--url", envvar="FORKD_URL", default=None, help=URL_HELP)
@click.option("--token-file", envvar="FORKD_TOKEN_FILE", default=None, type=click.Path(path_type=Path),
              help="File holding the bearer token (else $FORKD_TOKEN).")
@accel_option
@click.pass_context
def sandbox(ctx: click.Context, url: str | None, token_file: Path | None, accel: str | None) -> None:
    """Long-lived sandboxes, on a forkd-controller (--url / FORKD_URL) or on this machine."""
    ctx.obj = {"url": url, "token_file": token_file, "accel": accel}


@sandbox.command("spawn")
@click.option("--tag", required=True, help="Snapshot to fork from.")
@click.option("-n", "--n", "n", type=click.IntRange(1, MAX_CHILDREN), default=1, show_default=True)
@click.option("--network", type=click.Choice(["internet", "none", "user"]), default="internet", show_default=True)
@json_option
@click.pass_context
@handle_errors
def spawn(ctx: click.Context, tag: str, n: int, network: str, as_json: bool) -> None:
    """Start N sandboxes that keep running until killed."""
    rows = backend(ctx).spawn(tag, n, network)
    if as_json:
        print_json(rows)
    else:
        for r in rows:
            if r.get("error"):
                error(f"child {r['index']}: {r['error']}")
            else:
                console.print(r["id"], highlight=False)
    if any(r.get("error") for r in rows):
        sys.exit(1)


@sandbox.command("list")
@json_option
@click.pass_context
@handle_errors
def list_(ctx: click.Context, as_json: bool) -> None:
    """List sandboxes."""
    rows = backend(ctx).list()
    if as_json:
        print_json(rows)
        return
    table("sandboxes", ["ID", "SNAPSHOT", "PID", "STATUS"],
          [(r["id"], r.get("snapshot"), r.get("pid"), r.get("status")) for r in rows])


@sandbox.command("ping")
@click.argument("sid")
@click.pass_context
@handle_errors
def ping(ctx: click.Context, sid: str) -> None:
    """Ping a sandbox's agent."""
    print_json(backend(ctx).call(sid, "ping"))


@sandbox.command("eval")
@click.argument("sid")
@click.argument("expr")
@click.pass_context
@handle_errors
def eval_(ctx: click.Context, sid: str, expr: str) -> None:
    """Evaluate EXPR in the sandbox's warmed interpreter and print its repr."""
    click.echo(backend(ctx).call(sid, "eval", expr=expr)["repr"])


@sandbox.command("run")
@click.argument("sid")
@click.argument("code")
@click.pass_context
@handle_errors
def run(ctx: click.Context, sid: str, code: str) -> None:
    """Run Python statements (state persists); prints stdout, stderr and the last value."""
    r = backend(ctx).call(sid, "run_code", code=code)
    sys.stdout.write(r.get("stdout", ""))
    sys.stderr.write(r.get("stderr", ""))
    if r.get("repr") is not None:
        click.echo(r["repr"])


@sandbox.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds before the process is killed.")
@click.argument("sid")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
@handle_errors
def exec_(ctx: click.Context, timeout: float, sid: str, argv: tuple[str, ...]) -> None:
    """Run ARGV in the sandbox; exits with its exit code."""
    r = backend(ctx).call(sid, "exec", argv=list(argv), timeout=timeout)
    sys.stdout.write(r.get("stdout", ""))
    sys.stderr.write(r.get("stderr", ""))
    if r.get("timed_out"):
        error(f"timed out after {timeout} s")
        sys.exit(124)
    code = r.get("exit_code")
    sys.exit(code if isinstance(code, int) and code >= 0 else 1)


@sandbox.command("kill")
@click.argument("sids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Kill every sandbox.")
@click.pass_context
@handle_errors
def kill(ctx: click.Context, sids: tuple[str, ...], all_: bool) -> None:
    """Kill sandboxes."""
    b = backend(ctx)
    if all_:
        sids = tuple(r["id"] for r in b.list())
    elif not sids:
        raise click.UsageError("give sandbox ids or --all")
    failed = 0
    for sid in sids:
        try:
            b.kill(sid)
        except Exception as e:
            from forkd.sdk import ForkdAPIError  # one failure (a controller down) does not stop the others

            if not isinstance(e, ForkdAPIError) or len(sids) == 1:
                raise
            error(f"{sid}: {e}")
            failed += 1
            continue
        console.print(f"killed {sid}", highlight=False)
    if failed:
        sys.exit(1)




@click.command("branch")
@click.argument("sid")
@click.option("--tag", default=None, help="Name of the new snapshot (generated when absent).")
@click.option("--mode", type=click.Choice(BRANCH_MODES), default="auto", show_default=True,
              help="delta: pages in the vmstate over the base memory.bin; flat: a memory.bin of its own.")
@click.option("--no-wait", is_flag=True, help="Daemon only: return at once; the snapshot is `writing` until ready.")
@click.option("--url", envvar="FORKD_URL", default=None, help="forkd-controller URL; local engine when absent.")
@click.option("--token-file", envvar="FORKD_TOKEN_FILE", default=None, type=click.Path(path_type=Path))
@accel_option
@json_option
@handle_errors
def branch(sid: str, tag: str | None, mode: str, no_wait: bool, url: str | None, token_file: Path | None,
           accel: str | None, as_json: bool) -> None:
    """Snapshot the running sandbox SID so it can be forked again; it keeps running."""
    b: Backend = RemoteBackend(url, token_file) if url else LocalBackend(accel)
    r = b.branch(sid, tag, mode, not no_wait)
    if as_json:
        print_json(r)
    elif r.get("status") == "writing":
        console.print(f"snapshot {r['tag']} is being written", highlight=False)
    else:
        console.print(f"snapshot {r['tag']}: {r['mode']}, pause {r['pause_ms']} ms, "
                      f"{r['dirty_bytes'] / 2**20:.1f} MiB dirty, {r['bytes_written'] / 2**20:.1f} MiB written, "
                      f"{r['total_ms']} ms in all", highlight=False)
