"""The MCP server (``python -m forkd.mcp``) driven by the ``mcp`` client library over stdio and streamable
HTTP, against the session's real daemon, and in local-engine mode (a private daemon it starts itself)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from forkd.mcp.tools import TOOL_NAMES

pytestmark = pytest.mark.vm

NOT_PASSED = ("FORKD_URL", "FORKD_TOKEN", "FORKD_TOKEN_FILE")


def server_env(**extra: str) -> dict[str, str]:
    """What the server needs of this process's environment (the mcp client passes only a safe subset):
    the FORKD_* settings the fixtures made (FORKD_HOME, image root, ...), but no daemon unless given."""
    env = {k: v for k, v in os.environ.items()
           if (k.startswith("FORKD_") and k not in NOT_PASSED) or k in ("PATH", "HOME", "PYTHONPATH")}
    env.update(extra)
    return env


def run(session_fn: Callable[[ClientSession], Awaitable[None]], env: dict[str, str],
        args: tuple[str, ...] = ()) -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "forkd.mcp", *args], env=env)

    async def main() -> None:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            await session_fn(session)

    anyio.run(main)


async def call(session: ClientSession, name: str, **arguments: Any) -> Any:
    """The tool's structured result (asserting it is not an error)."""
    res = await session.call_tool(name, arguments)
    assert not res.is_error, (name, res.content)
    assert res.structured_content is not None, (name, res.content)
    data = res.structured_content
    return data["result"] if set(data) == {"result"} else data


def text_of(res: CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in res.content)


def test_mcp_over_stdio_against_the_daemon(daemon: Any, snapshot: str) -> None:
    daemon_message = httpx.post(f"{daemon.url}/v1/sandboxes/sb-nosuchsandbox/eval", json={"expr": "1"},
                                headers=daemon.headers, timeout=30).json()["error"]

    async def scenario(s: ClientSession) -> None:
        tools = (await s.list_tools()).tools
        assert {t.name for t in tools} == set(TOOL_NAMES)
        for t in tools:
            assert t.description and len(t.description) > 40, t.name
            assert t.input_schema.get("type") == "object", t.name
        by_name = {t.name: t for t in tools}
        assert "seconds" in (by_name["run_command"].description or "")
        assert by_name["explore"].input_schema["properties"]["variants"]["maxItems"] == 16

        info = await call(s, "info")
        assert info["mode"] == "daemon" and info["url"] == daemon.url
        assert daemon.token not in json.dumps(info)
        assert snapshot in [x["tag"] for x in await call(s, "list_snapshots")]

        spawned = await call(s, "spawn", tag=snapshot, n=1, lifetime_s=900, metadata={"suite": "mcp"})
        (sid,) = spawned["sandbox_ids"]
        try:
            listed = await call(s, "list_sandboxes", metadata={"suite": "mcp"})
            assert [x["id"] for x in listed] == [sid] and listed[0]["expires_at"]

            # Python state persists between calls; an exception is a result, not a tool error
            assert (await call(s, "run_code", sandbox_id=sid, code="x = 41\nprint('set')"))["stdout"] == "set\n"
            out = await call(s, "run_code", sandbox_id=sid, code="x + 1")
            assert out["ok"] and out["value"] == 42
            assert (await call(s, "eval", sandbox_id=sid, expr="x * 2"))["value"] == 82
            bad = await call(s, "run_code", sandbox_id=sid, code="1 / 0")
            assert not bad["ok"] and bad["error"]["type"] == "ZeroDivisionError"

            # command output over the cap is cut, with a note giving the sizes
            full = "".join(f"{i}\n" for i in range(1, 5001))
            cmd = await call(s, "run_command", sandbox_id=sid, command="seq 1 5000", max_output_chars=100)
            assert cmd["exit_code"] == 0 and cmd["stdout"] == full[:100]
            assert cmd["note"] == f"stdout [output cut: 100 of {len(full)} bytes shown]"
            argv = await call(s, "run_command", sandbox_id=sid,
                              command=["/bin/sh", "-c", "echo hi; echo e >&2; exit 3"])
            assert (argv["exit_code"], argv["stdout"], argv["stderr"], argv["note"]) == (3, "hi\n", "e\n", None)

            # files: text and binary
            assert (await call(s, "write_file", sandbox_id=sid, path="/tmp/mcp/hello.txt",
                               content="hello \u03c0\n"))["bytes_written"] == 9
            got = await call(s, "read_file", sandbox_id=sid, path="/tmp/mcp/hello.txt")
            assert (got["content"], got["encoding"], got["size"]) == ("hello \u03c0\n", "utf-8", 9)
            blob = bytes(range(256))
            await call(s, "write_file", sandbox_id=sid, path="/tmp/mcp/blob.bin",
                       content=base64.b64encode(blob).decode(), base64=True)
            got = await call(s, "read_file", sandbox_id=sid, path="/tmp/mcp/blob.bin")
            assert got["encoding"] == "base64" and base64.b64decode(got["content"]) == blob
            cut = await call(s, "read_file", sandbox_id=sid, path="/tmp/mcp/blob.bin", max_bytes=10)
            assert cut["truncated"] and base64.b64decode(cut["content"]) == blob[:10]
            listing = await call(s, "list_files", sandbox_id=sid, path="/tmp/mcp")
            assert [e["name"] for e in listing["entries"]] == ["blob.bin", "hello.txt"]

            # explore: each child starts from the parent's current state and runs its own variant
            await call(s, "run_code", sandbox_id=sid,
                       code="base = 100\nopen('/tmp/state.txt', 'w').write('parent')")
            ex = await call(s, "explore", sandbox_id=sid, keep=1, variants=[
                {"code": "base + 1"},
                {"code": "y = base * 2\nprint(y)"},
                {"command": "cat /tmp/state.txt; printf ':child2'"},
            ])
            r = ex["results"]
            assert [x["index"] for x in r] == [0, 1, 2] and all(x["ok"] for x in r), r
            assert r[0]["value"] == 101
            assert r[1]["stdout"] == "200\n"
            assert r[2]["stdout"] == "parent:child2" and r[2]["exit_code"] == 0
            ids = [x["sandbox_id"] for x in r]
            assert len(set(ids)) == 3 and sid not in ids
            assert ex["kept"] == ids[1] and r[1]["kept"] and not ex["branch_deleted"]
            # the kept child has its variant's effects, the others are gone, the parent is untouched
            assert (await call(s, "eval", sandbox_id=ids[1], expr="y"))["value"] == 200
            live = {x["id"] for x in await call(s, "list_sandboxes") if x["status"] == "running"}
            assert ids[1] in live and ids[0] not in live and ids[2] not in live
            parent = await call(s, "eval", sandbox_id=sid, expr="(base, 'y' in globals())")
            assert parent["value"] == [100, False]
            await call(s, "kill", sandbox_ids=[ids[1]])
            assert (await call(s, "delete_snapshot", tag=ex["branch_tag"]))["deleted"] == ex["branch_tag"]

            # nothing kept: every child is killed and the branch snapshot deleted
            ex = await call(s, "explore", sandbox_id=sid, variants=[{"code": "base - 1"}, {"command": ["false"]}])
            assert [x["ok"] for x in ex["results"]] == [True, False] and ex["results"][0]["value"] == 99
            assert ex["results"][1]["exit_code"] == 1
            assert ex["kept"] is None and ex["branch_deleted"]
            assert ex["branch_tag"] not in [x["tag"] for x in await call(s, "list_snapshots")]
            live = {x["id"] for x in await call(s, "list_sandboxes") if x["status"] == "running"}
            assert not live & {x["sandbox_id"] for x in ex["results"]}

            # bad arguments are tool errors with the daemon's (or the schema's) message; the server goes on
            res = await s.call_tool("eval", {"sandbox_id": "sb-nosuchsandbox", "expr": "1"})
            assert res.is_error and daemon_message in text_of(res), (daemon_message, text_of(res))
            res = await s.call_tool("spawn", {"tag": snapshot, "n": 0})
            assert res.is_error and "greater than or equal to 1" in text_of(res)
            res = await s.call_tool("spawn", {"tag": "no-such-snapshot"})
            assert res.is_error and "no-such-snapshot" in text_of(res)
            res = await s.call_tool("explore", {"sandbox_id": sid, "variants": [{"code": "1", "command": "ls"}]})
            assert res.is_error and "exactly one of" in text_of(res)
            res = await s.call_tool("explore", {"sandbox_id": sid, "variants": [{"code": "1"}], "keep": 3})
            assert res.is_error and "keep" in text_of(res)
            assert (await call(s, "eval", sandbox_id=sid, expr="base"))["value"] == 100
        finally:
            killed = await call(s, "kill", sandbox_ids=[sid])
        assert killed["killed"] == [sid]
        assert sid not in {x["id"] for x in await call(s, "list_sandboxes") if x["status"] == "running"}

    run(scenario, server_env(FORKD_URL=daemon.url, FORKD_TOKEN=daemon.token))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_mcp_over_streamable_http(daemon: Any, tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "mcp.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "forkd.mcp", "--transport", "http", "--bind", f"127.0.0.1:{port}"],
                            env=server_env(FORKD_URL=daemon.url, FORKD_TOKEN=daemon.token), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "mcp.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MCP server did not listen"
                time.sleep(0.2)

        # DNS-rebinding protection: a foreign Host or Origin is refused before any MCP handling
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        hdrs = {"Accept": "application/json, text/event-stream"}
        assert httpx.post(url, json=init, headers={**hdrs, "Host": "evil.example"}).status_code == 421
        assert httpx.post(url, json=init, headers={**hdrs, "Origin": "http://evil.example"}).status_code == 403

        async def main() -> None:
            async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                tools = (await session.list_tools()).tools
                assert {t.name for t in tools} == set(TOOL_NAMES)
                info = await session.call_tool("info", {})
                assert not info.is_error and info.structured_content["mode"] == "daemon"

        anyio.run(main)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def processes_mentioning(text: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
    return found


def test_mcp_local_engine_starts_and_stops_its_own_daemon(engine: Any, snapshot: str) -> None:
    seen: dict[str, str] = {}

    async def scenario(s: ClientSession) -> None:
        info = await call(s, "info")
        assert info["mode"] == "local" and info["url"].startswith("unix:")
        seen["url"] = info["url"]
        d = Path(info["url"][len("unix:"):]).parent
        assert d.stat().st_mode & 0o777 == 0o700 and (d / "token").stat().st_mode & 0o777 == 0o600
        assert snapshot in [x["tag"] for x in await call(s, "list_snapshots")]
        (sid,) = (await call(s, "spawn", tag=snapshot))["sandbox_ids"]
        assert (await call(s, "eval", sandbox_id=sid, expr="numpy.zeros(3).tolist()"))["value"] == [0, 0, 0]
        seen["left_running"] = (await call(s, "spawn", tag=snapshot))["sandbox_ids"][0]  # the keeper kills it
        assert (await call(s, "kill", sandbox_ids=[sid]))["killed"] == [sid]
        assert processes_mentioning(str(d)), "no private daemon found"

    env = server_env(FORKD_SNAPSHOT_ROOT=str(engine.store.root))
    run(scenario, env)
    d = Path(seen["url"][len("unix:"):]).parent
    deadline = time.monotonic() + 120
    while d.exists() or processes_mentioning(str(d)):
        assert time.monotonic() < deadline, f"the private daemon is still there: {processes_mentioning(str(d))}"
        time.sleep(0.5)


def test_mcp_local_engine_is_cleaned_up_after_a_sigkill(engine: Any, snapshot: str) -> None:
    """The keeper notices the server's death (its stdin pipe ends) and kills the sandboxes and the daemon."""
    seen: dict[str, Path] = {}
    killed: list[int] = []

    async def scenario(s: ClientSession) -> None:
        (sid,) = (await call(s, "spawn", tag=snapshot))["sandbox_ids"]
        assert (await call(s, "eval", sandbox_id=sid, expr="1 + 1"))["value"] == 2
        d = seen["dir"] = Path((await call(s, "info"))["url"][len("unix:"):]).parent
        (keeper,) = [pid for pid in processes_mentioning(str(d)) if b"forkd.mcp.keeper" in
                     Path(f"/proc/{pid}/cmdline").read_bytes()]
        status = Path(f"/proc/{keeper}/status").read_text()
        server_pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        os.kill(server_pid, signal.SIGKILL)
        killed.append(server_pid)
        deadline = time.monotonic() + 120
        while d.exists() or processes_mentioning(str(d)):
            assert time.monotonic() < deadline, f"still there after the server died: {processes_mentioning(str(d))}"
            await anyio.sleep(0.5)

    try:
        run(scenario, server_env(FORKD_SNAPSHOT_ROOT=str(engine.store.root)))
    except AssertionError:
        raise
    except Exception:  # the client may report the dead server on its way out
        if not killed:
            raise
    assert not seen["dir"].exists()
