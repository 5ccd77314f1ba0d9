"""Reading newline-delimited JSON from a socket with a bound on line length (the peer may be hostile).

The reader never scans a byte twice (it remembers how far the buffer was searched for a newline) and
never holds more than one line limit plus one receive of data, however the peer splits its writes.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

MAX_LINE = 64 << 20
RECV_SIZE = 1 << 20


class LineTooLong(ValueError):
    pass


class Receiver(Protocol):
    """What the reader needs of a socket."""

    def recv(self, bufsize: int, /) -> bytes: ...


class LineReader:
    """Buffered line reader over a socket; ``readline()`` returns b"" at EOF.

    ``scanned`` counts the bytes searched for a newline so far (each received byte once).
    """

    def __init__(self, sock: Receiver, max_line: int = MAX_LINE, recv_size: int = RECV_SIZE) -> None:
        if max_line < 1 or recv_size < 1:
            raise ValueError("max_line and recv_size must be positive")
        self.sock = sock
        self.buf = bytearray()
        self.max_line = max_line
        self.recv_size = recv_size
        self.eof = False
        self.scanned = 0
        self._scan = 0  # buf[:_scan] holds no newline
        self._skipping = False

    def readline(self) -> bytes:
        """The next line including its newline; b"" at EOF. LineTooLong for an over-long line, whose
        remaining bytes are then skipped up to the next newline."""
        while True:
            i = self._find_newline()
            if i >= 0:
                line = self._take(i + 1)
                if self._skipping:
                    self._skipping = False
                    continue
                if len(line) > self.max_line:
                    raise self._too_long()
                return line
            if self.eof:
                self._discard()  # an unterminated last line is dropped
                return b""
            if len(self.buf) > self.max_line:
                self._discard()
                if not self._skipping:
                    self._skipping = True
                    raise self._too_long()
            self._fill()

    def read_exact(self, n: int) -> bytes:
        """The next ``n`` bytes (a binary frame after a line); EOFError if the stream ends first."""
        while len(self.buf) < n:
            if self.eof:
                raise EOFError(f"the stream ended {n - len(self.buf)} bytes short of a {n}-byte frame")
            self._fill()
        return self._take(n)

    def _find_newline(self) -> int:
        """Index of the first newline in the buffer, or -1; only the bytes not searched before are."""
        i = self.buf.find(b"\n", self._scan)
        end = len(self.buf) if i < 0 else i + 1
        self.scanned += end - self._scan
        self._scan = end if i < 0 else 0
        return i

    def _take(self, n: int) -> bytes:
        if n == len(self.buf):  # the usual case: a fresh buffer gives a long line's memory back now
            line, self.buf = bytes(self.buf), bytearray()
        else:
            with memoryview(self.buf) as view:
                line = bytes(view[:n])  # one copy (a slice of the bytearray would be a second one)
            del self.buf[:n]  # CPython moves the start of a bytearray: no copy of the rest
        self._scan = 0
        return line

    def _discard(self) -> None:
        self.buf.clear()
        self._scan = 0

    def _fill(self) -> None:
        chunk = self.sock.recv(self.recv_size)
        if not chunk:
            self.eof = True
        self.buf += chunk

    def _too_long(self) -> LineTooLong:
        return LineTooLong(f"line longer than {self.max_line} bytes")


def encode(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()
