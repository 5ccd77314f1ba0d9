"""The Python SDK against a real forkd-controller process with real VMs behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon

from forkd import (
    AsyncController,
    AuthenticationError,
    BadRequestError,
    CodeError,
    Controller,
    GatewayTimeoutError,
    NotFoundError,
    Sandbox,
)

pytestmark = pytest.mark.vm

TIMEOUT = 300.0  # seconds: TCG on a slow shared machine


@pytest.fixture(scope="module")
def ctl(daemon: Daemon) -> Iterator[Controller]:
    with Controller(daemon.url, daemon.token, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def sandbox(ctl: Controller, snapshot: str) -> Iterator[Sandbox]:
    """One sandbox shared by the tests of the guest operations (they use distinct names and paths)."""
    with ctl.spawn_sandbox(snapshot, timeout=TIMEOUT) as sb:
        yield sb


def test_service_and_snapshot(ctl: Controller, snapshot: str) -> None:
    assert ctl.health() is True
    v = ctl.version()
    assert v.api == "v1" and v.accelerator in ("kvm", "tcg")
    assert snapshot in [s.tag for s in ctl.list_snapshots()]
    info = ctl.snapshot_info(snapshot)
    assert info.tag == snapshot and info.memory_mib == 512
    assert "forkd" in ctl.metrics()


def test_spawn_two_with_context_managers_kills_them(ctl: Controller, snapshot: str) -> None:
    sbs = ctl.spawn_sandboxes(snapshot, 2, timeout=TIMEOUT)
    assert len(sbs) == 2 and len({s.id for s in sbs}) == 2
    with sbs[0] as a, sbs[1] as b:
        for sb in (a, b):
            assert sb.snapshot_tag == snapshot and sb.info.running
            assert sb.ping().numpy
        live = {s.id for s in ctl.list_sandboxes()}
        assert {a.id, b.id} <= live
    live = {s.id for s in ctl.list_sandboxes()}
    for sb in sbs:
        assert sb.id not in live
        with pytest.raises(NotFoundError):
            sb.refresh()
        sb.kill()  # idempotent


def test_eval(sandbox: Sandbox) -> None:
    assert sandbox.eval("numpy.zeros(5).tolist()") == [0.0] * 5
    r = sandbox.eval_result("numpy.zeros(2)")
    assert r.value is None and r.repr.startswith("array(") and r.type == "ndarray"
    assert sandbox.eval("numpy.zeros(2)") == r.repr
    assert sandbox.eval("None") is None


def test_run_code_state_and_code_error(sandbox: Sandbox) -> None:
    assert sandbox.run_code("sdk_counter = 41").repr is None
    ex = sandbox.run_code("sdk_counter += 1\nprint('counted')\nsdk_counter")
    assert ex.value == 42 and ex.repr == "42" and ex.stdout == "counted\n"
    assert sandbox.eval("sdk_counter") == 42
    with pytest.raises(CodeError) as ei:
        sandbox.run_code("print('partial')\ndef f():\n    return 1 / 0\nf()", timeout=60)
    e = ei.value
    assert e.type == "ZeroDivisionError" and "division" in e.message
    assert e.traceback is not None and "ZeroDivisionError" in e.traceback and "f()" in e.traceback
    assert e.stdout == "partial\n"
    with pytest.raises(CodeError, match="NameError"):
        sandbox.eval("no_such_name_here")
    assert sandbox.eval("sdk_counter") == 42  # the interpreter survived


def test_commands(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo hello; echo oops >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.ok) == (3, "hello\n", "oops\n", False, False)
    r = sandbox.commands.run(["uname", "-s"])
    assert r.ok and r.stdout.strip() == "Linux"
    r = sandbox.commands.run(["sh", "-c", 'printf "%s:%s:" "$SDK_VAR" "$(pwd)"; cat'], env={"SDK_VAR": "v"},
                             cwd="/tmp", stdin="from stdin")
    assert r.stdout == "v:/tmp:from stdin"
    r = sandbox.commands.run("sleep 30", timeout=1)
    assert r.timed_out and r.exit_code != 0
    with pytest.raises(BadRequestError, match="FileNotFoundError"):
        sandbox.commands.run(["/no/such/program"])


def test_files_round_trip(sandbox: Sandbox) -> None:
    data = bytes(range(256)) * 4
    assert sandbox.files.write("/tmp/sdk/all-bytes.bin", data, mode=0o600) == len(data)
    assert sandbox.files.read("/tmp/sdk/all-bytes.bin") == data
    st = sandbox.files.stat("/tmp/sdk/all-bytes.bin")
    assert st.is_file and st.size == len(data) and st.mode == 0o600 and st.name == "all-bytes.bin"
    assert sandbox.files.write("/tmp/sdk/empty", b"") == 0 and sandbox.files.read("/tmp/sdk/empty") == b""
    sandbox.files.remove("/tmp/sdk/empty")
    sandbox.files.write("/tmp/sdk/note.txt", "héllo\n")
    assert sandbox.files.read_text("/tmp/sdk/note.txt") == "héllo\n"
    assert [e.name for e in sandbox.files.list("/tmp/sdk")] == ["all-bytes.bin", "note.txt"]
    sandbox.files.make_dir("/tmp/sdk/a/b")
    assert sandbox.files.stat("/tmp/sdk/a/b").is_dir
    assert sandbox.files.exists("/tmp/sdk/note.txt") and not sandbox.files.exists("/tmp/sdk/missing")
    sandbox.files.remove("/tmp/sdk/note.txt")
    assert not sandbox.files.exists("/tmp/sdk/note.txt")
    sandbox.files.remove("/tmp/sdk", recursive=True)
    assert not sandbox.files.exists("/tmp/sdk")
    with pytest.raises(NotFoundError):
        sandbox.files.read("/tmp/sdk/all-bytes.bin")


def test_unknown_sandbox_is_not_found(ctl: Controller) -> None:
    with pytest.raises(NotFoundError) as ei:
        ctl.get_sandbox("sb-0000000000000000")
    assert ei.value.status == 404 and "not found" in ei.value.message
    with pytest.raises(NotFoundError):
        ctl.snapshot_info("no-such-snapshot")


def test_wrong_token_is_authentication_error(daemon: Daemon) -> None:
    wrong = "wrong-token-" + "z" * 20
    with Controller(daemon.url, wrong) as c:
        assert c.health() is True
        with pytest.raises(AuthenticationError) as ei:
            c.list_sandboxes()
    assert ei.value.status == 401
    for text in (str(ei.value), repr(ei.value)):
        assert wrong not in text and daemon.token not in text


def test_async_spawn_eval_kill_concurrently(daemon: Daemon, snapshot: str) -> None:
    async def main() -> list[object]:
        async with AsyncController(daemon.url, daemon.token, timeout=TIMEOUT) as c:
            sbs = await asyncio.gather(*(c.spawn_sandbox(snapshot, timeout=TIMEOUT) for _ in range(3)))
            try:
                assert len({s.id for s in sbs}) == 3
                values = await asyncio.gather(*(sb.eval(f"{i} * 7 + numpy.zeros(3).sum()")
                                                for i, sb in enumerate(sbs)))
            finally:
                await asyncio.gather(*(sb.kill() for sb in sbs))
            live = {s.id for s in await c.list_sandboxes()}
            assert not live & {s.id for s in sbs}
            return values

    assert asyncio.run(main()) == [0.0, 7.0, 14.0]


def test_timed_out_code_is_interrupted_and_the_sandbox_answers_again(ctl: Controller, snapshot: str) -> None:
    with ctl.spawn_sandbox(snapshot, timeout=TIMEOUT) as sb:
        sb.run_code("spins = 0")
        with pytest.raises(GatewayTimeoutError, match="interrupted .KeyboardInterrupt"):
            sb.run_code("while True:\n    spins += 1", timeout=2)
        assert sb.eval("spins > 0", timeout=60) is True  # answered, not queued behind the loop
        # code blocked in C does not stop: reported, and new calls are served all the same
        with pytest.raises(GatewayTimeoutError, match="did not stop"):
            sb.eval("time.sleep(3600)", timeout=2)
        assert sb.eval("1 + 1", timeout=60) == 2
        r = sb.interrupt()
        assert (r.found, r.stuck) == (1, 1)  # the sleeper is still there
        assert sb.interrupt().found == 1 and sb.ping().agent_version == "3"


def test_streamed_command_delivers_output_before_it_ends(ctl: Controller, snapshot: str) -> None:
    """The command waits for a file that the test writes only once the first line has arrived: it can
    finish only if its output is streamed."""
    with ctl.spawn_sandbox(snapshot, timeout=TIMEOUT) as sb:
        seen: list[str] = []
        errs: list[str] = []

        def on_stdout(text: str) -> None:
            seen.append(text)
            if "first" in "".join(seen) and not sb.files.exists("/tmp/go"):
                sb.files.write("/tmp/go", "")

        r = sb.commands.run("echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second; "
                            "echo oops >&2; exit 7", on_stdout=on_stdout, on_stderr=errs.append, timeout=120)
        assert "".join(seen) == "first\nsecond\n" == r.stdout
        assert "".join(errs) == "oops\n" == r.stderr and r.exit_code == 7 and not r.timed_out


def test_a_large_streamed_output_arrives_whole(ctl: Controller, snapshot: str) -> None:
    """Megabytes through the guest's channel as fast as it takes them: every byte, in order."""
    with ctl.spawn_sandbox(snapshot, timeout=TIMEOUT) as sb:
        got: list[str] = []
        r = sb.commands.run("head -c 8000000 /dev/urandom | od -An -v -tx1 | head -c 9000000", on_stdout=got.append,
                            timeout=600)
        text = "".join(got)
        assert r.exit_code == 0 and len(text) == 9_000_000 and len(got) > 1
        assert set(text) <= set("0123456789abcdef \n")


def test_streamed_run_code_delivers_output_before_it_ends(ctl: Controller, snapshot: str) -> None:
    """As for commands: the code can finish only if its first line reached the client while it ran."""
    with ctl.spawn_sandbox(snapshot, timeout=TIMEOUT) as sb:
        seen: list[str] = []
        errs: list[str] = []

        def on_stdout(text: str) -> None:
            seen.append(text)
            if "first" in "".join(seen) and not sb.files.exists("/tmp/go-code"):
                sb.files.write("/tmp/go-code", "")

        ex = sb.run_code("import sys\nprint('first')\nwhile not os.path.exists('/tmp/go-code'):\n"
                         "    time.sleep(0.05)\nprint('second é')\nprint('oops', file=sys.stderr)\n6 * 7",
                         on_stdout=on_stdout, on_stderr=errs.append, timeout=120)
        assert "".join(seen) == "first\nsecond é\n" == ex.stdout
        assert "".join(errs) == "oops\n" == ex.stderr and ex.value == 42
        with pytest.raises(CodeError, match="ZeroDivisionError") as raised:
            sb.run_code("print('so far')\n1/0", on_stdout=seen.append)
        assert raised.value.stdout == "so far\n"
        with pytest.raises(GatewayTimeoutError, match="interrupted"):
            sb.run_code("print('spinning')\nwhile True:\n    pass", on_stdout=seen.append, timeout=2)
        assert seen[-1] == "spinning\n" and sb.eval("2 + 2", timeout=60) == 4


def test_background_processes_are_listed_fed_and_killed(ctl: Controller, snapshot: str) -> None:
    with ctl.spawn_sandbox(snapshot, timeout=TIMEOUT) as sb:
        cat = sb.commands.run(["cat"], background=True, timeout=None)
        sleeper = sb.commands.run("sleep 600", background=True, timeout=None)
        pids = {p.pid: p for p in sb.commands.list()}
        assert {cat.pid, sleeper.pid} <= set(pids) and pids[cat.pid].running and pids[cat.pid].argv == ["cat"]
        assert cat.send_stdin("hello\n") == 6
        cat.send_stdin(b"\x00\xffbytes", eof=True)
        r = cat.wait()
        assert r.exit_code == 0 and r.stdout.startswith("hello\n") and r.stdout.endswith("bytes")
        assert sleeper.kill() is True
        assert sleeper.wait().exit_code == -9
        assert sb.commands.list() == []  # both read to the end: forgotten
        with pytest.raises(NotFoundError):
            sb.commands.connect(cat.pid)


def test_pack_and_unpack_through_the_daemon(ctl: Controller, snapshot: str, tmp_path: Path, daemon: Daemon) -> None:
    out = tmp_path / "p.tar.zst"
    r = ctl.pack_snapshot(snapshot, out, level=1)
    assert r.chain == [snapshot] and r.bytes == out.stat().st_size > 0 and r.path == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tar.zst"]  # no .partial left
    with pytest.raises(FileExistsError):
        ctl.pack_snapshot(snapshot, out)
    with pytest.raises(NotFoundError):
        ctl.pack_snapshot("no-such-snapshot", tmp_path / "q.tar.zst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tar.zst"]  # nothing of the failed download
    # a damaged pack is refused whole and registers nothing
    bad = tmp_path / "bad.tar.zst"
    data = bytearray(out.read_bytes()[: 4 << 20])
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(BadRequestError):
        ctl.unpack_snapshot(bad, tag="from-bad-pack")
    assert "from-bad-pack" not in [s.tag for s in ctl.list_snapshots()]
    u = ctl.unpack_snapshot(out, tag="from-daemon-pack")
    assert u.tags == ["from-daemon-pack"] == u.registered and not u.replaced
    try:
        with ctl.spawn_sandbox("from-daemon-pack", timeout=TIMEOUT) as sb:
            assert sb.eval("6 * 7") == 42
        again = ctl.unpack_snapshot(out, tag="from-daemon-pack")  # the same files: left as they are
        assert again.reused == ["from-daemon-pack"] and not again.registered
    finally:
        ctl.delete_snapshot("from-daemon-pack")
    scratch = [p.name for p in Path(daemon.args[daemon.args.index("--snapshot-root") + 1]).iterdir()
               if p.name.startswith(".staging-")]
    assert scratch == []  # nothing of the pack or the uploads is left in the store
