"""Unauthenticated requests cannot grow the daemon's memory or disk: fixed metric labels, capped audit
lines, cheap 401s; and the warning for a TCP bind without a token. No VM, no engine."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from starlette.testclient import TestClient

from forkd.daemon import audit as audit_mod
from forkd.daemon.app import create_app
from forkd.daemon.audit import AuditLog, AuditMiddleware
from forkd.daemon.auth import BearerAuth
from forkd.daemon.main import check_bind_auth
from forkd.daemon.metrics import Metrics, method_label
from forkd.errors import ValidationError

TOKEN = b"t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN.decode()}"}


@pytest.fixture
def served(tmp_path: Path) -> tuple[TestClient, Metrics, Path]:
    metrics = Metrics(lambda: 0, lambda: 0)
    app = create_app(SimpleNamespace(engine=None), metrics)  # type: ignore[arg-type]
    log_path = tmp_path / "audit.log"
    asgi = AuditMiddleware(BearerAuth(app, TOKEN), AuditLog(log_path), metrics.observe_request)
    return TestClient(asgi, raise_server_exceptions=False), metrics, log_path


def _request_series(metrics: Metrics) -> list[dict[str, str]]:
    out = []
    for family in metrics.registry.collect():
        if family.name == "forkd_http_request_duration_seconds":
            out += [dict(s.labels) for s in family.samples if s.name.endswith("_count")]
    return out


def _audit(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def test_method_label_is_a_fixed_set() -> None:
    for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        assert method_label(m) == m
    for m in ("FOOBAR", "get", "PROPFIND", "X" * 1000, ""):
        assert method_label(m) == "other"


def test_metrics_labels_never_carry_client_strings(served: tuple[TestClient, Metrics, Path]) -> None:
    client, metrics, _ = served
    assert client.request("FOOBAR", "/healthz").status_code == 405
    assert client.request("FOOBAR", "/v1/sandboxes", headers=AUTH).status_code == 405
    assert client.get("/v1/no/such/route/abc123", headers=AUTH).status_code == 404
    assert client.get("/v1/sandboxes/sb-secretpath99/files", headers={}).status_code == 401  # before routing
    assert client.get("/healthz").status_code == 200
    series = _request_series(metrics)
    assert {"method": "other", "route": "/healthz", "status": "405"} in series
    assert {"method": "other", "route": "/v1/sandboxes", "status": "405"} in series
    assert {"method": "GET", "route": "unmatched", "status": "404"} in series
    assert {"method": "GET", "route": "unmatched", "status": "401"} in series
    assert {"method": "GET", "route": "/healthz", "status": "200"} in series
    text = generate_latest(metrics.registry).decode()
    for raw in ("FOOBAR", "abc123", "secretpath99"):
        assert raw not in text


def test_many_distinct_paths_make_one_series(served: tuple[TestClient, Metrics, Path]) -> None:
    client, metrics, _ = served
    for i in range(50):
        client.request(f"M{i}", f"/x/{i}")
        client.get(f"/v1/sandboxes/sb-{i:016x}", headers={"Authorization": "Bearer wrong-token-000000"})
    assert {tuple(sorted(s.items())) for s in _request_series(metrics)} == {
        (("method", "other"), ("route", "unmatched"), ("status", "401")),
        (("method", "GET"), ("route", "unmatched"), ("status", "401")),
    }


def test_route_label_only_takes_app_templates() -> None:
    metrics = Metrics(lambda: 0, lambda: 0)
    metrics.set_routes(["/v1/sandboxes/{sid}"])
    assert metrics.route_label("/v1/sandboxes/{sid}") == "/v1/sandboxes/{sid}"
    assert metrics.route_label("/v1/sandboxes/sb-1234") == "unmatched"
    assert metrics.route_label(None) == "unmatched"


def test_audit_line_caps_client_strings(served: tuple[TestClient, Metrics, Path]) -> None:
    client, _, log_path = served
    ua = "A" * 10_000
    path = "/" + "p" * 10_000
    client.get(path + "?" + "q=" + "x" * 5000, headers={"User-Agent": ua})
    client.get("/healthz", headers={"User-Agent": ("é" * 5000).encode()})  # type: ignore[dict-item]
    client.get("/healthz", headers={"User-Agent": "curl/8.0"})
    first, accented, short = _audit(log_path)
    assert first["status"] == 401 and len(first["ua"]) == audit_mod.MAX_UA_CHARS and first["ua"].endswith("...")
    assert len(first["path"]) == audit_mod.MAX_PATH_CHARS and first["path"].startswith("/ppp")
    assert "x" * 10 not in json.dumps(first)  # no query string
    assert len(accented["ua"]) == audit_mod.MAX_UA_CHARS and accented["ua"].startswith("éé")
    assert short["ua"] == "curl/8.0"
    assert max(len(line) for line in log_path.read_text().splitlines()) < 4096


def test_audit_record_caps_method_and_remote() -> None:
    scope = {"type": "http", "method": "M" * 500, "path": "/x", "headers": [(b"user-agent", b"u" * 10_000)],
             "client": ("h" * 10_000, 1)}
    rec = audit_mod.record(scope, 401, 0.001)
    assert len(rec["method"]) == audit_mod.MAX_METHOD_CHARS
    assert len(rec["remote"]) == audit_mod.MAX_REMOTE_CHARS
    assert len(rec["ua"]) == audit_mod.MAX_UA_CHARS
    assert audit_mod.cap("abc", 3) == "abc" and audit_mod.cap("abcd", 3) == "..."


async def _never(*_: Any) -> Any:
    raise AssertionError("the request body was read")


async def _call(asgi: Any, headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/sandboxes", "headers": headers}
    await asgi(scope, _never, send)
    return sent


def test_a_401_reads_no_body_and_is_constant() -> None:
    import anyio

    async def app(*_: Any) -> None:
        raise AssertionError("the app was reached")

    auth = BearerAuth(app, TOKEN)
    big = [(b"content-length", b"1000000000"), (b"authorization", b"Bearer " + b"x" * 8000)]
    replies = [anyio.run(_call, auth, h) for h in ([], big, [(b"authorization", b"Basic abc")], big)]
    assert [r[0]["status"] for r in replies] == [401] * 4
    assert replies[1] == replies[3]  # the same bytes whatever was sent
    assert replies[1][0]["headers"] is not replies[3][0]["headers"]  # a fresh list: nothing shared to grow
    assert json.loads(replies[0][1]["body"]) == {"error": "missing bearer token"}
    assert json.loads(replies[1][1]["body"]) == {"error": "invalid bearer token"}


def test_bind_without_token() -> None:
    with pytest.raises(ValidationError, match="refusing to bind 0.0.0.0:8889 without --token-file"):
        check_bind_auth("0.0.0.0:8889", ("0.0.0.0", 8889), None)
    with pytest.raises(ValidationError, match="refusing"):
        check_bind_auth("[::]:8889", ("::", 8889), None)
    warning = check_bind_auth("127.0.0.1:8889", ("127.0.0.1", 8889), None)
    assert warning is not None and "unauthenticated" in warning and "controls every sandbox" in warning
    assert check_bind_auth("127.0.0.1:8889", ("127.0.0.1", 8889), TOKEN) is None
    assert check_bind_auth("0.0.0.0:8889", ("0.0.0.0", 8889), TOKEN) is None
    assert check_bind_auth("unix:/run/forkd.sock", "/run/forkd.sock", None) is None


def test_healthz_with_a_slash_needs_no_token_and_nothing_else_does(served: tuple[TestClient, Metrics, Path]) -> None:
    client, _, _ = served
    assert client.get("/healthz/").json() == {"ok": True}
    assert client.get("/healthz").json() == {"ok": True}
    for path in ("/HEALTHZ", "/healthz//", "/healthzz", "/version", "/openapi.json"):
        assert client.get(path).status_code == 401, path
