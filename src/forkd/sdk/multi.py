"""The synchronous multi-controller client: one :class:`~forkd.sdk.Controller` per controller (one per
node), a spawn of N spread over them by free capacity, ids that say which node holds a sandbox, list
and kill across all. ``amulti.py`` mirrors it for asyncio; the I/O-free half is ``_multi.py``.

Example::

    from forkd import connect

    with connect("http://n1:8889,http://n2:8889") as ctl:      # or dns+http://forkd.ns.svc:8889
        ctl.distribute_snapshot("pyagent")                    # every controller has the snapshot
        sbs = ctl.spawn_sandboxes("pyagent", n=30, return_exceptions=True)
        ctl.kill_sandboxes([sb.id for sb in sbs if not isinstance(sb, Exception)])
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import httpx

from forkd.sdk import _base as b
from forkd.sdk import _multi as mm
from forkd.sdk._config import Verify
from forkd.sdk.errors import APIConnectionError, ForkdAPIError, NotFoundError, SpawnError
from forkd.sdk.models import CapacityInfo, PullResult, SnapshotInfo, VersionInfo
from forkd.sdk.sync import Controller, Sandbox

__all__ = ["MultiController", "connect"]

T = TypeVar("T")
R = TypeVar("R")


def connect(url: str | Sequence[str] | None = None, token: str | None = None, *, timeout: float | None = 60.0,
            verify: Verify = True) -> Controller | MultiController:
    """A :class:`Controller` for one URL, a :class:`MultiController` for several (a list, commas, or a
    ``dns+http://NAME:PORT`` name); ``url`` defaults to ``$FORKD_URL``."""
    if mm.is_multi(url):
        return MultiController(url, token, timeout=timeout, verify=verify)
    return Controller(url if isinstance(url, str) or url is None else url[0], token, timeout=timeout, verify=verify)


class MultiController:
    """Several forkd controllers as one: ``url`` is a list, a comma-separated string or ``dns+`` names
    (default ``$FORKD_URL``), all reached with ``token`` (``$FORKD_TOKEN``); ``timeout`` and ``verify``
    as for :class:`Controller`. ``controllers`` gives ready-made clients instead (tests, custom transports).

    Sandboxes it returns have ids ``NODE~sb-...`` (the node holding them); :meth:`get_sandbox`,
    :meth:`sandbox` and :meth:`kill` take those (or a plain id, looked for on every controller).
    Requests to the controllers go out concurrently. Closing it closes the clients; no sandbox is killed.
    """

    def __init__(self, url: str | Sequence[str] | None = None, token: str | None = None, *,
                 timeout: float | None = 60.0, verify: Verify = True,
                 controllers: Sequence[Controller] | None = None,
                 resolver: mm.Resolver = mm.getaddrinfo_resolver) -> None:
        self._make: Callable[[str], Controller] = lambda u: Controller(u, token, timeout=timeout, verify=verify)
        self._spec: tuple[str | Sequence[str] | None, mm.Resolver] | None = None
        if controllers is not None:
            self._ctls = list(controllers)
        else:
            self._spec = (url, resolver)
            self._ctls = [self._make(u) for u in mm.expand(mm.split_urls(url), resolver)]
        if not self._ctls:
            raise ValueError("url: no controller")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Resolve the URL list's ``dns+`` names again: controllers that appeared are added, those whose
        address is gone are dropped (their clients closed). Nothing happens for ``controllers=``."""
        if self._spec is None:
            return
        urls = mm.expand(mm.split_urls(self._spec[0]), self._spec[1])
        old = {c.url: c for c in self._ctls}
        self._ctls = [old.pop(u) if u in old else self._make(u) for u in urls]
        for c in old.values():
            c.close()

    @property
    def controllers(self) -> list[Controller]:
        """One client per controller, in the order given (DNS names: by address)."""
        return list(self._ctls)

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self._ctls]

    def __repr__(self) -> str:
        return f"MultiController(urls={self.urls!r})"

    def close(self) -> None:
        """Close every client's connections (sandboxes keep running)."""
        for c in self._ctls:
            c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- fan-out
    def _each(self, fn: Callable[[Controller], R], ctls: Sequence[Controller] | None = None
              ) -> list[R | ForkdAPIError]:
        """``fn(controller)`` on each controller at once; an SDK error is that controller's answer."""
        targets = self._ctls if ctls is None else list(ctls)

        def one(c: Controller) -> R | ForkdAPIError:
            try:
                return fn(c)
            except ForkdAPIError as e:  # a ValueError (a bad argument, the same for all) is raised
                return e

        if len(targets) == 1:
            return [one(targets[0])]
        with ThreadPoolExecutor(max_workers=min(32, len(targets)) or 1) as pool:
            return list(pool.map(one, targets))

    def _learn(self, c: Controller) -> CapacityInfo:
        """``c``'s capacity, its node name recorded on it (checked, and unique among the clients)."""
        cap = c._request(b.op_capacity(b.probe_timeout(c._timeout)))  # a hung controller: down, not waited for
        node = mm.check_node(cap.node, c.url)
        with self._lock:  # two controllers learnt at once must not both take one name
            mm.check_unique([(node, c.url)] + [(o.node, o.url) for o in self._ctls if o is not c and o.node])
            c._node = node
        return cap

    def _named(self, c: Controller) -> Controller:
        if c.node is None:
            self._learn(c)
        return c

    # -- service
    def health(self) -> dict[str, bool]:
        """URL -> whether that controller answers ``/healthz``."""
        got = self._each(lambda c: c.health())
        return {c.url: r is True for c, r in zip(self._ctls, got, strict=True)}

    def version(self) -> VersionInfo:
        """The version of the first controller that answers (APIConnectionError if none does)."""
        for c in self._ctls:
            try:
                return c.version()
            except APIConnectionError:
                continue
        raise APIConnectionError(f"no controller answers: {', '.join(self.urls)}")

    def capacity(self) -> dict[str, CapacityInfo | ForkdAPIError]:
        """URL -> that controller's capacity (or why it did not answer); node names are learnt here."""
        got = self._each(self._learn)
        return {c.url: r for c, r in zip(self._ctls, got, strict=True)}

    def nodes(self) -> dict[str, Controller]:
        """Node name -> client, for the controllers that answer."""
        self._each(self._named, [c for c in self._ctls if c.node is None])
        return {c.node: c for c in self._ctls if c.node is not None}

    # -- snapshots
    def list_snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot tag on any controller that answers (as the first one holding it describes it)."""
        seen: dict[str, SnapshotInfo] = {}
        for got in self._each(lambda c: c.list_snapshots()):
            if not isinstance(got, ForkdAPIError):
                for s in got:
                    seen.setdefault(s.tag, s)
        return list(seen.values())

    def snapshot_holders(self, tag: str) -> list[Controller]:
        """The controllers that have snapshot ``tag`` (NotFoundError from the others is expected)."""
        got = self._each(lambda c: c.snapshot_info(tag))
        return [c for c, r in zip(self._ctls, got, strict=True) if isinstance(r, SnapshotInfo)]

    def distribute_snapshot(self, tag: str, *, force: bool = False, timeout: float = 3600.0
                            ) -> dict[str, PullResult | ForkdAPIError | None]:
        """Make every controller have snapshot ``tag``: each one without it pulls it from one that has it
        (two at a time per source, and each controller that got it serves the next ones). URL -> the
        pull's result, None where it was already, or the error. NotFoundError if no controller has it."""
        sources = self.snapshot_holders(tag)
        if not sources:
            raise NotFoundError(f"no controller has snapshot {tag}", status=404)
        out: dict[str, PullResult | ForkdAPIError | None] = {c.url: None for c in sources}
        todo = [c for c in self._ctls if c.url not in out]
        while todo:
            pairs = list(zip([s for s in sources for _ in (0, 1)], todo, strict=False))
            todo = todo[len(pairs):]

            def pull(pair: tuple[Controller, Controller]) -> PullResult:
                src, dst = pair
                url, token = src._pack_source(tag)
                return dst.pull_snapshot(url, token=token, force=force, timeout=timeout)

            with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
                results = list(pool.map(lambda p: _catch(pull, p), pairs))
            for (_src, dst), r in zip(pairs, results, strict=True):
                out[dst.url] = r
                if isinstance(r, PullResult):
                    sources.append(dst)
        return out

    def create_snapshot(self, tag: str, **kw: Any) -> SnapshotInfo:
        """Create snapshot ``tag`` on the first controller that answers (keywords as
        :meth:`Controller.create_snapshot`), then :meth:`distribute_snapshot` it to the others."""
        for c in self._ctls:
            try:
                c.health()
            except APIConnectionError:
                continue
            info = c.create_snapshot(tag, **kw)
            self.distribute_snapshot(tag)
            return info
        raise APIConnectionError(f"no controller answers: {', '.join(self.urls)}")

    def delete_snapshot(self, tag: str, *, force: bool = False, cascade: bool = False) -> None:
        """Delete ``tag`` on every controller that has it; NotFoundError if none has it, else the first error."""
        got = self._each(lambda c: c.delete_snapshot(tag, force=force, cascade=cascade))
        errors = [e for e in got if isinstance(e, ForkdAPIError)]
        if len(errors) == len(got) or any(not isinstance(e, NotFoundError) for e in errors):
            raise next((e for e in errors if not isinstance(e, NotFoundError)), errors[0])

    # -- spawning
    def plan_spawn(self, n: int, snapshot_tag: str | None = None) -> mm.SpawnPlan[Controller]:
        """How :meth:`spawn_sandboxes` would spread ``n`` children now: ``GET /v1/capacity`` on each
        controller, then ``n`` split by ``free_slots`` (see :func:`forkd.sdk._multi.spread`). With
        ``snapshot_tag``, only over the controllers that have it (the others are in ``plan.missing``;
        NotFoundError if none has it)."""
        b.check_int(n, "n", 1, b.MAX_CHILDREN * len(self._ctls))

        def probe(c: Controller) -> CapacityInfo:
            cap = self._learn(c)
            if snapshot_tag is not None:
                c.snapshot_info(snapshot_tag)
            return cap

        got = self._each(probe)
        return mm.make_plan(n, mm.probes(self._ctls, [c.url for c in self._ctls], [c.node for c in self._ctls], got),
                            snapshot_tag)

    @overload
    def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, plan: mm.SpawnPlan[Controller] | None = None,
                        return_exceptions: Literal[False] = False, **kw: Any) -> list[Sandbox]: ...

    @overload
    def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, plan: mm.SpawnPlan[Controller] | None = None,
                        return_exceptions: Literal[True], **kw: Any) -> list[Sandbox | SpawnError[Sandbox]]: ...

    def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *, plan: mm.SpawnPlan[Controller] | None = None,
                        return_exceptions: bool = False, **kw: Any
                        ) -> list[Sandbox] | list[Sandbox | SpawnError[Sandbox]]:
        """Fork ``n`` sandboxes from ``snapshot_tag``, spread by free capacity over the controllers that
        have it (:meth:`plan_spawn`, or the ``plan`` given), one request per controller, all at once. Keywords
        are :meth:`Controller.spawn_sandboxes`'s (network, lifetime, metadata, timeout, ...).

        Each child succeeds or fails on its own, in global index order (controller by controller): a
        controller that fails (down, killed mid-way, snapshot missing) gives one error per child of its
        share, the others' children start; children no controller has room for are errors too. Raised
        as one :class:`SpawnError` with the started ones in ``.sandboxes``, or, with
        ``return_exceptions=True``, one ``SpawnError`` in place of each failed child.
        """
        if plan is None:
            plan = self.plan_spawn(n, snapshot_tag)
        elif plan.n != n:
            raise ValueError(f"plan: made for n={plan.n}, not {n}")

        def one(share: mm.Share[Controller]) -> list[Sandbox | SpawnError[Sandbox]] | ForkdAPIError:
            try:
                return share.controller.spawn_sandboxes(snapshot_tag, share.count, return_exceptions=True, **kw)
            except ForkdAPIError as e:
                return e

        if plan.shares:
            with ThreadPoolExecutor(max_workers=len(plan.shares)) as pool:
                answers = list(pool.map(one, plan.shares))
        else:
            answers = []
        indexed: list[tuple[int, Sandbox | SpawnError[Sandbox]]] = []
        for share, got in zip(plan.shares, answers, strict=True):
            indexed += mm.share_results(share, got, share.controller.url)
        indexed += mm.unplaced_results(plan)
        results = [r for _i, r in sorted(indexed, key=lambda x: x[0])]
        return results if return_exceptions else b.spawn_or_raise(results)

    def spawn_sandbox(self, snapshot_tag: str, **kw: Any) -> Sandbox:
        """One sandbox, on the controller with the most free slots (see :meth:`spawn_sandboxes`)."""
        return self.spawn_sandboxes(snapshot_tag, 1, **kw)[0]

    # -- sandboxes
    def list_sandboxes(self, *, metadata: Mapping[str, str] | None = None) -> mm.SandboxList[Sandbox]:
        """The sandboxes of every controller (``NODE~`` ids), those with all of ``metadata``; a controller
        that does not answer is in the result's ``errors`` (URL -> error), the others' are listed."""
        got = self._each(lambda c: self._named(c).list_sandboxes(metadata=metadata))
        out = mm.SandboxList[Sandbox]()
        for c, r in zip(self._ctls, got, strict=True):
            if isinstance(r, ForkdAPIError):
                out.errors[c.url] = r
            else:
                out.extend(r)
        return out

    def controller_of(self, sandbox_id: str) -> tuple[Controller, str]:
        """(the client of the controller holding ``sandbox_id``, its plain id). A qualified id names the
        node; a plain one is looked for on every controller. NotFoundError if none holds it."""
        node, sid = b.split_id(sandbox_id)
        if node is not None:
            ctl = self.nodes().get(node)
            if ctl is None:
                raise NotFoundError(f"sandbox {sandbox_id} not found: no controller that answers is node {node!r}",
                                    status=404)
            return ctl, sid
        got = self._each(lambda c: self._named(c).get_sandbox(sid))
        for c, r in zip(self._ctls, got, strict=True):
            if isinstance(r, Sandbox):
                return c, sid
        raise NotFoundError(f"sandbox {sid} not found on any controller", status=404)

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle on ``sandbox_id`` (``NODE~sb-...``: no round trip to the sandbox)."""
        ctl, sid = self.controller_of(sandbox_id)
        return ctl.sandbox(sid)

    def get_sandbox(self, sandbox_id: str) -> Sandbox:
        """The sandbox with that id, fetched from its controller; NotFoundError if there is none."""
        ctl, sid = self.controller_of(sandbox_id)
        return ctl.get_sandbox(sid)

    def kill(self, sandbox_id: str) -> None:
        """Kill one sandbox (a sandbox already gone is not an error)."""
        self.sandbox(sandbox_id).kill()

    def kill_sandboxes(self, sandbox_ids: Sequence[str]) -> dict[str, ForkdAPIError]:
        """Kill these sandboxes, on whichever controllers hold them, at once; id -> error for the ones
        that could not be killed (their controller down, ...), empty when all went."""
        ids = list(dict.fromkeys(sandbox_ids))
        if not ids:
            return {}
        with ThreadPoolExecutor(max_workers=min(32, len(ids))) as pool:
            got = list(pool.map(lambda i: _catch(self.kill, i), ids))
        return {i: e for i, e in zip(ids, got, strict=True) if isinstance(e, ForkdAPIError)}


def _catch(fn: Callable[[T], R], arg: T) -> R | ForkdAPIError:
    try:
        return fn(arg)
    except ForkdAPIError as e:
        return e
    except (ValueError, httpx.HTTPError) as e:
        return ForkdAPIError(str(e))
