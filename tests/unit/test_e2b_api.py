"""The E2B translation layer over a fake Controller (no VM): shapes of the control plane's answers and
errors, Connect framing of process streams, the access token, /files and /execute."""

from __future__ import annotations

import base64
import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from forkd.daemon.service import NotFound
from forkd.e2b import connect as cx
from forkd.e2b.app import create_e2b_app
from forkd.e2b.auth import Keys
from forkd.e2b.envd import parse_multipart, shell_fallback
from forkd.engine.child import CodeOutput, ProcessOutput
from forkd.errors import AgentError

KEY = b"e2b_" + b"ab" * 20


@dataclass
class FakeChild:
    snapshot: str = "pyagent"
    files: dict[str, bytes] = field(default_factory=dict)
    started: list[dict[str, Any]] = field(default_factory=list)

    def start_process(self, argv: list[str], **kw: Any) -> dict[str, Any]:
        self.started.append({"argv": argv, **kw})
        return {"pid": 7, "argv": argv, "started_at": 0.0, "running": True}

    def read_process(self, pid: int, wait: float = 10.0) -> ProcessOutput:
        return ProcessOutput(b"hello\n", b"oops\n", True, 3, False)

    def stat(self, path: str) -> dict[str, Any]:
        if path == "/bin/bash":
            raise AgentError("file_stat", "FileNotFoundError", "no such file")
        if path not in self.files:
            raise AgentError("file_stat", "FileNotFoundError", f"no such file: {path}")
        return {"name": path.rsplit("/", 1)[-1], "path": path, "type": "file", "size": len(self.files[path]),
                "mode": 0o644, "mtime": 0.0}

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> int:
        self.files[path] = data
        return len(data)

    def iter_file(self, path: str, max_bytes: int) -> Any:
        if path not in self.files:
            raise AgentError("file_read", "FileNotFoundError", f"no such file: {path}")
        return iter([self.files[path]])

    def run_code_stream(self, code: str, timeout: float) -> Any:
        if code == "1/0":
            yield CodeOutput(b"partial", b"")
            raise AgentError("run_code", "ZeroDivisionError", "division by zero", traceback="Traceback ...")
        yield CodeOutput(b"hi\n", b"")
        yield {"stdout": "", "stderr": "", "repr": "42", "value": 42}


@dataclass
class FakeSandbox:
    id: str
    child: FakeChild
    metadata: dict[str, str]
    expires_at: float | None
    created_at: float = field(default_factory=time.time)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "snapshot_tag": self.child.snapshot, "created_at": self.created_at,
                "expires_at": self.expires_at, "metadata": self.metadata, "status": "running", "network": "internet",
                "memory_limit_mib": None}


class FakeStore:
    def exists(self, tag: str) -> bool:
        return tag == "pyagent"


class FakeEngine:
    store = FakeStore()


class FakeController:
    engine = FakeEngine()

    def __init__(self) -> None:
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.spawns: list[tuple[Any, ...]] = []

    def spawn(self, tag: str, n: int, network: str, *args: Any) -> list[dict[str, Any]]:
        self.spawns.append((tag, n, network, *args))
        if tag != "pyagent":
            from forkd.errors import SnapshotNotFoundError
            raise SnapshotNotFoundError(f"snapshot {tag} not found")
        sid = f"sb-{len(self.sandboxes):016x}"
        lifetime = args[-2]
        self.sandboxes[sid] = FakeSandbox(sid, FakeChild(), dict(args[-1]), time.time() + lifetime)
        info = self.sandboxes[sid].info()
        return [{"index": 0, "sandbox": info, "error": None, **info}]

    def get(self, sid: str) -> FakeSandbox:
        if sid not in self.sandboxes:
            raise NotFound(f"sandbox {sid} not found")
        return self.sandboxes[sid]

    def running(self, sid: str) -> FakeChild:
        return self.get(sid).child

    def call(self, sid: str, fn: Any) -> Any:
        return fn(self.running(sid))

    def delete(self, sid: str) -> None:
        self.get(sid)
        del self.sandboxes[sid]

    def set_lifetime(self, sid: str, lifetime_s: float) -> dict[str, Any]:
        sb = self.get(sid)
        sb.expires_at = time.time() + lifetime_s
        return sb.info()

    def list_sandboxes(self, metadata: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return [sb.info() for sb in self.sandboxes.values()
                if all(sb.metadata.get(k) == v for k, v in (metadata or {}).items())]

    def snapshot_info(self, tag: str) -> dict[str, Any]:
        return {"vcpus": 2, "memory_mib": 512}


@pytest.fixture
def env() -> tuple[TestClient, FakeController]:
    ctl = FakeController()
    app = create_e2b_app(ctl, KEY, default_template="pyagent")
    return TestClient(app), ctl


API = {"X-API-KEY": KEY.decode()}


def _create(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"a": "1"}, "envVars": {"E": "v"},
                                          **body}, headers=API)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def _frames(body: bytes) -> list[tuple[int, dict[str, Any]]]:
    out, off = [], 0
    while off < len(body):
        flags, n = struct.unpack_from(">BI", body, off)
        out.append((flags, json.loads(body[off + 5:off + 5 + n])))
        off += 5 + n
    return out


def test_control_plane_shapes_and_errors(env: tuple[TestClient, FakeController]) -> None:
    client, ctl = env
    sb = _create(client, timeout=60)
    assert set(sb) >= {"templateID", "sandboxID", "clientID", "envdVersion", "envdAccessToken"}
    assert sb["templateID"] == "pyagent" and sb["sandboxID"].isalnum() and sb["envdVersion"] == "0.5.7"
    assert ctl.spawns[0][:3] == ("pyagent", 1, "internet") and ctl.spawns[0][-2] == 60.0
    r = client.get(f"/sandboxes/{sb['sandboxID']}", headers=API)
    d = r.json()
    assert r.status_code == 200 and d["state"] == "running" and d["metadata"] == {"a": "1"} and d["cpuCount"] == 2
    assert d["startedAt"].endswith("Z") and d["envdAccessToken"] == sb["envdAccessToken"]
    assert [s["sandboxID"] for s in client.get("/v2/sandboxes", params={"metadata": "a=1"}, headers=API).json()] \
        == [sb["sandboxID"]]
    assert client.get("/v2/sandboxes", params={"metadata": "a=2"}, headers=API).json() == []
    assert client.post(f"/sandboxes/{sb['sandboxID']}/timeout", json={"timeout": 30}, headers=API).status_code == 204
    assert client.delete(f"/sandboxes/{sb['sandboxID']}", headers=API).status_code == 204
    r = client.get(f"/sandboxes/{sb['sandboxID']}", headers=API)
    assert r.status_code == 404 and r.json()["code"] == 404 and "not found" in r.json()["message"]
    r = client.get("/sandboxes/x", headers={"X-API-KEY": "e2b_00"})
    assert r.status_code == 401 and r.json()["code"] == 401
    assert client.get("/sandboxes", headers={}).status_code == 401
    for bad in ({"timeout": "5"}, {"autoPause": True}, {"templateID": "../etc"}, {"bogus": 1},
                {"metadata": {"bad key": "v"}}):
        r = client.post("/v2/sandboxes", json={"templateID": "base", **bad}, headers=API)
        assert r.status_code == 400 and r.json()["code"] == 400, (bad, r.text)
    r = client.post("/sandboxes", json={"templateID": "nope"}, headers=API)
    assert r.status_code == 404 and r.json()["code"] == 404
    r = client.post("/sandboxes", content=b"x" * (2 << 20), headers=API)
    assert r.status_code == 413


def test_process_start_streams_connect_frames(env: tuple[TestClient, FakeController]) -> None:
    client, ctl = env
    sb = _create(client)
    h = {"E2b-Sandbox-Id": sb["sandboxID"], "E2b-Sandbox-Port": "49983", "X-Access-Token": sb["envdAccessToken"],
         "Content-Type": "application/connect+json", "Connect-Timeout-Ms": "60000"}
    req = cx.envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"]}, "stdin": False})
    r = client.post("/process.Process/Start", content=req, headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/connect+json"
    frames = _frames(r.content)
    assert frames[0] == (0, {"event": {"start": {"pid": 7}}})
    assert frames[1] == (0, {"event": {"data": {"stdout": base64.b64encode(b"hello\n").decode()}}})
    assert frames[2] == (0, {"event": {"data": {"stderr": base64.b64encode(b"oops\n").decode()}}})
    assert frames[3][1]["event"]["end"]["exitCode"] == 3 and frames[-1] == (2, {})
    started = ctl.sandboxes[f"sb-{sb['sandboxID']}"].child.started[0]
    assert started["argv"] == ["/bin/sh", "-c", "echo hi"]  # the fake guest has no bash
    assert started["env"] == {"E": "v"} and started["timeout"] == 60.0 and started["stdin_open"] is False
    bad = client.post("/process.Process/Start", content=req, headers={**h, "X-Access-Token": "nope"})
    assert _frames(bad.content) == [(2, {"error": {"code": "unauthenticated", "message": bad.text[bad.text.index(
        "invalid"):-3]}})]
    other = client.post("/process.Process/Start", content=req, headers={**h, "E2b-Sandbox-Id": "ffff"})
    assert _frames(other.content)[0][1]["error"]["code"] == "unauthenticated"  # whether it exists is not told
    gone = client.post("/process.Process/Start", content=req, headers={
        **h, "E2b-Sandbox-Id": "ffff", "X-Access-Token": Keys(KEY).access_token("sb-ffff")})
    assert _frames(gone.content)[0][1]["error"]["code"] == "unavailable"
    assert "was not found" in _frames(gone.content)[0][1]["error"]["message"]
    r = client.post("/filesystem.Filesystem/Stat", json={"path": "/nope"}, headers={**h, "Content-Type":
                                                                                      "application/json"})
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_files_and_execute(env: tuple[TestClient, FakeController]) -> None:
    client, _ = env
    sb = _create(client)
    h = {"E2b-Sandbox-Id": sb["sandboxID"], "E2b-Sandbox-Port": "49983", "X-Access-Token": sb["envdAccessToken"]}
    r = client.post("/files", params={"path": "/tmp/a.txt"}, files={"file": ("/tmp/a.txt", b"\r\ndata\r\n")},
                    headers=h)
    assert r.status_code == 200 and r.json() == [{"name": "a.txt", "type": "file", "path": "/tmp/a.txt"}]
    assert client.get("/files", params={"path": "/tmp/a.txt"}, headers=h).content == b"\r\ndata\r\n"
    r = client.post("/files", params={"path": "rel/b.bin"}, content=b"\x00\xff",
                    headers={**h, "Content-Type": "application/octet-stream"})
    assert r.json()[0]["path"] == "/rel/b.bin"
    r = client.get("/files", params={"path": "/missing"}, headers=h)
    assert r.status_code == 404 and r.json()["code"] == 404
    assert client.get("/health", headers={k: v for k, v in h.items() if k != "X-Access-Token"}).status_code == 204
    assert client.get("/files", params={"path": "/tmp/a.txt"}, headers={**h, "X-Access-Token": "x"}).status_code \
        == 401
    ci = {**h, "E2b-Sandbox-Port": "49999"}
    r = client.post("/execute", json={"code": "x", "context_id": None, "language": None, "env_vars": None},
                    headers=ci)
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["type"] for x in lines] == ["stdout", "result", "number_of_executions", "end_of_execution"]
    assert lines[0]["text"] == "hi\n" and lines[1]["text"] == "42" and lines[1]["is_main_result"] is True
    lines = [json.loads(x) for x in client.post("/execute", json={"code": "1/0"}, headers=ci).text.splitlines()]
    assert lines[1] == {"type": "error", "name": "ZeroDivisionError", "value": "division by zero",
                        "traceback": "Traceback ..."}
    assert lines[2]["execution_count"] == 2
    assert client.post("/execute", json={"code": "1", "language": "r"}, headers=ci).status_code == 400
    assert client.get("/health", headers={**h, "E2b-Sandbox-Port": "8080"}).status_code == 502


def test_multipart_and_framing_units() -> None:
    blob = bytes(range(256)) + b"\r\n--notit\r\n"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/a\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + blob + b"\r\n--XyZ\r\n"
            b"Content-Disposition: form-data; name=\"file\"; filename=\"/b\"\r\n\r\n\r\n--XyZ--\r\n")
    assert parse_multipart(body, "multipart/form-data; boundary=XyZ") == [("/a", blob), ("/b", b"")]
    with pytest.raises(Exception, match="closing boundary"):
        parse_multipart(body[:-9], "multipart/form-data; boundary=XyZ")
    assert cx.parse_envelopes(cx.envelope({"a": 1}) + cx.end_stream()) == [{"a": 1}]
    with pytest.raises(cx.ConnectError):
        cx.parse_envelopes(b"\x00\x00\x00\x00\x09{}")
    with pytest.raises(cx.ConnectError, match="compressed"):
        cx.parse_envelopes(b"\x01\x00\x00\x00\x02{}")
    assert shell_fallback(["-l", "-c", "echo $0", "x"]) == ["/bin/sh", "-c", "echo $0", "x"]


SDK_PYTHON = Path(__file__).resolve().parents[2] / ".venv-e2b" / "bin" / "python"
SDK_SCRIPT = """
import json
from e2b import Sandbox, SandboxQuery, CommandExitException, NotFoundException
from e2b_code_interpreter import Sandbox as CodeSandbox
sb = Sandbox.create(metadata={"a": "1"})
out = {"running": sb.is_running(), "template": sb.get_info().template_id}
try:
    sb.commands.run("echo hi")
except CommandExitException as e:
    out["exit"] = [e.exit_code, e.stdout, e.stderr]
sb.files.write("/tmp/x", "data")
out["read"] = sb.files.read("/tmp/x")
listed = Sandbox.list(query=SandboxQuery(metadata={"a": "1"})).next_items()
out["listed"] = [s.sandbox_id == sb.sandbox_id for s in listed]
sb.set_timeout(30)
ex = CodeSandbox.create().run_code("x")
out["code"] = [ex.logs.stdout, ex.text]
sb.kill()
try:
    Sandbox.get_info(sb.sandbox_id)
except NotFoundException as e:
    out["gone"] = type(e).__name__
print(json.dumps(out))
"""


@pytest.mark.skipif(not SDK_PYTHON.exists(), reason="no .venv-e2b (make e2b-venv)")
def test_real_sdk_against_the_fake_controller() -> None:
    """The unmodified SDKs (``make e2b-venv``) against the layer over a fake controller: the wire
    contract in a second, without a VM."""
    import socket
    import subprocess
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_e2b_app(FakeController(), KEY, "pyagent"),
                                           host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.run([str(SDK_PYTHON), "-I", "-c", SDK_SCRIPT], capture_output=True, text=True, timeout=120,
                              env={"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": KEY.decode()})
    finally:
        server.should_exit = True
        thread.join(10)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"running": True, "template": "pyagent", "exit": [3, "hello\n", "oops\n"],
                                       "read": "data", "listed": [True], "code": [["hi\n"], "42"],
                                       "gone": "SandboxNotFoundException"}
