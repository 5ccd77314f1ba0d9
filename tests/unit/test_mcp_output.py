"""forkd.mcp.output: output caps and their notes, file contents as text or base64 (no VM)."""

from __future__ import annotations

import base64

import pytest

from forkd.mcp.output import cap_text, cut_note, decode_upload, file_content, notes


def test_short_text_is_not_cut() -> None:
    c = cap_text("hello", 10)
    assert (c.text, c.note, c.cut) == ("hello", None, False)
    assert cap_text("hello", 5).note is None


def test_long_text_is_cut_with_a_note_in_bytes() -> None:
    c = cap_text("x" * 1000, 100)
    assert c.text == "x" * 100 and c.note == "[output cut: 100 of 1000 bytes shown]"
    c = cap_text("\u03c0" * 10, 4)  # two bytes each
    assert c.text == "\u03c0" * 4 and c.note == "[output cut: 8 of 20 bytes shown]"
    assert cap_text("abc", 0).note == "[output cut: 0 of 3 bytes shown]"


def test_a_size_counted_upstream_is_used() -> None:
    assert cap_text("abc", 10, total_bytes=5000).note == "[output cut: 3 of 5000 bytes shown]"
    assert cap_text("abc", 10, total_bytes=3).note is None
    assert cap_text("abc", 10, more=True).note == "[output cut: 3 of more than 3 bytes shown]"
    with pytest.raises(ValueError, match="max_output_chars"):
        cap_text("abc", -1)


def test_notes_name_the_streams_cut() -> None:
    out, err = cap_text("a" * 5, 2), cap_text("b", 2)
    assert notes(stdout=out, stderr=err) == "stdout [output cut: 2 of 5 bytes shown]"
    assert notes(stdout=err) is None
    assert cut_note(1, 2) == "[output cut: 1 of 2 bytes shown]"


def test_text_files_come_back_as_text() -> None:
    fc = file_content("h\u00e9llo\n".encode(), 100)
    assert (fc.content, fc.encoding, fc.size, fc.truncated, fc.note) == ("h\u00e9llo\n", "utf-8", 7, False, None)


def test_binary_files_and_asked_for_base64() -> None:
    blob = bytes(range(256))
    fc = file_content(blob, 1000)
    assert fc.encoding == "base64" and base64.b64decode(fc.content) == blob and not fc.truncated
    assert file_content(b"a\0b", 10).encoding == "base64"  # NUL: not text
    fc = file_content(b"text", 10, as_base64=True)
    assert fc.encoding == "base64" and base64.b64decode(fc.content) == b"text"


def test_a_cut_never_splits_a_character() -> None:
    data = ("ab" + "\u20ac" * 3).encode()  # the euro sign is 3 bytes
    fc = file_content(data, 4)  # a, b and 2 bytes of the first euro sign
    assert fc.encoding == "utf-8" and fc.content == "ab" and fc.truncated
    assert fc.note == f"[output cut: 2 of {len(data)} bytes shown]"
    fc = file_content(b"\xff\xfe" + b"a" * 20, 5)
    assert fc.encoding == "base64" and base64.b64decode(fc.content) == b"\xff\xfeaaa"
    assert fc.note == "[output cut: 5 of 22 bytes shown]"


def test_uploads() -> None:
    assert decode_upload("h\u00e9", False) == "h\u00e9".encode()
    assert decode_upload(base64.b64encode(b"\0\1").decode(), True) == b"\0\1"
    with pytest.raises(ValueError, match="base64"):
        decode_upload("not base64!", True)
    with pytest.raises(ValueError, match="base64"):
        decode_upload("\u00e9", True)
