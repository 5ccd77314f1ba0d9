"""The multi-controller client without VMs: the spreading arithmetic, qualified ids, URL lists and DNS
names, and MultiController / AsyncMultiController against controllers answered by httpx's MockTransport
(one of them failing, to see per-child errors for its share only)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from forkd.sdk import (
    AsyncController,
    AsyncMultiController,
    Controller,
    ForkdAPIError,
    MultiController,
    NotFoundError,
    SpawnError,
    connect,
)
from forkd.sdk._base import qualify, split_id
from forkd.sdk._multi import expand, is_multi, make_plan, split_urls, spread

# ---------------------------------------------------------------- spreading


def test_spread_is_proportional_to_free_slots() -> None:
    assert spread(30, [20, 10, 10]) == [15, 8, 7]  # 7.5 and 7.5: the tie goes to the earlier controller
    assert spread(30, [10, 10, 10]) == [10, 10, 10]
    assert spread(10, [100, 0, 300]) == [3, 0, 7]  # 2.5 and 7.5
    assert spread(1, [5, 9, 9]) == [0, 1, 0]  # the largest share first, then the earlier
    assert spread(7, [1, 1, 1, 100]) == [0, 0, 0, 7]


def test_spread_caps_each_controller_at_its_free_slots() -> None:
    assert spread(50, [20, 10, 10]) == [20, 10, 10]  # 10 left over: no controller has room
    assert spread(5, [0, 0]) == [0, 0]
    assert spread(3, [2000, 1], cap=1000) == [3, 0]
    assert spread(1500, [2000, 2000], cap=1000) == [750, 750]
    assert spread(3, [-4, 5]) == [0, 3]  # a negative answer counts as none
    with pytest.raises(ValueError, match="n"):
        spread(-1, [1])


def test_spread_properties_on_random_inputs() -> None:
    rng = random.Random(14)
    for _ in range(2000):
        free = [rng.choice([0, 1, 2, 3, 7, 10, 64, 333, 1000]) for _ in range(rng.randint(1, 8))]
        n = rng.randint(0, 1200)
        got = spread(n, free)
        assert got == spread(n, free)  # deterministic
        assert all(0 <= g <= f for g, f in zip(got, free, strict=True))
        assert sum(got) == min(n, sum(free))
        if sum(free) > n:  # within one of the exact proportional share
            assert all(abs(g - n * f / sum(free)) < 1 for g, f in zip(got, free, strict=True))


def test_plan_skips_controllers_that_are_down_or_lack_the_snapshot() -> None:
    plan = make_plan(10, [("a", "http://a", "na", 10), ("b", "http://b", None, "connection refused"),
                          ("c", "http://c", "nc", None), ("d", "http://d", "nd", 30)], "snap")
    assert plan.counts == {"na": 3, "nd": 7} and plan.down == {"http://b": "connection refused"}
    assert plan.missing == ["http://c"] and plan.unplaced == 0
    assert [(s.first, s.count) for s in plan.shares] == [(0, 3), (3, 7)]
    assert make_plan(20, [("a", "http://a", "na", 5)]).unplaced == 15
    with pytest.raises(NotFoundError, match="snap"):
        make_plan(1, [("a", "http://a", "na", None)], "snap")


# ---------------------------------------------------------------- ids and URLs


def test_qualified_ids() -> None:
    assert qualify("n1", "sb-00ff") == "n1~sb-00ff" and qualify(None, "sb-00ff") == "sb-00ff"
    assert split_id("n1~sb-00ff") == ("n1", "sb-00ff")
    assert split_id("node.example-1~sb-00ff") == ("node.example-1", "sb-00ff")
    assert split_id("sb-00ff") == (None, "sb-00ff")
    for bad in ("~sb-1", "n1~", "", None, 5):
        with pytest.raises(ValueError, match="sandbox_id"):
            split_id(bad)


def test_url_lists_and_dns_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert split_urls(" http://a:1, http://b:2 ,,http://a:1") == ["http://a:1", "http://b:2"]
    assert split_urls(["http://a:1", "http://b:2"]) == ["http://a:1", "http://b:2"]
    monkeypatch.setenv("FORKD_URL", "http://x:1,http://y:2")
    assert split_urls(None) == ["http://x:1", "http://y:2"] and is_multi(None)
    assert is_multi("dns+http://forkd.ns.svc:8889") and is_multi(["http://a"]) and not is_multi("http://a:1")
    with pytest.raises(ValueError, match="empty"):
        split_urls(" , ")

    def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("forkd.ns.svc", 8889)
        return ["10.0.0.2", "10.0.0.1", "fd00::1"]

    got = expand(["dns+http://forkd.ns.svc:8889/prefix", "http://10.0.0.2:8889/prefix", "unix:/run/f.sock"], resolver)
    assert got == ["http://10.0.0.2:8889/prefix", "http://10.0.0.1:8889/prefix", "http://[fd00::1]:8889/prefix",
                   "unix:/run/f.sock"]
    with pytest.raises(ValueError, match="dns"):
        expand(["dns+ftp://x:1"], resolver)
    with pytest.raises(ValueError, match="no address"):
        expand(["dns+http://forkd.ns.svc:8889"], lambda h, p: [])
    with pytest.raises(ValueError, match="expected"):
        expand(["ftp://a"])


def test_getaddrinfo_resolver_on_localhost() -> None:
    from forkd.sdk._multi import getaddrinfo_resolver

    assert "127.0.0.1" in getaddrinfo_resolver("localhost", 8889)
    with pytest.raises(ValueError, match="cannot resolve"):
        getaddrinfo_resolver("no-such-host.invalid", 80)


def test_single_controller_refuses_a_list_and_connect_picks() -> None:
    with pytest.raises(ValueError, match="MultiController"):
        Controller("http://a:1,http://b:2")
    one, many = connect("http://a:1"), connect("http://a:1,http://b:2")
    assert isinstance(one, Controller) and isinstance(many, MultiController)
    assert many.urls == ["http://a:1", "http://b:2"]
    one.close()
    many.close()


# ---------------------------------------------------------------- against mock controllers


class FakeNode:
    """One controller's answers: capacity, snapshots, spawn (counting), list, get and kill."""

    def __init__(self, node: str, free: int, snapshots: tuple[str, ...] = ("snap",), down: bool = False) -> None:
        self.node, self.free, self.snapshots, self.down = node, free, snapshots, down
        self.sandboxes: dict[str, dict[str, Any]] = {}
        self.spawned: list[int] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=req)
        path, m = req.url.path, req.method
        if path == "/v1/capacity":
            return httpx.Response(200, json={"node": self.node, "free_slots": self.free, "vcpus": 2})
        if path.startswith("/v1/snapshots/") and path.endswith("/info"):
            tag = path.split("/")[3]
            if tag in self.snapshots:
                return httpx.Response(200, json={"tag": tag})
            return httpx.Response(404, json={"error": f"snapshot {tag} not found"})
        if path == "/v1/sandboxes" and m == "POST":
            body = json.loads(req.content)
            self.spawned.append(body["n"])
            out = []
            for i in range(body["n"]):
                sid = f"sb-{self.node}{len(self.sandboxes):04d}"
                info = {"id": sid, "snapshot_tag": body["snapshot_tag"], "status": "running", "pid": 1}
                self.sandboxes[sid] = info
                out.append({"index": i, "sandbox": info, "error": None})
            return httpx.Response(201, json=out)
        if path == "/v1/sandboxes" and m == "GET":
            return httpx.Response(200, json=list(self.sandboxes.values()))
        if path.startswith("/v1/sandboxes/"):
            sid = path.split("/")[3]
            if sid not in self.sandboxes:
                return httpx.Response(404, json={"error": f"sandbox {sid} not found"})
            if m == "DELETE":
                del self.sandboxes[sid]
                return httpx.Response(204)
            return httpx.Response(200, json=self.sandboxes[sid])
        return httpx.Response(404, json={"error": "no route"})


def _multi(fakes: list[FakeNode]) -> MultiController:
    return MultiController(controllers=[
        Controller(f"http://{f.node}.test:8889", "tok", transport=httpx.MockTransport(f)) for f in fakes])


def test_spawn_spreads_and_a_down_controller_fails_its_share_only() -> None:
    fakes = [FakeNode("n1", 20), FakeNode("n2", 10), FakeNode("n3", 10)]
    with _multi(fakes) as m:
        plan = m.plan_spawn(30, "snap")
        assert plan.counts == {"n1": 15, "n2": 8, "n3": 7}
        fakes[1].down = True  # n2 goes down after the plan
        res = m.spawn_sandboxes("snap", 30, plan=plan, return_exceptions=True)
        assert len(res) == 30
        failed = [r for r in res if isinstance(r, SpawnError)]
        assert [f.index for f in failed] == list(range(15, 23))
        assert all("controller n2 (http://n2.test:8889) failed" in f.errors[0][1] for f in failed)
        ok = [r for r in res if not isinstance(r, SpawnError)]
        assert [sb.node for sb in ok] == ["n1"] * 15 + ["n3"] * 7
        assert all(sb.id == f"{sb.node}~{sb.local_id}" for sb in ok)
        assert fakes[0].spawned == [15] and fakes[2].spawned == [7]
        with pytest.raises(SpawnError) as ei:  # the default raises, carrying the started ones
            m.spawn_sandboxes("snap", 30, plan=plan)
        assert len(ei.value.sandboxes) == 22 and [i for i, _ in ei.value.errors] == list(range(15, 23))

        listed = m.list_sandboxes()
        assert len(listed) == 44 and list(listed.errors) == ["http://n2.test:8889"]
        a_n3 = next(sb for sb in ok if sb.node == "n3")
        assert m.get_sandbox(a_n3.id).local_id == a_n3.local_id
        assert m.get_sandbox(a_n3.local_id).id == a_n3.id  # a plain id is looked for everywhere
        errors = m.kill_sandboxes([sb.id for sb in listed] + ["n2~sb-x", "n9~sb-y"])
        assert set(errors) == {"n2~sb-x", "n9~sb-y"} and isinstance(errors["n9~sb-y"], NotFoundError)
        assert fakes[0].sandboxes == {} and fakes[2].sandboxes == {}


def test_controllers_down_at_planning_or_without_the_snapshot_get_no_share() -> None:
    fakes = [FakeNode("n1", 4), FakeNode("n2", 10, down=True), FakeNode("n3", 10, snapshots=())]
    with _multi(fakes) as m:
        res = m.spawn_sandboxes("snap", 6, return_exceptions=True)
        assert [type(r).__name__ for r in res] == ["Sandbox"] * 4 + ["SpawnError"] * 2  # n1 holds 4 at most
        assert isinstance(res[5], SpawnError) and "no controller has room" in res[5].errors[0][1]
        assert fakes[2].spawned == []
        with pytest.raises(NotFoundError, match="other"):
            m.plan_spawn(1, "other")


def test_duplicate_node_names_are_refused() -> None:
    ctls = [Controller(f"http://host{i}.test:8889", transport=httpx.MockTransport(FakeNode("same", 1)))
            for i in range(2)]
    with MultiController(controllers=ctls) as m:
        caps = m.capacity()
        assert any(isinstance(c, ForkdAPIError) and "--node-name" in str(c) for c in caps.values())


def test_async_mirror() -> None:
    fakes = [FakeNode("n1", 20), FakeNode("n2", 10), FakeNode("n3", 10)]

    async def run() -> None:
        ctls = [AsyncController(f"http://{f.node}.test:8889", "tok", transport=httpx.MockTransport(f)) for f in fakes]
        async with AsyncMultiController(controllers=ctls) as m:
            plan = await m.plan_spawn(30, "snap")
            assert plan.counts == {"n1": 15, "n2": 8, "n3": 7}
            fakes[2].down = True
            res = await m.spawn_sandboxes("snap", 30, plan=plan, return_exceptions=True)
            assert [r.index for r in res if isinstance(r, SpawnError)] == list(range(23, 30))
            listed = await m.list_sandboxes()
            assert len(listed) == 23 and list(listed.errors) == ["http://n3.test:8889"]
            assert await m.kill_sandboxes([s.id for s in listed]) == {}

    asyncio.run(run())


def _sync_async_methods(cls: type, acls: type, skip: Callable[[str], bool]) -> tuple[set[str], set[str]]:
    names = {n for n in dir(cls) if not n.startswith("_") and not skip(n)}
    anames = {n for n in dir(acls) if not n.startswith("_") and not skip(n)}
    return names, anames


def test_the_async_client_mirrors_the_sync_one() -> None:
    names, anames = _sync_async_methods(MultiController, AsyncMultiController, lambda n: False)
    assert names == anames


def test_mcp_tools_over_several_controllers(monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.mcp.backend import RemoteBackend, make_backend
    from forkd.mcp.tools import Tools

    fakes = [FakeNode("n1", 2), FakeNode("n2", 2)]
    multi = _multi(fakes)

    class Backend:
        mode, url = "daemon", ",".join(multi.urls)

        def controller(self) -> MultiController:
            return multi

        def redact(self, text: str) -> str:
            return text

        def close(self) -> None:
            multi.close()

    tools = Tools(Backend())  # type: ignore[arg-type]
    out = tools.spawn("snap", n=3)
    assert out.errors == [] and [i.split("~")[0] for i in out.sandbox_ids] == ["n1", "n1", "n2"]
    assert {s.id for s in tools.list_sandboxes()} == set(out.sandbox_ids)
    fakes[1].down = True
    killed = tools.kill(out.sandbox_ids)
    assert killed.killed == out.sandbox_ids[:2] and list(killed.errors) == [out.sandbox_ids[2]]
    backend = make_backend("http://a:1,http://b:2", "tok")
    assert isinstance(backend, RemoteBackend) and isinstance(backend.controller(), MultiController)
    assert backend.url == "http://a:1,http://b:2"
    backend.close()


def test_refresh_follows_the_dns_name() -> None:
    answers = [["10.0.0.1", "10.0.0.2"]]

    def resolver(host: str, port: int) -> list[str]:
        return answers[-1]

    m = MultiController("dns+http://forkd.ns.svc:8889", "tok", resolver=resolver)
    first = m.controllers
    assert m.urls == ["http://10.0.0.1:8889", "http://10.0.0.2:8889"]
    answers.append(["10.0.0.2", "10.0.0.3"])
    m.refresh()
    assert m.urls == ["http://10.0.0.2:8889", "http://10.0.0.3:8889"] and m.controllers[0] is first[1]

    async def run() -> list[str]:
        am = AsyncMultiController("dns+http://forkd.ns.svc:8889", "tok", resolver=resolver)
        answers.append(["10.0.0.9"])
        await am.refresh()
        await am.close()
        return am.urls

    assert asyncio.run(run()) == ["http://10.0.0.9:8889"]
    m.close()


# ---------------------------------------------------------------- hostile input (review fixes)


def test_qualified_ids_cannot_route_elsewhere() -> None:
    for bad in ("a/b~sb-1", "..~sb-1", "n1~..", "n1~../../v1/snapshots", "n1~sb%2F1", "n1~sb/1", "n%2F1~sb-1",
                "n1~sb-1?x=1", "n1~" + "s" * 65):
        with pytest.raises(ValueError, match="sandbox_id"):
            split_id(bad)
    seen: list[str] = []
    fake = FakeNode("n1", 2)

    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.raw_path.decode())
        return fake(req)

    ctl = Controller("http://n1.test:8889", "tok", transport=httpx.MockTransport(handle))
    with MultiController(controllers=[ctl]) as m:
        for bad in ("n1~..", "n1~sb/../../x"):
            with pytest.raises(ValueError):
                m.kill(bad)
        errors = m.kill_sandboxes(["n1~..", ".."])
        assert set(errors) == {"n1~..", ".."}
        for dots in (".", ".."):
            with pytest.raises(ValueError, match="sandbox_id"):
                m.controllers[0].sandbox(dots)
    assert all(p == "/v1/capacity" for p in seen), seen  # nothing but the probe went out


def test_dns_names_are_bounded_and_take_no_credentials() -> None:
    many = [f"10.0.{i // 256}.{i % 256}" for i in range(300)]
    with pytest.raises(ValueError, match="at most 256"):
        expand(["dns+http://big.svc:8889"], lambda h, p: many)
    assert len(expand(["dns+http://big.svc:8889"], lambda h, p: many[:256])) == 256
    with pytest.raises(ValueError, match="more than 256"):
        expand([f"http://h{i}:1" for i in range(257)])
    with pytest.raises(ValueError, match="credentials"):
        expand(["dns+http://u:p@big.svc:8889"], lambda h, p: many[:1])


def test_share_results_keep_global_indexes_whatever_a_controller_answers() -> None:
    from forkd.sdk._multi import Share, share_results

    share = Share("c", "n2", 3, 5)
    short = share_results(share, ["a"], "http://n2")  # one child answered for three
    assert [i for i, _ in short] == [5, 6, 7] and short[0][1] == "a"
    assert all(isinstance(r, SpawnError) and "answered 1 children for 3" in r.errors[0][1] for _i, r in short[1:])
    long = share_results(share, ["a", "b", "c", "d", "e"], "http://n2")
    assert [i for i, _ in long] == [5, 6, 7]


def test_capacity_probes_are_bounded_in_time_and_checked() -> None:
    timeouts: list[Any] = []

    class Odd(FakeNode):
        def __call__(self, req: httpx.Request) -> httpx.Response:
            timeouts.append(req.extensions.get("timeout"))
            if req.url.path == "/v1/capacity" and self.node == "odd":
                return httpx.Response(200, json={"node": self.node, "free_slots": "lots"})
            return super().__call__(req)

    ctls = [Controller(f"http://{n}.test:8889", "tok", timeout=None, transport=httpx.MockTransport(Odd(n, 4)))
            for n in ("n1", "odd")]
    with MultiController(controllers=ctls) as m:
        plan = m.plan_spawn(2)
        assert plan.counts == {"n1": 2} and "free_slots" in plan.down["http://odd.test:8889"]
    assert timeouts[0]["read"] == 15.0  # a client without a timeout still bounds the probe


def test_sync_and_async_raise_a_bad_argument_alike() -> None:
    fakes = [FakeNode("n1", 2), FakeNode("n2", 2)]
    with _multi(fakes) as m, pytest.raises(ValueError, match="tag"):
        m.snapshot_holders("..")

    async def run() -> None:
        ctls = [AsyncController(f"http://{f.node}.test:8889", "tok", transport=httpx.MockTransport(f)) for f in fakes]
        async with AsyncMultiController(controllers=ctls) as am:
            with pytest.raises(ValueError, match="tag"):
                await am.snapshot_holders("..")

    asyncio.run(run())
