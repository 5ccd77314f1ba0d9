"""LineReader against a hostile peer: long lines, many small writes, no rescanning, a bounded buffer."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator

import pytest

from forkd.engine.channel import MAX_REPLY_LINE
from forkd.engine.jsonlines import RECV_SIZE, LineReader, LineTooLong

MiB = 1 << 20


class Feed:
    """A socket stand-in that hands out the given chunks, then EOF, and records the reader's buffer."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks: Iterator[bytes] = iter(chunks)
        self.reader: LineReader | None = None
        self.received = 0
        self.max_buffer = 0

    def recv(self, n: int) -> bytes:
        if self.reader is not None:
            self.max_buffer = max(self.max_buffer, len(self.reader.buf))
        chunk = next(self.chunks, b"")
        assert len(chunk) <= n
        self.received += len(chunk)
        return chunk


def reader_over(chunks: Iterable[bytes], max_line: int, recv_size: int = RECV_SIZE) -> tuple[LineReader, Feed]:
    feed = Feed(chunks)
    reader = LineReader(feed, max_line=max_line, recv_size=recv_size)
    feed.reader = reader
    return reader, feed


def test_a_64_mib_line_is_refused_without_rescanning_or_buffering_it() -> None:
    block = b"x" * MiB

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield block
        yield b'\n{"id":1}\n'

    reader, feed = reader_over(chunks(), MAX_REPLY_LINE)
    with pytest.raises(LineTooLong):
        reader.readline()
    assert feed.received <= MAX_REPLY_LINE + 2 * MiB  # refused as soon as the limit was passed
    assert reader.readline() == b'{"id":1}\n'  # the rest of the long line was skipped
    assert reader.readline() == b""
    assert feed.received == 64 * MiB + 10
    assert reader.scanned <= feed.received  # every byte searched for a newline at most once
    assert feed.max_buffer <= MAX_REPLY_LINE + MiB


def test_a_long_legitimate_line_in_small_pieces_is_scanned_once() -> None:
    line = b'{"data":"' + b"A" * (11 * MiB) + b'"}\n'
    pieces = [line[i:i + 4096] for i in range(0, len(line), 4096)]
    reader, feed = reader_over(pieces, MAX_REPLY_LINE)
    assert reader.readline() == line
    assert reader.scanned == len(line) == feed.received


def test_lines_split_and_joined_across_receives() -> None:
    reader, _ = reader_over([b'{"a":1}\n{"b"', b':2}\n\n{"c":3}', b"\n", b"tail-without-newline"], 100)
    assert [reader.readline() for _ in range(4)] == [b'{"a":1}\n', b'{"b":2}\n', b"\n", b'{"c":3}\n']
    assert reader.readline() == b""  # the unterminated tail is dropped at EOF
    assert reader.readline() == b""


def test_the_limit_counts_the_newline() -> None:
    reader, _ = reader_over([b"a" * 9 + b"\n", b"b" * 10 + b"\n", b"c\n"], 10)
    assert reader.readline() == b"a" * 9 + b"\n"
    with pytest.raises(LineTooLong):
        reader.readline()
    assert reader.readline() == b"c\n"


def test_many_long_lines_in_a_row_each_raise_once() -> None:
    reader, _ = reader_over([b"x" * 50 + b"\n" + b"y" * 50 + b"\nok\n"], 20, recv_size=1000)
    for _ in range(2):
        with pytest.raises(LineTooLong):
            reader.readline()
    assert reader.readline() == b"ok\n"


def test_over_a_real_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        reader = LineReader(b, max_line=100)
        a.sendall(b'{"x":1}\n' + b"y" * 300 + b"\nz")
        assert reader.readline() == b'{"x":1}\n'
        with pytest.raises(LineTooLong):
            reader.readline()
        a.shutdown(socket.SHUT_WR)
        assert reader.readline() == b""


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        LineReader(Feed([]), max_line=0)
