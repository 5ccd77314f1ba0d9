"""``/healthz``, ``/version``, ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from forkd import __version__
from forkd.daemon import models as m
from forkd.daemon.deps import ERRORS, Ctl, MetricsDep

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=m.Health)
@router.get("/healthz/", response_model=m.Health, include_in_schema=False)  # the original API had both
def healthz() -> dict[str, bool]:
    """Liveness; never needs the token."""
    return {"ok": True}


@router.get("/version", response_model=m.Version, responses=ERRORS)
def version(ctl: Ctl) -> dict[str, str]:
    eng = ctl.engine
    return {"version": __version__, "api": "v1", "accelerator": eng.accel.name,
            "accelerator_reason": eng.accel.reason, "qemu_version": eng.qemu.version}


@router.get("/v1/capacity", response_model=m.Capacity, responses=ERRORS)
def capacity(ctl: Ctl) -> dict[str, Any]:
    """What this node can still take: memory, vCPUs, sandboxes running and their limit, the pools, and
    ``free_slots``, the sandboxes a client spreading a spawn over several controllers gives it at most."""
    from forkd.daemon.capacity import capacity as measure

    return measure(ctl.node_name, ctl.active_count(), ctl.max_sandboxes, ctl.pool_ready(), ctl.starting())


@router.get("/metrics", response_class=Response, responses=ERRORS)
def metrics_(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
