"""The keeper of the MCP server's private daemon (local-engine mode).

``python -m forkd.mcp.keeper DIR -- SERVE-ARGS...`` runs in a session of its own, so that the MCP client
killing the server's process group does not reach it. It starts ``forkd-controller serve SERVE-ARGS``
and waits for its standard input to end: the MCP server holds the only write end of that pipe, so the
pipe ends however the server exits, a SIGKILL included. Then it kills every sandbox the daemon has,
stops the daemon, kills any VM still recorded under DIR/run and removes DIR (the token file with it).

Files in DIR (mode 0700): ``token`` (0600), ``api.sock``, ``daemon.log``, ``state.json``, ``run/``, and
``daemon.exit`` (the daemon's exit status) once the daemon has exited.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

STOP_TIMEOUT_S = 60.0
"""Seconds the daemon gets to drain after SIGTERM before SIGKILL."""
EXIT_FILE = "daemon.exit"
LOG_FILE = "daemon.log"


class _Stop(Exception):
    """A signal asked the keeper to clean up now."""


def _on_signal(_sig: int, _frame: object) -> None:
    raise _Stop


def say(message: str) -> None:
    """A line on stderr (the MCP server's), never failing: that pipe may be closed by now."""
    with contextlib.suppress(OSError, ValueError):
        print(f"forkd-mcp keeper: {message}", file=sys.stderr, flush=True)


def _daemon_settings() -> set[str]:
    """The environment variables that set ``forkd-controller serve``'s options (TLS, pool, scratch
    directory, ...) and the client's: the private daemon gets only the options given on its command
    line, never the user's settings for another daemon. The engine's own (FORKD_HOME, ...) pass."""
    from forkd.daemon.main import serve

    names = {"FORKD_TOKEN", "FORKD_URL"}
    for p in serve.params:
        envvar = getattr(p, "envvar", None)
        names.update([envvar] if isinstance(envvar, str) else list(envvar or ()))
    return names - {"FORKD_SNAPSHOT_ROOT", "FORKD_ACCEL"}


def start_daemon(d: Path, serve_args: list[str]) -> subprocess.Popen[bytes]:
    log = open(d / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child
    try:
        env = {k: v for k, v in os.environ.items() if k not in _daemon_settings()}
        return subprocess.Popen([sys.executable, "-m", "forkd.daemon", "serve", *serve_args], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/")
    finally:
        log.close()


def wait_for_eof_or_exit(proc: subprocess.Popen[bytes], d: Path) -> None:
    """Block until stdin ends. If the daemon exits first, record its status and keep waiting."""
    recorded = False
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], 0.5)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            return
        if not recorded and proc.poll() is not None:
            (d / EXIT_FILE).write_text(f"{proc.returncode}\n")
            recorded = True
            kill_recorded_vms(d / "run")


def kill_sandboxes(d: Path) -> None:
    """Kill every sandbox of the daemon through its API (best effort)."""
    from forkd.sdk import Controller, ForkdAPIError

    try:
        token = (d / "token").read_text().strip()
        with Controller(f"unix:{d / 'api.sock'}", token, timeout=60.0) as ctl:
            for sb in ctl.list_sandboxes():
                with contextlib.suppress(ForkdAPIError):
                    sb.kill()
    except (OSError, ForkdAPIError) as e:
        say(f"could not kill the sandboxes through the daemon: {e}")


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def kill_recorded_vms(run: Path) -> None:
    """Kill the VMs still recorded in ``run`` (the daemon died, or did not kill them)."""
    if not run.is_dir():
        return
    from forkd.engine.vm import VMProcess, WorkDir, process_matches

    for w in run.iterdir():
        meta = WorkDir(w).read_meta() if w.is_dir() else None
        if not meta:
            continue
        pid, vm_id = int(meta.get("pid", 0)), str(meta.get("id", ""))
        if pid > 0 and process_matches(pid, vm_id):
            try:
                VMProcess.adopt(w).kill()
            except Exception:  # noqa: BLE001 - last resort below
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def run(d: Path, serve_args: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_daemon(d, serve_args)
        wait_for_eof_or_exit(proc, d)
    except _Stop:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the clean-up runs to its end
        if proc is not None and proc.poll() is None:
            kill_sandboxes(d)
            stop_daemon(proc)
        kill_recorded_vms(d / "run")
        shutil.rmtree(d, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] != "--":
        print("usage: python -m forkd.mcp.keeper DIR -- SERVE-ARGS...", file=sys.stderr)
        return 2
    d = Path(args[0])
    if not d.is_dir():
        say(f"{d} is not a directory")
        return 2
    return run(d, args[2:])


if __name__ == "__main__":
    sys.exit(main())
