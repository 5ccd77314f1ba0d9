"""``POST /v1/snapshots/pull``: fetch a pack from an HTTP(S) URL into the store's scratch area, then
verify and register it as an unpack does.

The daemon fetching a URL it is given is shaped like SSRF; the caller already holds the root token, and
the fetch is still bounded: http and https only, at most MAX_REDIRECTS redirects (http(s) only, never
from https down to http), the size the disk can take (free space less 1 GiB, as an upload; counted
as the bytes arrive, whatever Content-Length says), a deadline for the whole download (every socket
operation gets at most the time left: a source trickling bytes cannot hold the pack slot past it), the
body taken as sent (``Accept-Encoding: identity``; nothing decompressed in memory), an error answer
read only in part, no proxies from the environment, and the token (the peer's) sent only to the URL's
own origin (scheme, host, port) and never again once a redirect left it, never logged nor quoted in an
error. URLs with credentials, whitespace or control characters in them, or longer than 4096
characters, are refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from forkd import __version__
from forkd.errors import FileTooLargeError, ForkdError, ValidationError

log = logging.getLogger("forkd.controller")

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 30.0
CHUNK = 1 << 20
#: the longest URL taken (the request's ``url`` and every redirect's Location)
MAX_URL_CHARS = 4096
#: bytes of an error answer read (the start of its text goes into the error message)
MAX_ERROR_BODY = 4096
DEFAULT_PORTS = {"http": 80, "https": 443}


class SourceError(ForkdError):
    """The pack's URL could not be fetched (unreachable, an error status, too slow): 502."""


@dataclass(frozen=True)
class Fetched:
    source: str
    bytes: int
    sha256: str


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    scheme = p.scheme.lower()
    return scheme, (p.hostname or "").lower(), p.port if p.port is not None else DEFAULT_PORTS.get(scheme)


def display(url: str) -> str:
    """``url`` without credentials, query or fragment (what may be logged and answered)."""
    p = urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{p.port}" if p.port is not None else ""
    return f"{p.scheme}://{host}{port}{p.path}"


def check_url(url: str, field: str = "url") -> str:
    """``url`` if it is an absolute http(s) URL without credentials; ValidationError naming ``field``."""
    if len(url) > MAX_URL_CHARS:
        raise ValidationError(f"{field}: longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValidationError(f"{field}: whitespace or control characters in the URL; percent-encode them")
    try:
        p = urlsplit(url)
        p.port  # noqa: B018 - a bad port raises here
    except ValueError as e:
        raise ValidationError(f"{field}: not a valid URL: {e}") from None
    if p.scheme.lower() not in ("http", "https"):
        raise ValidationError(f"{field}: only http:// and https:// URLs can be pulled; got {p.scheme or 'none'}:")
    if not p.hostname:
        raise ValidationError(f"{field}: the URL has no host")
    if p.username is not None or p.password is not None:
        raise ValidationError(f"{field}: credentials in the URL are not accepted; give the token in `token`")
    return url


def fetch(url: str, dest: Path, *, limit: int, deadline_s: float, token: str | None = None,
          transport: httpx.BaseTransport | None = None) -> Fetched:
    """Download ``url`` to ``dest`` (created, mode 0600), at most ``limit`` bytes within ``deadline_s``
    seconds, following at most MAX_REDIRECTS redirects by the rules above; the sha256 is computed on the
    way. FileTooLargeError past ``limit``; SourceError when the source fails.

    The deadline bounds every socket operation (connect, TLS, each read and write: each gets at most the
    time left), so a source trickling a byte at a time cannot hold the pull (and its pack slot) past it.
    The body is taken as sent (no Content-Encoding decoded: a small gzip cannot expand in memory)."""
    check_url(url)
    quiet_http_logs()
    origin = _origin(url)
    deadline = time.monotonic() + deadline_s
    timeout = httpx.Timeout(deadline_s, connect=min(CONNECT_TIMEOUT_S, deadline_s))
    headers = {"User-Agent": f"forkd-controller/{__version__}", "Accept": "application/zstd, */*",
               "Accept-Encoding": "identity"}
    if transport is None:
        transport = deadline_transport(deadline)
    with httpx.Client(follow_redirects=False, trust_env=False, timeout=timeout, transport=transport) as client:
        current = url
        send_token = token is not None
        for _hop in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if _origin(current) != origin:
                send_token = False  # once away from the URL's origin, never again (not even back on it)
            if send_token and token is not None:
                h["Authorization"] = f"Bearer {token}"
            try:
                with client.stream("GET", current, headers=h) as resp:
                    if resp.is_redirect:
                        current = _next_hop(current, resp.headers.get("location", ""))
                        continue
                    if resp.status_code != 200:
                        raise SourceError(f"url: {display(current)} answered HTTP {resp.status_code}"
                                          + _reason(resp, token))
                    return _save(resp, current, dest, limit, deadline)
            except httpx.TimeoutException as e:
                raise SourceError(f"url: {display(current)} did not answer within timeout_s ({deadline_s:g} s) "
                                  f"or the connect timeout ({type(e).__name__})") from None
            except httpx.HTTPError as e:
                raise SourceError(f"url: cannot fetch {display(current)}: {type(e).__name__}: "
                                  f"{scrub(str(e), token)}") from None
            except httpx.InvalidURL as e:
                raise ValidationError(f"url: not a valid URL ({display(current)}): {scrub(str(e), token)}") from None
        raise SourceError(f"url: more than {MAX_REDIRECTS} redirects from {display(url)}")


def scrub(text: str, token: str | None) -> str:
    """``text`` with ``token`` redacted (an error message that could quote a header or an echo)."""
    return text.replace(token, "[REDACTED]") if token else text


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation gets at most the time left before the deadline."""

    def __init__(self, inner: httpcore.NetworkStream, backend: _DeadlineBackend) -> None:
        self._inner = inner
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._backend.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._backend.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, self._backend.left(timeout,
                                                                                      httpcore.ConnectTimeout))
        return _DeadlineStream(inner, self._backend)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sync backend with a deadline over every operation (see fetch)."""

    def __init__(self, deadline: float) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline

    def left(self, timeout: float | None, exc: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise exc("the deadline passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Any = None) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, self.left(timeout, httpcore.ConnectTimeout), local_address,
                                         socket_options)
        return _DeadlineStream(stream, self)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Any = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("no Unix sockets here")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def deadline_transport(deadline: float) -> httpx.HTTPTransport:
    """An httpx transport (TLS verified, no proxies from the environment) over _DeadlineBackend."""
    ctx = httpx.create_ssl_context(trust_env=False)
    transport = httpx.HTTPTransport(verify=ctx, trust_env=False)
    transport._pool = httpcore.ConnectionPool(ssl_context=ctx, network_backend=_DeadlineBackend(deadline))
    return transport


def quiet_http_logs() -> None:
    """httpx logs each request's URL (with its query, which may be a signature) at INFO and httpcore its
    headers (the token) at DEBUG: only their warnings reach the daemon's log."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _reason(resp: httpx.Response, token: str | None) -> str:
    """The start of an error answer's text (a source echoing the token gets it redacted: it is logged);
    at most MAX_ERROR_BODY bytes of it are read, whatever the source sends."""
    if not resp.headers.get("content-type", "").startswith(("application/json", "text/")):
        return ""
    head = b""
    for chunk in resp.iter_raw():
        head += chunk
        if len(head) >= MAX_ERROR_BODY:
            break
    text = scrub(head[:MAX_ERROR_BODY].decode("utf-8", errors="replace").strip()[:300], token)
    text = "".join(c if c.isprintable() else " " for c in text)
    return f": {text}" if text else ""


def _next_hop(current: str, location: str) -> str:
    if not location:
        raise SourceError(f"url: {display(current)} redirected without a Location")
    nxt = urljoin(current, location)
    check_url(nxt, "url (redirect)")
    if _origin(current)[0] == "https" and _origin(nxt)[0] == "http":
        raise ValidationError(f"url: {display(current)} redirected from https to http ({display(nxt)}); refused")
    return nxt


def _save(resp: httpx.Response, current: str, dest: Path, limit: int, deadline: float) -> Fetched:
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise SourceError(f"url: {display(current)} sent the pack with Content-Encoding {encoding[:40]!r}; "
                          "only the file as it is (identity) is taken")
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FileTooLargeError(f"url: the pack is {declared} bytes, more than the {limit} bytes this disk can "
                                "take now (its free space less 1 GiB)")
    digest = hashlib.sha256()
    got = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        for chunk in resp.iter_raw(CHUNK):
            got += len(chunk)
            if got > limit:
                raise FileTooLargeError(f"url: the pack is larger than the {limit} bytes this disk can take now "
                                        "(its free space less 1 GiB)")
            if time.monotonic() > deadline:
                raise SourceError(f"url: {display(current)} did not finish within timeout_s ({got} bytes read)")
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    if got == 0:
        raise SourceError(f"url: {display(current)} sent an empty body")
    return Fetched(source=display(current), bytes=got, sha256=digest.hexdigest())
