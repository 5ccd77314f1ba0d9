"""One contract: docs/openapi.json is what the daemon serves, and the SDK's requests and result types
agree with it (every operation called, every body valid against its schema, every result field known)."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from forkd import limits
from forkd.daemon import models as dm
from forkd.daemon.app import openapi_document
from forkd.daemon.main import openapi_json
from forkd.sdk import _base as b
from forkd.sdk import models as sm

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
SID, TAG = "sb-0123456789abcdef", "snap"

#: every SDK request builder with sample arguments
SDK_CALLS: list[Callable[[], b.Call[Any] | b.StreamCall]] = [
    b.op_health, b.op_version, b.op_metrics, b.op_list_snapshots, b.op_pending_snapshots,
    lambda: b.op_create_snapshot(TAG, 512, 1, "import numpy", 300.0, "my-image"),
    lambda: b.op_snapshot_info(TAG),
    lambda: b.op_delete_snapshot(TAG, False, True),
    lambda: b.op_compact(TAG, "flat-copy"),
    lambda: b.op_branch(SID, "br", "delta", False),
    lambda: b.op_spawn(TAG, 3, "none", 256, True, 60.0, (8080,), 300.0, {"team": "a", "run:id": "7"}),
    lambda: b.op_list_sandboxes({"team": "a"}),
    lambda: b.op_get_sandbox(SID), lambda: b.op_kill(SID), lambda: b.op_ping(SID),
    lambda: b.op_interrupt(SID),
    lambda: b.op_set_timeout(SID, 600.0),
    lambda: b.op_eval(SID, "1 + 1", 10.0), lambda: b.op_run_code(SID, "x = 1", 10.0),
    lambda: b.op_exec(SID, ["ls", "-l"], {"A": "1"}, "/tmp", "in", 5.0, 1024),
    lambda: b.op_read_file(SID, "/etc/hostname"),
    lambda: b.op_write_file(SID, "/tmp/f", b"data", 0o600),
    lambda: b.op_list_files(SID, "/tmp"), lambda: b.op_stat(SID, "/tmp"),
    lambda: b.op_mkdir(SID, "/tmp/d"), lambda: b.op_remove(SID, "/tmp/d", True),
    lambda: b.op_exec_stream(SID, "echo hi", None, None, None, 30.0),
    lambda: b.op_start_process(SID, ["cat"], {"A": "1"}, "/", "x", None, True),
    lambda: b.op_list_processes(SID), lambda: b.op_process_stream(SID, 42),
    lambda: b.op_process_stdin(SID, 42, b"\x00", True), lambda: b.op_process_kill(SID, 42, "TERM"),
    lambda: b.op_run_code_stream(SID, "print(1)", 10.0),
    lambda: b.op_pack(TAG, 19), lambda: b.op_unpack(__file__, "renamed", True),
    b.op_capacity, lambda: b.op_pull("https://peer:8889/v1/snapshots/snap/pack", "0" * 64, "copy", True, "tok", 600.0),
    lambda: b.op_pull("http://files.example/snap.tar.zst", None, None, False, None, 60.0),
    lambda: b.op_create_workspace("ws1", TAG, "none", 256, 300.0, {"team": "a"}, 60.0, 120.0),
    lambda: b.op_create_workspace("ws1", TAG, "internet", None, None, None, None, 30.0),
    b.op_list_workspaces, lambda: b.op_get_workspace("ws1"), lambda: b.op_suspend_workspace("ws1"),
    lambda: b.op_resume_workspace("ws1"), lambda: b.op_delete_workspace("ws1"),
]
#: SDK result type -> the schema of the daemon's answer
RESULTS = {sm.VersionInfo: "Version", sm.SnapshotInfo: "SnapshotInfo", sm.BranchResult: "BranchResponse",
           sm.SandboxInfo: "SandboxInfo", sm.SpawnEntry: "SpawnEntry", sm.PingResult: "PingResponse",
           sm.InterruptResult: "InterruptResponse", sm.PendingSnapshot: "PendingSnapshot",
           sm.EvalResult: "EvalResponse", sm.Execution: "RunCodeResponse", sm.CommandResult: "ExecResponse",
           sm.FileEntry: "FileEntry", sm.ProcessInfo: "ProcessInfo", sm.UnpackResult: "UnpackResponse",
           sm.WorkspaceInfo: "WorkspaceInfo", sm.CapacityInfo: "Capacity", sm.PullResult: "PullResponse"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(DOC_PATH.read_text())


def test_committed_document_is_what_the_daemon_serves(doc: dict[str, Any]) -> None:
    served = openapi_json(openapi_document())
    assert DOC_PATH.read_text() == served, (
        "docs/openapi.json is out of date: run `forkd-controller openapi --out docs/openapi.json` and commit it")


def test_every_reference_resolves_in_the_document(doc: dict[str, Any]) -> None:
    """``#`` is the document's root: an inline schema's own ``$defs`` are not reachable from there."""
    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values()
                                                                                     for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []
    for ref in refs(doc):
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(target, dict) and part in target, f"$ref {ref} does not resolve in docs/openapi.json"
            target = target[part]


def _operation(doc: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    want = path.split("/")
    for template, ops in doc["paths"].items():
        have = template.split("/")
        same = len(have) == len(want) and all(h == w or (h.startswith("{") and w)
                                              for h, w in zip(have, want, strict=False))
        if same and method.lower() in ops:
            return template, ops[method.lower()]
    raise AssertionError(f"the SDK calls {method} {path}, which docs/openapi.json does not have")


def _validate(doc: dict[str, Any], schema: dict[str, Any], value: object, what: str) -> None:
    try:
        jsonschema.validate(value, {**schema, "components": doc["components"]},
                            cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as e:
        raise AssertionError(f"{what}: {e.message}") from None


def test_every_sdk_request_is_in_the_contract(doc: dict[str, Any]) -> None:
    covered = set()
    for make in SDK_CALLS:
        call = make()
        template, op = _operation(doc, call.method, call.path)
        covered.add((call.method.lower(), template))
        what = f"{call.method} {template}"
        declared = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "query"}
        for name, value in (getattr(call, "params", None) or {}).items():
            assert name in declared, f"{what}: the SDK sends ?{name}=, which the contract does not declare"
            _validate(doc, declared[name]["schema"], value, f"{what} ?{name}")
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if call.json is not None:
            assert body is not None, f"{what}: the SDK sends a JSON body the contract does not take"
            _validate(doc, body["schema"], call.json, f"{what} body")
    every = {(method, template) for template, ops in doc["paths"].items() for method in ops}
    assert every - covered == set(), f"operations the SDK never calls: {sorted(every - covered)}"


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]  # type: ignore[no-any-return]


def test_sdk_results_read_only_what_the_daemon_answers(doc: dict[str, Any]) -> None:
    for cls, name in RESULTS.items():
        props = set(_schema(doc, name)["properties"])
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        extra = fields - props - {"ok", "error"}  # the code outcomes are read from the envelope
        assert not extra, f"sdk {cls.__name__} reads {sorted(extra)}, which {name} does not have"
        required = set(_schema(doc, name).get("required", []))
        missing = {r for r in required if r not in fields} - {"ok", "error", "index"} if cls is not sm.SpawnEntry \
            else set()
        assert not missing or cls in (sm.EvalResult, sm.Execution, sm.CommandResult), \
            f"sdk {cls.__name__} drops the required {sorted(missing)} of {name}"


def test_enums_and_limits_come_from_one_module() -> None:
    fields = dm.CreateSandboxesRequest.model_fields
    assert typing.get_args(fields["network"].annotation) == limits.NETWORKS
    modes = typing.get_args(dm.BranchRequest.model_fields["mode"].annotation)
    assert modes == limits.BRANCH_MODES + tuple(limits.ORIGINAL_BRANCH_MODES)
    n = {type(m).__name__: m for m in fields["n"].metadata}
    assert n["Le"].le == limits.MAX_CHILDREN
