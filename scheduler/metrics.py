"""The scheduler's Prometheus metrics (`rrp_scheduler_*`), read from its pools' status when scraped."""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from scheduler.core import PoolStatus
from scheduler.executor import EvaluationPool


class PoolCollector(Collector):
    """The pool's own counters (`GetPoolStatus`) as metrics: no bookkeeping on the dispatch path."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._pools: weakref.WeakSet[EvaluationPool] = weakref.WeakSet()
        self._lock = threading.Lock()
        registry.register(self)

    def track(self, pool: EvaluationPool) -> None:
        with self._lock:
            self._pools.add(pool)

    def describe(self) -> Iterator[Metric]:
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            pools = list(self._pools)
        return self._families([pool.status() for pool in pools])

    @staticmethod
    def _families(statuses: list[PoolStatus]) -> Iterator[Metric]:
        def total(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield GaugeMetricFamily(
            "rrp_scheduler_queue_length", "evaluations queued, not yet sent", value=sum(s.pending for s in statuses)
        )
        yield GaugeMetricFamily(
            "rrp_scheduler_in_flight", "evaluation calls out on game servers", value=sum(s.in_flight for s in statuses)
        )
        yield total("rrp_scheduler_done_total", "evaluations answered with a result", sum(s.done for s in statuses))
        yield total(
            "rrp_scheduler_retries_total", "attempts retried after a server fault", sum(s.retried for s in statuses)
        )
        yield total(
            "rrp_scheduler_failed_total", "evaluations failed after every retry", sum(s.failed for s in statuses)
        )
        yield total(
            "rrp_scheduler_backups_total",
            "backup copies of evaluations sent for straggling calls",
            sum(s.backups for s in statuses),
        )
        servers = [server for status in statuses for server in status.servers]
        yield GaugeMetricFamily(
            "rrp_scheduler_servers", "game servers in the pool (listed or discovered)", value=len(servers)
        )
        yield GaugeMetricFamily(
            "rrp_scheduler_healthy_servers",
            "game servers that passed their last health check",
            value=sum(s.healthy for s in servers),
        )
        per_server: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
        for server in servers:
            row = per_server[server.address]
            row[0] += server.healthy
            row[1] += server.in_flight
            row[2] += server.done
            row[3] += server.failed
            row[4] += server.retried
        families: tuple[GaugeMetricFamily | CounterMetricFamily, ...] = (
            GaugeMetricFamily(
                "rrp_scheduler_server_healthy", "1 if the server passed its last health check", labels=["server"]
            ),
            GaugeMetricFamily("rrp_scheduler_server_in_flight", "calls out on the server", labels=["server"]),
            CounterMetricFamily(
                "rrp_scheduler_server_done_total", "evaluations the server answered", labels=["server"]
            ),
            CounterMetricFamily(
                "rrp_scheduler_server_failures_total",
                "evaluations lost to the server's faults (each retried elsewhere or failed)",
                labels=["server"],
            ),
            CounterMetricFamily(
                "rrp_scheduler_server_retries_total",
                "evaluations the server failed or refused (busy) that were queued again",
                labels=["server"],
            ),
        )
        for address, row in sorted(per_server.items()):
            for family, value in zip(families, row, strict=True):
                family.add_metric([address], value)
        yield from families


POOLS = PoolCollector()
