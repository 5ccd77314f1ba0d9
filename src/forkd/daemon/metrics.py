"""Prometheus metrics of the controller."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from forkd import __version__

SPAWN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Live(Collector):
    """Gauges read at scrape time, so they always agree with the API."""

    def __init__(self, snapshots: Callable[[], int], sandboxes: Callable[[], int]) -> None:
        self.snapshots = snapshots
        self.sandboxes = sandboxes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("forkd_snapshots_total", "Snapshots in the snapshot root.", value=self.snapshots())
        yield GaugeMetricFamily("forkd_sandboxes_active", "Sandboxes whose VM is running.", value=self.sandboxes())


class Metrics:
    def __init__(self, snapshots: Callable[[], int], sandboxes: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        info = Gauge("forkd_build_info", "Always 1; labels carry the version.", ["version"], registry=self.registry)
        info.labels(version=__version__).set(1)
        self.registry.register(_Live(snapshots, sandboxes))
        self.spawn_seconds = Histogram("forkd_spawn_seconds", "Restore of one child until its agent answered.",
                                       buckets=SPAWN_BUCKETS, registry=self.registry)
        self.request_seconds = Histogram("forkd_http_request_duration_seconds", "HTTP requests by route and status.",
                                         ["method", "route", "status"], registry=self.registry)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.request_seconds.labels(method=method, route=route, status=str(status)).observe(seconds)
