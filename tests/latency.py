"""Latency checks that hold on a loaded machine: a call beside a load is judged against the same call without it.

A fixed bound in milliseconds fails whenever the machine is busy (the suite's own servers, or anything beside it),
whatever the server does. Starvation (a call queued behind streams or evaluations) costs whole seconds, so a call
whose median stays within a few times its idle median, and that always answers within its deadline, was not starved.
The absolute figure (p99 <= 100 ms on an idle machine) is printed by `benchmarks/bench_idle_streams.py`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

SLACK_MS = 50.0  # a scheduler hiccup on a busy machine is tens of milliseconds; starvation is seconds
FACTOR = 4.0


def call_times_ms(fn: Callable[[], object], n: int = 40) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def assert_not_starved(loaded: list[float], idle: list[float]) -> None:
    """Every call answered (the caller's deadline would have raised), and the loaded median is near the idle one."""
    bound = max(SLACK_MS, FACTOR * statistics.median(idle))
    assert statistics.median(loaded) < bound, (
        f"median {statistics.median(loaded):.1f} ms beside the load vs {statistics.median(idle):.1f} ms without; "
        f"slowest {sorted(loaded)[-3:]}"
    )
