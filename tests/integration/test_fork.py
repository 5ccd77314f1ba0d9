"""Forking real VMs from a real snapshot: isolation, freshness, the agent's operations, failures."""

from __future__ import annotations

import os
import signal
import time

import pytest

from forkd.engine import Engine
from forkd.errors import AgentError, ChannelClosedError
from forkd.fsutil import sha256_file

pytestmark = pytest.mark.vm


def test_fork_several_children(spawn) -> None:
    kids = spawn(3)
    assert len({k.id for k in kids}) == 3 and len({k.pid for k in kids}) == 3
    for k in kids:
        assert k.eval("numpy.zeros(5).tolist()")["value"] == [0.0] * 5
        assert k.ping()["numpy"]


def test_writes_are_private_and_memory_bin_unchanged(engine: Engine, snapshot: str, spawn) -> None:
    snap = engine.store.open(snapshot)
    before = sha256_file(snap.memory)
    a, b = spawn(2)
    a.run_code("WHO = 'a'\nBIG = bytearray(b'x') * (32 << 20)")
    b.run_code("WHO = 'b'")
    assert a.eval("WHO")["value"] == "a" and b.eval("WHO")["value"] == "b"
    assert b.eval("'BIG' in globals()")["value"] is False
    a.write_file("/tmp/who", b"a-file")
    with pytest.raises(AgentError, match="FileNotFoundError"):
        b.read_file("/tmp/who")
    a.kill()
    b.kill()
    assert sha256_file(snap.memory) == before


def test_fresh_gives_distinct_randomness_and_a_current_clock(spawn) -> None:
    kids = spawn(2)
    code = "import os, time, random\n(os.urandom(16).hex(), random.random(), float(numpy.random.random()))"
    vals = [k.run_code(code)["value"] for k in kids]
    assert vals[0][0] != vals[1][0], "two children returned the same os.urandom bytes"
    assert vals[0][1] != vals[1][1] and vals[0][2] != vals[1][2]
    for k in kids:
        assert k.fresh["clock_set"] and k.fresh["rng_reseeded"], k.fresh
        guest = k.eval("__import__('time').time()")["value"]
        assert abs(guest - time.time()) < 1.0


def test_children_from_a_warm_pool_are_distinct_and_current(engine: Engine, snapshot: str) -> None:
    """A warm pool member has loaded the snapshot and answered a fresh before it is taken: the spawn's own
    fresh must still give each child its own clock and random streams, and its own state."""
    pool = engine.start_pool(snapshot, 2)
    kids = []
    try:
        assert pool.warm and pool.wait_full(timeout=600), pool.stats()
        members = list(pool._ready)
        # the members are loaded and running already, before any spawn
        assert all(m.qmp.execute("query-status")["status"] == "running" for m in members)
        results = engine.spawn(snapshot, 2)
        kids = [r.child for r in results if r.child is not None]
        assert [r.error for r in results] == [None, None]
        assert all(k.from_pool for k in kids) and {k.pid for k in kids} == {m.pid for m in members}
        code = "import os, random\n(os.urandom(16).hex(), random.random(), float(numpy.random.random()))"
        vals = [k.run_code(code)["value"] for k in kids]
        assert vals[0][0] != vals[1][0] and vals[0][1] != vals[1][1] and vals[0][2] != vals[1][2]
        kids[0].run_code("WHO = 'first'")
        assert kids[1].eval("'WHO' in globals()")["value"] is False
        for k in kids:
            assert k.fresh["clock_set"] and k.fresh["rng_reseeded"] and k.fresh["numpy_reseeded"], k.fresh
            assert abs(k.eval("__import__('time').time()")["value"] - time.time()) < 1.0
    finally:
        engine.close_pools()
        for k in kids:
            k.kill()


def test_eval_run_code_exec_and_files(spawn) -> None:
    (k,) = spawn(1)
    k.run_code("counter = 1")
    r = k.run_code("counter += 41\nprint('hi')\ncounter")
    assert r["value"] == 42 and r["stdout"] == "hi\n"
    with pytest.raises(AgentError, match="ZeroDivisionError") as ei:
        k.run_code("1/0")
    assert "Traceback" in (ei.value.traceback or "")
    r = k.exec(["/bin/sh", "-c", "echo $FOO; pwd; cat; exit 3"], env={"FOO": "bar"}, cwd="/tmp", stdin="in")
    assert (r.exit_code, r.stdout) == (3, "bar\n/tmp\nin")
    r = k.exec(["sleep", "30"], timeout=1)
    assert r.timed_out
    r = k.exec(["/bin/sh", "-c", "yes | head -c 100000"], max_output=1000)
    assert r.stdout_truncated and "truncated" in r.stdout
    data = bytes(range(256)) * 1024
    k.mkdir("/tmp/d/e")
    assert k.write_file("/tmp/d/e/bin", data) == len(data)
    assert k.read_file("/tmp/d/e/bin") == data
    assert [e["name"] for e in k.list_dir("/tmp/d/e")] == ["bin"]
    assert k.stat("/tmp/d/e/bin")["size"] == len(data)
    k.remove("/tmp/d", recursive=True)
    with pytest.raises(AgentError, match="FileNotFoundError"):
        k.stat("/tmp/d")


def test_bad_requests_get_errors_and_the_agent_keeps_serving(spawn) -> None:
    (k,) = spawn(1)
    with pytest.raises(AgentError, match="UnknownOp"):
        k.vm.channel.call("no_such_op")
    with pytest.raises(AgentError, match="BadRequest.*expr"):
        k.vm.channel.call("eval", expr=123)
    with pytest.raises(AgentError, match="ReplyTooLarge"):
        k.eval("'x' * (20 << 20)")
    assert k.ping()["agent_version"]


def test_replies_to_lines_nobody_asked_are_a_violation(spawn) -> None:
    (k,) = spawn(1)
    # the agent answers these with an id-less error and a reply to id 5: neither was asked by the host
    k.vm.channel.sock.sendall(b"this is not json\n[1,2]\n{\"id\": 5}\n")
    deadline = time.monotonic() + 60
    while k.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not k.alive()
    assert "protocol violation" in (k.vm.exit_status() or "")


def test_child_killed_mid_request_gives_a_clear_error(spawn) -> None:
    (k,) = spawn(1)
    fut = k.vm.channel.submit("exec", argv=["sleep", "60"], timeout=120)
    time.sleep(0.5)
    os.kill(k.pid, signal.SIGKILL)
    with pytest.raises(ChannelClosedError, match="killed by signal 9"):
        k.vm.channel.result("exec", fut, 60)
    assert not k.alive()


def test_a_failing_child_does_not_lose_the_others(engine: Engine, snapshot: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.engine import engine as engine_mod
    from forkd.errors import VMError

    real, calls = engine_mod.launch_child, []

    def flaky(*a, **kw):  # the second launch fails, as if QEMU could not start
        calls.append(1)
        if len(calls) == 2:
            raise VMError("injected launch failure")
        return real(*a, **kw)

    monkeypatch.setattr(engine_mod, "launch_child", flaky)
    results = engine.spawn(snapshot, 3, concurrency=1, use_pool=False)
    try:
        errors = [r for r in results if r.error]
        assert len(errors) == 1 and "injected launch failure" in errors[0].error
        good = [r.child for r in results if r.child]
        assert len(good) == 2
        for c in good:
            assert c.eval("6*7")["value"] == 42
    finally:
        for r in results:
            if r.child:
                r.child.kill()
