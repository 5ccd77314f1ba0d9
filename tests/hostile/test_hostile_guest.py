"""A hostile guest, for real: code in a sandbox writes onto its own agent channel, serves endless files.

Each misbehaving sandbox must be killed with a reason that says why, its siblings keep answering,
and the host process's memory stays bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from forkd.engine import Child
from forkd.errors import ChannelClosedError, FileTooLargeError

pytestmark = pytest.mark.vm

MiB = 1 << 20

# Run in the agent (PID 1) by run_code: write raw bytes onto the agent's own virtio port, bypassing it.
PORT_WRITER = '''
import os

def _agent_port_fd():
    for fd in os.listdir("/proc/self/fd"):
        try:
            dev = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if dev.startswith("/dev/vport"):
            with open(f"/sys/class/virtio-ports/{dev[5:]}/name") as f:
                if f.read().strip() == "org.forkd.agent":
                    return int(fd)
    raise RuntimeError("the agent's port is not open")

def _write_to_host(data):
    fd, view = _agent_port_fd(), memoryview(data)
    while view:
        view = view[os.write(fd, view):]
'''


def write_to_host(data: str) -> str:
    """run_code source that writes ``data`` (a Python bytes expression) onto the agent's channel."""
    return PORT_WRITER + f"\n_write_to_host({data})\n"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Samples this process's RSS while the block runs: ``{"before", "peak", "after"}`` in KiB."""
    out = {"before": rss_kib(), "peak": 0, "after": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            out["peak"] = max(out["peak"], rss_kib())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["after"] = rss_kib()
        out["peak"] = max(out["peak"], out["after"])


def wait_exited(child: Child, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := child.vm.exit_status()) is None:
        assert time.monotonic() < deadline, f"{child.id} is still running"
        time.sleep(0.05)
    return status


def test_an_unsolicited_reply_or_a_second_ready_kills_only_that_sandbox(spawn) -> None:
    liar, announcer, sibling = spawn(3)
    with pytest.raises(ChannelClosedError, match="protocol violation: reply to id 123 that was never asked"):
        liar.run_code(write_to_host("""b'{"id": 123, "ok": true, "result": {}}\\n'"""), timeout=300)
    assert wait_exited(liar) == "killed: agent protocol violation: reply to id 123 that was never asked"
    assert liar.vm.meta["exit_reason"] == liar.info()["status"]
    assert "killed: agent protocol violation" in liar.vm.describe_exit()

    with pytest.raises(ChannelClosedError, match="protocol violation: a second ready event"):
        announcer.run_code(write_to_host("""b'{"event": "ready", "pid": 1}\\n'"""), timeout=300)
    assert wait_exited(announcer).startswith("killed: agent protocol violation: a second ready event")

    assert sibling.eval("6*7", timeout=300)["value"] == 42
    assert sibling.alive()


def test_an_over_long_line_kills_the_sandbox_and_host_memory_stays_bounded(spawn) -> None:
    k, sibling = spawn(2)
    with peak_rss() as rss, pytest.raises(ChannelClosedError, match="protocol violation: a line longer than"):
        k.run_code(write_to_host("b'x' * (20 << 20)"), timeout=600)  # 20 MiB, no newline
    assert wait_exited(k).startswith("killed: agent protocol violation: a line longer than")
    assert rss["peak"] - rss["before"] < 100 * 1024, rss
    assert sibling.ping(timeout=300)["agent_version"]


def test_reading_dev_zero_is_refused_without_growing_memory(spawn) -> None:
    (k,) = spawn(1)
    with peak_rss() as rss:
        with pytest.raises(FileTooLargeError, match="/dev/zero gave more than"):
            for _ in k.iter_file("/dev/zero", timeout=300):  # the default limit: 256 MiB
                pass
        with pytest.raises(FileTooLargeError, match="/dev/zero gave more than 20971520 bytes"):
            k.read_file("/dev/zero", timeout=300, max_bytes=20 * MiB)
    assert rss["peak"] - rss["before"] < 100 * 1024, rss
    assert rss["after"] - rss["before"] < 100 * 1024, rss
    # a sparse file far beyond the limit is refused from its first reply
    k.exec(["/bin/sh", "-c", "truncate -s 100G /tmp/sparse || dd if=/dev/zero of=/tmp/sparse bs=1 count=0 seek=100G"])
    with pytest.raises(FileTooLargeError, match="is 107374182400 bytes"):
        k.iter_file("/tmp/sparse")
    # and ordinary reads still work, in several chunks
    data = bytes(range(256)) * (40 * 1024)  # 10 MiB
    k.write_file("/tmp/ten", data, timeout=300)
    assert k.read_file("/tmp/ten", timeout=300) == data
    assert [len(c) for c in k.iter_file("/tmp/ten", timeout=300)] == [8 * MiB, 2 * MiB]
    assert k.ping()["agent_version"]


def _sandbox(c, tag: str) -> str:  # noqa: ANN001 - httpx.Client
    r = c.post("/v1/sandboxes", json={"snapshot_tag": tag, "n": 1})
    assert r.status_code == 201, r.text
    return str(r.json()[0]["sandbox"]["id"])


def test_the_daemon_answers_413_for_dev_zero_and_reports_a_violation(daemon, snapshot: str) -> None:
    with daemon.client() as c:
        sid = _sandbox(c, snapshot)
        try:
            r = c.get(f"/v1/sandboxes/{sid}/files", params={"path": "/dev/zero"})
            assert r.status_code == 413, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert "/dev/zero gave more than" in r.json()["error"]
            assert c.get(f"/v1/sandboxes/{sid}/files", params={"path": "/nope"}).status_code == 404
            data = bytes(range(256)) * (48 * 1024)  # 12 MiB: streamed in two chunks
            assert c.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/f"}, content=data).status_code == 200
            r = c.get(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/f"})
            assert r.status_code == 200 and r.content == data and r.headers["content-length"] == str(len(data))
            r = c.post(f"/v1/sandboxes/{sid}/run_code",
                       json={"code": write_to_host("""b'{"id": 5, "ok": true}\\n'"""), "timeout_s": 300})
            assert r.status_code == 409 and "protocol violation: reply to id 5" in r.json()["error"], r.text
            deadline = time.monotonic() + 60
            while (info := c.get(f"/v1/sandboxes/{sid}").json())["status"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert info["status"] == "exited"
            assert info["exit_reason"] == "killed: agent protocol violation: reply to id 5 that was never asked"
        finally:
            c.delete(f"/v1/sandboxes/{sid}")


def test_the_sdk_maps_413_to_a_typed_error(daemon, snapshot: str) -> None:
    from forkd.sdk import Controller
    from forkd.sdk.errors import NotFoundError, PayloadTooLargeError

    with Controller(daemon.url, daemon.token, timeout=600) as ctl:
        (sb,) = ctl.spawn_sandboxes(snapshot, n=1)
        with sb:
            with pytest.raises(PayloadTooLargeError, match="413"):
                sb.files.read("/dev/zero")
            with pytest.raises(NotFoundError):
                sb.files.read("/nope")
            sb.files.write("/tmp/s", b"sdk")
            assert sb.files.read("/tmp/s") == b"sdk"



@pytest.mark.parametrize("forgive", [True, False])
def test_an_adopted_channel_forgives_a_reply_meant_for_the_previous_connection(
        engine, spawn, monkeypatch: pytest.MonkeyPatch, forgive: bool) -> None:
    """A controller that restarts while a request is in flight: the agent's reply, written while no host
    was connected, reaches the next connection, which never asked for it. Without the allowance for
    leftovers (``forgive=False``) that would kill a healthy sandbox on re-adoption."""
    from forkd.engine import vm as vm_mod

    if not forgive:
        monkeypatch.setattr(vm_mod, "ADOPT_LEFTOVER_LINES", 0)
    (k,) = spawn(1)
    k.vm.channel.submit("exec", argv=["sleep", "2"], timeout=60)
    time.sleep(0.5)
    k.vm.disconnect()
    time.sleep(4)  # the exec ends and its reply waits for a host
    again = engine.adopt(k.vm.workdir.path)
    try:
        if forgive:
            assert again.ping(timeout=300)["agent_version"]
            time.sleep(5)  # in case the exec ended only now, under a slow emulator
            assert again.ping(timeout=300)["agent_version"] and again.alive()
        else:
            assert wait_exited(again, timeout=300).startswith(
                "killed: agent protocol violation: reply to id")
            assert "that was never asked" in str(again.vm.violation)
    finally:
        again.kill()
