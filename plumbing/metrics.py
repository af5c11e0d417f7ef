"""Prometheus metrics: the one HTTP endpoint a process serves, and gauges read from live objects when scraped.

Services declare their metrics once, in their own `metrics.py` (names `rrp_<service>_...`, units in the
name, `_total` counters, `_seconds` histograms), on prometheus-client's default registry; a process serves
them all with `start_metrics(host, port)`, which `plumbing.bootstrap.create_server` calls for every gRPC
service (`--metrics-port`; 0: no endpoint).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Latencies from a fraction of a millisecond to seconds, with edges at the budgets the alerts name: the
# 15 ms inference target and the 40 ms tick.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25,
                     0.5, 1.0, 2.5, 5.0)  # fmt: skip


@dataclass
class MetricsEndpoint:
    """A running `/metrics` HTTP endpoint; `stop()` closes its socket."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def start_metrics(host: str, port: int, name: str = "rrp") -> MetricsEndpoint | None:
    """Serves the process's metrics on http://host:port/metrics; port 0 means no endpoint (None)."""
    if port == 0:
        return None
    if not 0 < port < 65536:
        raise ValueError(f"metrics port {port} is not a port (1..65535, or 0 for none)")
    disable_created_metrics()  # `_created` series double every counter for nothing Prometheus uses
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
    thread.name = f"{name}-metrics"
    endpoint = MetricsEndpoint(host, port, server, thread)
    log.info("%s metrics on %s", name, endpoint.url)
    return endpoint


class LiveGauges(Collector):
    """Gauges read from live objects when scraped (open sessions, busy slots), summed over those of this
    process, so that two servers in one process (tests, tools) add up instead of overwriting each other."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[Any], float]]]) -> None:
        self._gauges = gauges
        self._objects: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def track(self, obj: Any) -> None:
        with self._lock:
            self._objects.add(obj)

    def forget(self, obj: Any) -> None:
        with self._lock:
            self._objects.discard(obj)

    def describe(self) -> Iterator[Metric]:
        for name, (doc, _) in self._gauges.items():
            yield GaugeMetricFamily(name, doc)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            objects = list(self._objects)
        for name, (doc, read) in self._gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(sum(read(obj) for obj in objects)))
