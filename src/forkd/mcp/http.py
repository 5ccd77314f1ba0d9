"""The streamable HTTP transport of ``forkd mcp --transport http``: the MCP SDK's Starlette app, with its
Host/Origin checks (DNS-rebinding protection) on for the bound address, served by uvicorn.

A loopback address is the default. Any other address needs a bearer token (``--http-token-file``): the
tools control every sandbox of the daemon.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

MCP_PATH = "/mcp"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError names what is wrong."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--bind {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:8765")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_settings(host: str, port: int, extra_hosts: tuple[str, ...] = ()) -> TransportSecuritySettings:
    """Host and Origin headers allowed: the bound address (and, on loopback, its other loopback names),
    at that port only, and ``extra_hosts`` (``NAME[:PORT]``, the names clients reach it by: a DNS name,
    the real address behind a 0.0.0.0 bind, a proxy's)."""
    shown = f"[{host}]" if ":" in host else host
    hosts = [f"{shown}:{port}"] + list(extra_hosts)
    if is_loopback(host):
        hosts += [f"{name}:{port}" for name in LOOPBACK_NAMES]
    hosts = list(dict.fromkeys(hosts))
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=origins)


class BearerToken:
    """ASGI middleware: HTTP requests need ``Authorization: Bearer <token>`` (401 otherwise)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                body = b'{"error": "missing or wrong bearer token"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def http_app(server: MCPServer[Any], host: str, port: int, token: str | None,
             extra_hosts: tuple[str, ...] = ()) -> ASGIApp:
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to serve MCP on {host}:{port} without --http-token-file: its tools control "
                         "every sandbox, so only a loopback address may go without a token")
    app: ASGIApp = server.streamable_http_app(streamable_http_path=MCP_PATH,
                                              transport_security=security_settings(host, port, extra_hosts), host=host)
    return BearerToken(app, token) if token else app


def serve_http(server: MCPServer[Any], bind: str, token: str | None, log_level: str = "warning",
               extra_hosts: tuple[str, ...] = ()) -> None:
    """Serve ``server`` at ``http://BIND/mcp`` until interrupted."""
    import uvicorn

    host, port = parse_bind(bind)
    app = http_app(server, host, port, token, extra_hosts)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                  server_header=False, access_log=False)).run()
