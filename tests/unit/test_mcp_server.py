"""The MCP server in process (the mcp client's in-memory transport) against a fake daemon (an httpx
MockTransport behind the real SDK): tool schemas, errors as tool errors, output caps, explore's
orchestration and clean-up, the HTTP transport's checks. No VM."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from forkd.mcp.backend import BackendError
from forkd.mcp.http import BearerToken, http_app, is_loopback, parse_bind, security_settings
from forkd.mcp.server import build_server
from forkd.mcp.tools import TOOL_NAMES
from forkd.sdk import Controller
from forkd.sdk._base import redact

TOKEN = "s3cret-t0ken-0123456789"


class FakeDaemon:
    """Just enough of the REST API for the tools, recording what was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.killed: list[str] = []
        self.deleted: list[str] = []
        self.spawned = 0

    def __call__(self, req: httpx.Request) -> httpx.Response:
        is_json = req.content and req.headers.get("content-type") == "application/json"
        body = json.loads(req.content) if is_json else None
        path = req.url.path
        self.calls.append((req.method, path, body))
        assert req.headers["authorization"] == f"Bearer {TOKEN}"
        parts = path.strip("/").split("/")
        if path == "/version":
            return httpx.Response(200, json={"version": "0.1.0", "api": "v1", "accelerator": "tcg"})
        if path == "/v1/snapshots" and req.method == "GET":
            return httpx.Response(200, json=[{"tag": "py", "kind": "root", "sandboxes": 2}])
        if parts[:2] == ["v1", "snapshots"] and req.method == "DELETE":
            self.deleted.append(parts[2])
            return httpx.Response(204)
        if path == "/v1/sandboxes" and req.method == "POST":
            out = []
            for i in range(body["n"]):
                if body["snapshot_tag"] == "half" and i % 2:
                    out.append({"index": i, "error": "no room"})
                    continue
                self.spawned += 1
                out.append({"index": i, "sandbox": {"id": f"sb-c{self.spawned}", "snapshot_tag": body["snapshot_tag"],
                                                    "metadata": body.get("metadata") or {}}})
            return httpx.Response(200, json=out)
        if parts[:2] != ["v1", "sandboxes"] or len(parts) < 3:
            return httpx.Response(404, json={"error": "no such route"})
        sid, op = parts[2], (parts[3] if len(parts) > 3 else "")
        if sid == "sb-missing":
            return httpx.Response(404, json={"error": f"sandbox sb-missing not found (token {TOKEN})"})
        if req.method == "DELETE" and not op:
            self.killed.append(sid)
            return httpx.Response(204)
        if op == "branch":
            return httpx.Response(200, json={"tag": "br-test", "mode": "delta", "pause_ms": 1.0})
        if op == "run_code":
            if body["code"] == "boom":
                return httpx.Response(200, json={"ok": False, "stdout": "before\n", "error": {
                    "type": "RuntimeError", "message": "boom", "traceback": "Traceback ..."}})
            return httpx.Response(200, json={"ok": True, "stdout": f"{sid}\n", "stderr": "", "value": body["code"],
                                             "repr": repr(body["code"])})
        if op == "eval":
            return httpx.Response(200, json={"ok": True, "value": 2, "repr": "2", "type": "int"})
        if op == "exec":
            assert body["stream"] is True
            lines = [{"type": "start", "pid": 7}, {"type": "stdout", "data": "x" * 3000},
                     {"type": "stdout", "data": "y" * 2000}, {"type": "stderr", "data": "warn\n"},
                     {"type": "exit", "exit_code": 0, "timed_out": False, "duration_s": 0.5}]
            return httpx.Response(200, content="".join(json.dumps(x) + "\n" for x in lines).encode(),
                                  headers={"content-type": "application/x-ndjson"})
        return httpx.Response(404, json={"error": f"no route {req.method} {path}"})


class FakeBackend:
    mode = "daemon"
    url = "http://fake:1"

    def __init__(self, daemon: FakeDaemon | None = None, fail: str | None = None) -> None:
        self.daemon = daemon or FakeDaemon()
        self.fail = fail
        self.closed = False
        self._ctl = Controller(self.url, TOKEN, transport=httpx.MockTransport(self.daemon))

    def controller(self) -> Controller:
        if self.fail:
            raise BackendError(self.fail)
        return self._ctl

    def redact(self, text: str) -> str:
        return redact(text, TOKEN)

    def close(self) -> None:
        self.closed = True


def with_client(backend: FakeBackend, fn: Callable[[Client], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Client(build_server(backend)) as client:  # type: ignore[arg-type]
            await fn(client)

    anyio.run(main)


def structured(res: Any) -> Any:
    assert not res.is_error, res.content
    data = res.structured_content
    return data["result"] if set(data) == {"result"} else data


def text(res: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in res.content)


def test_every_tool_has_a_schema_and_a_description() -> None:
    async def check(c: Client) -> None:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        assert set(tools) == set(TOOL_NAMES)
        for t in tools.values():
            assert t.input_schema["type"] == "object" and len(t.description or "") > 40, t.name
        spawn = tools["spawn"].input_schema["properties"]
        assert spawn["n"]["minimum"] == 1 and spawn["n"]["maximum"] == 1000
        variants = tools["explore"].input_schema["properties"]["variants"]
        assert variants["minItems"] == 1 and variants["maxItems"] == 16
        assert tools["run_command"].input_schema["required"] == ["sandbox_id", "command"]
        assert tools["kill"].annotations.destructive_hint and tools["list_files"].annotations.read_only_hint

    backend = FakeBackend()
    with_client(backend, check)
    assert backend.closed  # the server's lifespan closes the backend


def test_daemon_errors_are_tool_errors_and_the_token_is_redacted() -> None:
    async def check(c: Client) -> None:
        res = await c.call_tool("eval", {"sandbox_id": "sb-missing", "expr": "1"})
        assert res.is_error and "HTTP 404: sandbox sb-missing not found" in text(res)
        assert TOKEN not in text(res) and "[REDACTED]" in text(res)
        res = await c.call_tool("spawn", {"tag": "py", "n": 0})
        assert res.is_error and "greater than or equal to 1" in text(res)
        res = await c.call_tool("write_file", {"sandbox_id": "sb-1", "path": "/x", "content": "!!", "base64": True})
        assert res.is_error and "not valid base64" in text(res)
        assert structured(await c.call_tool("eval", {"sandbox_id": "sb-1", "expr": "1 + 1"}))["value"] == 2

    with_client(FakeBackend(), check)


def test_an_unreachable_forkd_is_a_tool_error() -> None:
    async def check(c: Client) -> None:
        res = await c.call_tool("list_snapshots", {})
        assert res.is_error and "the local forkd daemon did not start: boom" in text(res)

    with_client(FakeBackend(fail="the local forkd daemon did not start: boom"), check)


def test_code_errors_are_results() -> None:
    async def check(c: Client) -> None:
        out = structured(await c.call_tool("run_code", {"sandbox_id": "sb-1", "code": "boom"}))
        assert not out["ok"] and out["error"]["type"] == "RuntimeError" and out["stdout"] == "before\n"

    with_client(FakeBackend(), check)


def test_command_output_is_cut_with_the_whole_size() -> None:
    async def check(c: Client) -> None:
        out = structured(await c.call_tool("run_command", {"sandbox_id": "sb-1", "command": "big",
                                                           "max_output_chars": 10}))
        assert out["stdout"] == "x" * 10 and out["stderr"] == "warn\n"
        assert out["note"] == "stdout [output cut: 10 of 5000 bytes shown]"

    daemon = FakeDaemon()
    with_client(FakeBackend(daemon), check)
    (body,) = [b for m, p, b in daemon.calls if p.endswith("/exec")]
    assert body["argv"] == ["/bin/sh", "-c", "big"] and body["stream"] is True


def test_spawn_reports_children_that_failed() -> None:
    async def check(c: Client) -> None:
        out = structured(await c.call_tool("spawn", {"tag": "half", "n": 3, "metadata": {"k": "v"}}))
        assert out["sandbox_ids"] == ["sb-c1", "sb-c2"] and len(out["errors"]) == 1 and "no room" in out["errors"][0]

    daemon = FakeDaemon()
    with_client(FakeBackend(daemon), check)
    (body,) = [b for m, p, b in daemon.calls if p == "/v1/sandboxes" and m == "POST"]
    assert body["lifetime_s"] == 3600 and body["metadata"] == {"k": "v"}


@pytest.mark.parametrize("keep", [None, 1])
def test_explore_forks_runs_each_variant_and_cleans_up(keep: int | None) -> None:
    async def check(c: Client) -> None:
        args: dict[str, Any] = {"sandbox_id": "sb-parent", "variants": [{"code": "a"}, {"code": "b"},
                                                                        {"command": ["ls"]}]}
        if keep is not None:
            args["keep"] = keep
        out = structured(await c.call_tool("explore", args))
        r = out["results"]
        assert [x["sandbox_id"] for x in r] == ["sb-c1", "sb-c2", "sb-c3"]
        assert [x["value"] for x in r[:2]] == ["a", "b"] and r[0]["stdout"] == "sb-c1\n"
        assert r[2]["kind"] == "command" and r[2]["ok"] and r[2]["stdout"] == "x" * 3000 + "y" * 1000
        assert r[2]["note"] == "stdout [output cut: 4000 of 5000 bytes shown]"
        assert out["branch_tag"] == "br-test"
        assert out["kept"] == (None if keep is None else "sb-c2")
        assert out["branch_deleted"] is (keep is None)

    daemon = FakeDaemon()
    with_client(FakeBackend(daemon), check)
    spawn = [b for m, p, b in daemon.calls if p == "/v1/sandboxes" and m == "POST"]
    assert spawn[0]["snapshot_tag"] == "br-test" and spawn[0]["n"] == 3
    assert spawn[0]["metadata"] == {"forkd-mcp/explore": "br-test"}
    assert ("POST", "/v1/sandboxes/sb-parent/branch") in [(m, p) for m, p, _ in daemon.calls]
    assert sorted(daemon.killed) == (["sb-c1", "sb-c2", "sb-c3"] if keep is None else ["sb-c1", "sb-c3"])
    assert daemon.deleted == (["br-test"] if keep is None else [])


def test_explore_checks_its_arguments_before_branching() -> None:
    async def check(c: Client) -> None:
        res = await c.call_tool("explore", {"sandbox_id": "sb-p", "variants": [{"code": "a"}], "keep": 1})
        assert res.is_error and "keep: must be the index of a variant (0..0)" in text(res)
        res = await c.call_tool("explore", {"sandbox_id": "sb-p", "variants": [{"code": "a"}] * 17})
        assert res.is_error and "at most 16" in text(res)
        res = await c.call_tool("explore", {"sandbox_id": "sb-p", "variants": [{}]})
        assert res.is_error and "exactly one of" in text(res)
        res = await c.call_tool("explore", {"sandbox_id": "sb-p", "variants": [{"command": " "}]})
        assert res.is_error and "the command is empty" in text(res)

    daemon = FakeDaemon()
    with_client(FakeBackend(daemon), check)
    assert daemon.calls == []


def test_http_checks() -> None:
    assert parse_bind("127.0.0.1:8765") == ("127.0.0.1", 8765) and parse_bind("[::1]:80") == ("::1", 80)
    for bad in ("8765", "host:", "host:0", ":80"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_bind(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    s = security_settings("127.0.0.1", 9000)
    assert s.enable_dns_rebinding_protection and "localhost:9000" in s.allowed_hosts
    assert "http://127.0.0.1:9000" in s.allowed_origins and not any("*" in h for h in s.allowed_hosts)
    assert security_settings("10.1.2.3", 9000).allowed_hosts == ["10.1.2.3:9000"]
    wide = security_settings("0.0.0.0", 9000, ("10.1.2.3:9000", "mcp.example"))
    assert wide.allowed_hosts == ["0.0.0.0:9000", "10.1.2.3:9000", "mcp.example"]
    assert "https://mcp.example" in (wide.allowed_origins or [])
    server = build_server(FakeBackend())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without --http-token-file"):
        http_app(server, "0.0.0.0", 9000, None)
    assert isinstance(http_app(server, "0.0.0.0", 9000, TOKEN), BearerToken)


def test_the_bearer_token_middleware() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        transport = httpx.ASGITransport(app=BearerToken(app, TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            assert (await c.get("/mcp")).status_code == 401
            assert (await c.get("/mcp", headers={"Authorization": "Bearer nope"})).status_code == 401
            assert (await c.get("/mcp", headers={"Authorization": f"Bearer {TOKEN}"})).text == "ok"

    anyio.run(main)
