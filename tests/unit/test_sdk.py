"""The Python SDK alone, against an in-memory fake of forkd-controller (``httpx.MockTransport``)."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest

import forkd
from forkd import (
    APIConnectionError,
    APITimeoutError,
    AsyncController,
    AsyncSandbox,
    AuthenticationError,
    BadRequestError,
    CodeError,
    ConflictError,
    Controller,
    ForkdAPIError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    Sandbox,
    ServiceUnavailableError,
    SpawnError,
    UnprocessableEntityError,
)
from forkd.sdk import APIStatusError, CommandResult, Execution, FileEntry
from forkd.sdk._config import parse_url, resolve

TOKEN = "s3cr3t-token-" + "x" * 20
BASE = "http://forkd.test:8889"


def sandbox_json(sid: str, tag: str = "py", **extra: object) -> dict[str, object]:
    return {"id": sid, "snapshot_tag": tag, "status": "running", "exit_reason": None, "pid": 4242,
            "created_at": 1.0e9, "ready_ms": 512.5, "from_pool": False, "network": "user",
            "memory_limit_mib": None, "netns": None, **extra}


class FakeController:
    """Just enough of the REST API; every request is recorded in ``requests``."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.sandboxes: dict[str, dict[str, object]] = {}
        self.files: dict[str, bytes] = {}
        self.spawn_errors: dict[int, str] = {}
        self.fail: tuple[int, object] | None = None  # (status, body) for the next request
        self.next_id = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.fail is not None:
            status, body = self.fail
            self.fail = None
            if isinstance(body, str):
                return httpx.Response(status, text=body)
            return httpx.Response(status, json=body)
        method, parts = request.method, request.url.path.strip("/").split("/")
        body = json.loads(request.content) if request.headers.get("content-type") == "application/json" else None
        q = request.url.params
        if parts == ["healthz"]:
            return httpx.Response(200, json={"ok": True})
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return httpx.Response(401, json={"error": "invalid bearer token"})
        if parts == ["version"]:
            return httpx.Response(200, json={"version": "0.1.0", "api": "v1", "accelerator": "tcg",
                                             "accelerator_reason": "no /dev/kvm", "qemu_version": "7.2",
                                             "brand_new_field": 1})
        if parts == ["v1", "sandboxes"] and method == "POST":
            assert body is not None
            out: list[dict[str, object]] = []
            for i in range(body["n"]):
                if i in self.spawn_errors:
                    out.append({"index": i, "sandbox": None, "error": self.spawn_errors[i]})
                    continue
                sid = f"sb-{self.next_id:04d}"
                self.next_id += 1
                self.sandboxes[sid] = sandbox_json(sid, body["snapshot_tag"], workdir="/ignored/extra")
                out.append({"index": i, "sandbox": self.sandboxes[sid], "error": None})
            return httpx.Response(201, json=out[::-1])  # the SDK must restore request order
        if parts == ["v1", "sandboxes"] and method == "GET":
            return httpx.Response(200, json=list(self.sandboxes.values()))
        if len(parts) >= 3 and parts[:2] == ["v1", "sandboxes"]:
            sid, rest = parts[2], parts[3:]
            if sid not in self.sandboxes:
                return httpx.Response(404, json={"error": f"sandbox {sid} not found"})
            return self.sandbox_op(method, sid, rest, body, q)
        return httpx.Response(404, json={"error": "Not Found"})

    def sandbox_op(self, method: str, sid: str, rest: list[str], body: Any,
                   q: httpx.QueryParams) -> httpx.Response:
        if not rest and method == "GET":
            return httpx.Response(200, json=self.sandboxes[sid])
        if not rest and method == "DELETE":
            del self.sandboxes[sid]
            return httpx.Response(204)
        if rest == ["eval"]:
            expr = body["expr"]
            if expr == "1/0":
                return httpx.Response(200, json={"ok": False, "error": {
                    "type": "ZeroDivisionError", "message": "division by zero",
                    "traceback": 'Traceback (most recent call last):\n  File "<eval>", line 1\nZeroDivisionError'},
                    "stdout": "", "stderr": ""})
            if expr == "object()":
                return httpx.Response(200, json={"ok": True, "repr": "<object object at 0x7f>", "value": None,
                                                 "type": "object"})
            if expr == "None":
                return httpx.Response(200, json={"ok": True, "repr": "None", "value": None, "type": "NoneType"})
            return httpx.Response(200, json={"ok": True, "repr": "[0.0, 0.0]", "value": [0.0, 0.0], "type": "list"})
        if rest == ["run_code"]:
            if "raise" in body["code"]:
                return httpx.Response(200, json={"ok": False, "stdout": "before\n", "stderr": "", "error": {
                    "type": "ValueError", "message": "boom", "traceback": "Traceback...\nValueError: boom"}})
            return httpx.Response(200, json={"ok": True, "stdout": "hi\n", "stderr": "", "repr": "3", "value": 3})
        if rest == ["exec"]:
            return httpx.Response(200, json={"exit_code": 0, "stdout": json.dumps(body["argv"]), "stderr": "",
                                             "timed_out": False, "stdout_truncated": False,
                                             "stderr_truncated": False, "duration_s": 0.01})
        if rest == ["files"] and method == "PUT":
            self.files[q["path"]] = bytes(self._content)
            return httpx.Response(200, json={"bytes_written": len(self._content)})
        if rest == ["files"] and method == "GET":
            if q["path"] not in self.files:
                return httpx.Response(404, json={"error": "file_read: FileNotFoundError: no such file"})
            return httpx.Response(200, content=self.files[q["path"]],
                                  headers={"content-type": "application/octet-stream"})
        if rest == ["files", "stat"]:
            if q["path"] not in self.files:
                return httpx.Response(404, json={"error": "file_stat: FileNotFoundError: no such file"})
            p = q["path"]
            return httpx.Response(200, json={"name": p.rsplit("/", 1)[-1], "path": p, "type": "file",
                                             "size": len(self.files[p]), "mode": 0o644, "mtime": 1.0})
        if rest == ["files", "list"]:
            return httpx.Response(200, json={"entries": [
                {"name": p.rsplit("/", 1)[-1], "path": p, "type": "file", "size": len(d), "mode": 420, "mtime": 1.0}
                for p, d in sorted(self.files.items())]})
        return httpx.Response(404, json={"error": "Not Found"})

    _content: bytes = b""

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self._content = request.read()
            return self.handler(request)
        return httpx.MockTransport(handle)

    def async_transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            self._content = await request.aread()
            return self.handler(request)
        return httpx.MockTransport(handle)

    def calls(self, method: str | None = None) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests if method is None or r.method == method]


@pytest.fixture
def fake() -> FakeController:
    return FakeController()


@pytest.fixture
def ctl(fake: FakeController) -> Iterator[Controller]:
    with Controller(BASE, TOKEN, transport=fake.transport()) as c:
        yield c


def actl(fake: FakeController, token: str = TOKEN) -> AsyncController:
    return AsyncController(BASE, token, transport=fake.async_transport())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError), (404, NotFoundError),
    (409, ConflictError), (413, PayloadTooLargeError), (422, UnprocessableEntityError),
    (500, InternalServerError), (502, InternalServerError), (503, ServiceUnavailableError),
    (504, GatewayTimeoutError), (418, APIStatusError),
])
def test_status_maps_to_exception(fake: FakeController, ctl: Controller, status: int,
                                 cls: type[APIStatusError]) -> None:
    fake.fail = (status, {"error": "the reason"})
    with pytest.raises(cls) as ei:
        ctl.version()
    e = ei.value
    assert type(e) is cls and isinstance(e, APIStatusError) and isinstance(e, ForkdAPIError)
    assert e.status == status and e.message == "the reason" and e.body == {"error": "the reason"}
    assert str(e) == f"HTTP {status}: the reason"
    if status in (503, 504):
        assert isinstance(e, InternalServerError)


def test_exceptions_pickle_and_copy() -> None:
    import copy
    import pickle

    errs: list[ForkdAPIError] = [
        NotFoundError("gone", status=404, body={"error": "gone"}), APITimeoutError("slow"),
        CodeError("ValueError", "bad", "Traceback...", stdout="o", stderr="e"),
        SpawnError("1 of 2 failed", sandboxes=["a"], errors=[(1, "boom")]),
    ]
    for e in errs:
        for e2 in (pickle.loads(pickle.dumps(e)), copy.copy(e)):
            assert type(e2) is type(e) and str(e2) == str(e) and e2.__dict__ == e.__dict__


def test_non_json_error_body(fake: FakeController, ctl: Controller) -> None:
    fake.fail = (502, "<html>bad gateway</html>")
    with pytest.raises(InternalServerError) as ei:
        ctl.version()
    assert ei.value.status == 502 and "bad gateway" in ei.value.message and ei.value.body == "<html>bad gateway</html>"


def test_transport_failures() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with Controller(BASE, TOKEN, transport=httpx.MockTransport(refuse)) as c, \
            pytest.raises(APIConnectionError, match="cannot reach forkd-controller at http://forkd.test:8889") as ei:
        c.health()
    assert ei.value.status is None and not isinstance(ei.value, APITimeoutError)
    with Controller(BASE, TOKEN, transport=httpx.MockTransport(slow)) as c, pytest.raises(APITimeoutError):
        c.health()


def test_unexpected_success_body(fake: FakeController, ctl: Controller) -> None:
    fake.fail = (200, ["not", "an", "object"])
    with pytest.raises(ForkdAPIError, match="unexpected response to GET /version"):
        ctl.version()
    fake.fail = (200, {"api": "v1"})  # "version" missing
    with pytest.raises(ForkdAPIError, match="missing field"):
        ctl.version()


# ---------------------------------------------------------------- auth, headers and the token


def test_token_sent_as_bearer_with_user_agent(fake: FakeController, ctl: Controller) -> None:
    assert ctl.version().accelerator == "tcg"
    r = fake.requests[-1]
    assert r.headers["authorization"] == f"Bearer {TOKEN}"
    assert r.headers["user-agent"] == f"forkd-python/{forkd.__version__}"


def test_url_and_token_from_environment(fake: FakeController, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKD_URL", "http://env.test:1234/")
    monkeypatch.setenv("FORKD_TOKEN", TOKEN + "\n")
    with Controller(transport=fake.transport()) as c:
        assert c.url == "http://env.test:1234/"
        c.version()
    r = fake.requests[-1]
    assert str(r.url) == "http://env.test:1234/version" and r.headers["authorization"] == f"Bearer {TOKEN}"
    monkeypatch.delenv("FORKD_URL")
    monkeypatch.delenv("FORKD_TOKEN")
    ep = resolve()
    assert ep.url == "http://127.0.0.1:8889" and ep.token is None and "authorization" not in ep.headers


def test_wrong_or_missing_token_is_authentication_error(fake: FakeController) -> None:
    with Controller(BASE, "wrong-token-0123456789", transport=fake.transport()) as c:
        assert c.health() is True  # /healthz needs no token
        with pytest.raises(AuthenticationError, match="invalid bearer token"):
            c.list_sandboxes()
    with Controller(BASE, transport=fake.transport()) as c:
        with pytest.raises(AuthenticationError):
            c.version()
        assert "authorization" not in fake.requests[-1].headers


def test_token_never_in_messages_or_reprs(fake: FakeController, ctl: Controller) -> None:
    assert TOKEN not in repr(ctl) and TOKEN not in str(ctl)
    assert TOKEN not in repr(resolve(BASE, TOKEN))
    fake.fail = (401, {"error": f"invalid bearer token {TOKEN}", "echo": [TOKEN]})
    with pytest.raises(AuthenticationError) as ei:
        ctl.version()
    e = ei.value
    for text in (str(e), repr(e), e.message, repr(e.body), repr(e.args)):
        assert TOKEN not in text
    assert "[REDACTED]" in e.message

    def leak(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused while sending {request.headers['authorization']}", request=request)

    with Controller(BASE, TOKEN, transport=httpx.MockTransport(leak)) as c, \
            pytest.raises(APIConnectionError) as ci:
        c.version()
    assert TOKEN not in str(ci.value) and TOKEN not in repr(ci.value)


def test_bad_token_characters_rejected_without_echo() -> None:
    with pytest.raises(ValueError, match="token") as ei:
        Controller(BASE, "abc def\nghi-0123456789")
    assert "ghi-0123456789" not in str(ei.value)


# ---------------------------------------------------------------- URLs and transports


def test_parse_url_forms() -> None:
    assert parse_url("http://127.0.0.1:8889") == ("http://127.0.0.1:8889", None)
    assert parse_url("https://forkd.example/api/") == ("https://forkd.example/api", None)
    assert parse_url("unix:/run/forkd/api.sock") == ("http://localhost", "/run/forkd/api.sock")
    assert parse_url("unix:///run/forkd/api.sock") == ("http://localhost", "/run/forkd/api.sock")
    assert parse_url("http+unix://%2Frun%2Fforkd%2Fapi.sock") == ("http://localhost", "/run/forkd/api.sock")
    assert parse_url("http+unix://%2Frun%2Fapi.sock/prefix/") == ("http://localhost/prefix", "/run/api.sock")
    for bad in ["", "unix:", "ftp://x", "127.0.0.1:8889", "http+unix://"]:
        with pytest.raises(ValueError, match="url"):
            parse_url(bad)


def test_verify_options(tmp_path: Path) -> None:
    assert resolve("https://h:1", verify=False).verify is False
    assert resolve("https://h:1").verify is True
    with pytest.raises(ValueError, match="verify: CA bundle"):
        resolve("https://h:1", verify=str(tmp_path / "missing.pem"))
    assert resolve("http://h:1", verify=str(tmp_path / "missing.pem")).verify is True  # not TLS: unused


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps({"ok": True, "path": self.path, "auth": self.headers.get("Authorization")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "api.sock")
    srv = _UnixHTTPServer(path, _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield path
    srv.shutdown()
    srv.server_close()


def test_unix_socket_transport(unix_server: str) -> None:
    for url in (f"unix:{unix_server}", f"http+unix://{quote(unix_server, safe='')}"):
        with Controller(url, TOKEN) as c:
            assert c.health() is True

    async def main() -> bool:
        async with AsyncController(f"unix:{unix_server}", TOKEN) as c:
            return await c.health()

    assert asyncio.run(main()) is True


def test_unix_socket_missing_is_connection_error(tmp_path: Path) -> None:
    with Controller(f"unix:{tmp_path}/nothing.sock") as c, pytest.raises(APIConnectionError):
        c.health()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on loopback whose certificate is signed by a fresh CA; yields (url, CA bundle path)."""
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"https://127.0.0.1:{srv.server_address[1]}", ca_path
    srv.shutdown()
    srv.server_close()


def test_tls_verify(tls_server: tuple[str, Path]) -> None:
    url, ca_path = tls_server
    with Controller(url, TOKEN, verify=str(ca_path)) as c:
        assert c.health() is True
    with Controller(url, TOKEN, verify=ca_path) as c:  # a PathLike works too
        assert c.health() is True
    with Controller(url, TOKEN, verify=False) as c:
        assert c.health() is True
    with Controller(url, TOKEN) as c, pytest.raises(APIConnectionError, match="CERTIFICATE_VERIFY_FAILED") as ei:
        c.health()  # the system CAs do not know the test CA
    assert TOKEN not in str(ei.value)


# ---------------------------------------------------------------- spawn


def test_spawn_all_ok_in_request_order(fake: FakeController, ctl: Controller) -> None:
    sbs = ctl.spawn_sandboxes("py", 3, timeout=10)
    assert [s.id for s in sbs] == ["sb-0000", "sb-0001", "sb-0002"]
    assert all(isinstance(s, Sandbox) and s.snapshot_tag == "py" and s.info.ready_ms == 512.5 for s in sbs)
    req = fake.requests[-1]
    assert json.loads(req.content) == {"snapshot_tag": "py", "n": 3, "network": "internet", "memory_limit_mib": None,
                                       "per_child_netns": False, "timeout_s": 10.0}
    assert req.extensions["timeout"]["read"] == 3 * 10 + 30


def test_spawn_partial_failure_raises_with_started(fake: FakeController, ctl: Controller) -> None:
    fake.spawn_errors = {1: "restore timed out", 3: "qemu exited"}
    with pytest.raises(SpawnError) as ei:
        ctl.spawn_sandboxes("py", 4)
    e = ei.value
    assert [s.id for s in e.sandboxes] == ["sb-0000", "sb-0001"]
    assert all(isinstance(s, Sandbox) for s in e.sandboxes)
    assert e.errors == [(1, "restore timed out"), (3, "qemu exited")]
    assert "2 of 4" in str(e) and "restore timed out" in str(e)
    for s in e.sandboxes:  # the caller can clean up
        s.kill()
    assert fake.sandboxes == {}


def test_spawn_return_exceptions(fake: FakeController, ctl: Controller) -> None:
    fake.spawn_errors = {0: "no memory"}
    out = ctl.spawn_sandboxes("py", 3, return_exceptions=True)
    assert isinstance(out[0], SpawnError) and out[0].errors == [(0, "no memory")] and out[0].index == 0
    assert out[0].sandboxes == []
    assert [type(x) for x in out[1:]] == [Sandbox, Sandbox]


def test_spawn_sandbox_single_failure(fake: FakeController, ctl: Controller) -> None:
    fake.spawn_errors = {0: "boom"}
    with pytest.raises(SpawnError, match="boom") as ei:
        ctl.spawn_sandbox("py")
    assert ei.value.sandboxes == []


@pytest.mark.parametrize(("kw", "match"), [
    ({"n": 0}, "n: must be in 1..1000"), ({"n": 1001}, "n: must be in 1..1000"),
    ({"network": "host"}, "network"), ({"timeout": 0}, "timeout"), ({"snapshot_tag": ""}, "snapshot_tag"),
])
def test_spawn_validates_client_side(fake: FakeController, ctl: Controller, kw: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"snapshot_tag": "py", **kw}
    with pytest.raises(ValueError, match=match):
        ctl.spawn_sandboxes(**args)
    assert fake.requests == []


# ---------------------------------------------------------------- sandbox operations


def test_context_manager_kills(fake: FakeController, ctl: Controller) -> None:
    with ctl.spawn_sandbox("py") as sb:
        assert sb.id in fake.sandboxes
    assert ("DELETE", f"/v1/sandboxes/{sb.id}") in fake.calls() and fake.sandboxes == {}
    with pytest.raises(RuntimeError, match="user error"), ctl.spawn_sandbox("py") as sb2:
        raise RuntimeError("user error")
    assert ("DELETE", f"/v1/sandboxes/{sb2.id}") in fake.calls()
    sb2.kill()  # idempotent: a 404 now
    assert fake.calls("DELETE")[-1] == ("DELETE", f"/v1/sandboxes/{sb2.id}")


def test_eval_value_repr_and_code_error(fake: FakeController, ctl: Controller) -> None:
    sb = ctl.spawn_sandbox("py")
    assert sb.eval("numpy.zeros(2).tolist()", timeout=5) == [0.0, 0.0]
    assert fake.requests[-1].extensions["timeout"]["read"] == 35
    assert json.loads(fake.requests[-1].content) == {"expr": "numpy.zeros(2).tolist()", "timeout_s": 5.0}
    assert sb.eval("object()") == "<object object at 0x7f>"
    assert sb.eval("None") is None
    r = sb.eval_result("object()")
    assert (r.value, r.repr, r.type) == (None, "<object object at 0x7f>", "object")
    with pytest.raises(CodeError) as ei:
        sb.eval("1/0")
    e = ei.value
    assert e.type == "ZeroDivisionError" and e.message == "division by zero" and "Traceback" in (e.traceback or "")
    assert str(e) == "ZeroDivisionError: division by zero" and e.status is None


def test_run_code(fake: FakeController, ctl: Controller) -> None:
    sb = ctl.spawn_sandbox("py")
    assert sb.run_code("print('hi'); 3") == Execution(stdout="hi\n", stderr="", value=3, repr="3")
    with pytest.raises(CodeError) as ei:
        sb.run_code("print('before'); raise ValueError('boom')")
    assert ei.value.type == "ValueError" and ei.value.stdout == "before\n" and "boom" in (ei.value.traceback or "")


def test_commands_run_str_list_and_timeout(fake: FakeController, ctl: Controller) -> None:
    sb = ctl.spawn_sandbox("py")
    r = sb.commands.run("echo hi | wc -c")
    assert isinstance(r, CommandResult) and r.ok
    body = json.loads(fake.requests[-1].content)
    assert body["argv"] == ["/bin/sh", "-c", "echo hi | wc -c"] and body["timeout_s"] == 60.0
    assert fake.requests[-1].extensions["timeout"]["read"] == 90
    sb.commands.run(["uname", "-a"], env={"A": "1"}, cwd="/tmp", stdin=b"data", timeout=None, max_output=10)
    body = json.loads(fake.requests[-1].content)
    assert body == {"argv": ["uname", "-a"], "env": {"A": "1"}, "cwd": "/tmp", "stdin": "data", "timeout_s": None,
                    "max_output": 10}
    assert fake.requests[-1].extensions["timeout"]["read"] is None
    n = len(fake.requests)
    for bad in ([], "", "   ", [""]):
        with pytest.raises(ValueError, match="cmd"):
            sb.commands.run(bad)
    with pytest.raises(TypeError, match=r"cmd\[1\]"):
        sb.commands.run(cast(Any, ["ls", 3]))
    with pytest.raises(ValueError, match="stdin"):
        sb.commands.run("cat", stdin=b"\xff")
    assert len(fake.requests) == n


def test_files(fake: FakeController, ctl: Controller) -> None:
    sb = ctl.spawn_sandbox("py")
    data = bytes(range(256))
    assert sb.files.write("/tmp/a b.bin", data, mode=0o600) == 256
    put = fake.requests[-1]
    assert put.method == "PUT" and put.url.params["path"] == "/tmp/a b.bin" and put.url.params["mode"] == "384"
    assert sb.files.read("/tmp/a b.bin") == data
    big = os.urandom((3 << 20) + 5)  # sent in 1 MiB chunks, with a Content-Length (not chunked encoding)
    assert sb.files.write("/tmp/big", big) == len(big) and fake.files["/tmp/big"] == big
    assert fake.requests[-1].headers["content-length"] == str(len(big))
    assert "transfer-encoding" not in fake.requests[-1].headers
    assert sb.files.write("/tmp/empty", b"") == 0 and fake.files["/tmp/empty"] == b""
    assert sb.files.write("/tmp/t.txt", "héllo") == len("héllo".encode())
    assert sb.files.read_text("/tmp/t.txt") == "héllo"
    assert sb.files.stat("/tmp/t.txt") == FileEntry("t.txt", "/tmp/t.txt", "file", 6, 0o644, 1.0)
    assert [e.name for e in sb.files.list("/tmp")] == ["a b.bin", "big", "empty", "t.txt"]
    with pytest.raises(NotFoundError, match="FileNotFoundError"):
        sb.files.read("/nope")
    with pytest.raises(ValueError, match="path"):
        sb.files.read("")


def test_files_exists_on_404(fake: FakeController, ctl: Controller) -> None:
    sb = ctl.spawn_sandbox("py")
    fake.files["/etc/hostname"] = b"x"
    assert sb.files.exists("/etc/hostname") is True
    assert sb.files.exists("/no/such/file") is False
    sb.kill()
    with pytest.raises(NotFoundError, match="sandbox"):
        sb.files.exists("/etc/hostname")  # the sandbox is gone: not "the file does not exist"


def test_get_list_refresh_and_unknown_fields(fake: FakeController, ctl: Controller) -> None:
    sb = ctl.spawn_sandbox("py")
    assert ctl.get_sandbox(sb.id) == sb
    assert [s.id for s in ctl.list_sandboxes()] == [sb.id]
    fake.sandboxes[sb.id] = {**fake.sandboxes[sb.id], "status": "exited", "exit_reason": "killed", "future": 1}
    assert sb.refresh().status == "exited" and sb.info.exit_reason == "killed" and not sb.info.running
    with pytest.raises(NotFoundError, match="sandbox sb-9 not found"):
        ctl.get_sandbox("sb-9")
    with pytest.raises(NotFoundError):
        ctl.get_sandbox("../v1")  # percent-encoded: stays one path segment
    assert fake.requests[-1].url.raw_path == b"/v1/sandboxes/..%2Fv1"


def test_import_forkd_is_light() -> None:
    code = ("import sys, forkd; assert 'httpx' not in sys.modules and 'forkd.engine' not in sys.modules; "
            "from forkd import Controller, AsyncSandbox, CodeError; assert 'forkd.engine' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


# ---------------------------------------------------------------- async mirror


def test_async_status_mapping_and_token(fake: FakeController) -> None:
    async def main() -> None:
        async with actl(fake) as c:
            assert (await c.version()).version == "0.1.0"
            assert fake.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"
            fake.fail = (409, {"error": f"in use {TOKEN}"})
            with pytest.raises(ConflictError) as ei:
                await c.delete_snapshot("py")
            assert TOKEN not in str(ei.value) and TOKEN not in repr(ei.value)
            assert fake.requests[-1].url.params["force"] == "false"
        async with actl(fake, token="wrong-token-0123456789") as c:
            with pytest.raises(AuthenticationError):
                await c.list_snapshots()

    asyncio.run(main())


def test_async_spawn_partial_failure_and_return_exceptions(fake: FakeController) -> None:
    async def main() -> None:
        async with actl(fake) as c:
            fake.spawn_errors = {2: "restore failed"}
            with pytest.raises(SpawnError) as ei:
                await c.spawn_sandboxes("py", 3)
            assert [type(s) for s in ei.value.sandboxes] == [AsyncSandbox, AsyncSandbox]
            assert ei.value.errors == [(2, "restore failed")]
            await asyncio.gather(*(s.kill() for s in ei.value.sandboxes))
            out = await c.spawn_sandboxes("py", 3, return_exceptions=True)
            assert [type(x) for x in out] == [AsyncSandbox, AsyncSandbox, SpawnError]

    asyncio.run(main())


def test_async_context_manager_eval_commands_files(fake: FakeController) -> None:
    async def main() -> str:
        async with actl(fake) as c:
            async with await c.spawn_sandbox("py") as sb:
                assert await sb.eval("x") == [0.0, 0.0]
                with pytest.raises(CodeError, match="ZeroDivisionError"):
                    await sb.eval("1/0")
                await sb.commands.run("ls /")
                assert json.loads(fake.requests[-1].content)["argv"] == ["/bin/sh", "-c", "ls /"]
                assert await sb.files.write("/f", b"\x00\xff") == 2
                assert await sb.files.read("/f") == b"\x00\xff"
                assert await sb.files.exists("/f") and not await sb.files.exists("/g")
            await sb.kill()  # idempotent
            return sb.id

    sid = asyncio.run(main())
    assert fake.calls("DELETE") == [("DELETE", f"/v1/sandboxes/{sid}")] * 2 and fake.sandboxes == {}


def test_sync_and_async_mirror_each_other() -> None:
    from forkd.sdk import aio, sync

    pairs: list[tuple[type, type]] = [(sync.Controller, aio.AsyncController), (sync.Sandbox, aio.AsyncSandbox),
                                      (sync.Commands, aio.AsyncCommands), (sync.Files, aio.AsyncFiles),
                                      (sync.CommandHandle, aio.AsyncCommandHandle)]
    for s, a in pairs:
        public: Callable[[type], set[str]] = lambda c: {n for n in vars(c) if not n.startswith("_")}  # noqa: E731
        assert public(s) == public(a), (s, a)
        for name in public(s):
            if callable(getattr(s, name)):
                assert asyncio.iscoroutinefunction(getattr(a, name)), (a, name)
