"""Reading newline-delimited JSON from a socket with a bound on line length (the peer may be hostile)."""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_LINE = 64 << 20


class LineTooLong(ValueError):
    pass


class LineReader:
    """Buffered line reader over a socket; ``readline()`` returns b"" at EOF."""

    def __init__(self, sock: socket.socket, max_line: int = MAX_LINE) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.max_line = max_line
        self.eof = False
        self._skipping = False

    def readline(self) -> bytes:
        """The next line including its newline; b"" at EOF. LineTooLong for an over-long line, whose
        remaining bytes are then skipped up to the next newline."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                if self._skipping:
                    self._skipping = False
                    continue
                if len(line) > self.max_line:
                    raise LineTooLong(f"line longer than {self.max_line} bytes")
                return line
            if self.eof:
                self.buf.clear()  # an unterminated last line is dropped
                return b""
            if len(self.buf) > self.max_line:
                self.buf.clear()
                if not self._skipping:
                    self._skipping = True
                    raise LineTooLong(f"line longer than {self.max_line} bytes")
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                self.eof = True
            self.buf += chunk


def encode(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()
