"""The asyncio multi-controller client: :class:`AsyncMultiController` mirrors
:class:`forkd.sdk.multi.MultiController` method for method (every method is ``async``; the controllers are
asked concurrently with ``asyncio.gather``). The I/O-free half is ``_multi.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import httpx

from forkd.sdk import _base as b
from forkd.sdk import _multi as mm
from forkd.sdk._config import Verify
from forkd.sdk.aio import AsyncController, AsyncSandbox
from forkd.sdk.errors import APIConnectionError, ForkdAPIError, NotFoundError, SpawnError
from forkd.sdk.models import CapacityInfo, PullResult, SnapshotInfo, VersionInfo

__all__ = ["AsyncMultiController", "aconnect"]

T = TypeVar("T")
R = TypeVar("R")


def aconnect(url: str | Sequence[str] | None = None, token: str | None = None, *, timeout: float | None = 60.0,
             verify: Verify = True) -> AsyncController | AsyncMultiController:
    """An :class:`AsyncController` for one URL, an :class:`AsyncMultiController` for several (see
    :func:`forkd.connect`)."""
    if mm.is_multi(url):
        return AsyncMultiController(url, token, timeout=timeout, verify=verify)
    return AsyncController(url if isinstance(url, str) or url is None else url[0], token, timeout=timeout,
                           verify=verify)


async def _catch_api(aw: Awaitable[R]) -> R | ForkdAPIError:
    """As multi.MultiController._each: an SDK error is the answer, a ValueError (a bad argument) is raised."""
    try:
        return await aw
    except ForkdAPIError as e:
        return e


async def _catch(aw: Awaitable[R]) -> R | ForkdAPIError:
    try:
        return await aw
    except ForkdAPIError as e:
        return e
    except (ValueError, httpx.HTTPError) as e:
        return ForkdAPIError(str(e))


class AsyncMultiController:
    """Several forkd controllers as one, for asyncio (see :class:`forkd.MultiController`)."""

    def __init__(self, url: str | Sequence[str] | None = None, token: str | None = None, *,
                 timeout: float | None = 60.0, verify: Verify = True,
                 controllers: Sequence[AsyncController] | None = None,
                 resolver: mm.Resolver = mm.getaddrinfo_resolver) -> None:
        self._make: Callable[[str], AsyncController] = lambda u: AsyncController(u, token, timeout=timeout,
                                                                                 verify=verify)
        self._spec: tuple[str | Sequence[str] | None, mm.Resolver] | None = None
        if controllers is not None:
            self._ctls = list(controllers)
        else:  # resolved here, blocking: a client is made once; refresh() resolves in a thread
            self._spec = (url, resolver)
            self._ctls = [self._make(u) for u in mm.expand(mm.split_urls(url), resolver)]
        if not self._ctls:
            raise ValueError("url: no controller")

    async def refresh(self) -> None:
        if self._spec is None:
            return
        urls = await asyncio.to_thread(mm.expand, mm.split_urls(self._spec[0]), self._spec[1])
        old = {c.url: c for c in self._ctls}
        self._ctls = [old.pop(u) if u in old else self._make(u) for u in urls]
        await asyncio.gather(*(c.close() for c in old.values()))

    @property
    def controllers(self) -> list[AsyncController]:
        return list(self._ctls)

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self._ctls]

    def __repr__(self) -> str:
        return f"AsyncMultiController(urls={self.urls!r})"

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._ctls))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- fan-out
    async def _each(self, fn: Callable[[AsyncController], Awaitable[R]],
                    ctls: Sequence[AsyncController] | None = None) -> list[R | ForkdAPIError]:
        targets = self._ctls if ctls is None else list(ctls)
        return list(await asyncio.gather(*(_catch_api(fn(c)) for c in targets)))

    async def _learn(self, c: AsyncController) -> CapacityInfo:
        cap = await c._request(b.op_capacity(b.probe_timeout(c._timeout)))  # a hung controller: down
        node = mm.check_node(cap.node, c.url)
        mm.check_unique([(node, c.url)] + [(o.node, o.url) for o in self._ctls if o is not c and o.node])
        c._node = node
        return cap

    async def _named(self, c: AsyncController) -> AsyncController:
        if c.node is None:
            await self._learn(c)
        return c

    # -- service
    async def health(self) -> dict[str, bool]:
        got = await self._each(lambda c: c.health())
        return {c.url: r is True for c, r in zip(self._ctls, got, strict=True)}

    async def version(self) -> VersionInfo:
        for c in self._ctls:
            try:
                return await c.version()
            except APIConnectionError:
                continue
        raise APIConnectionError(f"no controller answers: {', '.join(self.urls)}")

    async def capacity(self) -> dict[str, CapacityInfo | ForkdAPIError]:
        got = await self._each(self._learn)
        return {c.url: r for c, r in zip(self._ctls, got, strict=True)}

    async def nodes(self) -> dict[str, AsyncController]:
        await self._each(self._named, [c for c in self._ctls if c.node is None])
        return {c.node: c for c in self._ctls if c.node is not None}

    # -- snapshots
    async def list_snapshots(self) -> list[SnapshotInfo]:
        seen: dict[str, SnapshotInfo] = {}
        for got in await self._each(lambda c: c.list_snapshots()):
            if not isinstance(got, ForkdAPIError):
                for s in got:
                    seen.setdefault(s.tag, s)
        return list(seen.values())

    async def snapshot_holders(self, tag: str) -> list[AsyncController]:
        got = await self._each(lambda c: c.snapshot_info(tag))
        return [c for c, r in zip(self._ctls, got, strict=True) if isinstance(r, SnapshotInfo)]

    async def distribute_snapshot(self, tag: str, *, force: bool = False, timeout: float = 3600.0
                                  ) -> dict[str, PullResult | ForkdAPIError | None]:
        sources = await self.snapshot_holders(tag)
        if not sources:
            raise NotFoundError(f"no controller has snapshot {tag}", status=404)
        out: dict[str, PullResult | ForkdAPIError | None] = {c.url: None for c in sources}
        todo = [c for c in self._ctls if c.url not in out]
        while todo:
            pairs = list(zip([s for s in sources for _ in (0, 1)], todo, strict=False))
            todo = todo[len(pairs):]

            async def pull(src: AsyncController, dst: AsyncController) -> PullResult:
                url, token = src._pack_source(tag)
                return await dst.pull_snapshot(url, token=token, force=force, timeout=timeout)

            results = await asyncio.gather(*(_catch(pull(s, d)) for s, d in pairs))
            for (_src, dst), r in zip(pairs, results, strict=True):
                out[dst.url] = r
                if isinstance(r, PullResult):
                    sources.append(dst)
        return out

    async def create_snapshot(self, tag: str, **kw: Any) -> SnapshotInfo:
        for c in self._ctls:
            try:
                await c.health()
            except APIConnectionError:
                continue
            info = await c.create_snapshot(tag, **kw)
            await self.distribute_snapshot(tag)
            return info
        raise APIConnectionError(f"no controller answers: {', '.join(self.urls)}")

    async def delete_snapshot(self, tag: str, *, force: bool = False, cascade: bool = False) -> None:
        got = await self._each(lambda c: c.delete_snapshot(tag, force=force, cascade=cascade))
        errors = [e for e in got if isinstance(e, ForkdAPIError)]
        if len(errors) == len(got) or any(not isinstance(e, NotFoundError) for e in errors):
            raise next((e for e in errors if not isinstance(e, NotFoundError)), errors[0])

    # -- spawning
    async def plan_spawn(self, n: int, snapshot_tag: str | None = None) -> mm.SpawnPlan[AsyncController]:
        b.check_int(n, "n", 1, b.MAX_CHILDREN * len(self._ctls))

        async def probe(c: AsyncController) -> CapacityInfo:
            cap = await self._learn(c)
            if snapshot_tag is not None:
                await c.snapshot_info(snapshot_tag)
            return cap

        got = await self._each(probe)
        return mm.make_plan(n, mm.probes(self._ctls, [c.url for c in self._ctls], [c.node for c in self._ctls], got),
                            snapshot_tag)

    @overload
    async def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *,
                              plan: mm.SpawnPlan[AsyncController] | None = None,
                              return_exceptions: Literal[False] = False, **kw: Any) -> list[AsyncSandbox]: ...

    @overload
    async def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *,
                              plan: mm.SpawnPlan[AsyncController] | None = None,
                              return_exceptions: Literal[True], **kw: Any
                              ) -> list[AsyncSandbox | SpawnError[AsyncSandbox]]: ...

    async def spawn_sandboxes(self, snapshot_tag: str, n: int = 1, *,
                              plan: mm.SpawnPlan[AsyncController] | None = None,
                              return_exceptions: bool = False, **kw: Any
                              ) -> list[AsyncSandbox] | list[AsyncSandbox | SpawnError[AsyncSandbox]]:
        if plan is None:
            plan = await self.plan_spawn(n, snapshot_tag)
        elif plan.n != n:
            raise ValueError(f"plan: made for n={plan.n}, not {n}")
        answers = await asyncio.gather(*(_catch(s.controller.spawn_sandboxes(
            snapshot_tag, s.count, return_exceptions=True, **kw)) for s in plan.shares))
        indexed: list[tuple[int, AsyncSandbox | SpawnError[AsyncSandbox]]] = []
        for share, got in zip(plan.shares, answers, strict=True):
            indexed += mm.share_results(share, got, share.controller.url)
        indexed += mm.unplaced_results(plan)
        results = [r for _i, r in sorted(indexed, key=lambda x: x[0])]
        return results if return_exceptions else b.spawn_or_raise(results)

    async def spawn_sandbox(self, snapshot_tag: str, **kw: Any) -> AsyncSandbox:
        return (await self.spawn_sandboxes(snapshot_tag, 1, **kw))[0]

    # -- sandboxes
    async def list_sandboxes(self, *, metadata: Mapping[str, str] | None = None
                             ) -> mm.SandboxList[AsyncSandbox]:
        async def one(c: AsyncController) -> list[AsyncSandbox]:
            return await (await self._named(c)).list_sandboxes(metadata=metadata)

        got = await self._each(one)
        out = mm.SandboxList[AsyncSandbox]()
        for c, r in zip(self._ctls, got, strict=True):
            if isinstance(r, ForkdAPIError):
                out.errors[c.url] = r
            else:
                out.extend(r)
        return out

    async def controller_of(self, sandbox_id: str) -> tuple[AsyncController, str]:
        node, sid = b.split_id(sandbox_id)
        if node is not None:
            ctl = (await self.nodes()).get(node)
            if ctl is None:
                raise NotFoundError(f"sandbox {sandbox_id} not found: no controller that answers is node {node!r}",
                                    status=404)
            return ctl, sid

        async def one(c: AsyncController) -> AsyncSandbox:
            return await (await self._named(c)).get_sandbox(sid)

        got = await self._each(one)
        for c, r in zip(self._ctls, got, strict=True):
            if isinstance(r, AsyncSandbox):
                return c, sid
        raise NotFoundError(f"sandbox {sid} not found on any controller", status=404)

    async def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        ctl, sid = await self.controller_of(sandbox_id)
        return await ctl.sandbox(sid)

    async def get_sandbox(self, sandbox_id: str) -> AsyncSandbox:
        ctl, sid = await self.controller_of(sandbox_id)
        return await ctl.get_sandbox(sid)

    async def kill(self, sandbox_id: str) -> None:
        await (await self.sandbox(sandbox_id)).kill()

    async def kill_sandboxes(self, sandbox_ids: Sequence[str]) -> dict[str, ForkdAPIError]:
        ids = list(dict.fromkeys(sandbox_ids))
        got = await asyncio.gather(*(_catch(self.kill(i)) for i in ids))
        return {i: e for i, e in zip(ids, got, strict=True) if isinstance(e, ForkdAPIError)}
