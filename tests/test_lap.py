"""A lap's outcome and stop rules (game_server.core.lap): the one definition every lap driver uses."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from game_server.core.lap import FINISHED, STOPPED, STUCK_TICKS, LapOutcome, LapWatch, budget_reason, stuck_reason


def feed(watch: LapWatch, progress: list[float], finish_at: int | None = None) -> int | None:
    """Ticks 1.. with these progress values; the tick the watch stopped at, or None."""
    for tick, p in enumerate(progress, start=1):
        finished = finish_at is not None and tick == finish_at
        if watch.observe(tick, p, tick // 10, finished, tick if finished else 0):
            return tick
    return None


def test_a_finished_lap_stops_at_the_line_with_its_time() -> None:
    watch = LapWatch(max_ticks=100)
    assert feed(watch, [i / 100 for i in range(1, 60)], finish_at=40) == 40
    o = watch.outcome
    assert (o.finished, o.lap_ticks, o.ticks, o.stop_reason) == (True, 40, 40, FINISHED)
    assert o.lap_s == pytest.approx(1.6)
    assert json.loads(json.dumps(o.summary())) == {
        "finished": True, "lap_ticks": 40, "lap_s": 1.6, "ticks": 40, "progress_fraction": 0.4,
        "wall_contacts": 4, "stop_reason": "finished",
    }  # fmt: skip


def test_the_tick_budget_and_the_stuck_rule_stop_a_lap() -> None:
    budget = LapWatch(max_ticks=30)
    assert feed(budget, [i / 100 for i in range(1, 100)]) == 30
    assert budget.outcome.stop_reason == budget_reason(30) == "tick budget 30 spent"
    assert not budget.outcome.finished and budget.outcome.lap_ticks == 0
    stuck = LapWatch(max_ticks=10_000)
    # Progress until tick 5, then none (a gain under the epsilon is none): stuck 250 ticks later.
    assert feed(stuck, [0.01 * min(t, 5) + 1e-9 * t for t in range(1, 1000)]) == 5 + STUCK_TICKS
    assert stuck.outcome.stop_reason == stuck_reason(STUCK_TICKS) == "no progress for 250 ticks"
    never = LapWatch(max_ticks=400, stuck_ticks=0)
    assert feed(never, [0.0] * 1000) == 400


def test_a_lap_stopped_from_outside_keeps_a_rules_reason() -> None:
    watch = LapWatch(max_ticks=100)
    watch.observe(3, 0.1, 0, False, 0)
    assert not watch.stopped and watch.stop().stop_reason == STOPPED and watch.stopped
    done = LapWatch(max_ticks=2)
    done.observe(2, 0.1, 0, False, 0)
    assert done.stop().stop_reason == budget_reason(2)
    # Once stopped, nothing changes it.
    assert done.observe(3, 0.5, 1, True, 3) and done.outcome.ticks == 2 and not done.outcome.finished
    with pytest.raises(ValueError):
        LapWatch(max_ticks=0)
    assert LapOutcome().summary()["stop_reason"] == ""


@given(
    progress=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=400),
    max_ticks=st.integers(1, 500),
    stuck_ticks=st.integers(0, 60),
    finish_at=st.one_of(st.none(), st.integers(1, 400)),
)
def test_the_lap_stops_at_the_first_tick_a_rule_names(
    progress: list[float], max_ticks: int, stuck_ticks: int, finish_at: int | None
) -> None:
    watch = LapWatch(max_ticks, stuck_ticks)
    stopped_at = feed(watch, progress, finish_at)
    # The rules, written out once more by hand: the first tick at which one of them holds.
    best, best_tick, expected = -1.0, 0, None
    for tick, p in enumerate(progress, start=1):
        if tick == finish_at:
            expected = tick
            break
        if p > best + 1e-6:
            best, best_tick = p, tick
        if (stuck_ticks and tick - best_tick >= stuck_ticks) or tick >= max_ticks:
            expected = tick
            break
    assert stopped_at == expected
    o = watch.outcome
    assert watch.stopped == (expected is not None) and o.ticks <= max_ticks
    assert o.finished == (o.stop_reason == FINISHED) and (o.lap_ticks > 0) == o.finished
