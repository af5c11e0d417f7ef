"""Fitness of a lap: its time when it finishes, otherwise how far it got, so that no generation is flat."""

from __future__ import annotations

from typing import Any

from rallyrobopilot.v1 import game_pb2, sim_pb2
from scheduler.tasks import EvaluationTask

# An unfinished lap always costs more than any finished one: (2 - progress) x the tick budget.
UNFINISHED_BASE = 2.0
WALL_PENALTY_TICKS = 0.1


def lap_cost(result: sim_pb2.LapResult, budget_ticks: int) -> float:
    """Lower is better. Finished: lap ticks (plus a small wall-contact penalty). Unfinished: worse than any
    finished lap and decreasing with progress along the track."""
    walls = WALL_PENALTY_TICKS * result.wall_contacts
    if result.finished:
        return float(result.lap_ticks) + walls
    return (UNFINISHED_BASE - result.progress_fraction) * budget_ticks + walls


class ProgramCost(EvaluationTask[float]):
    """Open-loop individual: a control program (list of masks) from the track's base state."""

    def __init__(self, track: str, budget_ticks: int, finish_gate: sim_pb2.Gate | None = None) -> None:
        self.track = track
        self.budget_ticks = budget_ticks
        self.finish_gate = finish_gate

    def request(self, genome: Any) -> game_pb2.EvaluateRequest:
        return game_pb2.EvaluateRequest(
            track=self.track,
            program=sim_pb2.ControlProgram(masks=bytes(genome)),
            finish_gate=self.finish_gate,
            max_ticks=self.budget_ticks,
        )

    def result(self, response: game_pb2.EvaluateResponse) -> float:
        return lap_cost(response.result, self.budget_ticks)

    def __repr__(self) -> str:
        return f"ProgramCost(track={self.track!r}, budget_ticks={self.budget_ticks})"


class DriverLap(EvaluationTask[sim_pb2.LapResult]):
    """Closed-loop individual on one track; the GA averages the costs of several tracks itself."""

    def __init__(self, kind: str, budget_ticks: dict[str, int]) -> None:
        self.kind = kind
        self.budget_ticks = budget_ticks

    def request(self, genome: Any, track: str) -> game_pb2.EvaluateRequest:
        return game_pb2.EvaluateRequest(
            track=track,
            driver=sim_pb2.DriverParams(kind=self.kind, params=[float(g) for g in genome]),
            max_ticks=self.budget_ticks[track],
        )

    def result(self, response: game_pb2.EvaluateResponse) -> sim_pb2.LapResult:
        return response.result

    def __repr__(self) -> str:
        return f"DriverLap(kind={self.kind!r}, tracks={sorted(self.budget_ticks)})"


def relative_cost(result: sim_pb2.LapResult, reference_ticks: int, budget_ticks: int) -> float:
    """A lap's cost in units of the reference lap on the same track (1.0 = as fast as the reference)."""
    return lap_cost(result, budget_ticks) / reference_ticks
