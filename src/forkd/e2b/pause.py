"""E2B's pause and resume over forkd's workspaces (docs/workspaces.md).

A sandbox created through E2B becomes a workspace named ``e2b-<its E2B id>`` when it is first paused
(its network, memory limit, labels and lifetime are the workspace's options). Pause suspends that
workspace; resume (or a connect of a paused sandbox) resumes it. E2B keeps a sandbox's id across a
pause, while a resume starts a forkd sandbox with a new id: the E2B id stays the *identity* (what the
answers carry and what its envd access token is derived from, so a client's token stays valid), and
``current`` maps it to the forkd sandbox that serves it now, through the workspace's record (on disk,
so the mapping survives a daemon restart). Env vars given at create are kept across a pause in memory
only (lost on a daemon restart, as they are for a running sandbox)."""

from __future__ import annotations

import contextlib
from typing import Any

from forkd.e2b.auth import to_e2b_id
from forkd.e2b.common import ENVD_VERSION, E2BState
from forkd.e2b.errors import E2BError
from forkd.errors import ForkdError

PREFIX = "e2b-"


def workspace_name(sid: str) -> str:
    """The workspace of the E2B sandbox whose identity is forkd id ``sid``."""
    return PREFIX + to_e2b_id(sid)


def identity_of(st: E2BState, info: dict[str, Any]) -> str:
    """The E2B identity (a forkd id) of a sandbox listed by the controller: its own id, or for the
    current sandbox of an E2B workspace the id it was paused under (checked against the workspace's
    record, not only its label)."""
    from forkd.daemon.workspaces import LABEL

    name = str((info.get("metadata") or {}).get(LABEL) or "")
    ws = _ws(st)
    if name.startswith(PREFIX) and ws is not None:
        with contextlib.suppress(ForkdError):
            if ws.sandbox_of(name)[1] == info["id"]:
                return "sb-" + name[len(PREFIX):]
    return str(info["id"])


def _ws(st: E2BState) -> Any:
    """The controller's workspaces (None without them)."""
    return getattr(st.ctl, "workspaces", None)


def as_e2b(st: E2BState, info: dict[str, Any]) -> dict[str, Any]:
    """A controller sandbox info as E2B sees it: its identity's id, without the workspace label."""
    from forkd.daemon.workspaces import LABEL

    meta = {k: v for k, v in (info.get("metadata") or {}).items() if k != LABEL}
    return {**info, "id": identity_of(st, info), "metadata": meta}


def status(st: E2BState, sid: str) -> tuple[str | None, str | None]:
    """(the workspace's status, its sandbox id), (None, None) when ``sid`` was never paused."""
    ws = _ws(st)
    if ws is None:
        return None, None
    try:
        return ws.sandbox_of(workspace_name(sid))
    except ForkdError:
        return None, None


def current(st: E2BState, sid: str) -> str:
    """The forkd sandbox serving E2B identity ``sid`` now (``sid`` itself unless it was paused and resumed)."""
    state, running = status(st, sid)
    return running if state == "running" and running else sid


def pause(st: E2BState, sid: str) -> bool:
    """Pause: False when it is paused already (E2B answers 409 then)."""
    ws = _ws(st)
    if ws is None:
        raise E2BError(400, "pausing needs workspaces, which this daemon does not have")
    name = workspace_name(sid)
    state, running = status(st, sid)
    if state == "suspended":
        return False
    if state is None:
        ws.adopt(name, sid)  # NotFound (404) for a sandbox that does not exist
        running = sid
    elif state == "stale":
        raise E2BError(409, f"sandbox {to_e2b_id(sid)}'s VM is gone (a restart or reboot): resume it from its "
                            "last pause first")
    assert running is not None
    envs = dict(st.extra(running).envs)
    ws.suspend(name)
    st.forget(running)
    st.paused_envs[sid] = envs
    return True


def resume(st: E2BState, sid: str, timeout: int | None) -> tuple[str, dict[str, Any]]:
    """Resume a paused sandbox: (the new forkd sandbox, its info). 404 when it is not paused."""
    ws = _ws(st)
    state, _ = status(st, sid)
    if ws is None or state is None:
        raise E2BError(404, f"paused sandbox {to_e2b_id(sid)} not found")
    if state == "running":
        raise E2BError(409, f"sandbox {to_e2b_id(sid)} is already running")
    info = ws.resume(workspace_name(sid))
    new = str(info["sandbox_id"])
    st.extra(new).envs = st.paused_envs.pop(sid, {})
    if timeout:
        st.ctl.set_lifetime(new, float(timeout))
    return new, st.ctl.get(new).info()


def delete(st: E2BState, sid: str) -> bool:
    """Kill a sandbox that was paused (its workspace and states go); False when it never was."""
    state, running = status(st, sid)
    if state is None:
        return False
    _ws(st).delete(workspace_name(sid))
    if running:
        st.forget(running)
    st.paused_envs.pop(sid, None)
    return True


def paused_entry(st: E2BState, sid: str) -> dict[str, Any] | None:
    """E2B's ListedSandbox of a paused sandbox (None when ``sid`` is not paused)."""
    ws = _ws(st)
    state, _ = status(st, sid)
    if ws is None or state not in ("suspended", "stale"):
        return None
    info = ws.get(workspace_name(sid))
    return paused_listed(st, sid, info)


def paused_listed(st: E2BState, sid: str, info: dict[str, Any]) -> dict[str, Any]:
    from forkd.e2b.control import _iso

    tag = str(info["snapshot_tag"])
    spec = st.spec(tag)
    opts = info.get("options") or {}
    at = float(info.get("suspended_at") or info.get("created_at") or 0)
    return {"templateID": tag, "alias": tag, "sandboxID": to_e2b_id(sid), "clientID": "forkd",
            "startedAt": _iso(float(info.get("created_at") or 0)), "endAt": _iso(at),
            "cpuCount": spec["vcpus"], "memoryMB": opts.get("memory_limit_mib") or spec["memory_mib"],
            "diskSizeMB": 0, "state": "paused", "envdVersion": ENVD_VERSION,
            "metadata": dict(opts.get("metadata") or {}), "allowInternetAccess": opts.get("network") != "none"}


def paused_all(st: E2BState) -> list[dict[str, Any]]:
    ws = _ws(st)
    if ws is None:
        return []
    return [paused_listed(st, "sb-" + w["name"][len(PREFIX):], w) for w in ws.list_all()
            if w["name"].startswith(PREFIX) and w["status"] in ("suspended", "stale")]
