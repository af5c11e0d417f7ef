"""One lap: its outcome, and the rules that end it (finish line, tick budget, no progress), fed tick by tick.

Every driver of a lap over the game service (the autopilot, the evaluation suite, the main job's race) stops by
these rules and reports this outcome, so that "a lap" and "stuck" mean the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from game_server.core.state import TICK_S

STUCK_TICKS = 250  # 10 s at 25 Hz without new progress: the car is stuck or lost
PROGRESS_EPSILON = 1e-6  # progress below this gain is no progress (float noise of a car at rest)

FINISHED = "finished"
STOPPED = "stopped"  # ended from outside (a signal, the stream closed) before any rule ended it


def stuck_reason(stuck_ticks: int) -> str:
    return f"no progress for {stuck_ticks} ticks"


def budget_reason(max_ticks: int) -> str:
    return f"tick budget {max_ticks} spent"


@dataclass(frozen=True)
class LapOutcome:
    """How a lap ended: finished or not, its time, how far it got, and why it stopped ("" while running)."""

    finished: bool = False
    lap_ticks: int = 0  # start line to finish line; 0 unless finished
    ticks: int = 0  # the last tick observed
    progress_fraction: float = 0.0  # of the track's length, at the last tick
    wall_contacts: int = 0  # ticks touching a wall
    stop_reason: str = ""

    @property
    def lap_s(self) -> float:
        return self.lap_ticks * TICK_S

    def summary(self) -> dict[str, bool | int | float | str]:
        """The outcome as JSON: the fields every lap report carries."""
        return {
            "finished": self.finished,
            "lap_ticks": self.lap_ticks,
            "lap_s": round(self.lap_s, 2),
            "ticks": self.ticks,
            "progress_fraction": round(self.progress_fraction, 4),
            "wall_contacts": self.wall_contacts,
            "stop_reason": self.stop_reason,
        }


class WithOutcome:
    """A lap's record read through its `outcome`: one definition for every record that carries a LapOutcome."""

    outcome: LapOutcome

    @property
    def finished(self) -> bool:
        return self.outcome.finished

    @property
    def lap_ticks(self) -> int:
        return self.outcome.lap_ticks

    @property
    def ticks(self) -> int:
        return self.outcome.ticks

    @property
    def progress_fraction(self) -> float:
        return self.outcome.progress_fraction

    @property
    def wall_contacts(self) -> int:
        return self.outcome.wall_contacts

    @property
    def stop_reason(self) -> str:
        return self.outcome.stop_reason


class LapWatch:
    """The stop rules of one lap, fed each tick's state: it says when the lap stops, and why.

    The lap stops at the finish line, when the tick budget is spent, or after `stuck_ticks` ticks without new
    progress (0: never). Once stopped, the outcome no longer changes.
    """

    def __init__(self, max_ticks: int, stuck_ticks: int = STUCK_TICKS) -> None:
        if max_ticks < 1 or stuck_ticks < 0:
            raise ValueError(
                f"a lap needs a tick budget of at least 1 and stuck ticks >= 0: {max_ticks}, {stuck_ticks}"
            )
        self.max_ticks, self.stuck_ticks = max_ticks, stuck_ticks
        self.outcome = LapOutcome()
        self._best_progress, self._best_tick = -1.0, 0

    @property
    def stopped(self) -> bool:
        return bool(self.outcome.stop_reason)

    def observe(self, tick: int, progress_fraction: float, wall_contacts: int, finished: bool, lap_ticks: int) -> bool:
        """Takes this tick's state; True when the lap stops here (or stopped before)."""
        if self.stopped:
            return True
        reason = ""
        if finished:
            reason = FINISHED
        else:
            if progress_fraction > self._best_progress + PROGRESS_EPSILON:
                self._best_progress, self._best_tick = progress_fraction, tick
            if self.stuck_ticks and tick - self._best_tick >= self.stuck_ticks:
                reason = stuck_reason(self.stuck_ticks)
            elif tick >= self.max_ticks:
                reason = budget_reason(self.max_ticks)
        self.outcome = LapOutcome(
            finished=finished,
            lap_ticks=lap_ticks if finished else 0,
            ticks=tick,
            progress_fraction=progress_fraction,
            wall_contacts=wall_contacts,
            stop_reason=reason,
        )
        return self.stopped

    def stop(self, reason: str = STOPPED) -> LapOutcome:
        """Ends the lap from outside, unless a rule ended it already; the outcome."""
        if not self.stopped:
            self.outcome = replace(self.outcome, stop_reason=reason)
        return self.outcome
