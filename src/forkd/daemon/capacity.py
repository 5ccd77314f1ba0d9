"""``GET /v1/capacity``: what this node can still take, for a client that spreads a spawn over several
controllers (``forkd.sdk.MultiController``).

``free_slots`` is the one number the spreader uses: the sandboxes this node can start now, i.e. the
memory available (the host's ``MemAvailable``, or less if this daemon's own cgroup has a lower limit)
less a reserve, divided by the memory a sandbox is counted at, and at most ``--max-sandboxes`` less
those running. It is an estimate: children share their snapshot's pages and cost what they write.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

#: memory a sandbox is counted at (a TCG child measured ~30 MiB PSS after a small task; headroom for more)
SANDBOX_COST_MIB = 64
#: memory kept free for the host, the daemon and page cache, MiB
MEMORY_RESERVE_MIB = 1024
#: a node name: a DNS label or hostname (also what qualifies sandbox ids in forkd.sdk.MultiController)
NODE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"

MEMINFO = Path("/proc/meminfo")


def default_node_name() -> str:
    """This host's name, cut to a valid node name (``node`` if it has none)."""
    import re

    name = socket.gethostname().split(".")[0][:63]
    return name if re.fullmatch(NODE_NAME_PATTERN, name) else "node"


def meminfo(path: Path = MEMINFO) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (only the ``kB`` lines)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024
    return out


def cgroup_memory(proc_cgroup: Path = Path("/proc/self/cgroup"),
                  root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int]:
    """(the cgroup v2 ``memory.max`` in bytes that leaves this process the least room, or None for no
    limit; that cgroup's ``memory.current``). Every ancestor counts: a slice or a pod above the daemon's
    own cgroup may have the lower limit."""
    try:
        rel = next(line.split("::", 1)[1] for line in proc_cgroup.read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        return None, 0
    d = root / rel.strip().lstrip("/")
    if ".." in Path(rel.strip()).parts:
        return None, 0
    best: tuple[int | None, int] = (None, 0)
    first = True
    while True:
        try:
            limit = (d / "memory.max").read_text().strip()
            current = max(0, int((d / "memory.current").read_text().strip() or 0))
        except (OSError, ValueError):
            pass  # no memory controller here (the root has neither file)
        else:
            if first:
                best, first = ((int(limit) if limit.isdigit() else None), current), False
            if limit.isdigit() and (best[0] is None or int(limit) - current < best[0] - best[1]):
                best = (int(limit), current)
        if d == root or root not in d.parents:
            return best
        d = d.parent


def vcpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_slots(available_bytes: int, running: int, max_sandboxes: int | None,
               cost_mib: int = SANDBOX_COST_MIB, reserve_mib: int = MEMORY_RESERVE_MIB) -> int:
    """Sandboxes that fit now: memory available less the reserve over the cost of one, capped by the
    limit less those running; never negative."""
    by_memory = max(0, available_bytes - (reserve_mib << 20)) // (cost_mib << 20)
    if max_sandboxes is not None:
        return max(0, min(by_memory, max_sandboxes - running))
    return max(0, by_memory)


def capacity(node: str, running: int, max_sandboxes: int | None, pools: dict[str, int],
             starting: int = 0) -> dict[str, Any]:
    """The answer of ``GET /v1/capacity`` (see models.Capacity); ``starting``: children of spawns in flight."""
    info = meminfo()
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0))
    limit, current = cgroup_memory()
    if limit is not None:
        total = min(total, limit) if total else limit
        available = min(available, max(0, limit - current))
    return {"node": node, "memory_total_bytes": total, "memory_available_bytes": available,
            "memory_limit_bytes": limit, "vcpus": vcpus(), "sandboxes_running": running,
            "sandboxes_starting": starting,
            "max_sandboxes": max_sandboxes, "sandbox_cost_bytes": SANDBOX_COST_MIB << 20,
            "memory_reserve_bytes": MEMORY_RESERVE_MIB << 20, "pool_ready": pools,
            "free_slots": free_slots(available, running + starting, max_sandboxes)}
