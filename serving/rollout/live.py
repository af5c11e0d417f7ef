"""The canary's live figures: the autopilots' per-version counters, scraped from their /metrics endpoints, read
from a Prometheus, or taken from this process's own registry (the deployer's own cars)."""

from __future__ import annotations

import json
import logging
import urllib.parse
import urllib.request
from dataclasses import fields

from serving.rollout.judges import Snapshot
from serving.rollout.records import Counters

log = logging.getLogger(__name__)

PREFIX = "rrp_autopilot_"
_COUNTERS = tuple(f.name for f in fields(Counters) if f.name not in ("laps", "finished", "lap_s_sum"))
PROMETHEUS_QUERY = (
    'sum by (__name__, version, finished) ({__name__=~"rrp_autopilot_(laps|wall_contacts|fallbacks|'
    'missed_ticks|ticks|inference_errors)_total|rrp_autopilot_lap_seconds_sum"})'
)


def add_sample(out: Snapshot, name: str, labels: dict[str, str], value: float) -> None:
    """One sample of an autopilot series into its version's counters; other series are ignored."""
    version = labels.get("version", "")
    if not name.startswith(PREFIX) or not version:
        return
    counters = out.setdefault(version, Counters())
    stem = name.removeprefix(PREFIX)
    if stem == "laps_total":
        counters.laps += value
        if labels.get("finished") == "true":
            counters.finished += value
    elif stem == "lap_seconds_sum":
        counters.lap_s_sum += value
    elif stem.endswith("_total") and stem.removesuffix("_total") in _COUNTERS:
        counter = stem.removesuffix("_total")
        setattr(counters, counter, getattr(counters, counter) + value)


def parse_exposition(text: str, out: Snapshot | None = None) -> Snapshot:
    """Prometheus text exposition -> per-version autopilot counters (added to `out`: summed over every source)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {} if out is None else out
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            add_sample(out, sample.name, dict(sample.labels), float(sample.value))
    return out


class LiveFigures:
    """Snapshots of the autopilots' per-version counters: scraped, from a Prometheus, or this process's own."""

    def __init__(self, urls: tuple[str, ...], prometheus: str, own: bool) -> None:
        self.urls, self.prometheus, self.own = urls, prometheus.rstrip("/"), own

    def snapshot(self) -> Snapshot:
        """Every source's counters summed; an unreachable source is logged and counts nothing this time."""
        out: Snapshot = {}
        if self.own:
            from prometheus_client import REGISTRY, generate_latest

            parse_exposition(generate_latest(REGISTRY).decode(), out)
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=5.0) as r:
                    parse_exposition(r.read().decode(), out)
            except OSError as exc:
                log.warning("live figures: %s unreachable: %s", url, exc)
        if self.prometheus:
            self._from_prometheus(out)
        return out

    def _from_prometheus(self, out: Snapshot) -> None:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": PROMETHEUS_QUERY})
        try:
            with urllib.request.urlopen(url, timeout=5.0) as r:
                body = json.loads(r.read())
            for item in body.get("data", {}).get("result", []):
                labels = {str(k): str(v) for k, v in item["metric"].items()}
                add_sample(out, labels.pop("__name__", ""), labels, float(item["value"][1]))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("live figures: Prometheus %s: %s", self.prometheus, exc)
