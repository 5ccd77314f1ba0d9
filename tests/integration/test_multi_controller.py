"""Fan-out across nodes: three real forkd-controller processes on this machine, each with its own port,
state, run dir and snapshot root, stand in for three nodes. One snapshot is created on the first and
pulled by the other two; a spawn of 30 is spread by their capacity (``--max-sandboxes`` 20, 10 and 10);
list and kill span all three, through the SDK, the CLI and the MCP tools; a controller killed between
the plan and the spawn, or while it restores its share, gives per-child errors for that share only (and
its next start kills the children it had started). Real VMs, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, free_port, kill_run_dir, make_token_file, start_daemon_process, wait_healthy

from forkd.sdk import (
    AsyncMultiController,
    BadRequestError,
    Controller,
    InternalServerError,
    MultiController,
    NotFoundError,
    Sandbox,
    SpawnError,
)
from forkd.sdk._multi import spread

pytestmark = pytest.mark.vm

TAG = "fanout-multi"
TIMEOUT = 600.0  # seconds: TCG on a shared 2-core machine
LIMITS = (20, 10, 10)  # --max-sandboxes of n1, n2, n3: their free_slots while idle
NAMES = ("n1", "n2", "n3")


def _kill_vms(run: Path) -> None:
    """The VMs a daemon left running (on purpose: they outlive it) go at the end of the module."""
    kill_run_dir(run)


@pytest.fixture(scope="module")
def nodes(forkd_home: Path, image: object) -> Iterator[list[Daemon]]:
    token = "multi-" + os.urandom(12).hex()
    daemons: list[Daemon] = []
    try:
        for name, limit in zip(NAMES, LIMITS, strict=True):
            d = forkd_home / f"node-{name}"
            (d / "snapshots").mkdir(parents=True)
            port = free_port()
            args = ["--bind", f"127.0.0.1:{port}", "--state", str(d / "state.json"),
                    "--audit-log", str(d / "audit.log"), "--token-file", str(make_token_file(d / "token", token)),
                    "--snapshot-root", str(d / "snapshots"), "--node-name", name, "--max-sandboxes", str(limit)]
            proc = start_daemon_process(args, d)
            daemons.append(Daemon(url=f"http://127.0.0.1:{port}", token=token, dir=d, proc=proc, args=args))
        for dm in daemons:
            wait_healthy(dm.url, dm.proc)
        yield daemons
    finally:
        for dm in daemons:
            if dm.proc.poll() is None:
                dm.stop()
            _kill_vms(dm.dir / "run")


@pytest.fixture(scope="module")
def multi(nodes: list[Daemon]) -> Iterator[MultiController]:
    with MultiController(",".join(d.url for d in nodes), nodes[0].token, timeout=TIMEOUT) as m:
        yield m


def _one(dm: Daemon) -> Controller:
    return Controller(dm.url, dm.token, timeout=TIMEOUT)


def _cli(*args: str, token_file: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FORKD_TOKEN_FILE": str(token_file)}
    env.pop("FORKD_URL", None)
    r = subprocess.run([sys.executable, "-m", "forkd.cli", *args], capture_output=True, text=True, env=env,
                       timeout=TIMEOUT)
    if check:
        assert r.returncode == 0, f"forkd {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_capacity_names_each_node(multi: MultiController, nodes: list[Daemon]) -> None:
    caps = multi.capacity()
    assert [caps[d.url].node for d in nodes] == list(NAMES)  # type: ignore[union-attr]
    for d, limit in zip(nodes, LIMITS, strict=True):
        cap = caps[d.url]
        assert not isinstance(cap, Exception), cap
        assert cap.max_sandboxes == limit and cap.sandboxes_running == 0
        assert cap.free_slots == limit  # 24 GiB: memory allows far more than the limit
        assert cap.vcpus >= 1 and 0 < cap.memory_available_bytes <= cap.memory_total_bytes
    assert set(multi.nodes()) == set(NAMES)


@pytest.fixture(scope="module")
def shared_snapshot(multi: MultiController, nodes: list[Daemon]) -> str:
    """One snapshot, created on n1 (a real boot), pulled by n2 through the SDK and pushed to n3 by the CLI."""
    with _one(nodes[0]) as c1, _one(nodes[1]) as c2:
        c1.create_snapshot(TAG, boot_timeout=TIMEOUT)
        url = f"{nodes[0].url}/v1/snapshots/{TAG}/pack"
        with pytest.raises(BadRequestError, match="sha256"):  # checked before anything is registered
            c2.pull_snapshot(url, token=nodes[0].token, sha256="0" * 64, timeout=TIMEOUT)
        with pytest.raises(InternalServerError, match="401"):  # the peer refused a wrong token: a 502
            c2.pull_snapshot(url, token="wrong-token-" + "x" * 16, timeout=TIMEOUT)
        assert TAG not in [s.tag for s in c2.list_snapshots()]
        got = c2.pull_snapshot(url, token=nodes[0].token, timeout=TIMEOUT)
        assert got.tags == [TAG] and got.registered == [TAG] and got.bytes > 0 and len(got.sha256) == 64
        assert got.source == url
    r = _cli("push", TAG, "--url", nodes[0].url, "--to", nodes[2].url, "--json", token_file=nodes[0].dir / "token")
    rows = json.loads(r.stdout)
    assert [(x["controller"], x["tags"], x["registered"]) for x in rows] == [(nodes[2].url, [TAG], [TAG])]
    r = _cli("pull", f"{nodes[0].url}/v1/snapshots/{TAG}/pack", "--url", f"{nodes[1].url},{nodes[2].url}",
             "--peer-token-file", str(nodes[0].dir / "token"), "--json", token_file=nodes[0].dir / "token")
    assert [(x["controller"], x["reused"]) for x in json.loads(r.stdout)] == [(nodes[1].url, [TAG]),
                                                                              (nodes[2].url, [TAG])]
    assert multi.distribute_snapshot(TAG) == {d.url: None for d in nodes}  # everywhere already
    infos = [_one(d).snapshot_info(TAG) for d in nodes]
    assert len({(i.memory_bytes, i.vmstate_bytes, i.image_id) for i in infos}) == 1
    return TAG


def test_spawn_of_30_is_spread_by_capacity_and_list_kill_span_all(multi: MultiController, nodes: list[Daemon],
                                                                  shared_snapshot: str) -> None:
    plan = multi.plan_spawn(30, shared_snapshot)
    want = dict(zip(NAMES, spread(30, LIMITS), strict=True))
    assert plan.counts == want == {"n1": 15, "n2": 8, "n3": 7}
    sbs = multi.spawn_sandboxes(shared_snapshot, 30, plan=plan, timeout=TIMEOUT, lifetime=3600)
    try:
        assert len(sbs) == 30 and Counter(sb.node for sb in sbs) == want
        for sb in sbs:
            assert sb.id == f"{sb.node}~{sb.local_id}" and sb.local_id.startswith("sb-")
        for name in NAMES:  # one answer from each node, through its qualified id
            first = next(sb for sb in sbs if sb.node == name)
            assert multi.get_sandbox(first.id).eval("6 * 7") == 42
        listed = multi.list_sandboxes()
        assert listed.errors == {} and {sb.id for sb in listed} == {sb.id for sb in sbs}
        for d, name in zip(nodes, NAMES, strict=True):  # each controller holds its own share only
            with _one(d) as c:
                assert {s.id for s in c.list_sandboxes()} == {sb.local_id for sb in sbs if sb.node == name}
                assert c.capacity().free_slots == LIMITS[NAMES.index(name)] - want[name]

        async def alist() -> set[str]:
            async with AsyncMultiController([d.url for d in nodes], nodes[0].token, timeout=TIMEOUT) as am:
                return {s.id for s in await am.list_sandboxes()}

        assert asyncio.run(alist()) == {sb.id for sb in sbs}
        assert multi.kill_sandboxes([sb.id for sb in sbs]) == {}
        assert list(multi.list_sandboxes()) == []
        with pytest.raises(NotFoundError, match="gone"):
            multi.get_sandbox(sbs[0].id)
    finally:
        multi.kill_sandboxes([sb.id for sb in sbs])


def test_cli_spawn_list_kill_across_controllers(nodes: list[Daemon], shared_snapshot: str) -> None:
    urls, token = ",".join(d.url for d in nodes), nodes[0].dir / "token"
    r = _cli("sandbox", "--url", urls, "spawn", "--tag", shared_snapshot, "-n", "6", "--json", token_file=token)
    rows = json.loads(r.stdout)
    assert Counter(x["node"] for x in rows) == dict(zip(NAMES, spread(6, LIMITS), strict=True))
    ids = {x["id"] for x in rows}
    assert all(i.split("~")[0] in NAMES for i in ids)
    one = next(iter(sorted(ids)))
    assert _cli("sandbox", "--url", urls, "eval", one, "2 ** 10", token_file=token).stdout.strip() == "1024"
    listed = json.loads(_cli("sandbox", "--url", urls, "list", "--json", token_file=token).stdout)
    assert {x["id"] for x in listed} == ids
    _cli("sandbox", "--url", urls, "kill", "--all", token_file=token)
    assert json.loads(_cli("sandbox", "--url", urls, "list", "--json", token_file=token).stdout) == []


def test_mcp_tools_span_controllers(nodes: list[Daemon], shared_snapshot: str) -> None:
    from forkd.mcp.backend import make_backend
    from forkd.mcp.tools import Tools

    backend = make_backend(",".join(d.url for d in nodes), nodes[0].token)
    try:
        tools = Tools(backend, default_lifetime_s=600)
        out = tools.spawn(shared_snapshot, n=4)
        assert out.errors == [] and Counter(i.split("~")[0] for i in out.sandbox_ids) == dict(
            zip(NAMES, spread(4, LIMITS), strict=True))
        assert tools.eval(out.sandbox_ids[-1], "sum(range(5))").value == 10
        assert {s.id for s in tools.list_sandboxes()} >= set(out.sandbox_ids)
        killed = tools.kill(out.sandbox_ids)
        assert killed.killed == out.sandbox_ids and killed.errors == {}
        assert not {s.id for s in tools.list_sandboxes()} & set(out.sandbox_ids)
    finally:
        backend.close()


def test_a_controller_killed_mid_way_fails_its_share_only(multi: MultiController, nodes: list[Daemon],
                                                          shared_snapshot: str) -> None:
    plan = multi.plan_spawn(30, shared_snapshot)  # all three answered: n3 has a share
    assert plan.counts == {"n1": 15, "n2": 8, "n3": 7}
    nodes[2].proc.send_signal(signal.SIGKILL)  # n3 dies between the plan and the spawn
    nodes[2].proc.wait(timeout=60)
    res = multi.spawn_sandboxes(shared_snapshot, 30, plan=plan, timeout=TIMEOUT, return_exceptions=True)
    started = [r for r in res if isinstance(r, Sandbox)]
    try:
        failed = [r for r in res if isinstance(r, SpawnError)]
        n3 = next(s for s in plan.shares if s.node == "n3")
        assert [f.index for f in failed] == list(range(n3.first, n3.first + n3.count))  # its share, by index
        assert all("controller n3" in f.errors[0][1] for f in failed)
        assert Counter(sb.node for sb in started) == {"n1": 15, "n2": 8}
        listed = multi.list_sandboxes()
        assert set(listed.errors) == {nodes[2].url} and {s.id for s in listed} == {sb.id for sb in started}
        errors = multi.kill_sandboxes([sb.id for sb in started] + ["n3~sb-0123456789abcdef"])
        assert list(errors) == ["n3~sb-0123456789abcdef"]  # its controller is down; the rest went
        assert list(multi.list_sandboxes()) == []
    finally:
        multi.kill_sandboxes([sb.id for sb in started])
        nodes[2].restart()  # its state and sandboxes come back with it (none here)



def test_a_controller_killed_during_its_spawn_fails_its_share_and_its_vms_go(
        multi: MultiController, nodes: list[Daemon], shared_snapshot: str) -> None:
    """SIGKILL while n3 is restoring its share: the request's answer never comes, so its whole share is
    errors (its children that had started are orphans its next start kills); n1's and n2's start."""
    import threading
    import time

    from forkd.engine.vm import recorded_vms

    run3 = nodes[2].dir / "run"
    before = {r.workdir.path.name for r in recorded_vms(run3)}
    plan = multi.plan_spawn(30, shared_snapshot)
    n3 = next(s for s in plan.shares if s.node == "n3")
    out: list[list[Sandbox | SpawnError[Sandbox]]] = []
    t = threading.Thread(target=lambda: out.append(multi.spawn_sandboxes(
        shared_snapshot, 30, plan=plan, timeout=TIMEOUT, return_exceptions=True)))
    t.start()
    deadline = time.monotonic() + TIMEOUT
    while not {r.workdir.path.name for r in recorded_vms(run3) if r.meta.get("role") == "child"} - before:
        assert time.monotonic() < deadline and t.is_alive(), "n3 started no child"
        time.sleep(0.02)
    nodes[2].proc.send_signal(signal.SIGSTOP)  # frozen at once, then killed: it cannot answer in between
    nodes[2].proc.send_signal(signal.SIGKILL)
    nodes[2].proc.wait(timeout=60)
    t.join(timeout=TIMEOUT)
    res = out[0]
    started = [r for r in res if isinstance(r, Sandbox)]
    try:
        failed = [r for r in res if isinstance(r, SpawnError)]
        if not failed and Counter(sb.node for sb in started)["n3"] == n3.count:
            pytest.skip("n3 answered before it was stopped (its share was done already)")
        assert [f.index for f in failed] == list(range(n3.first, n3.first + n3.count))
        assert all("controller n3" in f.errors[0][1] for f in failed)
        assert Counter(sb.node for sb in started) == {"n1": plan.counts["n1"], "n2": plan.counts["n2"]}
    finally:
        multi.kill_sandboxes([sb.id for sb in started])
    nodes[2].restart()  # reconcile: the children it started but never recorded are orphans, killed
    assert [r for r in recorded_vms(run3) if r.alive and r.meta.get("role") == "child"] == []
    with _one(nodes[2]) as c3:
        assert c3.list_sandboxes() == []
