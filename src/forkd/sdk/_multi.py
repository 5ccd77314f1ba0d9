"""The I/O-free half of the multi-controller clients (``multi.py``, ``amulti.py``): which controllers a
URL list names, how a spawn of N is spread over them, and how their answers become one result.

URL lists: ``FORKD_URL`` or ``url=`` as ``"http://a:8889,http://b:8889"`` or a list; an entry
``dns+http://NAME:PORT[/prefix]`` (or ``dns+https://``) is a DNS name resolved to every A/AAAA address it
has (a Kubernetes headless Service: one address per controller pod), each reached as
``http://ADDRESS:PORT``. With https the certificate must then name the address.

Sandbox ids: ``NODE~sb-...`` (:func:`forkd.sdk._base.qualify`), NODE being the name the controller gives
itself in ``GET /v1/capacity`` (``--node-name``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from forkd.limits import MAX_CHILDREN
from forkd.sdk._base import NODE_PATTERN as _NODE_PATTERN
from forkd.sdk._config import DEFAULT_URL, URL_ENV, parse_url
from forkd.sdk.errors import ForkdAPIError, NotFoundError, SpawnError

C = TypeVar("C")
S = TypeVar("S")

DNS_PREFIX = "dns+"
NODE_PATTERN = _NODE_PATTERN
"""A node name as the daemon checks it (``--node-name``): never holds the ``~`` of a qualified id."""
MAX_CONTROLLERS = 256
"""Controllers a URL list may name at most, ``dns+`` names expanded (a name that resolves to more is an
error, not thousands of clients)."""

Resolver = Callable[[str, int], list[str]]


class CapacityLike(Protocol):
    @property
    def free_slots(self) -> int: ...


def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    """Every A/AAAA address of ``host``, unique, IPv4 first, each sorted (deterministic)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ValueError(f"url dns+...://{host}:{port}: cannot resolve {host}: {e.strerror}") from None
    addrs = {str(info[4][0]) for info in infos}
    return sorted(addrs, key=lambda a: (ipaddress.ip_address(a.split("%")[0]).version, ipaddress.ip_address(
        a.split("%")[0])))


def split_urls(url: str | Sequence[str] | None) -> list[str]:
    """The entries of a URL list (``url``, else ``$FORKD_URL``, else the default URL), stripped, in order,
    duplicates dropped. ValueError for an empty list."""
    if url is None:
        url = os.environ.get(URL_ENV) or DEFAULT_URL
    items = url.split(",") if isinstance(url, str) else list(url)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"url: expected strings, got {type(item).__name__}")
        if item.strip() and item.strip() not in out:
            out.append(item.strip())
    if not out:
        raise ValueError("url: the list of controllers is empty")
    return out


def is_multi(url: str | Sequence[str] | None) -> bool:
    """Whether ``url`` (else ``$FORKD_URL``) names several controllers: a list, a comma or ``dns+``."""
    if url is None:
        url = os.environ.get(URL_ENV) or DEFAULT_URL
    if not isinstance(url, str):
        return True
    return "," in url or url.strip().lower().startswith(DNS_PREFIX)


def expand(urls: Sequence[str], resolver: Resolver = getaddrinfo_resolver) -> list[str]:
    """``urls`` with each ``dns+`` entry replaced by one URL per address of its name (each entry checked)."""
    out: list[str] = []
    for u in urls:
        if u.lower().startswith(DNS_PREFIX):
            parts = urlsplit(u[len(DNS_PREFIX):])
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"url {u!r}: expected dns+http://NAME:PORT or dns+https://NAME:PORT")
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError as e:
                raise ValueError(f"url {u!r}: {e}") from None
            if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
                raise ValueError(f"url {parts.hostname}: a dns+ entry takes no credentials, query or fragment")
            addrs = resolver(parts.hostname, port)
            if not addrs:
                raise ValueError(f"url {u!r}: {parts.hostname} has no address")
            if len(addrs) + len(out) > MAX_CONTROLLERS:
                raise ValueError(f"url {u!r}: {parts.hostname} has {len(addrs)} addresses; a list takes at most "
                                 f"{MAX_CONTROLLERS} controllers")
            for a in addrs:
                host = f"[{a}]" if ":" in a else a
                concrete = f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"
                if concrete not in out:
                    out.append(concrete)
        else:
            parse_url(u)  # ValueError names a malformed entry
            if u not in out:
                out.append(u)
        if len(out) > MAX_CONTROLLERS:
            raise ValueError(f"url: more than {MAX_CONTROLLERS} controllers")
    return out


def check_node(name: object, url: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NODE_PATTERN, name):
        raise ForkdAPIError(f"the controller at {url} calls itself {name!r}, which is not a node name")
    return name


def check_unique(nodes: Sequence[tuple[str, str]]) -> None:
    """(node, url) pairs: ForkdAPIError if two controllers give the same node name."""
    seen: dict[str, str] = {}
    for node, url in nodes:
        if node in seen and seen[node] != url:
            raise ForkdAPIError(f"the controllers at {seen[node]} and {url} both call themselves node {node!r}; "
                                "start each with its own --node-name")
        seen[node] = url


def spread(n: int, free: Sequence[int], cap: int = MAX_CHILDREN) -> list[int]:
    """Split ``n`` children over controllers with ``free`` slots each: proportional to ``free`` (largest
    remainders, ties to the earlier controller), never more than a controller's ``free`` (nor ``cap``, a
    request's limit). When ``n`` exceeds the slots in all, each gets its ``free`` and the rest is left
    out (``n - sum(result)``)."""
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    slots = [max(0, min(int(f), cap)) for f in free]
    total = sum(slots)
    if n >= total:
        return slots
    quotas = [n * f for f in slots]  # each over total: integer arithmetic, no float rounding
    shares = [q // total for q in quotas]
    rest = n - sum(shares)
    for i in sorted(range(len(slots)), key=lambda i: (-(quotas[i] % total), i))[:rest]:
        shares[i] += 1
    return shares


@dataclass
class Share(Generic[C]):
    """One controller's part of a spawn: ``count`` children, global indexes ``first .. first+count-1``."""

    controller: C
    node: str
    count: int
    first: int


@dataclass
class SpawnPlan(Generic[C]):
    """How a spawn of ``n`` is spread: the shares, the children no controller has room for, and the
    controllers that did not answer ``GET /v1/capacity`` (url -> message; they get no share) or lack
    the snapshot."""

    n: int
    shares: list[Share[C]] = field(default_factory=list)
    unplaced: int = 0
    down: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    """URLs of the controllers without the snapshot (they get no share)."""
    free: dict[str, int] = field(default_factory=dict)
    """Node -> free_slots as measured."""

    @property
    def counts(self) -> dict[str, int]:
        """Node -> children given to it."""
        return {s.node: s.count for s in self.shares}


Probe = tuple[C, str, "str | None", "int | str | None"]
"""(controller, url, node, free_slots; or the error message; or None: it lacks the snapshot)."""


def probes(ctls: Sequence[C], urls: Sequence[str], nodes: Sequence[str | None],
           got: Sequence[CapacityLike | ForkdAPIError]) -> list[Probe[C]]:
    """What ``make_plan`` takes, from each controller's capacity or error (a 404: it lacks the snapshot)."""
    out: list[Probe[C]] = []
    for c, u, node, r in zip(ctls, urls, nodes, got, strict=True):
        if isinstance(r, NotFoundError):
            out.append((c, u, node, None))
        elif isinstance(r, ForkdAPIError):
            out.append((c, u, node, str(r)))
        elif isinstance(r.free_slots, int) and not isinstance(r.free_slots, bool):
            out.append((c, u, node, r.free_slots))
        else:
            out.append((c, u, node, f"the controller at {u} answered free_slots {r.free_slots!r:.40}, not a count"))
    return out


def make_plan(n: int, answers: Sequence[Probe[C]], snapshot_tag: str | None = None) -> SpawnPlan[C]:
    """The plan for ``n`` from one probe per controller. NotFoundError when ``snapshot_tag`` is on none
    of the controllers that answered."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    up = [(c, u, node, f) for c, u, node, f in answers if isinstance(f, int) and node is not None]
    plan: SpawnPlan[C] = SpawnPlan(n=n, down={u: f for _c, u, _node, f in answers if isinstance(f, str)},
                                   missing=[u for _c, u, _node, f in answers if f is None])
    if not up and plan.missing:
        raise NotFoundError(f"snapshot {snapshot_tag} not found on any controller that answers"
                            + (f" (down: {'; '.join(f'{u}: {m}' for u, m in plan.down.items())})" if plan.down else ""),
                            status=404)
    shares = spread(n, [f for *_x, f in up])
    first = 0
    for (c, _u, node, f), k in zip(up, shares, strict=True):
        assert node is not None and isinstance(f, int)
        plan.free[node] = f
        if k:
            plan.shares.append(Share(c, node, k, first))
            first += k
    plan.unplaced = n - first
    return plan


def share_results(share: Share[C], got: Sequence[S | SpawnError[S]] | BaseException,
                  url: str) -> list[tuple[int, S | SpawnError[S]]]:
    """(global index, sandbox or per-child SpawnError) for one share: a request that failed as a whole
    (controller down, killed, 5xx) is one error per child of the share."""
    if isinstance(got, BaseException):
        msg = f"controller {share.node} ({url}) failed: {got}"
        return [(share.first + i, SpawnError(f"sandbox {share.first + i} failed to start: {msg}",
                                             errors=[(share.first + i, msg)])) for i in range(share.count)]
    out: list[tuple[int, S | SpawnError[S]]] = []
    for i, r in enumerate(got[:share.count]):  # a controller answering more than asked cannot take others' indexes
        gi = share.first + i
        if isinstance(r, SpawnError):
            msg = f"on {share.node}: " + (r.errors[0][1] if r.errors else str(r))
            out.append((gi, SpawnError(f"sandbox {gi} failed to start: {msg}", errors=[(gi, msg)])))
        else:
            out.append((gi, r))
    for i in range(len(out), share.count):  # ... nor leave a hole by answering fewer
        gi = share.first + i
        msg = f"on {share.node}: the controller answered {len(got)} children for {share.count}"
        out.append((gi, SpawnError(f"sandbox {gi} failed to start: {msg}", errors=[(gi, msg)])))
    return out


def unplaced_results(plan: SpawnPlan[C]) -> list[tuple[int, SpawnError[S]]]:
    """One SpawnError per child no controller had room for."""
    first = plan.n - plan.unplaced
    why = (f"no controller has room for it: free_slots {plan.free or {}}"
           + (f"; down: {', '.join(plan.down)}" if plan.down else ""))
    return [(i, SpawnError(f"sandbox {i} failed to start: {why}", errors=[(i, why)])) for i in range(first, plan.n)]


class SandboxList(list[S]):
    """The sandboxes of every controller that answered; ``errors`` maps each one that did not (its URL)
    to the error."""

    errors: dict[str, ForkdAPIError]

    def __init__(self, items: Sequence[S] = (), errors: dict[str, ForkdAPIError] | None = None) -> None:
        super().__init__(items)
        self.errors = dict(errors or {})
