"""The Connect protocol's JSON codec, as the e2b SDK speaks it (connectrpc over HTTP/1.1).

A streamed message is an envelope: one flags byte, a 4-byte big-endian length, then that many bytes
of JSON. The last envelope of a server stream has flag 0x02 (end of stream) and carries ``{}`` or
``{"error": {"code", "message"}}``. A unary call is plain JSON both ways; its error is an HTTP status
with ``{"code", "message"}`` (the code a string such as ``not_found``)."""

from __future__ import annotations

import json
import struct
from typing import Any

from starlette.responses import Response

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
HEADER = struct.Struct(">BI")
STREAM_CONTENT_TYPE = "application/connect+json"
UNARY_CONTENT_TYPE = "application/json"

#: Connect error code -> the HTTP status of a unary answer (connectrpc.com/docs/protocol)
HTTP_STATUS = {"canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
               "not_found": 404, "already_exists": 409, "permission_denied": 403, "resource_exhausted": 429,
               "failed_precondition": 400, "aborted": 409, "out_of_range": 400, "unimplemented": 501,
               "internal": 500, "unavailable": 503, "data_loss": 500, "unauthenticated": 401}


class ConnectError(Exception):
    """An error to answer in Connect's shape: ``code`` is one of HTTP_STATUS's keys."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        assert code in HTTP_STATUS, code
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def envelope(obj: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return HEADER.pack(flags, len(data)) + data


def end_stream(error: ConnectError | None = None) -> bytes:
    return envelope({} if error is None else {"error": error.body()}, FLAG_END_STREAM)


def parse_envelopes(body: bytes, max_messages: int = 16) -> list[dict[str, Any]]:
    """The JSON messages of a streamed request body (a client stream of one for server-stream calls)."""
    out: list[dict[str, Any]] = []
    off = 0
    while off < len(body):
        if len(body) - off < HEADER.size:
            raise ConnectError("invalid_argument", "truncated Connect envelope header")
        flags, n = HEADER.unpack_from(body, off)
        off += HEADER.size
        if n > len(body) - off:
            raise ConnectError("invalid_argument", "truncated Connect envelope")
        if flags & FLAG_COMPRESSED:
            raise ConnectError("unimplemented", "compressed Connect messages are not supported (send identity)")
        chunk = body[off:off + n]
        off += n
        if flags & FLAG_END_STREAM:
            break
        out.append(parse_json(chunk))
        if len(out) > max_messages:
            raise ConnectError("invalid_argument", f"more than {max_messages} messages in one request")
    return out


def parse_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConnectError("invalid_argument", f"the message is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConnectError("invalid_argument", "the message must be a JSON object")
    return obj


def unary(obj: dict[str, Any]) -> Response:
    return Response(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), media_type=UNARY_CONTENT_TYPE)


def unary_error(e: ConnectError) -> Response:
    return Response(json.dumps(e.body()), status_code=HTTP_STATUS[e.code], media_type=UNARY_CONTENT_TYPE)


def stream_error(e: ConnectError) -> Response:
    """A server stream that fails before its first message: status 200 and only the end of stream."""
    return Response(end_stream(e), media_type=STREAM_CONTENT_TYPE)
