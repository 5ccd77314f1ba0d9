"""From inside a sandbox, what an attacker would try on the network: this host (its loopback, its own
address, the daemon), a sibling's exposed port, the cloud metadata address and private ranges.

Every target is on this machine: servers the test runs on the host, or in network namespaces the test
creates (the metadata address, a private and a "public" address are given to a listener in a namespace
of ours, reached over a veth pair; that namespace has no route anywhere else).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from forkd.engine import Child, Engine
from forkd.errors import AgentError

pytestmark = pytest.mark.vm

CONNECT = ("import socket\n"
           "s = socket.socket(socket.AF_INET6 if ':' in {host!r} else socket.AF_INET)\n"
           "s.settimeout(20)\n"
           "try:\n"
           "    s.connect(({host!r}, {port}))\n"
           "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
           "    r = 'connected:' + s.recv(200).decode(errors='replace')\n"
           "except OSError as e:\n"
           "    r = 'failed:' + type(e).__name__\n"
           "finally:\n"
           "    s.close()\n"
           "r")


def try_connect(child: Child, host: str, port: int) -> str:
    return str(child.run_code(CONNECT.format(host=host, port=port), timeout=120)["value"])


@contextlib.contextmanager
def tcp_server(host: str = "127.0.0.1", family: int = socket.AF_INET) -> Iterator[int]:
    """A server on this host that answers anyone who connects with a line; yields its port."""
    srv = socket.socket(family)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                c.settimeout(5)
                with contextlib.suppress(OSError):
                    c.recv(1024)  # the request, read before answering (else closing resets it)
                    c.sendall(b"HTTP/1.0 200 OK\r\n\r\nhost-secret\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        stop.set()
        t.join(5)
        srv.close()


def host_addresses() -> list[str]:
    """This host's own global IPv4 addresses."""
    out = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout)
    return [a["local"] for i in out for a in i.get("addr_info", []) if a.get("scope") == "global"]


def test_a_guest_cannot_reach_the_hosts_loopback(spawn) -> None:
    (k,) = spawn(1)
    with tcp_server() as port:
        assert "host-secret" in urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert try_connect(k, "10.0.2.2", port).startswith("failed:ConnectionRefused")


def test_a_guest_cannot_reach_the_hosts_own_address(spawn) -> None:
    addrs = host_addresses()
    assert addrs, "this host has no global IPv4 address to test against"
    (k,) = spawn(1)
    with tcp_server("0.0.0.0") as port:
        for a in addrs:
            assert try_connect(k, a, port).startswith("failed:"), a


def test_a_guest_cannot_reach_the_daemon(daemon, snapshot: str) -> None:
    port = int(daemon.url.rsplit(":", 1)[1])
    with daemon.client() as c:
        r = c.post("/v1/sandboxes", json={"snapshot_tag": snapshot, "n": 1})
        assert r.status_code in (200, 201), r.text
        sid = r.json()[0]["sandbox"]["id"] if "sandbox" in r.json()[0] else r.json()[0]["id"]
        try:
            code = CONNECT.format(host="10.0.2.2", port=port)
            res = c.post(f"/v1/sandboxes/{sid}/run_code", json={"code": code, "timeout_s": 120})
            assert res.status_code == 200, res.text
            assert str(res.json()["value"]).startswith("failed:ConnectionRefused"), res.json()
            assert httpx.get(f"{daemon.url}/healthz", timeout=10).status_code == 200  # the host still can
        finally:
            c.delete(f"/v1/sandboxes/{sid}")


def test_a_guest_cannot_reach_a_siblings_exposed_port(spawn) -> None:
    victim, attacker = spawn(1, expose=(8000,))[0], spawn(1)[0]
    host_port = int(victim.vm.meta["ports"]["8000"])
    victim.run_code("import threading, socketserver\n"
                    "class H(socketserver.BaseRequestHandler):\n"
                    "    def handle(self): self.request.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nvictim-secret\\n')\n"
                    "srv = socketserver.ThreadingTCPServer(('0.0.0.0', 8000), H)\n"
                    "threading.Thread(target=srv.serve_forever, daemon=True).start()")
    deadline = time.monotonic() + 60
    while True:  # the host reaches it (that is what exposing is for)
        try:
            with socket.create_connection(("127.0.0.1", host_port), timeout=20) as s:
                if b"victim-secret" in s.recv(200):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the exposed port never answered the host"
        time.sleep(0.5)
    assert try_connect(attacker, "10.0.2.2", host_port).startswith("failed:ConnectionRefused")


NS_SANDBOX, NS_FAR = "fkt-sandbox", "fkt-far"
METADATA, PRIVATE, PUBLIC = "169.254.169.254", "10.123.0.1", "9.9.9.9"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def test_hosts() -> Iterator[int]:
    """Namespace NS_SANDBOX (where the sandbox's QEMU runs) linked by a veth pair to NS_FAR, which holds
    the metadata, a private and a public address with a listener on each; yields the port."""
    for ns in (NS_SANDBOX, NS_FAR):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", NS_SANDBOX, "link", "add", "fkt-a", "type", "veth", "peer", "name", "fkt-b", "netns", NS_FAR)
    ip("-n", NS_SANDBOX, "addr", "add", "10.200.0.1/30", "dev", "fkt-a")
    ip("-n", NS_FAR, "addr", "add", "10.200.0.2/30", "dev", "fkt-b")
    ip("-n", NS_SANDBOX, "link", "set", "fkt-a", "up")
    ip("-n", NS_FAR, "link", "set", "fkt-b", "up")
    for a in (METADATA, PRIVATE, PUBLIC):
        ip("-n", NS_FAR, "addr", "add", f"{a}/32", "dev", "lo")
        ip("-n", NS_SANDBOX, "route", "add", f"{a}/32", "via", "10.200.0.2")
    port = 8080
    server = subprocess.Popen(
        ["ip", "netns", "exec", NS_FAR, sys.executable, "-c",
         "import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         f"s.bind(('0.0.0.0', {port})); s.listen(16)\n"
         "while True:\n    c, _ = s.accept(); c.settimeout(5)\n    try:\n        c.recv(1024)\n"
         "        c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nfar-side\\n')\n"
         "    except OSError:\n        pass\n    c.close()\n"])
    try:
        time.sleep(1.0)
        yield port
    finally:
        server.kill()
        server.wait()
        for ns in (NS_SANDBOX, NS_FAR):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_metadata_and_private_ranges_are_unreachable_public_is_reachable(engine: Engine, snapshot: str,
                                                                          test_hosts: int) -> None:
    kids = []
    try:
        for network in ("internet", "none"):
            (res,) = engine.spawn(snapshot, 1, network=network, netns=NS_SANDBOX)
            assert res.child is not None, res.error
            kids.append(res.child)
        internet, none = kids
        assert "far-side" in try_connect(internet, PUBLIC, test_hosts)
        for addr in (METADATA, PRIVATE):
            assert try_connect(internet, addr, test_hosts).startswith("failed:ConnectionRefused"), addr
        for addr in (PUBLIC, METADATA, PRIVATE):
            assert try_connect(none, addr, test_hosts).startswith("failed:"), addr
    finally:
        for k in kids:
            k.kill()


def test_network_none_reaches_nothing_but_keeps_exposed_ports(spawn) -> None:
    (k,) = spawn(1, network="none", expose=(8000,))
    with tcp_server() as port:
        assert try_connect(k, "10.0.2.2", port).startswith("failed:")
    with pytest.raises(AgentError):
        k.run_code("import socket; socket.getaddrinfo('example.com', 80)", timeout=120)
