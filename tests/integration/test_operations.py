"""Operating forkd: memory limits, networking (own stack, none, namespaces, exposed ports), cleanup."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkd.engine import Engine, cgroup
from forkd.engine.cleanup import sweep
from forkd.errors import AgentError, ChannelClosedError, ValidationError

pytestmark = pytest.mark.vm
FETCH = "import urllib.request\nurllib.request.urlopen('http://10.0.2.2:{port}/', timeout=30).read().decode().strip()"


def test_child_over_its_memory_limit_is_oom_killed_and_its_sibling_goes_on(spawn) -> None:
    if cgroup.detect() is None:
        pytest.fail("no cgroup memory controller: this host cannot enforce memory limits")
    big, small = spawn(2, memory_limit_mib=160)
    assert big.vm.cgroup is not None and big.vm.cgroup.path.is_dir()
    with pytest.raises(ChannelClosedError, match="OOM-killed"):
        big.run_code("hog = bytearray(400 << 20)", timeout=300)
    assert "OOM-killed" in (big.vm.exit_status() or "")
    assert small.eval("sum(range(10))")["value"] == 45
    path = big.vm.cgroup.path
    big.kill()
    assert not path.exists()


@contextlib.contextmanager
def http_server(port: int, text: str, netns: str | None = None) -> Iterator[None]:
    d = Path(f"/tmp/forkd-test-www-{port}-{netns}")
    d.mkdir(exist_ok=True)
    (d / "index.html").write_text(text)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    p = subprocess.Popen([*prefix, sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                          "--directory", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        yield
    finally:
        p.kill()
        p.wait()


def test_network_none_cannot_connect_out(spawn) -> None:
    (k,) = spawn(1, network="none")
    with http_server(18182, "nope"), pytest.raises(AgentError, match="Connection refused|timed out|unreachable"):
        k.run_code(FETCH.format(port=18182), timeout=120)


def test_exposed_guest_port_is_reachable_from_the_host(spawn) -> None:
    (k,) = spawn(1, expose=(8000,))
    host_port = int(k.vm.meta["ports"]["8000"])
    k.run_code("import threading, http.server\n"
               "srv = http.server.ThreadingHTTPServer(('0.0.0.0', 8000), http.server.SimpleHTTPRequestHandler)\n"
               "threading.Thread(target=srv.serve_forever, daemon=True).start()")
    k.write_file("/srv-index.html", b"guest-page")
    k.run_code("import os; os.chdir('/')")
    deadline = time.monotonic() + 60
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{host_port}/srv-index.html", timeout=30).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert body == b"guest-page"


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    script = Path(__file__).resolve().parents[2] / "scripts" / "netns-setup.sh"
    names = ["forkd-child-1", "forkd-child-2"]
    if script.exists():
        subprocess.run(["bash", str(script), "2"], check=True, capture_output=True)
    else:
        for n in names:
            subprocess.run(["ip", "netns", "add", n], check=False, capture_output=True)
            subprocess.run(["ip", "netns", "exec", n, "ip", "link", "set", "lo", "up"], check=True)
    yield names
    for n in names:
        subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)


def test_children_run_in_their_own_namespaces_and_cannot_reach_its_loopback(spawn, namespaces: list[str]) -> None:
    with http_server(18183, "ns-one", namespaces[0]), http_server(18183, "ns-two", namespaces[1]):
        kids = spawn(2, per_child_netns=True)
        for k in kids:
            ns = Path("/var/run/netns") / str(k.vm.meta["netns"])
            assert Path(f"/proc/{k.pid}/ns/net").stat().st_ino == ns.stat().st_ino
            with pytest.raises(AgentError, match="refused"):
                k.run_code(FETCH.format(port=18183), timeout=120)
    assert sorted(str(k.vm.meta["netns"]) for k in kids) == ["forkd-child-1", "forkd-child-2"]


def test_missing_namespace_names_the_setup_script(engine: Engine, snapshot: str) -> None:
    subprocess.run(["ip", "netns", "del", "forkd-child-1"], check=False, capture_output=True)
    (res,) = engine.spawn(snapshot, 1, per_child_netns=True)
    assert res.child is None and "scripts/netns-setup.sh" in (res.error or "")


def test_bad_limits_are_refused(engine: Engine, snapshot: str) -> None:
    with pytest.raises(ValidationError, match="memory_limit_mib"):
        engine.spawn(snapshot, 1, memory_limit_mib=1)
    with pytest.raises(ValidationError, match="expose"):
        engine.spawn(snapshot, 1, expose=(70000,))


def test_cleanup_removes_a_dead_childs_cgroup_and_keeps_a_live_one(engine: Engine, spawn) -> None:
    dead, live = spawn(2, memory_limit_mib=256)
    dead_cg, live_cg = dead.vm.cgroup, live.vm.cgroup
    assert dead_cg is not None and live_cg is not None
    subprocess.run(["kill", "-9", str(dead.pid)], check=True)
    deadline = time.monotonic() + 30
    while dead.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    rep = sweep(engine.run_dir, engine.store)
    assert str(dead_cg.path) in rep.removed and not dead_cg.path.exists()
    assert live_cg.path.exists() and str(live.vm.workdir.path) in rep.kept_live
    assert live.eval("2*2")["value"] == 4
