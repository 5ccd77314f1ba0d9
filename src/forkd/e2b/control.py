"""The E2B control plane: create (``POST /sandboxes``, ``POST /v2/sandboxes``), get, list, kill,
timeout, connect, refresh, fork, and pause/resume (over workspaces, e2b/pause.py), over the
Controller. Answers and errors in E2B's JSON (camelCase, ``{"code", "message"}``)."""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.parse
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from forkd.e2b import pause as pz
from forkd.e2b.auth import to_e2b_id, to_forkd_id
from forkd.e2b.common import ENVD_VERSION, MAX_JSON_BODY, E2BState, read_body, state
from forkd.e2b.errors import E2BError
from forkd.limits import MAX_LIFETIME_S, MAX_METADATA, MAX_METADATA_VALUE, METADATA_KEY_PATTERN, TAG_PATTERN

#: E2B's default sandbox timeout (seconds) when the create asks for none: the SDK's documented default
DEFAULT_TIMEOUT_S = 300
MAX_ENVS = 256
#: children of one fork call (E2B's own limit)
MAX_FORKS = 20
#: seconds a child may take to restore (QEMU under TCG on a busy host is slow)
SPAWN_TIMEOUT_S = 120.0
MAX_ENV_BYTES = 64 << 10
_META_KEY = re.compile(METADATA_KEY_PATTERN)
_TAG = re.compile(TAG_PATTERN)
#: NewSandbox fields that are accepted and need nothing (``secure``: forkd sandboxes always need the token)
_IGNORED = {"secure", "templateID", "timeout", "metadata", "envVars", "allow_internet_access", "autoPause",
            "autoResume", "network", "mcp", "iam", "volumeMounts", "autoPauseMemory"}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


async def _json(request: Request) -> dict[str, Any]:
    body = await read_body(request, MAX_JSON_BODY)
    if not body.strip():
        return {}
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise E2BError(400, f"the body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise E2BError(400, "the body must be a JSON object")
    return obj


def _timeout(body: dict[str, Any], key: str = "timeout", default: int | None = DEFAULT_TIMEOUT_S) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_LIFETIME_S:
        raise E2BError(400, f"{key}: expected whole seconds in 0..{int(MAX_LIFETIME_S)}; got {v!r}")
    return v


def _str_map(body: dict[str, Any], key: str, limit: int, check_key: bool) -> dict[str, str]:
    v = body.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise E2BError(400, f"{key}: expected an object of strings")
    if len(v) > limit:
        raise E2BError(400, f"{key}: at most {limit} entries; got {len(v)}")
    for k, x in v.items():
        if check_key and not _META_KEY.fullmatch(k):
            raise E2BError(400, f"{key}: key {k[:140]!r} must match {METADATA_KEY_PATTERN}")
        if len(x) > (MAX_METADATA_VALUE if check_key else MAX_ENV_BYTES):
            raise E2BError(400, f"{key}: the value of {k[:140]!r} is too long")
    return dict(v)


def _unsupported(body: dict[str, Any]) -> None:
    """Fail closed on what forkd would otherwise silently not do."""
    if body.get("autoPause") is True:
        raise E2BError(400, "autoPause is not supported by forkd: a sandbox is killed when its timeout ends")
    if isinstance(body.get("autoResume"), dict) and body["autoResume"].get("enabled"):
        raise E2BError(400, "autoResume is not supported by forkd")
    for k in ("mcp", "iam", "volumeMounts"):
        if body.get(k):
            raise E2BError(400, f"{k} is not supported by forkd")
    net = body.get("network")
    if isinstance(net, dict) and any(net.get(k) for k in ("allowOut", "denyOut", "rules", "egressProxy")):
        raise E2BError(400, "network rules are not supported by forkd (only allow_internet_access: true/false)")


def _sandbox(st: E2BState, sid: str, tag: str) -> dict[str, Any]:
    """E2B's ``Sandbox`` (the answer of create and connect)."""
    return {"templateID": tag, "sandboxID": to_e2b_id(sid), "clientID": "forkd", "alias": tag,
            "envdVersion": ENVD_VERSION, "envdAccessToken": st.keys.access_token(sid), "trafficAccessToken": None,
            "domain": None}


def _listed(st: E2BState, info: dict[str, Any]) -> dict[str, Any]:
    tag = str(info["snapshot_tag"])
    spec = st.spec(tag)
    created = float(info.get("created_at") or 0)
    end = info.get("expires_at")
    return {"templateID": tag, "alias": tag, "sandboxID": to_e2b_id(str(info["id"])), "clientID": "forkd",
            "startedAt": _iso(created), "endAt": _iso(float(end) if end is not None else created + MAX_LIFETIME_S),
            "cpuCount": spec["vcpus"], "memoryMB": info.get("memory_limit_mib") or spec["memory_mib"],
            "diskSizeMB": 0, "state": "running", "envdVersion": ENVD_VERSION,
            "metadata": dict(info.get("metadata") or {})}


def _detail(st: E2BState, info: dict[str, Any]) -> dict[str, Any]:
    return {**_listed(st, info), "envdAccessToken": st.keys.access_token(str(info["id"])), "domain": None,
            "allowInternetAccess": info.get("network") != "none",
            "lifecycle": {"autoResume": False, "onTimeout": "kill"}}


async def create(request: Request) -> Response:
    st = state(request)
    body = await _json(request)
    unknown = set(body) - _IGNORED
    if unknown:
        raise E2BError(400, f"unknown fields: {sorted(unknown)[:10]}")
    template = body.get("templateID")
    if not isinstance(template, str) or not template:
        raise E2BError(400, "templateID: required, a string")
    tag = st.template_tag(template)
    if not _TAG.fullmatch(tag):
        raise E2BError(400, f"templateID {template[:80]!r}: forkd snapshot tags match {TAG_PATTERN}")
    _unsupported(body)
    timeout = _timeout(body)
    metadata = _str_map(body, "metadata", MAX_METADATA, check_key=True)
    envs = _str_map(body, "envVars", MAX_ENVS, check_key=False)
    internet = body.get("allow_internet_access", True)
    if not isinstance(internet, bool):
        raise E2BError(400, "allow_internet_access: expected true or false")
    if not await run_in_threadpool(st.ctl.engine.store.exists, tag):
        raise E2BError(404, f"template {template[:80]!r} not found: no forkd snapshot has the tag {tag!r}")
    out = await run_in_threadpool(st.ctl.spawn, tag, 1, "internet" if internet else "none", None, False,
                                  SPAWN_TIMEOUT_S, (), float(timeout or DEFAULT_TIMEOUT_S), metadata)
    entry = out[0]
    if entry.get("sandbox") is None:
        raise E2BError(500, f"the sandbox did not start: {entry.get('error')}")
    sid = str(entry["sandbox"]["id"])
    st.extra(sid).envs = envs
    return JSONResponse(_sandbox(st, sid, tag), status_code=201)


async def get(request: Request) -> Response:
    st = state(request)
    sid = to_forkd_id(request.path_params["id"])
    paused = await run_in_threadpool(pz.paused_entry, st, sid)
    if paused is not None:
        return JSONResponse({**paused, "envdAccessToken": st.keys.access_token(sid), "domain": None,
                             "lifecycle": {"autoResume": False, "onTimeout": "kill"}})
    sb = await run_in_threadpool(st.ctl.get, await run_in_threadpool(pz.current, st, sid))
    return JSONResponse(await run_in_threadpool(lambda: _detail(st, pz.as_e2b(st, sb.info()))))


def _metadata_filter(raw: str | None) -> dict[str, str]:
    """The SDK sends ``metadata=k%3Dv%26k2%3Dv2`` (urlencoded pairs, each key and value quoted)."""
    if not raw:
        return {}
    pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, max_num_fields=MAX_METADATA)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


async def list_(request: Request) -> Response:
    st = state(request)
    try:
        want = _metadata_filter(request.query_params.get("metadata"))
    except ValueError as e:
        raise E2BError(400, f"metadata: {e}") from None
    states = request.query_params.get("state")
    wanted = {"running", "paused"} if states is None else set(states.split(","))
    template = request.query_params.get("template")
    infos = await run_in_threadpool(st.ctl.list_sandboxes, want)
    running = [i for i in infos if i.get("status") == "running"
               and (template is None or i.get("snapshot_tag") == template)] if "running" in wanted else []
    out = await run_in_threadpool(lambda: [_listed(st, pz.as_e2b(st, i)) for i in running])
    if "paused" in wanted:
        out += [p for p in await run_in_threadpool(pz.paused_all, st)
                if (template is None or p["templateID"] == template)
                and all(p["metadata"].get(k) == v for k, v in want.items())]
    out.sort(key=lambda s: s["startedAt"], reverse=request.query_params.get("order") != "asc")
    limit = request.query_params.get("limit")
    if limit is not None and limit.isdigit():
        out = out[:max(1, int(limit))]
    return JSONResponse(out, headers={"X-Total-Running": str(len(infos))})


async def kill(request: Request) -> Response:
    st = state(request)
    sid = to_forkd_id(request.path_params["id"])
    if await run_in_threadpool(pz.delete, st, sid):  # one that was paused: its workspace goes
        return Response(status_code=204)
    await run_in_threadpool(st.ctl.delete, sid)
    st.forget(sid)
    return Response(status_code=204)


async def set_timeout(request: Request) -> Response:
    st = state(request)
    sid = to_forkd_id(request.path_params["id"])
    body = await _json(request)
    timeout = _timeout(body, default=None)
    if timeout is None:
        raise E2BError(400, "timeout: required")
    await run_in_threadpool(st.ctl.set_lifetime, await run_in_threadpool(pz.current, st, sid), float(timeout))
    return Response(status_code=204)


async def refresh(request: Request) -> Response:
    """Extend the lifetime by ``duration`` seconds from now (never shorten it)."""
    st = state(request)
    sid = to_forkd_id(request.path_params["id"])
    duration = _timeout(await _json(request), "duration", default=DEFAULT_TIMEOUT_S) or 0
    await run_in_threadpool(_extend, st, await run_in_threadpool(pz.current, st, sid), duration)
    return Response(status_code=204)


def _extend(st: E2BState, sid: str, seconds: int) -> dict[str, Any]:
    sb = st.ctl.get(sid)
    if sb.expires_at is not None and sb.expires_at >= time.time() + seconds:
        return sb.info()
    return st.ctl.set_lifetime(sid, float(seconds))


async def connect(request: Request) -> Response:
    """Connect to a sandbox: a running one's lifetime is only ever extended; a paused one is resumed
    (201), from its workspace's last state, under the same E2B id and access token."""
    st = state(request)
    sid = to_forkd_id(request.path_params["id"])
    body = await _json(request)
    timeout = _timeout(body, default=None)
    if (await run_in_threadpool(pz.status, st, sid))[0] in ("suspended", "stale"):
        _, info = await run_in_threadpool(pz.resume, st, sid, timeout)
        return JSONResponse(_sandbox(st, sid, str(info["snapshot_tag"])), status_code=201)
    actual = await run_in_threadpool(pz.current, st, sid)
    info = await run_in_threadpool(_extend, st, actual, timeout) if timeout else (await run_in_threadpool(
        st.ctl.get, actual)).info()
    return JSONResponse(_sandbox(st, sid, str(info["snapshot_tag"])), status_code=200)


async def fork(request: Request) -> Response:
    """E2B's fork: BRANCH the sandbox once (it keeps running, id and lifetime untouched) and start
    ``count`` children from that state, each with the source's network, memory limit, labels and
    environment; one entry per child, a sandbox or its error. The branch snapshot stays while children
    use it (``forkd snapshot rm`` it afterwards)."""
    st = state(request)
    sid = to_forkd_id(request.path_params["id"])
    body = await _json(request)
    unknown = set(body) - {"timeout", "count"}
    if unknown:
        raise E2BError(400, f"unknown fields: {sorted(unknown)[:10]}")
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_FORKS:
        raise E2BError(400, f"count: expected an integer in 1..{MAX_FORKS}; got {count!r}")
    timeout = _timeout(body)
    sid = await run_in_threadpool(pz.current, st, sid)
    sb = await run_in_threadpool(st.ctl.get, sid)
    source = await run_in_threadpool(lambda: pz.as_e2b(st, sb.info()))
    branched, _ = await run_in_threadpool(st.ctl.branch, sid, None, "auto", True)
    tag = str(branched["tag"])
    entries = await run_in_threadpool(
        st.ctl.spawn, tag, count, str(source.get("network") or "internet"), source.get("memory_limit_mib"), False,
        SPAWN_TIMEOUT_S, (), float(timeout or DEFAULT_TIMEOUT_S), dict(source.get("metadata") or {}))
    if not any(e.get("sandbox") for e in entries):  # nothing uses the branch: it goes
        with contextlib.suppress(Exception):
            await run_in_threadpool(st.ctl.delete_snapshot, tag)
    envs = dict(st.extra(sid).envs)
    results: list[dict[str, Any]] = []
    for entry in entries:
        if entry.get("sandbox") is None:
            results.append({"error": {"code": 500, "message": f"the fork did not start: {entry.get('error')}"}})
            continue
        child = str(entry["sandbox"]["id"])
        st.extra(child).envs = dict(envs)
        results.append({"sandbox": _sandbox(st, child, tag)})
    return JSONResponse(results, status_code=201)


async def pause(request: Request) -> Response:
    """Pause: the sandbox becomes (or is) the workspace ``e2b-<id>`` and is suspended to disk (memory,
    processes, files); 409 if it is paused already. ``memory`` / ``requireHealthyGuest`` are accepted:
    the memory is always kept."""
    st = state(request)
    sid = to_forkd_id(request.path_params["id"])
    body = await _json(request)
    unknown = set(body) - {"memory", "requireHealthyGuest"}
    if unknown:
        raise E2BError(400, f"unknown fields: {sorted(unknown)[:10]}")
    if not await run_in_threadpool(pz.pause, st, sid):
        raise E2BError(409, f"sandbox {request.path_params['id']} is already paused")
    return Response(status_code=204)


async def resume(request: Request) -> Response:
    """Resume a paused sandbox (as connect does for one): 201 with the sandbox; 409 if it runs."""
    st = state(request)
    sid = to_forkd_id(request.path_params["id"])
    body = await _json(request)
    if body.get("autoPause") is True:
        raise E2BError(400, "autoPause is not supported by forkd")
    _, info = await run_in_threadpool(pz.resume, st, sid, _timeout(body, default=None))
    return JSONResponse(_sandbox(st, sid, str(info["snapshot_tag"])), status_code=201)


async def unsupported(request: Request) -> Response:
    """A route E2B has and forkd does not: a 400 naming it (a 404 would read as "sandbox not found")."""
    raise E2BError(400, f"{request.method} {request.url.path[:200]} is not supported by forkd's E2B API "
                        "(docs/e2b.md lists what is)")


ROUTES = [
    Route("/sandboxes", create, methods=["POST"]),
    Route("/v2/sandboxes", create, methods=["POST"]),
    Route("/sandboxes", list_, methods=["GET"]),
    Route("/v2/sandboxes", list_, methods=["GET"]),
    Route("/sandboxes/{id}", get, methods=["GET"]),
    Route("/sandboxes/{id}", kill, methods=["DELETE"]),
    Route("/sandboxes/{id}/timeout", set_timeout, methods=["POST"]),
    Route("/sandboxes/{id}/refreshes", refresh, methods=["POST"]),
    Route("/sandboxes/{id}/connect", connect, methods=["POST"]),
    Route("/v2/sandboxes/{id}/connect", connect, methods=["POST"]),
    Route("/sandboxes/{id}/fork", fork, methods=["POST"]),
    Route("/sandboxes/{id}/pause", pause, methods=["POST"]),
    Route("/sandboxes/{id}/resume", resume, methods=["POST"]),
    *(Route(p, unsupported, methods=["GET", "POST", "PUT"]) for p in (
        "/sandboxes/{id}/snapshots", "/sandboxes/{id}/metrics", "/sandboxes/metrics",
        "/sandboxes/{id}/logs", "/v2/sandboxes/{id}/logs", "/sandboxes/{id}/network", "/snapshots")),
]
