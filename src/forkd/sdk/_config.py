"""Where the controller is and how to reach it: base URL, token, TLS verification, transport.

Resolution order: the ``url``/``token`` arguments, else the ``FORKD_URL`` / ``FORKD_TOKEN`` environment
variables, else ``http://127.0.0.1:8889`` and no token.

Accepted URLs:

* ``http://host:port[/prefix]`` and ``https://host:port[/prefix]`` (TCP; TLS certificates are verified
  unless ``verify=False``; ``verify`` may name a CA bundle file or directory, or be an ``ssl.SSLContext``);
* ``unix:/path/to.sock`` (also ``unix:///path/to.sock``): HTTP over a Unix socket;
* ``http+unix://%2Fpath%2Fto.sock[/prefix]``: the same, socket path percent-encoded as the host.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httpx

from forkd import __version__

DEFAULT_URL = "http://127.0.0.1:8889"
URL_ENV = "FORKD_URL"
TOKEN_ENV = "FORKD_TOKEN"
USER_AGENT = f"forkd-python/{__version__}"
UDS_BASE = "http://localhost"

Verify = bool | str | os.PathLike[str] | ssl.SSLContext


@dataclass(frozen=True)
class Endpoint:
    """A resolved controller address. ``repr`` never shows the token."""

    url: str
    """The URL as given (or from ``FORKD_URL``), for display."""
    base_url: str
    """What httpx requests go to (``http://localhost[/prefix]`` for a Unix socket)."""
    uds: str | None
    """The Unix socket path, or ``None`` for TCP."""
    token: str | None = field(repr=False)
    verify: ssl.SSLContext | bool = field(repr=False)

    @property
    def headers(self) -> dict[str, str]:
        h = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        return h


def parse_url(url: str) -> tuple[str, str | None]:
    """``url`` -> (httpx base URL, Unix socket path or None). ValueError names what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("url: must be a non-empty string such as http://127.0.0.1:8889 or unix:/run/forkd.sock")
    url = url.strip()
    if "," in url:
        raise ValueError(f"url {url!r}: a comma-separated list of controllers needs forkd.MultiController "
                         "(or forkd.connect(), which picks it)")
    if url.startswith("unix:"):
        path = url[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"url {url!r}: unix: needs a socket path, e.g. unix:/run/forkd/api.sock")
        return UDS_BASE, path
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "http+unix":
        path = unquote(parts.netloc)
        if not path:
            raise ValueError(f"url {url!r}: http+unix:// needs the percent-encoded socket path as its host, "
                             "e.g. http+unix://%2Frun%2Fforkd%2Fapi.sock")
        return UDS_BASE + parts.path.rstrip("/"), path
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url {url!r}: expected http://HOST:PORT, https://HOST:PORT, unix:/path/to.sock "
                         "or http+unix://%2Fpath%2Fto.sock")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}", None


def ssl_verify(verify: Verify) -> ssl.SSLContext | bool:
    """``verify`` as httpx wants it: True/False, or an SSLContext (a path names a CA file or directory)."""
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    if isinstance(verify, str | os.PathLike):
        path = os.fspath(verify)
        if os.path.isdir(path):
            return ssl.create_default_context(capath=path)
        if not os.path.isfile(path):
            raise ValueError(f"verify: CA bundle {path!r} does not exist")
        return ssl.create_default_context(cafile=path)
    raise TypeError(f"verify: expected a bool, a CA bundle path or an ssl.SSLContext, got {type(verify).__name__}")


def resolve(url: str | None = None, token: str | None = None, verify: Verify = True) -> Endpoint:
    """Resolve the controller address and token from the arguments and the environment."""
    given = url if url is not None else (os.environ.get(URL_ENV) or DEFAULT_URL)
    base_url, uds = parse_url(given)
    tok = token if token is not None else os.environ.get(TOKEN_ENV)
    if tok is not None:
        if not isinstance(tok, str):
            raise TypeError(f"token: expected a string, got {type(tok).__name__}")
        tok = tok.strip() or None
    if tok is not None and any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in tok):
        raise ValueError("token: must not contain whitespace or control characters")
    tls = ssl_verify(verify) if base_url.startswith("https:") else bool(verify)
    return Endpoint(url=given.strip(), base_url=base_url, uds=uds, token=tok, verify=tls)


def timeout_config(timeout: float | None) -> httpx.Timeout:
    """The default per-request timeout in seconds (``None``: no limit); connecting gets at most 30 s."""
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout: must be > 0 seconds or None, got {timeout!r}")
    return httpx.Timeout(timeout, connect=None if timeout is None else min(timeout, 30.0))


def sync_client(ep: Endpoint, timeout: float | None, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """An httpx.Client for ``ep`` (a Unix-socket transport when ``ep.uds`` is set)."""
    if transport is None and ep.uds is not None:
        transport = httpx.HTTPTransport(uds=ep.uds)
    return httpx.Client(base_url=ep.base_url, headers=ep.headers, timeout=timeout_config(timeout),
                        verify=ep.verify, transport=transport, follow_redirects=False)


def async_client(ep: Endpoint, timeout: float | None,
                 transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """An httpx.AsyncClient for ``ep`` (a Unix-socket transport when ``ep.uds`` is set)."""
    if transport is None and ep.uds is not None:
        transport = httpx.AsyncHTTPTransport(uds=ep.uds)
    return httpx.AsyncClient(base_url=ep.base_url, headers=ep.headers, timeout=timeout_config(timeout),
                             verify=ep.verify, transport=transport, follow_redirects=False)
