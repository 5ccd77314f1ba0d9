"""The official E2B SDKs (``e2b`` and ``e2b-code-interpreter`` from PyPI, unmodified, in a virtual
environment of their own: ``make e2b-venv``) against ``forkd-controller serve --e2b-bind``: create,
info, list, connect, timeout, commands (streamed output, exit codes, background + kill), files
(write, read, list, exists, missing), run_code (stdout, result, state, error), kill, a wrong key."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, free_port, make_token_file, start_daemon_process, wait_healthy
from packaging.version import Version

from forkd.engine import Engine

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
#: the SDKs' venvs (``make e2b-venv``): the newest tested release and an older 2.x (creates with POST /sandboxes)
PYTHONS = {"e2b-2.63": Path(os.environ.get("FORKD_E2B_PYTHON", ROOT / ".venv-e2b" / "bin" / "python")),
           "e2b-2.50": ROOT / ".venv-e2b-old" / "bin" / "python"}

SCRIPT = textwrap.dedent('''
    import io, json, sys, time
    import e2b
    from e2b import (AuthenticationException, CommandExitException, NotFoundException, Sandbox, SandboxQuery,
                     TimeoutException)
    from e2b_code_interpreter import Sandbox as CodeSandbox
    from importlib.metadata import version
    assert "site-packages" in e2b.__file__, e2b.__file__
    tag = sys.argv[1]
    out = {"versions": {p: version(p) for p in ("e2b", "e2b-code-interpreter")}, "t": {}}
    t0 = time.monotonic()

    def lap(name):
        global t0
        out["t"][name] = round(time.monotonic() - t0, 3)
        t0 = time.monotonic()

    sb = Sandbox.create(template=tag, timeout=120, metadata={"suite": "e2b", "run": "1"}, envs={"FOO": "bar"})
    lap("create")
    out["id"] = sb.sandbox_id
    out["running"] = sb.is_running()
    info = sb.get_info()
    out["info"] = {"id": info.sandbox_id, "template": info.template_id, "metadata": info.metadata,
                   "state": str(info.state), "lifetime": (info.end_at - info.started_at).total_seconds()}
    r = sb.commands.run("echo hello; echo oops >&2")
    lap("run")
    out["run"] = {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}
    seen = []
    sb.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=seen.append)
    out["streamed"] = "".join(seen)
    try:
        sb.commands.run("echo before; exit 3")
    except CommandExitException as e:
        out["exit"] = {"code": e.exit_code, "stdout": e.stdout}
    bg = sb.commands.run("sleep 60", background=True)
    out["bg"] = {"pid_ok": bg.pid > 0, "listed": any(p.pid == bg.pid for p in sb.commands.list()),
                 "killed": bg.kill()}
    lap("commands")
    w = sb.files.write("/tmp/probe.txt", "data-123")
    out["write"] = {"path": w.path, "name": w.name}
    out["read"] = sb.files.read("/tmp/probe.txt")
    blob = bytes(range(256)) * 3
    sb.files.write("/tmp/d/sub/bin.dat", blob)
    out["binary_ok"] = bytes(sb.files.read("/tmp/d/sub/bin.dat", format="bytes")) == blob
    out["list"] = sorted((e.name, getattr(e.type, "value", str(e.type))) for e in sb.files.list("/tmp/d", depth=2))
    out["exists"] = [sb.files.exists("/tmp/probe.txt"), sb.files.exists("/tmp/nope")]
    try:
        sb.files.read("/tmp/nope")
    except NotFoundException as e:
        out["read_missing"] = type(e).__name__
    out["mkdir"] = [sb.files.make_dir("/tmp/nd/x"), sb.files.make_dir("/tmp/nd/x")]
    sb.files.write("/tmp/nd/x/f", "1")
    out["rename"] = sb.files.rename("/tmp/nd/x/f", "/tmp/nd/g").path
    sb.files.remove("/tmp/nd")
    out["removed"] = sb.files.exists("/tmp/nd")
    out["write_files"] = [w.path for w in sb.files.write_files([{"path": "/tmp/m1", "data": "one"},
                                                                 {"path": "/tmp/m2", "data": b"two"}])]
    out["octet"] = [sb.files.write("/tmp/o", io.BytesIO(b"streamed")).path, sb.files.read("/tmp/o")]
    lap("files")
    r = sb.commands.run("echo $FOO $BAZ; pwd", envs={"BAZ": "q"}, cwd="/tmp")
    out["env"] = r.stdout
    t = time.monotonic()
    try:
        sb.commands.run("sleep 30", timeout=2)
    except TimeoutException as e:
        out["cmd_timeout"] = [type(e).__name__, time.monotonic() - t]
    h = sb.commands.run("cat", background=True, stdin=True)
    sb.commands.send_stdin(h.pid, "typed\\n")
    sb.commands.close_stdin(h.pid)
    out["stdin"] = h.wait().stdout
    t = time.monotonic()
    seen = []
    sb.commands.run("echo a; sleep 2; echo b", on_stdout=lambda x: seen.append([x, time.monotonic() - t]))
    out["stream_timing"] = seen
    lap("commands2")
    sb.set_timeout(90)
    out["after_timeout"] = (sb.get_info().end_at - __import__("datetime").datetime.now(
        __import__("datetime").timezone.utc)).total_seconds()
    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b"})).next_items()
    out["listed"] = [s.sandbox_id for s in listed]
    out["listed_other"] = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": "x"})).next_items()]
    again = Sandbox.connect(sb.sandbox_id)
    out["connect_run"] = again.commands.run("echo again").stdout
    sid = sb.sandbox_id
    sb.commands.run("echo forked-state > /tmp/fork-mark")
    forks = sb.fork(count=2, timeout=60) if hasattr(sb, "fork") else []
    out["fork"] = {"n": len(forks), "started": [not isinstance(f, Exception) for f in forks],
                   "distinct": len({f.sandbox_id for f in forks} | {sid}) == 3,
                   "mark": [f.commands.run("cat /tmp/fork-mark").stdout for f in forks],
                   "parent_running": sb.is_running()}
    for f in forks:
        f.kill()
    short = Sandbox.create(template=tag, timeout=2)
    time.sleep(4)
    out["expired"] = short.is_running()
    try:
        short.commands.run("echo x")
    except Exception as e:
        out["cmd_after_expiry"] = type(e).__name__
    sb.kill()
    lap("control")
    try:
        Sandbox.get_info(sid)
    except NotFoundException as e:
        out["after_kill"] = type(e).__name__
    out["kill_again"] = Sandbox.kill(sid)
    out["is_running_after_kill"] = again.is_running()

    ci = CodeSandbox.create(timeout=120)           # template code-interpreter-v1 -> --e2b-template
    lap("ci_create")
    got = []
    ex = ci.run_code("x = 40\\nprint('hi')\\nx + 2", on_stdout=lambda m: got.append(m.line))
    out["ci"] = {"stdout": ex.logs.stdout, "text": ex.text, "error": ex.error is None, "callback": got}
    out["ci_state"] = ci.run_code("x + 1").text
    err = ci.run_code("1/0").error
    out["ci_error"] = {"name": err.name, "value": err.value, "tb": "ZeroDivisionError" in err.traceback}
    lap("run_code")
    ci.kill()
    try:
        Sandbox.create(template=tag, api_key="e2b_" + "0" * 40)
    except AuthenticationException as e:
        out["bad_key"] = type(e).__name__
    try:
        Sandbox.create(template="no-such-template")
    except Exception as e:
        out["bad_template"] = [type(e).__name__, str(e)[:200]]
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def e2b_daemon(engine: Engine, snapshot: str, forkd_home: Path) -> Iterator[tuple[Daemon, str]]:
    d = forkd_home / "e2b-daemon"
    d.mkdir()
    key = "e2b_" + os.urandom(20).hex()
    port, e2b_port = free_port(), free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--state", str(d / "state.json"), "--audit-log", str(d / "audit.log"),
            "--token-file", str(make_token_file(d / "token", key)), "--snapshot-root", str(engine.store.root),
            "--e2b-bind", f"127.0.0.1:{e2b_port}", "--e2b-template", snapshot]
    proc = start_daemon_process(args, d)
    dm = Daemon(url=f"http://127.0.0.1:{port}", token=key, dir=d, proc=proc, args=args)
    wait_healthy(dm.url, proc)
    yield dm, f"http://127.0.0.1:{e2b_port}"
    if dm.proc.poll() is None:
        assert dm.stop() == 0
    from conftest import kill_vms_under

    kill_vms_under(forkd_home)


@pytest.mark.parametrize("sdk", sorted(PYTHONS))
def test_e2b_sdks_against_forkd(e2b_daemon: tuple[Daemon, str], snapshot: str, sdk: str) -> None:
    dm, url = e2b_daemon
    python = PYTHONS[sdk]
    assert python.exists(), f"{python} is missing: run `make e2b-venv` (the E2B SDKs' own venvs)"
    env = {"PATH": os.environ["PATH"], "E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": dm.token}
    t0 = time.monotonic()
    proc = subprocess.run([str(python), "-I", "-c", SCRIPT, snapshot], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:] + (dm.dir / "daemon.log").read_text()[-3000:]
    out = json.loads(proc.stdout)
    print(json.dumps({"seconds": round(time.monotonic() - t0, 1), **out}))
    assert out["running"] is True
    assert out["info"]["id"] == out["id"] and out["info"]["template"] == snapshot
    assert out["info"]["metadata"] == {"suite": "e2b", "run": "1"} and out["info"]["state"] == "running"
    assert 110 <= out["info"]["lifetime"] <= 130
    assert out["run"] == {"stdout": "hello\n", "stderr": "oops\n", "exit_code": 0}
    assert out["streamed"] == "1\n2\n3\n"
    assert out["exit"] == {"code": 3, "stdout": "before\n"}
    assert out["bg"] == {"pid_ok": True, "listed": True, "killed": True}
    assert out["write"] == {"path": "/tmp/probe.txt", "name": "probe.txt"}
    assert out["read"] == "data-123" and out["binary_ok"] is True
    assert out["list"] == [["bin.dat", "file"], ["sub", "dir"]]
    assert out["exists"] == [True, False]
    assert out["read_missing"] == "FileNotFoundException"
    assert out["mkdir"] == [True, False] and out["rename"] == "/tmp/nd/g" and out["removed"] is False
    assert out["write_files"] == ["/tmp/m1", "/tmp/m2"] and out["octet"] == ["/tmp/o", "streamed"]
    assert out["env"] == "bar q\n/tmp\n"
    assert out["cmd_timeout"][0] == "TimeoutException"
    assert out["stdin"] == "typed\n"
    (a, ta), (b, tb) = out["stream_timing"]
    assert (a, b) == ("a\n", "b\n") and tb - ta > 1.5   # streamed as written, not at the end
    # SandboxNotRunningException (a TimeoutException) since e2b 2.51; TimeoutException before
    assert out["expired"] is False and out["cmd_after_expiry"] in ("SandboxNotRunningException", "TimeoutException")
    assert 60 <= out["after_timeout"] <= 95
    assert out["listed"] == [out["id"]] and out["listed_other"] == []
    assert out["connect_run"] == "again\n"
    if Version(out["versions"]["e2b"]) >= Version("2.60"):  # Sandbox.fork: the children start from the parent's state
        assert out["fork"] == {"n": 2, "started": [True, True], "distinct": True,
                               "mark": ["forked-state\n"] * 2, "parent_running": True}
    assert out["after_kill"] in ("SandboxNotFoundException", "NotFoundException") and out["kill_again"] is False
    assert out["is_running_after_kill"] is False
    assert out["ci"] == {"stdout": ["hi\n"], "text": "42", "error": True, "callback": ["hi\n"]}
    assert out["ci_state"] == "41"
    assert out["ci_error"] == {"name": "ZeroDivisionError", "value": "division by zero", "tb": True}
    assert out["bad_key"] == "AuthenticationException"
    assert out["bad_template"][0] == "SandboxException" and out["bad_template"][1].startswith("404: template")
    audit = (dm.dir / "audit.log").read_text()
    assert "/v2/sandboxes" in audit and dm.token not in audit
    assert dm.token not in (dm.dir / "daemon.log").read_text()
