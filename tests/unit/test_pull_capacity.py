"""``POST /v1/snapshots/pull``'s fetch (a real HTTP server on loopback, and httpx's MockTransport for
what loopback cannot show: https, other hosts) and ``GET /v1/capacity``, without VMs."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from forkd.daemon import capacity as cap
from forkd.daemon.app import create_app
from forkd.daemon.main import check_node_name
from forkd.daemon.metrics import Metrics
from forkd.daemon.pull import SourceError, check_url, display, fetch
from forkd.daemon.service import Busy, Controller
from forkd.errors import FileTooLargeError, ValidationError

PACK = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    """/pack: the bytes; /chunked: the same without a Content-Length; /to/<path>: a 302 there;
    /loop: a 302 to itself; anything else 404. Every request's Authorization header is recorded."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.path, self.headers.get("Authorization")))
        path = self.path.split("?")[0]
        if path == "/pack":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PACK)))
            self.end_headers()
            self.wfile.write(PACK)
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(PACK)
        elif self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[3:])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not found")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Handler.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_fetch_streams_to_disk_with_its_sha256(server: str, tmp_path: Path) -> None:
    for path in ("/pack", "/chunked", "/to/pack"):
        dest = tmp_path / path.strip("/").replace("/", "-")
        got = fetch(server + path, dest, limit=10 << 20, deadline_s=60, token="peer-token")
        assert dest.read_bytes() == PACK and dest.stat().st_mode & 0o777 == 0o600
        assert got.bytes == len(PACK) and got.sha256 == hashlib.sha256(PACK).hexdigest()
    assert got.source == server + "/pack"  # after the redirect
    assert {auth for _p, auth in Handler.seen} == {"Bearer peer-token"}  # same origin: the token each time


def test_fetch_bounds_size_redirects_and_statuses(server: str, tmp_path: Path) -> None:
    with pytest.raises(FileTooLargeError, match="free space"):  # Content-Length: refused before reading
        fetch(server + "/pack", tmp_path / "a", limit=1000, deadline_s=60)
    with pytest.raises(FileTooLargeError, match="larger than"):  # no length: stopped while reading
        fetch(server + "/chunked", tmp_path / "b", limit=1000, deadline_s=60)
    with pytest.raises(SourceError, match="more than 5 redirects"):
        fetch(server + "/loop", tmp_path / "c", limit=1 << 30, deadline_s=60)
    with pytest.raises(SourceError, match="HTTP 404: not found"):
        fetch(server + "/missing", tmp_path / "d", limit=1 << 30, deadline_s=60)
    with pytest.raises(SourceError, match="cannot fetch"):
        fetch("http://127.0.0.1:1/pack", tmp_path / "e", limit=1 << 30, deadline_s=10)


def _mock(routes: dict[str, httpx.Response], seen: list[tuple[str, str | None]]) -> httpx.MockTransport:
    def handle(req: httpx.Request) -> httpx.Response:
        seen.append((str(req.url), req.headers.get("authorization")))
        return routes.get(str(req.url), httpx.Response(404))

    return httpx.MockTransport(handle)


def test_the_token_goes_to_the_urls_own_origin_only(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    routes = {"https://peer:8889/v1/snapshots/t/pack": httpx.Response(302, headers={"Location": "https://cdn/t"}),
              "https://cdn/t": httpx.Response(200, stream=httpx.ByteStream(b"pack"))}  # a body as sent
    got = fetch("https://peer:8889/v1/snapshots/t/pack", tmp_path / "p", limit=100, deadline_s=10, token="secret",
                transport=_mock(routes, seen))
    assert got.bytes == 4 and got.source == "https://cdn/t"
    assert seen == [("https://peer:8889/v1/snapshots/t/pack", "Bearer secret"), ("https://cdn/t", None)]


def test_redirects_to_other_schemes_or_down_to_http_are_refused(tmp_path: Path) -> None:
    for target, why in (("ftp://peer/t", "only http"), ("http://peer/t", "https to http"),
                        ("file:///etc/passwd", "only http"), ("http://user:pw@peer/t", "credentials")):
        routes = {"https://peer/t": httpx.Response(301, headers={"Location": target})}
        with pytest.raises(ValidationError, match=why):
            fetch("https://peer/t", tmp_path / "x", limit=100, deadline_s=10, transport=_mock(routes, []))
        assert not (tmp_path / "x").exists()


def test_urls_are_checked_and_displayed_without_secrets() -> None:
    for bad, why in (("ftp://h/p", "only http"), ("file:///etc/passwd", "only http"), ("http:///p", "no host"),
                     ("http://u:p@h/p", "credentials"), ("http://h:99999/p", "not a valid URL"), ("h/p", "only http")):
        with pytest.raises(ValidationError, match=why):
            check_url(bad)
    assert display("https://h:8889/v1/snapshots/t/pack?sig=SECRET#f") == "https://h:8889/v1/snapshots/t/pack"
    assert display("http://[::1]:80/x") == "http://[::1]:80/x"


def _client(ctl: object) -> TestClient:
    return TestClient(create_app(ctl, Metrics(lambda: 0, lambda: 0)), raise_server_exceptions=False)  # type: ignore[arg-type]


def test_pull_route_validates_at_the_edge() -> None:
    taken: list[str] = []
    client = _client(SimpleNamespace(upload_area=lambda: taken.append("slot")))
    r = client.post("/v1/snapshots/pull", json={"url": "ftp://peer/pack"})
    assert r.status_code == 400 and "url: only http" in r.json()["error"]
    for body, field in (({"url": "http://p/x", "sha256": "ABC"}, "sha256"), ({"url": "http://p/x", "nope": 1}, "nope"),
                        ({"url": "http://p/x", "timeout_s": 0}, "timeout_s"), ({}, "url"),
                        ({"url": "http://p/x", "tag": "../x"}, "tag")):
        r = client.post("/v1/snapshots/pull", json=body)
        assert r.status_code == 422 and field in r.json()["error"], (body, r.text)
    assert taken == []  # refused before a pack slot was taken


def test_capacity_route_and_free_slots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cgroup_memory = cap.cgroup_memory
    monkeypatch.setattr(cap, "cgroup_memory", lambda: (None, 0))
    ctl = SimpleNamespace(node_name="n1", active_count=lambda: 3, max_sandboxes=6, pool_ready=lambda: {"t": 2},
                          starting=lambda: 1)
    body = _client(ctl).get("/v1/capacity").json()
    assert body["node"] == "n1" and body["sandboxes_running"] == 3 and body["max_sandboxes"] == 6
    assert body["sandboxes_starting"] == 1
    assert body["pool_ready"] == {"t": 2} and body["vcpus"] >= 1 and body["free_slots"] <= 2
    assert 0 < body["memory_available_bytes"] <= body["memory_total_bytes"]

    gib, mib = 1 << 30, 1 << 20
    assert cap.free_slots(9 * gib, 0, None) == 8 * 1024 // 64  # (9 GiB - 1 GiB reserve) / 64 MiB
    assert cap.free_slots(9 * gib, 10, 12) == 2 and cap.free_slots(9 * gib, 20, 12) == 0
    assert cap.free_slots(512 * mib, 0, None) == 0

    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\nHugePages_Total: 0\n")
    assert cap.meminfo(tmp_path / "meminfo") == {"MemTotal": 24000000 * 1024, "MemAvailable": 20000000 * 1024}
    (tmp_path / "cgroup").write_text("0::/system.slice/forkd.service\n")
    d = tmp_path / "fs" / "system.slice" / "forkd.service"
    d.mkdir(parents=True)
    (d / "memory.max").write_text("4294967296\n")
    (d / "memory.current").write_text("1073741824\n")
    assert cgroup_memory(tmp_path / "cgroup", tmp_path / "fs") == (4 * gib, gib)
    (d / "memory.max").write_text("max\n")
    assert cgroup_memory(tmp_path / "cgroup", tmp_path / "fs") == (None, gib)
    assert cgroup_memory(tmp_path / "missing", tmp_path / "fs") == (None, 0)


def test_node_names_and_the_sandbox_limit() -> None:
    assert check_node_name("node-1.example") == "node-1.example"
    for bad in ("", "-x", "a~b", "x" * 64, "a b"):
        with pytest.raises(ValidationError, match="--node-name"):
            check_node_name(bad)
    assert check_node_name(None)
    ctl = Controller(SimpleNamespace(), SimpleNamespace())  # type: ignore[arg-type]
    ctl.max_sandboxes = 2
    with pytest.raises(Busy, match="--max-sandboxes 2"):
        ctl.spawn("snap", 3, "internet", None, False, 60.0)


def test_pull_route_registers_what_it_fetched_and_never_logs_the_token(server: str, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    import logging

    area = tmp_path / "area"
    area.mkdir()
    unpacked: list[tuple[bytes, str | None, bool]] = []
    released: list[Path] = []

    def done_with(path: Path) -> None:
        released.append(path)
        path.unlink(missing_ok=True)

    ctl = SimpleNamespace(
        upload_area=lambda: area, done_with=done_with,
        unpack=lambda path, tag, force: unpacked.append((path.read_bytes(), tag, force)) or {
            "tags": ["snap"], "registered": ["snap"], "reused": [], "replaced": [], "warnings": [], "seconds": 0.1})
    client = _client(ctl)
    secret = "peer-secret-" + "z" * 20
    caplog.set_level(logging.DEBUG)
    r = client.post("/v1/snapshots/pull", json={"url": server + "/to/pack?sig=QUERYSECRET", "token": secret,
                                                "tag": "snap", "force": True})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["source"] == server + "/pack" and body["bytes"] == len(PACK)
    assert body["sha256"] == hashlib.sha256(PACK).hexdigest() and body["registered"] == ["snap"]
    assert unpacked == [(PACK, "snap", True)] and released == [area / "pull.tar.zst"]
    assert not (area / "pull.tar.zst").exists()
    r = client.post("/v1/snapshots/pull", json={"url": server + "/pack", "sha256": "0" * 64, "token": secret})
    assert r.status_code == 400 and "sha256" in r.json()["error"] and len(unpacked) == 1  # nothing registered
    r = client.post("/v1/snapshots/pull", json={"url": server + "/missing", "token": secret})
    assert r.status_code == 502 and "HTTP 404" in r.json()["error"]
    assert Handler.seen[0] == ("/to/pack?sig=QUERYSECRET", f"Bearer {secret}")
    logged = caplog.text
    assert "pulled" in logged and secret not in logged and "QUERYSECRET" not in logged


# -- hostile sources (review fixes)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """/body: headers at once, then one byte every 0.1 s forever; /headers: the status line and headers
    one byte every 0.1 s."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        import time

        try:
            if self.path == "/body":
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 20))
                self.end_headers()
                self.wfile.flush()
                head = b""
            else:
                head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100000
            for i in range(100000):
                self.wfile.write(head[i:i + 1] or b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args: Any) -> None:
        pass


def test_a_trickling_source_is_cut_at_the_deadline(tmp_path: Path) -> None:
    import time

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for path in ("/body", "/headers"):
            t0 = time.monotonic()
            with pytest.raises(SourceError, match="within timeout_s"):
                fetch(f"http://127.0.0.1:{srv.server_address[1]}{path}", tmp_path / path.strip("/"),
                      limit=1 << 30, deadline_s=1.0)
            assert time.monotonic() - t0 < 3.0, path  # not one read timeout per byte
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_token_is_not_sent_again_after_leaving_the_origin(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    routes = {"https://peer/a": httpx.Response(302, headers={"Location": "https://elsewhere/b"}),
              "https://elsewhere/b": httpx.Response(302, headers={"Location": "https://peer:443/c"}),
              "https://peer/c": httpx.Response(200, stream=httpx.ByteStream(b"pack"))}
    fetch("https://peer/a", tmp_path / "p", limit=100, deadline_s=10, token="secret", transport=_mock(routes, seen))
    assert [auth for _u, auth in seen] == ["Bearer secret", None, None]
    seen.clear()  # the default port is the same origin
    routes = {"https://peer/a": httpx.Response(302, headers={"Location": "https://peer/c"}),  # httpx drops :443
              "https://peer/c": httpx.Response(200, stream=httpx.ByteStream(b"pack"))}
    fetch("https://peer:443/a", tmp_path / "q", limit=100, deadline_s=10, token="secret", transport=_mock(routes, seen))
    assert [auth for _u, auth in seen] == ["Bearer secret", "Bearer secret"]


class _Endless(httpx.SyncByteStream):
    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        while True:
            self.sent += len(self.chunk)
            yield self.chunk


def test_an_error_answer_is_read_only_in_part_and_encodings_are_refused(tmp_path: Path) -> None:
    body = _Endless(b"e" * 65536)
    seen: list[tuple[str, str | None]] = []
    routes = {"http://p/err": httpx.Response(500, headers={"Content-Type": "text/plain"}, stream=body)}
    with pytest.raises(SourceError, match="HTTP 500: e+$") as err:
        fetch("http://p/err", tmp_path / "e", limit=1 << 30, deadline_s=10, transport=_mock(routes, seen))
    assert body.sent <= 65536 and len(str(err.value)) < 400  # one chunk read, not the endless body

    def handle(req: httpx.Request) -> httpx.Response:
        assert req.headers["accept-encoding"] == "identity"
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"x"))

    with pytest.raises(SourceError, match="Content-Encoding 'gzip'"):
        fetch("http://p/gz", tmp_path / "g", limit=1 << 30, deadline_s=10, transport=httpx.MockTransport(handle))


def test_the_token_never_appears_in_an_error(tmp_path: Path) -> None:
    token = "tok-" + "s" * 30

    def handle(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/echo":
            return httpx.Response(401, headers={"Content-Type": "text/plain"},
                                  stream=httpx.ByteStream(f"bad {req.headers['authorization']}".encode()))
        raise httpx.RemoteProtocolError(f"illegal header {req.headers['authorization']}", request=req)

    for path in ("/echo", "/broken"):
        with pytest.raises(SourceError) as err:
            fetch(f"http://p{path}", tmp_path / "x", limit=100, deadline_s=10, token=token,
                  transport=httpx.MockTransport(handle))
        assert token not in str(err.value) and "[REDACTED]" in str(err.value), path


def test_pull_refuses_tokens_and_urls_that_could_smuggle_bytes() -> None:
    taken: list[str] = []
    client = _client(SimpleNamespace(upload_area=lambda: taken.append("slot")))
    for token in ("a\r\nX-Injected: 1", "has space", "t\u00e9"):
        r = client.post("/v1/snapshots/pull", json={"url": "http://p/x", "token": token})
        assert r.status_code == 422 and "token" in r.json()["error"] and token not in r.text, token
    for url, why in (("http://p/x y", "whitespace"), ("http://p/\x00", "control"),
                     ("http://p/" + "a" * 5000, "url")):
        r = client.post("/v1/snapshots/pull", json={"url": url})
        assert r.status_code in (400, 422) and why in r.json()["error"], url
    assert taken == []
    with pytest.raises(ValidationError, match="longer than"):
        check_url("http://p/" + "a" * 5000)


def test_a_lower_limit_above_the_daemons_cgroup_counts(tmp_path: Path) -> None:
    gib = 1 << 30
    (tmp_path / "cgroup").write_text("0::/kubepods/pod1/ctr\n")
    fs = tmp_path / "fs"
    leaf = fs / "kubepods" / "pod1" / "ctr"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.current").write_text(f"{gib}\n")
    pod = leaf.parent
    (pod / "memory.max").write_text(f"{2 * gib}\n")
    (pod / "memory.current").write_text(f"{3 * gib // 2}\n")
    (fs / "kubepods" / "memory.max").write_text(f"{8 * gib}\n")
    (fs / "kubepods" / "memory.current").write_text(f"{2 * gib}\n")
    assert cap.cgroup_memory(tmp_path / "cgroup", fs) == (2 * gib, 3 * gib // 2)  # the pod leaves the least
    (pod / "memory.current").write_text(f"{3 * gib}\n")  # over its limit: no room, never negative
    assert cap.cgroup_memory(tmp_path / "cgroup", fs) == (2 * gib, 3 * gib)
    assert cap.free_slots(0, 0, None) == 0 and cap.free_slots(-5, 3, 2) == 0
    (tmp_path / "cgroup").write_text("0::/../../etc\n")
    assert cap.cgroup_memory(tmp_path / "cgroup", fs) == (None, 0)


def test_capacity_needs_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.daemon.auth import BearerAuth

    ctl = SimpleNamespace(node_name="n1", active_count=lambda: 0, max_sandboxes=None, pool_ready=lambda: {"secret": 1},
                          starting=lambda: 0)
    app = BearerAuth(create_app(ctl, Metrics(lambda: 0, lambda: 0)), b"tok")  # type: ignore[arg-type]
    client = TestClient(app)
    r = client.get("/v1/capacity")
    assert r.status_code == 401 and "secret" not in r.text
    assert client.get("/v1/capacity", headers={"Authorization": "Bearer tok"}).json()["pool_ready"] == {"secret": 1}


def test_token_files_are_read_bounded(tmp_path: Path) -> None:
    import click
    from click.testing import CliRunner

    from forkd.cli.common import MAX_TOKEN_FILE, read_token
    from forkd.cli.main import cli

    (tmp_path / "ok").write_text("  tok-123\n")
    assert read_token(tmp_path / "ok") == "tok-123" and read_token(None) is None
    (tmp_path / "big").write_bytes(b"x" * (MAX_TOKEN_FILE + 1))
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    for name, why in (("big", "larger than"), ("empty", "empty"), ("bin", "not ASCII"), ("missing", "missing")):
        with pytest.raises(click.UsageError, match=why):
            read_token(tmp_path / name)
    r = CliRunner().invoke(cli, ["pull", "http://127.0.0.1:1/p", "--url", "http://127.0.0.1:1",
                                 "--peer-token-file", str(tmp_path / "big")])
    assert r.exit_code == 2 and "larger than" in r.output
