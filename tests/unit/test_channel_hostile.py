"""AgentChannel and FileChunks against a hostile guest (a socketpair stands in for the virtio port)."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from forkd.engine import channel as channel_mod
from forkd.engine.channel import AgentChannel
from forkd.engine.child import FileChunks
from forkd.errors import AgentTimeoutError, ChannelClosedError, FileTooLargeError, ValidationError

MiB = 1 << 20


class Guest:
    """The guest end: reads our requests, writes whatever a test wants."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def request(self) -> dict[str, Any]:
        return dict(json.loads(self.file.readline()))

    def send(self, obj: Any) -> None:
        self.sendraw(json.dumps(obj).encode() + b"\n")

    def sendraw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, req: dict[str, Any], result: dict[str, Any] | None = None) -> None:
        self.send({"id": req["id"], "ok": True, "result": result or {}})

    def close(self) -> None:
        self.file.close()  # the socket's fd stays open while its file object does
        self.sock.close()


@pytest.fixture
def pair() -> Iterator[Callable[..., tuple[AgentChannel, Guest, list[str]]]]:
    """``pair(**channel_kwargs)`` -> (channel, guest, reasons given to on_violation)."""
    made: list[tuple[AgentChannel, socket.socket]] = []

    def make(**kw: Any) -> tuple[AgentChannel, Guest, list[str]]:
        host, guest = socket.socketpair()
        reasons: list[str] = []
        ch = AgentChannel(host, "test", lambda: "QEMU exit status 1", on_violation=reasons.append, **kw)
        made.append((ch, guest))
        return ch, Guest(guest), reasons

    yield make
    for ch, g in made:
        ch.close()
        g.close()


def closed_with(ch: AgentChannel, reasons: list[str], what: str) -> None:
    """The channel closed for the violation ``what``, and told its owner exactly once."""
    ch._thread.join(10)
    assert ch.closed and ch.violation == f"protocol violation: {what}"
    assert reasons == [ch.violation]
    with pytest.raises(ChannelClosedError, match="protocol violation"):
        ch.submit("ping")


def test_a_reply_to_an_id_never_asked_fails_pending_requests_and_calls_the_owner(pair: Any) -> None:
    ch, guest, reasons = pair()
    fut = ch.submit("eval", expr="1")
    guest.request()
    guest.send({"id": 123, "ok": True, "result": {}})
    with pytest.raises(ChannelClosedError, match="before the reply to eval: protocol violation: reply to id 123 "
                                                 "that was never asked"):
        ch.result("eval", fut, 10)
    closed_with(ch, reasons, "reply to id 123 that was never asked")


def test_one_ready_event_where_expected_and_no_second(pair: Any) -> None:
    ch, guest, reasons = pair(expect_ready=True)
    guest.send({"event": "ready", "pid": 1})
    assert ch.wait_ready(10) == {"event": "ready", "pid": 1}
    guest.send({"event": "ready", "pid": 1})
    closed_with(ch, reasons, "a second ready event (an agent announces itself once, at boot)")
    assert ch.ready_event == {"event": "ready", "pid": 1}


def test_a_ready_event_from_a_restored_agent_is_a_second_one(pair: Any) -> None:
    ch, guest, reasons = pair()  # restored children and adopted VMs expect none
    guest.send({"event": "ready"})
    closed_with(ch, reasons, "a second ready event (an agent announces itself once, at boot)")
    assert ch.wait_ready(0) is None


@pytest.mark.parametrize(("line", "what"), [
    (b"not json\n", "a line that is not JSON"),
    (b"\n", "a line that is not JSON"),
    (b"[1,2]\n", "a line that is not a JSON object (list)"),
    (b'{"event":"hello"}\n', "unknown event 'hello'"),
    (b'{"id":null,"ok":false}\n', "a reply without an integer id (id None)"),
    (b'{"id":true,"ok":true}\n', "a reply without an integer id (id True)"),
    (b'{"id":"7","ok":true}\n', "a reply without an integer id (id '7')"),
])
def test_lines_that_break_the_protocol(pair: Any, line: bytes, what: str) -> None:
    ch, guest, reasons = pair()
    guest.sendraw(line)
    closed_with(ch, reasons, what)


def test_a_reply_without_ok(pair: Any) -> None:
    ch, guest, reasons = pair()
    ch.submit("ping")
    rid = guest.request()["id"]
    guest.send({"id": rid, "result": {}})
    closed_with(ch, reasons, f"a reply to id {rid} without a boolean 'ok'")


def test_an_over_long_line(pair: Any) -> None:
    ch, guest, reasons = pair(max_line=1000)
    guest.sendraw(b"x" * 5000)  # no newline needed
    closed_with(ch, reasons, "a line longer than 1000 bytes")


def test_the_default_limit_holds_a_file_read_chunk_and_a_worst_case_exec() -> None:
    chunk = json.dumps({"id": 1, "ok": True, "result": {"data_b64": base64.b64encode(
        b"\xff" * channel_mod.READ_CHUNK).decode(), "size": 1 << 40, "eof": False}})
    out = "\0" * channel_mod.EXEC_OUTPUT_MAX + "\n[forkd: output truncated at 1048576 bytes]"
    exe = json.dumps({"id": 1, "ok": True, "result": {"stdout": out, "stderr": out, "exit_code": 0}})
    assert max(len(chunk), len(exe)) + 1 <= channel_mod.MAX_REPLY_LINE <= 16 * MiB


def test_a_late_reply_after_a_timeout_is_dropped_but_a_second_one_is_a_violation(pair: Any) -> None:
    ch, guest, reasons = pair()
    with pytest.raises(AgentTimeoutError):
        ch.call("exec", reply_timeout=0.05, argv=["sleep", "1"])
    late = guest.request()
    guest.reply(late)
    fut = ch.submit("ping")
    guest.reply(guest.request(), {"pong": True})
    assert ch.result("ping", fut, 10) == {"pong": True}
    assert not ch.closed and reasons == []
    guest.reply(late)
    closed_with(ch, reasons, f"reply to id {late['id']} that is not in flight")


def test_abandoned_ids_are_bounded_and_evicted_ones_stay_tolerated(pair: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_mod, "ABANDONED_MAX", 2)
    ch, guest, reasons = pair()
    asked = []
    for _ in range(5):
        with pytest.raises(AgentTimeoutError):
            ch.call("eval", reply_timeout=0.01, expr="1")
        asked.append(guest.request())
    assert len(ch._abandoned) == 2 and not ch._pending
    for req in asked:
        guest.reply(req)
    fut = ch.submit("ping")
    guest.reply(guest.request())
    assert ch.result("ping", fut, 10) == {}
    assert reasons == []


def test_an_adopted_channel_forgives_leftovers_of_the_previous_connection(pair: Any) -> None:
    ch, guest, reasons = pair(leftover_lines=3)
    guest.sendraw(b'tail of a line"}}\n{"id":42,"ok":true,"result":{}}\n{"id":43,"ok":true}\n')
    fut = ch.submit("ping")
    guest.reply(guest.request(), {"pong": 1})
    assert ch.result("ping", fut, 10) == {"pong": 1}
    guest.send({"id": 44, "ok": True})
    closed_with(ch, reasons, "reply to id 44 that was never asked")


def test_a_failing_owner_callback_still_closes_the_channel() -> None:
    host, guest = socket.socketpair()
    calls = []

    def boom(reason: str) -> None:
        calls.append(reason)
        raise RuntimeError("cannot kill")

    ch = AgentChannel(host, "test", on_violation=boom)
    fut = ch.submit("ping")
    guest.sendall(b"[]\n")
    with pytest.raises(ChannelClosedError, match="not a JSON object"):
        ch.result("ping", fut, 10)
    assert len(calls) == 1
    ch.close()
    guest.close()


def test_no_violation_when_the_peer_just_goes_away(pair: Any) -> None:
    ch, guest, reasons = pair()
    fut = ch.submit("ping")
    guest.request()
    guest.close()
    with pytest.raises(ChannelClosedError, match="the agent closed the channel.*exit status 1"):
        ch.result("ping", fut, 10)
    assert reasons == [] and ch.violation is None


def test_a_request_too_long_for_the_agent_is_refused_before_sending(pair: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_mod, "AGENT_MAX_REQUEST", 100)
    ch, _, _ = pair()
    with pytest.raises(ValidationError, match="at most 100"):
        ch.submit("run_code", code="x" * 200)
    assert not ch._pending and not ch.closed


# ---------------------------------------------------------------- file reads
class FakeFiles:
    """Answers file_read like the agent, for files described by ``size_of`` / ``data_at``."""

    def __init__(self, guest: Guest, size_of: Callable[[int], int], data_at: Callable[[int, int], bytes],
                 lie: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.guest, self.size_of, self.data_at, self.lie = guest, size_of, data_at, lie
        self.calls = 0
        self.sent = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                req = self.guest.request()
            except (ValueError, OSError):
                return
            self.calls += 1
            size, off, want = self.size_of(self.calls), req["offset"], req["length"]
            data = self.data_at(off, want)
            regular = size > 0 or not data
            result = {"data_b64": base64.b64encode(data).decode(), "size": size,
                      "eof": len(data) < want or (regular and off + len(data) >= size)}
            if self.lie is not None:
                result = self.lie(result)
            self.sent += len(data)
            try:
                self.guest.reply(req, result)
            except OSError:
                return


def regular(content: bytes) -> tuple[Callable[[int], int], Callable[[int, int], bytes]]:
    return (lambda _n: len(content)), (lambda off, n: content[off:off + n])


def zeros(_off: int, n: int) -> bytes:
    return b"\0" * n


def test_a_regular_file_in_chunks(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("forkd.engine.child.READ_CHUNK", 1000)
    ch, guest, _ = pair()
    content = bytes(range(256)) * 20
    FakeFiles(guest, *regular(content))
    chunks = FileChunks(ch, "/f", max_bytes=len(content), timeout=10)
    assert chunks.size == len(content)
    parts = list(chunks)
    assert b"".join(parts) == content and max(map(len, parts)) == 1000


def test_an_empty_file(pair: Any) -> None:
    ch, guest, _ = pair()
    FakeFiles(guest, *regular(b""))
    chunks = FileChunks(ch, "/f", max_bytes=0, timeout=10)
    assert chunks.size == 0 and list(chunks) == []


def test_a_regular_file_over_the_limit_fails_at_once(pair: Any) -> None:
    ch, guest, _ = pair()
    fake = FakeFiles(guest, lambda _n: 1 << 40, zeros)  # a sparse 1 TiB file
    with pytest.raises(FileTooLargeError, match="is 1099511627776 bytes, more than the limit of 1000"):
        FileChunks(ch, "/sparse", max_bytes=1000, timeout=10)
    assert fake.calls == 1 and fake.sent == 1001


def test_dev_zero_is_read_to_the_limit_then_refused(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("forkd.engine.child.READ_CHUNK", 1000)
    ch, guest, _ = pair()
    fake = FakeFiles(guest, lambda _n: 0, zeros)
    chunks = FileChunks(ch, "/dev/zero", max_bytes=5500, timeout=10)
    assert chunks.size is None
    with pytest.raises(FileTooLargeError, match="gave more than 5500 bytes"):
        list(chunks)
    assert fake.sent == 5501
    assert list(chunks) == []  # and it stays finished


def test_a_growing_file_stops_at_its_first_size(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("forkd.engine.child.READ_CHUNK", 1000)
    ch, guest, _ = pair()
    FakeFiles(guest, lambda n: 2500 + 1000 * n, zeros)  # bigger at every call
    assert sum(map(len, FileChunks(ch, "/log", max_bytes=10_000, timeout=10))) == 3500


def test_a_device_that_ends_is_read_whole(pair: Any) -> None:
    ch, guest, _ = pair()
    FakeFiles(guest, lambda _n: 0, lambda off, n: b"cpuinfo\n"[off:off + n])  # like /proc files
    assert b"".join(FileChunks(ch, "/proc/cpuinfo", max_bytes=100, timeout=10)) == b"cpuinfo\n"


@pytest.mark.parametrize(("lie", "what"), [
    (lambda r: {**r, "data_b64": base64.b64encode(b"x" * 2000).decode()}, "2000 bytes of file data for a read of"),
    (lambda r: {**r, "data_b64": "***"}, "whose data is not base64"),
    (lambda r: {**r, "size": -1}, "without data_b64, size and eof"),
    (lambda r: {**r, "eof": "yes"}, "without data_b64, size and eof"),
])
def test_a_lying_file_read_reply_is_a_violation(pair: Any, lie: Any, what: str) -> None:
    ch, guest, reasons = pair()
    FakeFiles(guest, *regular(b"abc"), lie=lie)
    with pytest.raises(ChannelClosedError, match=what):
        FileChunks(ch, "/f", max_bytes=1000, timeout=10)
    assert len(reasons) == 1 and what in reasons[0]


# ---------------------------------------------------------------- raw frames (output reads)

def test_a_raw_frame_follows_its_line_even_split_across_writes(pair: Any) -> None:
    ch, guest, reasons = pair()
    fut = ch.submit("proc_read", pid=1, raw=True)
    req = guest.request()
    data = bytes(range(256)) * 3 + b"\n{not json\n"
    line = json.dumps({"id": req["id"], "ok": True, "result": {"stdout_len": len(data)}, "raw": len(data)})
    wire = line.encode() + b"\n" + data
    for i in range(0, len(wire), 97):
        guest.sendraw(wire[i:i + 97])
    got = ch.result("proc_read", fut, 10)
    assert got[channel_mod.RAW] == data and got["stdout_len"] == len(data)
    fut = ch.submit("ping")
    guest.reply(guest.request(), {"pong": True})
    assert ch.result("ping", fut, 10) == {"pong": True} and reasons == []


def test_raw_bytes_nobody_asked_for_are_a_violation(pair: Any) -> None:
    ch, guest, reasons = pair()
    fut = ch.submit("ping")
    req = guest.request()
    guest.send({"id": req["id"], "ok": True, "result": {}, "raw": 4})
    with pytest.raises(ChannelClosedError, match="not asked for"):
        ch.result("ping", fut, 10)
    closed_with(ch, reasons, f"a reply to id {req['id']} announcing 4 raw bytes that it was not asked for")


@pytest.mark.parametrize("n", [channel_mod.RAW_MAX + 1, -1, "12", True])
def test_a_raw_frame_too_large_or_malformed_is_a_violation(pair: Any, n: Any) -> None:
    ch, guest, reasons = pair()
    fut = ch.submit("proc_read", pid=1, raw=True)
    req = guest.request()
    guest.send({"id": req["id"], "ok": True, "result": {}, "raw": n})
    with pytest.raises(ChannelClosedError, match="raw bytes"):
        ch.result("proc_read", fut, 10)
    assert ch.violation is not None and "raw bytes" in ch.violation and len(reasons) == 1


def test_a_raw_result_key_sent_as_json_is_not_taken_for_bytes(pair: Any) -> None:
    ch, guest, _ = pair()
    fut = ch.submit("proc_read", pid=1, raw=True)
    guest.reply(guest.request(), {channel_mod.RAW: "AAAA", "stdout_len": 3})
    assert channel_mod.RAW not in ch.result("proc_read", fut, 10)


def test_the_raw_frame_of_a_late_reply_is_skipped(pair: Any) -> None:
    ch, guest, reasons = pair()
    with pytest.raises(AgentTimeoutError):
        ch.call("proc_read", reply_timeout=0.05, pid=1, raw=True)
    late = guest.request()
    guest.sendraw(json.dumps({"id": late["id"], "ok": True, "result": {}, "raw": 5}).encode() + b"\n" + b'{"x"\n')
    fut = ch.submit("ping")
    guest.reply(guest.request(), {"pong": True})
    assert ch.result("ping", fut, 10) == {"pong": True} and reasons == []


def test_a_guest_that_goes_away_inside_a_raw_frame_fails_the_read(pair: Any) -> None:
    ch, guest, reasons = pair()
    fut = ch.submit("proc_read", pid=1, raw=True)
    req = guest.request()
    guest.sendraw(json.dumps({"id": req["id"], "ok": True, "result": {}, "raw": 100}).encode() + b"\nshort")
    guest.close()
    with pytest.raises(ChannelClosedError):
        ch.result("proc_read", fut, 10)
    assert reasons == []


def test_an_adopted_channel_skips_the_raw_frame_of_a_leftover_reply(pair: Any) -> None:
    ch, guest, reasons = pair(leftover_lines=3)
    frame = b"\n".join(b"not json" for _ in range(50)) + b"\n"
    guest.sendraw(json.dumps({"id": 999_999, "ok": True, "result": {}, "raw": len(frame)}).encode() + b"\n" + frame)
    fut = ch.submit("ping")
    guest.reply(guest.request(), {"pong": True})
    assert ch.result("ping", fut, 10) == {"pong": True} and reasons == []
