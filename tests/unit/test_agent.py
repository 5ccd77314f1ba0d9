"""The guest agent, driven over pipes (``agent.py --stdio``) exactly as the host drives it over virtio."""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

AGENT = Path(__file__).resolve().parents[2] / "src" / "forkd" / "guest" / "agent.py"
# The interpreter that runs the agent; e.g. FORKD_AGENT_PYTHON="/usr/bin/python3.11 -S -E" (the guest's way).
AGENT_PYTHON = shlex.split(os.environ.get("FORKD_AGENT_PYTHON", "")) or [sys.executable]
TIMEOUT = 60.0  # per reply: the test machine is slow and shared
ALL_BYTES = bytes(range(256))


class AgentClient:
    """A pipe client for one agent process: send requests, receive reply lines."""

    def __init__(self) -> None:
        env = {**os.environ, "FORKD_AGENT_TEST": "1"}
        self.proc = subprocess.Popen(
            [*AGENT_PYTHON, str(AGENT), "--stdio"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self._ids = itertools.count(1)
        self.stash: dict[Any, dict[str, Any]] = {}
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.recv()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "raw" in msg:  # a raw frame follows the line (requests with raw=true)
                msg["raw_bytes"] = self.proc.stdout.read(msg["raw"])
            self._inbox.put(msg)
        self._inbox.put(None)

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, op: str, **args: Any) -> int:
        rid = next(self._ids)
        self.send_raw(json.dumps({"id": rid, "op": op, **args}).encode() + b"\n")
        return rid

    def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = self._inbox.get(timeout=timeout)
        assert msg is not None, "agent closed its stdout"
        return msg

    def reply_to(self, rid: int) -> dict[str, Any]:
        """The reply to ``rid``; replies to other requests that come first are kept for their turn."""
        while rid not in self.stash:
            msg = self.recv()
            self.stash[msg["id"]] = msg
        return self.stash.pop(rid)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its reply (requests are not overlapped here)."""
        rid = self.send(op, **args)
        reply = self.recv()
        assert reply["id"] == rid
        return reply

    def ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.call(op, **args)
        assert reply["ok"], reply
        return reply["result"]

    def err(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.call(op, **args)
        assert not reply["ok"], reply
        return reply["error"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def agent() -> Iterator[AgentClient]:
    client = AgentClient()
    yield client
    client.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------- basics

def test_ready_line(agent: AgentClient) -> None:
    ready = agent.ready
    assert ready["event"] == "ready"
    assert ready["agent_version"] == "3"
    assert ready["pid"] == agent.proc.pid
    assert re.fullmatch(r"3\.\d+\.\d+", ready["python"])
    assert ready["numpy"] is None or isinstance(ready["numpy"], str)


def test_ping(agent: AgentClient) -> None:
    r = agent.ok("ping")
    assert r["agent_version"] == "3"
    assert r["pid"] == agent.proc.pid
    assert isinstance(r["uptime_s"], float) and r["uptime_s"] >= 0
    assert abs(r["time"] - time.time()) < 600
    assert r["numpy"] == agent.ready["numpy"]


def test_string_ids_are_echoed(agent: AgentClient) -> None:
    agent.send_raw(b'{"id": "abc", "op": "ping"}\n')
    reply = agent.recv()
    assert reply["id"] == "abc" and reply["ok"]


# ---------------------------------------------------------------- eval / run_code

def test_eval_values(agent: AgentClient) -> None:
    assert agent.ok("eval", expr="1 + 2") == {"repr": "3", "value": 3, "type": "int"}
    assert agent.ok("eval", expr="'ab' * 2") == {"repr": "'abab'", "value": "abab", "type": "str"}
    assert agent.ok("eval", expr="{'a': [1, None]}")["value"] == {"a": [1, None]}
    r = agent.ok("eval", expr="object()")
    assert r["value"] is None and r["repr"].startswith("<object object") and r["type"] == "object"
    r = agent.ok("eval", expr="float('nan')")
    assert r["value"] is None and r["repr"] == "nan"


def test_eval_warm_modules(agent: AgentClient) -> None:
    assert agent.ok("eval", expr="json.dumps([math.floor(2.5)])")["value"] == "[2]"
    assert agent.ok("eval", expr="hashlib.sha256(b'').hexdigest()[:8]")["value"] == "e3b0c442"
    if agent.ready["numpy"] is not None:
        assert agent.ok("eval", expr="np.arange(3).tolist()")["value"] == [0, 1, 2]
        assert agent.ok("eval", expr="numpy is np")["value"] is True


def test_eval_error(agent: AgentClient) -> None:
    e = agent.err("eval", expr="1 / 0")
    assert e["type"] == "ZeroDivisionError"
    assert e["message"] == "division by zero"
    assert "ZeroDivisionError" in e["traceback"]
    assert agent.err("eval", expr="x = 1")["type"] == "SyntaxError"


def test_run_code_state_persists(agent: AgentClient) -> None:
    r = agent.ok("run_code", code="x = 41\ndef inc(v):\n    return v + 1\n")
    assert r == {"stdout": "", "stderr": "", "repr": None, "value": None}
    assert agent.ok("eval", expr="inc(x)")["value"] == 42
    r = agent.ok("run_code", code="x = inc(x)\nx")
    assert r["repr"] == "42" and r["value"] == 42
    assert agent.ok("eval", expr="x")["value"] == 42


def test_run_code_captures_output(agent: AgentClient) -> None:
    r = agent.ok("run_code", code="import sys\nprint('out')\nprint('err', file=sys.stderr)\n[1, 'a']")
    assert r["stdout"] == "out\n"
    assert r["stderr"] == "err\n"
    assert r["repr"] == "[1, 'a']" and r["value"] == [1, "a"]


def test_run_code_last_expression(agent: AgentClient) -> None:
    assert agent.ok("run_code", code="y = 3")["repr"] is None
    assert agent.ok("run_code", code="y = 3\ny * 2")["value"] == 6
    assert agent.ok("run_code", code="if True:\n    y = 5\n")["repr"] is None
    r = agent.ok("run_code", code="{1, 2}")
    assert r["repr"] == "{1, 2}" and r["value"] is None


def test_run_code_exception(agent: AgentClient) -> None:
    e = agent.err("run_code", code="print('before')\ndef f():\n    return 1 / 0\nf()\nprint('after')")
    assert e["type"] == "ZeroDivisionError"
    assert e["stdout"] == "before\n"
    assert e["stderr"] == ""
    assert "line 3, in f" in e["traceback"] and "return 1 / 0" in e["traceback"]
    assert "agent.py" not in e["traceback"]
    assert agent.ok("eval", expr="callable(f)")["value"] is True  # statements before the error ran
    e = agent.err("run_code", code="def (")
    assert e["type"] == "SyntaxError"
    e = agent.err("run_code", code="raise SystemExit(3)")
    assert e["type"] == "SystemExit"
    assert agent.ok("ping")["pid"] == agent.proc.pid  # still alive


# ---------------------------------------------------------------- exec

def test_exec_basics(agent: AgentClient, tmp_path: Path) -> None:
    r = agent.ok("exec", argv=["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert r["exit_code"] == 7
    assert r["stdout"] == "out\n" and r["stderr"] == "err\n"
    assert r["timed_out"] is False
    assert r["stdout_truncated"] is False and r["stderr_truncated"] is False
    assert isinstance(r["duration_s"], float)
    r = agent.ok("exec", argv=["sh", "-c", "echo $FORKD_T1-$FORKD_AGENT_TEST"], env={"FORKD_T1": "v1"})
    assert r["stdout"] == "v1-1\n"  # merged over the agent's environment
    r = agent.ok("exec", argv=["pwd"], cwd=str(tmp_path))
    assert r["stdout"].strip() == os.path.realpath(tmp_path)
    r = agent.ok("exec", argv=["sh", "-c", "kill -TERM $$"])
    assert r["exit_code"] == -15


def test_exec_stdin(agent: AgentClient) -> None:
    assert agent.ok("exec", argv=["cat"], stdin="héllo\n")["stdout"] == "héllo\n"
    code = "import sys; d = sys.stdin.buffer.read(); print(len(d), d == bytes(range(256)))"
    r = agent.ok("exec", argv=[sys.executable, "-c", code], stdin_b64=b64(ALL_BYTES))
    assert r["stdout"] == "256 True\n"
    big = "0123456789abcdef" * 65536  # 1 MiB both ways: stdin is fed while stdout is drained
    r = agent.ok("exec", argv=["cat"], stdin=big, max_output=2 * len(big))
    assert r["stdout"] == big
    assert agent.ok("exec", argv=["cat"])["stdout"] == ""  # no stdin: /dev/null, not the protocol pipe


def test_exec_timeout_kills_process_group(agent: AgentClient) -> None:
    r = agent.ok("exec", argv=["sh", "-c", "sleep 60 & echo $!; wait"], timeout=1)
    assert r["timed_out"] is True
    assert r["exit_code"] == -9
    child = int(r["stdout"].split()[0])
    for _ in range(100):  # the background sleep shares the group and must be gone (or a zombie)
        try:
            state = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("background process survived the timeout")


def test_exec_output_truncation(agent: AgentClient) -> None:
    code = "import sys; sys.stdout.write('x' * 200000); sys.stderr.write('e' * 10)"
    r = agent.ok("exec", argv=[sys.executable, "-c", code], max_output=1000)
    marker = "\n[forkd: output truncated at 1000 bytes]"
    assert r["stdout_truncated"] is True and r["stderr_truncated"] is False
    assert r["stdout"] == "x" * 1000 + marker
    assert r["stderr"] == "e" * 10
    assert r["exit_code"] == 0  # the pipe was drained, the writer was not blocked


def test_exec_invalid_utf8_is_replaced(agent: AgentClient) -> None:
    r = agent.ok("exec", argv=["printf", "a\\377b"])
    assert r["stdout"] == "a\ufffdb"


def test_exec_missing_program(agent: AgentClient, tmp_path: Path) -> None:
    e = agent.err("exec", argv=["/nonexistent/forkd-program"])
    assert e["type"] == "FileNotFoundError"
    assert agent.err("exec", argv=["true"], cwd=str(tmp_path / "missing"))["type"] == "FileNotFoundError"


# ---------------------------------------------------------------- files

def test_file_round_trip_binary(agent: AgentClient, tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "dir" / "data.bin")
    data = ALL_BYTES * 4
    assert agent.ok("file_write", path=path, data_b64=b64(data))["bytes_written"] == len(data)
    assert Path(path).read_bytes() == data
    r = agent.ok("file_read", path=path)
    assert base64.b64decode(r["data_b64"]) == data and r["size"] == len(data) and r["eof"] is True
    r = agent.ok("file_read", path=path, offset=250, length=10)
    assert base64.b64decode(r["data_b64"]) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    assert r["eof"] is False
    r = agent.ok("file_read", path=path, offset=len(data) - 2, length=10)
    assert base64.b64decode(r["data_b64"]) == b"\xfe\xff" and r["eof"] is True
    agent.ok("file_write", path=path, data_b64=b64(b"tail"), append=True)
    assert Path(path).read_bytes() == data + b"tail"
    agent.ok("file_write", path=path, data_b64=b64(b"new"), mode=0o600)
    assert Path(path).read_bytes() == b"new"
    assert agent.ok("file_stat", path=path)["entry"]["mode"] == 0o600
    assert [p.name for p in Path(path).parent.iterdir()] == ["data.bin"]  # no temp files left behind


def test_file_list_and_stat(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"hello")
    (tmp_path / "a").mkdir()
    (tmp_path / "c").symlink_to("b.txt")
    entries = agent.ok("file_list", path=str(tmp_path))["entries"]
    assert [(e["name"], e["type"]) for e in entries] == [("a", "dir"), ("b.txt", "file"), ("c", "symlink")]
    b = entries[1]
    assert b["path"] == str(tmp_path / "b.txt") and b["size"] == 5
    assert abs(b["mtime"] - (tmp_path / "b.txt").stat().st_mtime) < 1e-3
    assert b["mode"] == (tmp_path / "b.txt").stat().st_mode & 0o7777
    entry = agent.ok("file_stat", path=str(tmp_path / "a"))["entry"]
    assert entry["name"] == "a" and entry["type"] == "dir"


def test_file_mkdir_and_remove(agent: AgentClient, tmp_path: Path) -> None:
    deep = tmp_path / "x" / "y" / "z"
    assert agent.ok("file_mkdir", path=str(deep)) == {}
    assert deep.is_dir()
    agent.ok("file_mkdir", path=str(deep))  # exist_ok by default
    assert agent.err("file_mkdir", path=str(deep), exist_ok=False)["type"] == "FileExistsError"
    e = agent.err("file_mkdir", path=str(tmp_path / "p" / "q"), parents=False)
    assert e["type"] == "FileNotFoundError"
    (deep / "f").write_bytes(b"1")
    assert agent.err("file_remove", path=str(tmp_path / "x"))["type"] == "OSError"  # not empty
    agent.ok("file_remove", path=str(deep / "f"))
    assert not (deep / "f").exists()
    agent.ok("file_remove", path=str(deep))  # empty directory
    assert not deep.exists()
    (tmp_path / "x" / "y" / "g").write_bytes(b"2")
    agent.ok("file_remove", path=str(tmp_path / "x"), recursive=True)
    assert not (tmp_path / "x").exists()


def test_file_errors(agent: AgentClient, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    for op in ("file_read", "file_stat", "file_list", "file_remove"):
        e = agent.err(op, path=missing)
        assert e["type"] == "FileNotFoundError", (op, e)
        assert "missing" in e["message"]
    assert agent.err("file_read", path=str(tmp_path))["type"] == "IsADirectoryError"
    (tmp_path / "f").write_bytes(b"")
    assert agent.err("file_list", path=str(tmp_path / "f"))["type"] == "NotADirectoryError"
    e = agent.err("file_write", path=str(tmp_path / "no" / "f"), data_b64="", make_parents=False)
    assert e["type"] == "FileNotFoundError"
    assert agent.err("file_write", path=missing, data_b64="!!")["type"] == "BadRequest"


# ---------------------------------------------------------------- fresh

def test_fresh_reseeds_python_random() -> None:
    a, b = AgentClient(), AgentClient()
    try:
        for c in (a, b):
            c.ok("run_code", code="random.seed(1)")
        same = [c.ok("eval", expr="random.random()")["value"] for c in (a, b)]
        assert same[0] == same[1]  # control: identical state gives identical streams
        results = []
        for c in (a, b):
            c.ok("run_code", code="random.seed(1)")
            results.append(c.ok("fresh", time=time.time(), entropy_b64=b64(os.urandom(32))))
        after = [c.ok("eval", expr="random.random()")["value"] for c in (a, b)]
        assert after[0] != after[1]
        for r in results:
            assert r["clock_set"] is False and r["rng_reseeded"] is False  # FORKD_AGENT_TEST=1
            assert r["numpy_reseeded"] is (a.ready["numpy"] is not None)
            assert isinstance(r["time"], float) and r["warnings"] == []
    finally:
        a.close()
        b.close()


def test_fresh_bad_arguments(agent: AgentClient) -> None:
    e = agent.err("fresh", time=1.0, entropy_b64=b64(b"short"))
    assert e["type"] == "BadRequest" and "entropy_b64" in e["message"]
    e = agent.err("fresh", entropy_b64=b64(os.urandom(32)))
    assert e["type"] == "BadRequest" and "time" in e["message"]


# ---------------------------------------------------------------- malformed requests

@pytest.mark.parametrize(
    ("line", "rid", "etype", "words"),
    [
        (b"this is not json", None, "BadRequest", "JSON"),
        (b"[1, 2, 3]", None, "BadRequest", "object"),
        (b'{"op": "ping"}', None, "BadRequest", "id"),
        (b'{"id": [1], "op": "ping"}', None, "BadRequest", "id"),
        (b'{"id": 5}', 5, "BadRequest", "op"),
        (b'{"id": 6, "op": 7}', 6, "BadRequest", "op"),
        (b'{"id": 7, "op": "reboot"}', 7, "UnknownOp", "reboot"),
        (b'{"id": 8, "op": "eval", "expr": 5}', 8, "BadRequest", "expr"),
        (b'{"id": 9, "op": "eval"}', 9, "BadRequest", "expr"),
        (b'{"id": 10, "op": "exec", "argv": "ls"}', 10, "BadRequest", "argv"),
        (b'{"id": 11, "op": "exec", "argv": []}', 11, "BadRequest", "argv"),
        (b'{"id": 12, "op": "exec", "argv": ["true"], "timeout": "5"}', 12, "BadRequest", "timeout"),
        (b'{"id": 13, "op": "exec", "argv": ["true"], "env": {"A": 1}}', 13, "BadRequest", "env"),
        (b'{"id": 14, "op": "file_read", "path": "/", "offset": "x"}', 14, "BadRequest", "offset"),
        (b'{"id": 15, "op": "file_read", "path": "/", "offset": -1}', 15, "BadRequest", "offset"),
        (b'{"id": 16, "op": "file_write", "path": 3, "data_b64": ""}', 16, "BadRequest", "path"),
        (b'{"id": 17, "op": "file_remove", "path": "/x", "recursive": 1}', 17, "BadRequest", "recursive"),
        (b'{"id": 18, "op": "run_code", "code": null}', 18, "BadRequest", "code"),
        (b"\xff\xfe{}", None, "BadRequest", "JSON"),
    ],
)
def test_malformed_requests(agent: AgentClient, line: bytes, rid: Any, etype: str, words: str) -> None:
    agent.send_raw(line + b"\n")
    reply = agent.recv()
    assert reply["id"] == rid
    assert reply["ok"] is False
    assert reply["error"]["type"] == etype
    assert words in reply["error"]["message"]
    assert agent.ok("ping")["pid"] == agent.proc.pid  # keeps serving


def test_blank_lines_are_ignored(agent: AgentClient) -> None:
    agent.send_raw(b"\n  \n")
    assert agent.ok("ping")["agent_version"] == "3"


# ---------------------------------------------------------------- concurrency

def test_pipelined_requests(agent: AgentClient, tmp_path: Path) -> None:
    requests = [
        {"id": "slow", "op": "exec", "argv": ["sleep", "1"]},
        {"id": 1, "op": "ping"},
        {"id": 2, "op": "eval", "expr": "6 * 7"},
        {"id": 3, "op": "file_stat", "path": str(tmp_path)},
        {"id": 4, "op": "run_code", "code": "print('hi')"},
    ]
    agent.send_raw(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    replies = [agent.recv() for _ in requests]
    assert all(r["ok"] for r in replies), replies
    assert sorted(map(str, (r["id"] for r in replies))) == ["1", "2", "3", "4", "slow"]
    assert replies[-1]["id"] == "slow"
    by_id = {r["id"]: r["result"] for r in replies}
    assert by_id[2]["value"] == 42
    assert by_id[4]["stdout"] == "hi\n"
    assert by_id["slow"]["exit_code"] == 0


def test_replies_in_flight_are_sent_before_exit_on_eof() -> None:
    client = AgentClient()
    client.send("exec", argv=["sleep", "0.5"])
    assert client.proc.stdin is not None
    client.proc.stdin.close()
    reply = client.recv()
    assert reply["ok"] and reply["result"]["exit_code"] == 0
    assert client.proc.wait(timeout=TIMEOUT) == 0
    client.close()


def test_the_agents_longest_reply_fits_the_hosts_line_limit() -> None:
    from forkd.engine.channel import MAX_REPLY_LINE
    from forkd.guest import agent

    assert agent.MAX_REPLY < MAX_REPLY_LINE


# ---------------------------------------------------------------- interrupt

def _replies(agent: AgentClient, *ids: int) -> dict[int, dict[str, Any]]:
    got: dict[int, dict[str, Any]] = {}
    while set(ids) - set(got):
        msg = agent.recv()
        got[msg["id"]] = msg
    return got


def test_interrupt_stops_a_busy_loop_and_the_namespace_answers_again(agent: AgentClient) -> None:
    agent.ok("run_code", code="counter = 0")
    run = agent.send("run_code", code="while True:\n    counter += 1", run="loop-1")
    time.sleep(0.5)
    stop = agent.send("interrupt", run="loop-1", grace=10)
    got = _replies(agent, run, stop)
    assert got[stop]["result"] == {"found": 1, "stopped": 1, "stuck": 0}
    assert not got[run]["ok"] and got[run]["error"]["type"] == "KeyboardInterrupt"
    assert agent.ok("eval", expr="counter > 0")["value"] is True
    assert agent.ok("interrupt", grace=0) == {"found": 0, "stopped": 0, "stuck": 0}  # nothing runs
    other = agent.send("eval", expr="sum(range(10))", run="someone-else")
    assert _replies(agent, other)[other]["result"]["value"] == 45


def test_code_that_will_not_stop_is_reported_and_the_sandbox_goes_on() -> None:
    client = AgentClient()
    try:
        # blocked in C (sleep) and, separately, catching the interrupt: neither stops
        sleeper = client.send("eval", expr="__import__('time').sleep(600)", run="sleep")
        time.sleep(0.3)
        stop = client.send("interrupt", run="sleep", grace=0.5)
        assert _replies(client, stop)[stop]["result"] == {"found": 1, "stopped": 0, "stuck": 1}
        assert client.ok("eval", expr="2 + 2")["value"] == 4  # a new lock: not queued behind the sleeper
        stubborn = client.send("run_code", code="while True:\n    try:\n        x = sum(range(1000))\n"
                                                "    except KeyboardInterrupt:\n        pass", run="stubborn")
        time.sleep(0.3)
        stop = client.send("interrupt", run="stubborn", grace=0.5)
        assert _replies(client, stop)[stop]["result"]["stuck"] == 1
        assert client.ok("eval", expr="'still here'")["value"] == "still here"
        assert sleeper and stubborn
    finally:
        client.proc.kill()
        client.proc.wait()


# ---------------------------------------------------------------- processes

def _read_all(agent: AgentClient, pid: int) -> tuple[bytes, bytes, dict[str, Any]]:
    out, err = b"", b""
    while True:
        r = agent.ok("proc_read", pid=pid, wait=10)
        out += base64.b64decode(r["stdout_b64"])
        err += base64.b64decode(r["stderr_b64"])
        if r["exited"]:
            return out, err, r


def test_process_output_arrives_before_it_ends(agent: AgentClient) -> None:
    started = agent.ok("proc_start", argv=["sh", "-c", "echo first; sleep 2; echo second >&2; exit 4"])
    t0 = time.monotonic()
    first = agent.ok("proc_read", pid=started["pid"], wait=10)
    assert base64.b64decode(first["stdout_b64"]) == b"first\n" and not first["exited"]
    assert time.monotonic() - t0 < 1.5  # not after the sleep
    out, err, last = _read_all(agent, started["pid"])
    assert (out, err, last["exit_code"], last["timed_out"]) == (b"", b"second\n", 4, False)
    assert agent.err("proc_read", pid=started["pid"])["type"] == "ProcessLookupError"  # read out: forgotten


def test_background_process_stdin_list_and_kill(agent: AgentClient) -> None:
    cat = agent.ok("proc_start", argv=["cat"], stdin_open=True)
    assert cat["running"] and cat["pid"] in [p["pid"] for p in agent.ok("proc_list")["processes"]]
    assert agent.ok("proc_write", pid=cat["pid"], data_b64=b64(ALL_BYTES))["written"] == 256
    got = b""
    while len(got) < 256:
        got += base64.b64decode(agent.ok("proc_read", pid=cat["pid"], wait=10)["stdout_b64"])
    assert got == ALL_BYTES
    agent.ok("proc_write", pid=cat["pid"], eof=True)
    assert _read_all(agent, cat["pid"])[2]["exit_code"] == 0
    sleeper = agent.ok("proc_start", argv=["sleep", "600"])
    assert agent.ok("proc_kill", pid=sleeper["pid"], signal="TERM")["signalled"] is True
    assert _read_all(agent, sleeper["pid"])[2]["exit_code"] == -15
    assert agent.err("proc_kill", pid=sleeper["pid"], signal="STOP")["type"] in ("BadRequest", "ProcessLookupError")


def test_process_output_is_bounded_and_the_writer_waits(agent: AgentClient) -> None:
    # 8 MiB of output, nobody reading: the agent keeps at most 1 MiB per stream and the writer blocks
    big = agent.ok("proc_start", argv=["sh", "-c", "head -c 8388608 /dev/zero; echo done >&2"])
    time.sleep(1.5)
    assert [p for p in agent.ok("proc_list")["processes"] if p["pid"] == big["pid"]][0]["running"]
    out, err, last = _read_all(agent, big["pid"])
    assert len(out) == 8 << 20 and err == b"done\n" and last["exit_code"] == 0


def test_process_timeout_kills_the_group(agent: AgentClient) -> None:
    p = agent.ok("proc_start", argv=["sh", "-c", "sleep 600 & sleep 600"], timeout=1)
    _, _, last = _read_all(agent, p["pid"])
    assert last["timed_out"] is True and last["exit_code"] == -9


def test_a_raw_output_read_carries_the_bytes_after_the_line(agent: AgentClient) -> None:
    started = agent.ok("proc_start", argv=["sh", "-c", "cat; printf err >&2"], stdin_b64=b64(ALL_BYTES * 4))
    out = err = b""
    while True:
        reply = agent.call("proc_read", pid=started["pid"], wait=10, raw=True)
        r, data = reply["result"], reply["raw_bytes"]
        assert "stdout_b64" not in r and reply["raw"] == len(data) == r["stdout_len"] + r["stderr_len"]
        out, err = out + data[:r["stdout_len"]], err + data[r["stdout_len"]:]
        if r["exited"]:
            break
    assert (out, err, r["exit_code"]) == (ALL_BYTES * 4, b"err", 0)
    assert agent.ok("ping")["agent_version"] == "3"  # the stream goes on after the frames


def _cell_reads(agent: AgentClient, run: str) -> Iterator[tuple[float, bytes, bytes, bool]]:
    while True:
        reply = agent.reply_to(agent.send("run_read", run=run, wait=10, raw=True))
        assert reply["ok"], reply
        r, data = reply["result"], reply["raw_bytes"]
        yield time.monotonic(), data[:r["stdout_len"]], data[r["stdout_len"]:], r["done"]
        if r["done"]:
            return


def test_a_streamed_run_code_gives_its_output_as_it_is_written(agent: AgentClient) -> None:
    rid = agent.send("run_code", run="cell-1", stream=True,
                     code="import sys\nprint('first')\ntime.sleep(2)\nprint('é' * 3, file=sys.stderr)\n41 + 1")
    reads = list(_cell_reads(agent, "cell-1"))
    reply = agent.reply_to(rid)
    assert reply["id"] == rid and reply["ok"], reply
    assert reply["result"]["stdout"] == "" and reply["result"]["value"] == 42  # the output was streamed
    assert reads[0][1] == b"first\n" and not reads[0][3]  # before the sleep ended: the cell still runs
    assert b"".join(r[2] for r in reads) == "ééé\n".encode()
    assert agent.err("run_read", run="cell-1", wait=0)["type"] == "LookupError"  # read out: forgotten


def test_a_streamed_run_code_that_raises_keeps_its_output_for_the_reader(agent: AgentClient) -> None:
    rid = agent.send("run_code", run="cell-2", stream=True, code="print('before')\n1/0")
    out = b"".join(r[1] for r in _cell_reads(agent, "cell-2"))
    reply = agent.reply_to(rid)
    assert reply["id"] == rid and not reply["ok"] and reply["error"]["type"] == "ZeroDivisionError"
    assert out == b"before\n"


def test_a_streamed_run_code_blocked_on_a_full_stream_can_be_interrupted(agent: AgentClient) -> None:
    # nobody reads: the cell's stdout fills (1 MiB) and print waits, interruptibly
    rid = agent.send("run_code", run="cell-3", stream=True, code="while True:\n    print('x' * 65536)")
    time.sleep(2)
    stop = agent.send("interrupt", run="cell-3", grace=10)
    replies = _replies(agent, stop, rid)
    assert replies[stop]["result"]["stopped"] == 1
    assert replies[rid]["error"]["type"] == "KeyboardInterrupt"
    kept = sum(len(r[1]) for r in _cell_reads(agent, "cell-3"))
    assert 0 < kept <= 1024 * 1024 + 65537
    assert agent.ok("eval", expr="'next'")["value"] == "next"


def test_run_read_of_an_unknown_run_and_a_reused_token(agent: AgentClient) -> None:
    assert agent.err("run_read", run="never", wait=0.2)["type"] == "LookupError"
    rid = agent.send("run_code", run="dup", stream=True, code="time.sleep(3)")
    time.sleep(0.3)
    assert agent.reply_to(agent.send("run_code", run="dup", stream=True, code="1"))["error"]["type"] == "BadRequest"
    list(_cell_reads(agent, "dup"))
    assert agent.reply_to(rid)["ok"]


def test_the_agent_stops_code_past_its_own_deadline(agent: AgentClient) -> None:
    # the host that would interrupt it went away: deadline_s is the agent's own backstop
    reply = agent.call("run_code", run="gone-host", code="while True:\n    pass", deadline_s=1.0)
    assert not reply["ok"] and reply["error"]["type"] == "KeyboardInterrupt"
    assert agent.ok("eval", expr="1 + 1")["value"] == 2


def test_an_interrupt_reaches_code_still_waiting_for_the_namespace(agent: AgentClient) -> None:
    first = agent.send("run_code", run="holder", code="time.sleep(3)")
    time.sleep(0.5)
    queued = agent.send("run_code", run="queued", code="queued_ran = True")
    time.sleep(0.5)
    stop = agent.send("interrupt", run="queued", grace=10)
    replies = _replies(agent, first, queued, stop)
    assert replies[stop]["result"]["found"] == 1 and replies[stop]["result"]["stopped"] == 1
    assert replies[queued]["error"]["type"] == "KeyboardInterrupt" and replies[first]["ok"]
    assert agent.err("eval", expr="queued_ran")["type"] == "NameError"  # it never ran
