"""What the MCP tools hand back to an agent, bounded: text cut to a size with a note that says so, and
file contents as text or, when they are not UTF-8, as base64. No I/O here (tests/unit/test_mcp_output.py)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

DEFAULT_MAX_OUTPUT_CHARS = 20_000
"""Characters of stdout (and of stderr) a tool returns unless asked otherwise."""
MAX_OUTPUT_CHARS = 1 << 20
"""The most a tool returns per stream (the daemon keeps at most 1 MiB per stream of a command)."""
DEFAULT_MAX_FILE_BYTES = 200_000
"""Bytes of a file ``read_file`` returns unless asked otherwise."""
MAX_FILE_BYTES = 16 << 20


def cut_note(shown: int, total: int, more: bool = False) -> str:
    """``[output cut: N of M bytes shown]`` (``more``: M is a lower bound, the daemon dropped the rest)."""
    return f"[output cut: {shown} of {'more than ' if more else ''}{total} bytes shown]"


@dataclass(frozen=True)
class Capped:
    """Text kept within a limit: ``text`` as shown, ``note`` when some was cut (else None)."""

    text: str
    note: str | None = None

    @property
    def cut(self) -> bool:
        return self.note is not None


def cap_text(text: str, max_chars: int, total_bytes: int | None = None, more: bool = False) -> Capped:
    """``text`` cut to ``max_chars`` characters, with a note giving the UTF-8 bytes shown and in all.

    ``total_bytes`` is the size of the whole output when ``text`` is already a cut of it (counted while
    it streamed); ``more`` says that even ``text`` was cut upstream (the size in all is unknown).
    """
    if max_chars < 0:
        raise ValueError(f"max_output_chars: must be >= 0, got {max_chars}")
    shown = text[:max_chars]
    total = len(text.encode("utf-8", "surrogatepass")) if total_bytes is None else total_bytes
    shown_bytes = len(shown.encode("utf-8", "surrogatepass"))
    if shown_bytes >= total and not more:
        return Capped(shown)
    return Capped(shown, cut_note(shown_bytes, max(total, shown_bytes), more))


def notes(**streams: Capped) -> str | None:
    """One line naming each stream that was cut (``stdout [output cut: ...]; stderr ...``), or None."""
    parts = [f"{name} {c.note}" for name, c in streams.items() if c.note]
    return "; ".join(parts) if parts else None


@dataclass(frozen=True)
class FileContent:
    """A file's bytes for an agent: ``content`` is text (``encoding="utf-8"``) or base64."""

    content: str
    encoding: str
    size: int
    """The file's size in bytes."""
    truncated: bool
    note: str | None


def file_content(data: bytes, max_bytes: int, as_base64: bool = False) -> FileContent:
    """The first ``max_bytes`` of ``data`` as UTF-8 text, or as base64 when asked or when it is not text
    (invalid UTF-8 or a NUL byte). A cut never splits a UTF-8 character."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes: must be >= 0, got {max_bytes}")
    head = data[:max_bytes]
    cut = len(head) < len(data)
    note = cut_note(len(head), len(data)) if cut else None
    if not as_base64 and b"\0" not in head:
        text = _utf8_prefix(head, cut)
        if text is not None:
            if cut:
                note = cut_note(len(text.encode()), len(data))
            return FileContent(text, "utf-8", len(data), cut, note)
    return FileContent(base64.b64encode(head).decode("ascii"), "base64", len(data), cut, note)


def _utf8_prefix(head: bytes, cut: bool) -> str | None:
    """``head`` decoded; when it was cut from a longer file, up to 3 trailing bytes of a character split
    by the cut are dropped. None if it is not UTF-8."""
    for drop in range(4 if cut else 1):
        try:
            return head[:len(head) - drop].decode("utf-8")
        except UnicodeDecodeError as e:
            if not cut or e.start < len(head) - 3:
                return None
    return None


def decode_upload(content: str, is_base64: bool) -> bytes:
    """What ``write_file`` writes: ``content`` UTF-8 encoded, or base64-decoded (ValueError if invalid)."""
    if not is_base64:
        return content.encode("utf-8")
    try:
        return base64.b64decode(content.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"content: not valid base64 ({e})") from None
