"""Property-based fuzz of the real daemon from its own OpenAPI document: no input gives a 5xx or a crash."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from conftest import Daemon
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.vm
schemathesis.experimental.OPEN_API_3_1.enable()  # FastAPI publishes OpenAPI 3.1


@pytest.fixture(scope="module")
def api_schema(daemon: Daemon, snapshot: str):  # type: ignore[no-untyped-def]
    raw = httpx.get(f"{daemon.url}/openapi.json", headers=daemon.headers, timeout=60).json()
    schema = schemathesis.from_dict(raw, base_url=daemon.url)
    # Creating snapshots boots a VM per example: covered by the functional tests, not fuzzed.
    return schema.exclude(method="POST", path="/v1/snapshots")


schema = schemathesis.from_pytest_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, daemon: Daemon) -> None:  # type: ignore[no-untyped-def]
    response = case.call(headers=daemon.headers, timeout=300)
    case.validate_response(response, checks=(not_a_server_error,))
    assert daemon.proc.poll() is None, "the daemon exited"
