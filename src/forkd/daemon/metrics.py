"""Prometheus metrics of the controller."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from forkd import __version__

SPAWN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Label values are a fixed set, whatever a client sends: one series per (method, route, status) it can pick
# would let unauthenticated requests grow the registry without bound.
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED_ROUTE = "unmatched"


def method_label(method: str) -> str:
    """``method`` if it is a standard HTTP method, else "other"."""
    return method if method in METHODS else OTHER_METHOD


class _Live(Collector):
    """Gauges read at scrape time, so they always agree with the API."""

    def __init__(self, snapshots: Callable[[], int], sandboxes: Callable[[], int],
                 branches: Callable[[], tuple[int, int]] | None = None) -> None:
        self.snapshots = snapshots
        self.sandboxes = sandboxes
        self.branches = branches

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("forkd_snapshots_total", "Snapshots in the snapshot root.", value=self.snapshots())
        yield GaugeMetricFamily("forkd_sandboxes_active", "Sandboxes whose VM is running.", value=self.sandboxes())
        if self.branches is not None:
            in_flight, cap = self.branches()
            yield GaugeMetricFamily("forkd_branches_in_flight", "BRANCH operations running.", value=in_flight)
            yield GaugeMetricFamily("forkd_branch_concurrency_cap", "--branch-concurrency.", value=cap)


class Metrics:
    def __init__(self, snapshots: Callable[[], int], sandboxes: Callable[[], int],
                 branches: Callable[[], tuple[int, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        info = Gauge("forkd_build_info", "Always 1; labels carry the version.", ["version"], registry=self.registry)
        info.labels(version=__version__).set(1)
        self.registry.register(_Live(snapshots, sandboxes, branches))
        self.spawn_seconds = Histogram("forkd_spawn_seconds", "Restore of one child until its agent answered.",
                                       buckets=SPAWN_BUCKETS, registry=self.registry)
        self.request_seconds = Histogram("forkd_http_request_duration_seconds", "HTTP requests by route and status.",
                                         ["method", "route", "status"], registry=self.registry)
        self.routes: frozenset[str] = frozenset()  # the app's route templates (set by create_app)

    def set_routes(self, templates: Iterable[str]) -> None:
        """The route templates (``/v1/sandboxes/{sid}``) a request's route label may take."""
        self.routes = frozenset(templates)

    def route_label(self, route: str | None) -> str:
        """``route`` if it is one of the app's route templates, else "unmatched" (never a raw path)."""
        return route if route is not None and route in self.routes else UNMATCHED_ROUTE

    def observe_request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """One request: ``route`` is the template of the route that matched (None: none did)."""
        self.request_seconds.labels(method=method_label(method), route=self.route_label(route),
                                    status=str(status)).observe(seconds)
