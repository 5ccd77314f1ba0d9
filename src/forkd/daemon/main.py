"""``forkd-controller serve``: every flag also reads its FORKD_* environment variable."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import click
import uvicorn

from forkd import __version__
from forkd.daemon.app import create_app
from forkd.daemon.audit import AuditLog, AuditMiddleware
from forkd.daemon.auth import BearerAuth, is_loopback, load_token
from forkd.daemon.metrics import Metrics
from forkd.daemon.service import Controller
from forkd.daemon.state import StateFile
from forkd.daemon.workspaces import Registry, Workspaces
from forkd.engine import Engine
from forkd.errors import ForkdError, ValidationError
from forkd.limits import MAX_LIFETIME_S
from forkd.paths import snapshot_root

log = logging.getLogger("forkd.controller")


def parse_bind(bind: str) -> tuple[str, int] | str:
    """``host:port`` / ``[v6]:port`` -> (host, port); ``unix:/path`` -> path."""
    if bind.startswith("unix:"):
        path = bind[5:]
        if not path.startswith("/"):
            raise ValidationError(f"--bind {bind!r}: a Unix socket path must be absolute")
        return path
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"--bind {bind!r}: expected HOST:PORT or unix:/path")
    return host.strip("[]"), int(port)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="forkd-controller")
def cli() -> None:
    """The forkd controller daemon."""


@cli.command()
@click.option("--bind", envvar="FORKD_BIND", default="127.0.0.1:8889", show_default=True,
              help="HOST:PORT, or unix:/path/to.sock for a Unix socket.")
@click.option("--state", "state_path", envvar="FORKD_STATE", default="/var/lib/forkd/state.json",
              show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--snapshot-root", envvar="FORKD_SNAPSHOT_ROOT", default=None, type=click.Path(path_type=Path),
              help="Snapshot directory (default: $FORKD_HOME/snapshots).")
@click.option("--audit-log", envvar="FORKD_AUDIT_LOG", default="/var/log/forkd/audit.log", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--token-file", envvar="FORKD_TOKEN_FILE", default=None, type=click.Path(path_type=Path),
              help="Bearer token file (mode 0600, >= 16 bytes). Without it only loopback binds are allowed.")
@click.option("--tls-cert", envvar="FORKD_TLS_CERT", default=None, type=click.Path(path_type=Path))
@click.option("--tls-key", envvar="FORKD_TLS_KEY", default=None, type=click.Path(path_type=Path))
@click.option("--prewarm-scratch-dir", "scratch_dir", envvar="FORKD_PREWARM_SCRATCH_DIR", default=None,
              type=click.Path(path_type=Path),
              help="Scratch dir for the children's work dirs (~5 MiB each; default: run/ beside --state).")
@click.option("--branch-concurrency", envvar="FORKD_BRANCH_CONCURRENCY", default=4, show_default=True,
              type=click.IntRange(1, 1024), help="Maximum BRANCH operations in flight.")
@click.option("--pool-size", envvar="FORKD_POOL_SIZE", default=0, show_default=True, type=click.IntRange(0, 1000),
              help="QEMUs kept waiting per snapshot once it has been spawned from.")
@click.option("--sandbox-timeout", envvar="FORKD_SANDBOX_TIMEOUT", default=None,
              type=click.FloatRange(min=1, max=MAX_LIFETIME_S),
              help="Seconds a sandbox lives unless its spawn asks otherwise (default: until killed).")
@click.option("--accel", envvar="FORKD_ACCEL", default=None, type=click.Choice(["auto", "kvm", "tcg"]))
@click.option("--log-level", envvar="FORKD_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--insecure-no-jail", envvar="FORKD_INSECURE_NO_JAIL", is_flag=True,
              help="Run QEMU unjailed (as this daemon's user, with no network filter). Only for trusted code.")
@click.option("--e2b-bind", envvar="FORKD_E2B_BIND", default=None,
              help="HOST:PORT: also serve the E2B-compatible API there (docs/e2b.md).")
@click.option("--e2b-key-file", envvar="FORKD_E2B_KEY_FILE", default=None, type=click.Path(path_type=Path),
              help="The E2B API key (mode 0600, e.g. e2b_<hex>); default: the --token-file token.")
@click.option("--e2b-template", envvar="FORKD_E2B_TEMPLATE", default=None,
              help="Snapshot tag for E2B's default templates (base, code-interpreter-v1) when none has their name.")
@click.option("--workspace-max-depth", envvar="FORKD_WORKSPACE_MAX_DEPTH", default=4, show_default=True,
              type=click.IntRange(1, 32), help="Links of its own a workspace state may sit on before compaction.")
@click.option("--workspace-idle-suspend", envvar="FORKD_WORKSPACE_IDLE_SUSPEND", default=None,
              type=click.FloatRange(min=1, max=MAX_LIFETIME_S),
              help="Seconds without a request after which a running workspace is suspended (default: never, "
                   "unless its create gives idle_suspend_s).")
@click.option("--workspace-mode", envvar="FORKD_WORKSPACE_MODE", default="delta", show_default=True,
              type=click.Choice(["delta", "auto", "flat"]),
              help="BRANCH mode of a workspace suspend (delta: the state is the dirty pages only).")
@click.option("--node-name", envvar="FORKD_NODE_NAME", default=None,
              help="This node's name in GET /v1/capacity and in multi-controller sandbox ids (default: the "
                   "hostname; in Kubernetes, spec.nodeName).")
@click.option("--max-sandboxes", envvar="FORKD_MAX_SANDBOXES", default=None, type=click.IntRange(1, 100000),
              help="Sandboxes this controller runs at most (a spawn past it is a 503; default: no limit).")
def serve(bind: str, state_path: Path, snapshot_root: Path | None, audit_log: Path, token_file: Path | None,
          tls_cert: Path | None, tls_key: Path | None, scratch_dir: Path | None, branch_concurrency: int,
          pool_size: int, sandbox_timeout: float | None, accel: str | None, log_level: str,
          insecure_no_jail: bool, e2b_bind: str | None, e2b_key_file: Path | None, e2b_template: str | None,
          workspace_max_depth: int = 4, workspace_idle_suspend: float | None = None,
          workspace_mode: str = "delta", node_name: str | None = None,
          max_sandboxes: int | None = None) -> None:
    """Serve the REST API."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        setup_jail(insecure_no_jail)
        config, audit, e2b_config = build(bind, state_path, snapshot_root, audit_log, token_file, tls_cert, tls_key,
                                          scratch_dir, branch_concurrency, pool_size, accel, log_level,
                                          sandbox_timeout, e2b_bind, e2b_key_file, e2b_template,
                                          workspace_max_depth=workspace_max_depth,
                                          workspace_idle_suspend=workspace_idle_suspend,
                                          workspace_mode=workspace_mode, node_name=node_name,
                                          max_sandboxes=max_sandboxes)
    except ForkdError as e:
        click.echo(f"forkd-controller: error: {e}", err=True)
        sys.exit(2)
    signal.signal(signal.SIGHUP, lambda *_: audit.reopen())
    if e2b_config is None:
        _Server(config).run()
    else:
        asyncio.run(_serve_both(_MainServer(config), _QuietServer(e2b_config)))
    audit.close()


async def _serve_both(main: _MainServer, e2b: uvicorn.Server) -> None:
    """The REST API and the E2B API in one event loop; the REST server's signals stop both."""
    task = asyncio.create_task(e2b.serve())
    main.companion, main.companion_task = e2b, task
    try:
        await main.serve()
    finally:
        e2b.should_exit = True
        await task


def setup_jail(insecure_no_jail: bool) -> None:
    """Jail every VM and filter its network, or refuse to start; ``--insecure-no-jail`` opts out, loudly."""
    from forkd.engine import jail, netfilter

    if insecure_no_jail:
        jail.configure(False)
        log.warning("--insecure-no-jail: QEMU runs unjailed and sandboxes' networks are not filtered; a guest "
                    "that escapes QEMU is %s on this host", "root" if os.geteuid() == 0 else "this daemon's user")
        return
    why = jail.can_jail()
    if why is not None:
        raise ValidationError(f"cannot jail VMs: {why}. Run forkd-controller as root (see "
                              "packaging/systemd/forkd-controller.service), or pass --insecure-no-jail to run "
                              "untrusted code without the jail")
    netfilter.require()
    jail.configure(True)
    jail.set_daemon_oom_score()


class _QuietServer(uvicorn.Server):
    """A second server in the loop of a _Server: it leaves the signals to that one."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT after a graceful drain is a clean exit (status 0),
    not a re-raised signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        sigs = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class _MainServer(_Server):
    """The REST server of a daemon that also serves E2B's API: that one stops first, before the
    controller shuts down (the lifespan's end), so that no E2B request reaches a closed controller."""

    companion: uvicorn.Server | None = None
    companion_task: asyncio.Task[None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.companion is not None and self.companion_task is not None:
            self.companion.should_exit = True
            await self.companion_task
        await super().shutdown(sockets)


def build(bind: str, state_path: Path, snap_root: Path | None, audit_path: Path, token_file: Path | None,
          tls_cert: Path | None, tls_key: Path | None, scratch_dir: Path | None, branch_concurrency: int,
          pool_size: int, accel: str | None, log_level: str, sandbox_timeout: float | None = None,
          e2b_bind: str | None = None, e2b_key_file: Path | None = None,
          e2b_template: str | None = None, workspace_max_depth: int = 4,
          workspace_idle_suspend: float | None = None,
          workspace_mode: str = "delta", node_name: str | None = None,
          max_sandboxes: int | None = None) -> tuple[uvicorn.Config, AuditLog, uvicorn.Config | None]:
    where = parse_bind(bind)
    node = check_node_name(node_name)
    token = load_token(token_file) if token_file else None
    warning = check_bind_auth(bind, where, token)
    if warning is not None:
        log.warning("%s", warning)
    e2b_key = load_token(e2b_key_file) if e2b_key_file else token
    e2b_where = parse_bind(e2b_bind) if e2b_bind else None
    if e2b_bind and e2b_where is not None:
        if isinstance(e2b_where, str):
            raise ValidationError("--e2b-bind: a Unix socket is not supported (E2B's SDKs speak TCP)")
        if (e2b_warning := check_bind_auth(e2b_bind, e2b_where, e2b_key)) is not None:
            log.warning("E2B API: %s", e2b_warning)
    if bool(tls_cert) != bool(tls_key):
        raise ValidationError("--tls-cert and --tls-key must be given together")
    for p in (tls_cert, tls_key):
        if p is not None and not os.access(p, os.R_OK):
            raise ValidationError(f"TLS file {p} is not readable")
    lock_state(state_path)
    listener = unix_listener(Path(where)) if isinstance(where, str) else tcp_listener(*where)
    e2b_listener = tcp_listener(*e2b_where) if isinstance(e2b_where, tuple) else None
    run_dir = scratch_dir or state_path.parent / "run"
    engine = Engine(snapshot_root=snap_root or snapshot_root(), run_dir=run_dir, accel=accel)
    engine.accel  # noqa: B018 - fail at start-up, not on the first request, if the accelerator is unusable
    ctl = Controller(engine, StateFile(state_path), pool_size=pool_size, default_lifetime_s=sandbox_timeout)
    ctl.branch_concurrency = branch_concurrency
    ctl.node_name, ctl.max_sandboxes = node, max_sandboxes
    try:
        ctl.workspaces = Workspaces(ctl, Registry(state_path.with_name("workspaces.json")),
                                    max_depth=workspace_max_depth, idle_suspend_s=workspace_idle_suspend,
                                    mode=workspace_mode)
    except ValueError as e:
        raise ValidationError(str(e)) from e
    audit = AuditLog(audit_path)
    metrics = Metrics(lambda: sum(1 for _t, snap, _e in engine.store.list() if snap is not None), ctl.active_count,
                      ctl.branches_in_flight)
    ctl.spawn_observer = metrics.spawn_seconds.observe
    app = create_app(ctl, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = 256
        report = ctl.reconcile()
        ctl.start_reaper()
        ctl.workspaces.start_idle_check()
        log.info("forkd-controller %s on %s (accel %s); reconcile: %s", __version__, bind, engine.accel.name,
                 {k: len(v) for k, v in report.items()})
        yield
        log.info("shutting down: sandboxes keep running and are re-adopted at the next start")
        ctl.workspaces.stop()
        ctl.shutdown()

    app.router.lifespan_context = lifespan
    asgi = AuditMiddleware(BearerAuth(app, token), audit, metrics.observe_request)
    kw: dict[str, object] = {"log_level": log_level, "timeout_graceful_shutdown": 30, "access_log": False,
                             "lifespan": "on", "server_header": False,
                             "proxy_headers": False}  # X-Forwarded-For from loopback would spoof the audit log
    kw["fd"] = listener.detach()  # bound before reconcile: a busy address fails before anything is touched
    if tls_cert and tls_key:
        kw["ssl_certfile"], kw["ssl_keyfile"] = str(tls_cert), str(tls_key)
    config = uvicorn.Config(asgi, **kw)  # type: ignore[arg-type]
    config.load()
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.2 and 1.3 only
    e2b_config = None
    if e2b_listener is not None:
        from forkd.e2b.app import create_e2b_app

        e2b_asgi = AuditMiddleware(create_e2b_app(ctl, e2b_key, e2b_template), audit, metrics.observe_request)
        e2b_config = uvicorn.Config(e2b_asgi, **{**kw, "fd": e2b_listener.detach(), "lifespan": "off"})  # type: ignore[arg-type]
        e2b_config.load()
        if e2b_config.ssl is not None:
            e2b_config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    return config, audit, e2b_config


def check_node_name(name: str | None) -> str:
    """``--node-name`` checked (a hostname-like label), or this host's name."""
    import re

    from forkd.daemon.capacity import NODE_NAME_PATTERN, default_node_name

    if name is None:
        return default_node_name()
    if not re.fullmatch(NODE_NAME_PATTERN, name):
        raise ValidationError(f"--node-name {name!r}: letters, digits, '.', '_' and '-', 1-63 characters, "
                              "starting with a letter or digit")
    return name


def check_bind_auth(bind: str, where: tuple[str, int] | str, token: bytes | None) -> str | None:
    """Without a token: ValidationError for a non-loopback TCP address, and the warning to print for a
    loopback one (None: a token, or a Unix socket only its owner may connect to)."""
    if token is not None or not isinstance(where, tuple):
        return None
    if not is_loopback(where[0]):
        raise ValidationError(f"refusing to bind {bind} without --token-file: an unauthenticated API may only "
                              "listen on loopback or a Unix socket")
    return (f"--bind {bind} without --token-file: the API is unauthenticated, and any process or sandbox that can "
            "reach that address controls every sandbox (jailed sandboxes cannot reach it, but every local process "
            "can); give a --token-file, or bind a Unix socket (unix:/path.sock, mode 0600)")


_LOCKS: list[int] = []


def lock_state(state_path: Path) -> None:
    """Hold an exclusive lock beside the state file for the life of the process: a second daemon on the
    same state would otherwise prune the first one's sandboxes."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{state_path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise ValidationError(f"another forkd-controller is already using --state {state_path}") from e
    _LOCKS.append(fd)


def tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ValidationError(f"--bind {host}:{port}: {e.strerror}") from e
    s.listen(2048)
    return s


def unix_listener(path: Path) -> socket.socket:
    """A listening Unix socket only its owner may connect to (uvicorn's own would be mode 0666)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    s.listen(1024)
    return s


def main() -> None:
    cli()


@cli.command("openapi")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the document here (default: stdout). The repository keeps it in docs/openapi.json.")
def openapi(out: Path | None) -> None:
    """Print the OpenAPI document of REST API v1 (what the daemon serves at /openapi.json)."""
    from forkd.daemon.app import openapi_document
    from forkd.fsutil import atomic_write_bytes

    text = openapi_json(openapi_document())
    if out is None:
        click.echo(text, nl=False)
    else:
        atomic_write_bytes(out, text.encode(), 0o644)


def openapi_json(doc: dict[str, object]) -> str:
    """The canonical text of the document (sorted keys, two-space indent, final newline)."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
