"""Bearer-token authentication. The token is a root credential: checked in constant time, never logged."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import stat
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from forkd.errors import ValidationError

MIN_TOKEN_BYTES = 16
PLACEHOLDER_PREFIXES = ("REPLACE_ME", "CHANGE_ME")
PUBLIC_PATHS = frozenset({"/healthz", "/healthz/"})  # exact: no case folding, no decoding


def load_token(path: Path) -> bytes:
    """Read and validate the token file; ValidationError says exactly what is wrong and how to fix it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValidationError(f"--token-file {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ValidationError(f"--token-file {path}: not a regular file")
    if st.st_mode & 0o077:
        raise ValidationError(f"--token-file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read it; "
                              f"run: chmod 600 {path}")
    token = path.read_bytes().strip()
    if not token:
        raise ValidationError(f"--token-file {path}: the file is empty")
    if token.startswith(tuple(p.encode() for p in PLACEHOLDER_PREFIXES)):
        raise ValidationError(f"--token-file {path}: the token is still a placeholder "
                              f"({'/'.join(PLACEHOLDER_PREFIXES)}...); generate one with: "
                              "head -c 32 /dev/urandom | base64")
    if len(token) < MIN_TOKEN_BYTES:
        raise ValidationError(f"--token-file {path}: the token is {len(token)} bytes; at least "
                              f"{MIN_TOKEN_BYTES} are required")
    return token


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_matches(given: bytes, token: bytes) -> bool:
    return hmac.compare_digest(given, token)


class BearerAuth:
    """ASGI middleware: every request but /healthz needs ``Authorization: Bearer <token>``.

    A refusal is cheap and constant: the body is never read, the headers are scanned once without being
    copied, the token is compared in constant time, and the 401 is built from bytes made once."""

    def __init__(self, app: ASGIApp, token: bytes | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                header = v
                break
        if not header:
            await _deny(send, "missing bearer token")
            return
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token_matches(value.strip(), self.token):
            await _deny(send, "invalid bearer token")
            return
        await self.app(scope, receive, send)


def _denial(message: str) -> tuple[bytes, tuple[tuple[bytes, bytes], ...]]:
    body = json.dumps({"error": message}).encode()
    return body, ((b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                  (b"www-authenticate", b'Bearer realm="forkd"'))


_DENIALS = {m: _denial(m) for m in ("missing bearer token", "invalid bearer token")}


async def _deny(send: Send, message: str) -> None:
    body, headers = _DENIALS[message]
    # fresh message dicts and header list: a middleware may add to them, and must not add to a shared one
    await send({"type": "http.response.start", "status": 401, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})
