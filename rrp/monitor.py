"""`rrp monitor`: a local Prometheus scraping the services' metrics, with the alert rules."""

from __future__ import annotations

from typing import Any

from rrp.command import Commands


def _monitor() -> tuple[type[Any], Any]:
    from pipeline.monitor import MonitorConfig, run_monitor

    return MonitorConfig, run_monitor


def register(commands: Commands) -> None:
    commands.add(
        "monitor",
        _monitor,
        help="run a local Prometheus scraping the services' metrics, with the alert rules",
        description="Starts a real Prometheus on 127.0.0.1 with a generated config: one scrape job "
        "(`rallyrobopilot`, as on a cluster) over --targets (each service's --metrics-port), the chart's alert "
        "rules, and a data folder of its own. Prints its address (web UI, /api/v1/query, /alerts) and stops "
        "Prometheus on SIGTERM or Ctrl-C.",
    )
