"""The rollout's records as dataclasses, saved as JSON and read back field by field.

Reading is lenient the way a file format must be: a key this code does not know (a newer writer) is dropped, a
missing one takes its default (an older writer), and an empty object where a record may be absent (`"gate": {}`,
what versions never gated were written with) reads as absent.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from plumbing.errors import FailedPrecondition
from serving.rollout.config import CanaryConfig, GateConfig

R = TypeVar("R")


def load_record(cls: type[R], data: object) -> R:
    """A record of type `cls` from its JSON form (nested records, lists, tuples and dicts of them); a record
    class with a `from_json` classmethod of its own reads itself."""
    if not isinstance(data, dict):
        raise FailedPrecondition(f"a {cls.__name__} record must be a JSON object, not {type(data).__name__}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a record (a dataclass)")
    hints = typing.get_type_hints(cls)
    values = {f.name: _value(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
    try:
        return cls(**values)
    except TypeError as exc:  # a required field missing
        raise FailedPrecondition(f"a {cls.__name__} record without {exc}") from None


def dump_record(record: object) -> dict[str, object]:
    """The record's JSON form (what `load_record` reads back)."""
    assert dataclasses.is_dataclass(record) and not isinstance(record, type)
    return dataclasses.asdict(record)


def _value(tp: Any, raw: object) -> object:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw is None or (raw == {} and len(inner) == 1 and dataclasses.is_dataclass(inner[0])):
            return None
        return _value(inner[0], raw) if len(inner) == 1 else raw
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        own = getattr(tp, "from_json", None)
        return own(raw) if own is not None else load_record(tp, raw)
    if origin in (list, tuple) and isinstance(raw, list):
        items = [_value(args[0], x) for x in raw]
        return items if origin is list else tuple(items)
    if origin is dict and isinstance(raw, dict):
        return {str(k): _value(args[1], v) for k, v in raw.items()}
    if tp is float and isinstance(raw, int):
        return float(raw)
    return raw


# -- the gate ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateLap:
    """One version's lockstep lap of a held-out track, as the gate compares them."""

    track: str
    version: str
    finished: bool
    lap_ticks: int
    lap_s: float
    progress: float  # share of the lap reached, 0..1
    wall_contacts: int  # ticks touching a wall
    ticks: int
    stop_reason: str = ""
    inference_ms_p50: float | None = None
    inference_ms_p99: float | None = None


@dataclass(frozen=True)
class GatePair:
    """A held-out track's lap by the candidate beside the default's."""

    track: str
    candidate: GateLap
    default: GateLap


@dataclass(frozen=True)
class GateOutcome:
    """What a version's last gate showed, kept on the version (`ModelVersion.gate`); a default never gated itself
    keeps only the laps it drove as the baseline (`passed` None)."""

    passed: bool | None = None
    failures: list[str] = field(default_factory=list)
    inference_ms_p99: float | None = None
    laps: dict[str, GateLap] = field(default_factory=dict)  # "<track>@<max ticks>" -> the version's lap


# -- the canary ----------------------------------------------------------------------------------------------------


@dataclass
class Counters:
    """One version's autopilot counters, summed over every source (running totals, as Prometheus serves them)."""

    laps: float = 0.0
    finished: float = 0.0
    lap_s_sum: float = 0.0  # simulated seconds of the finished laps
    wall_contacts: float = 0.0
    fallbacks: float = 0.0
    missed_ticks: float = 0.0
    ticks: float = 0.0
    inference_errors: float = 0.0


@dataclass(frozen=True)
class LiveWindow:
    """One version's counters between two snapshots, and the rates the canary judges."""

    laps: float = 0.0
    finished: float = 0.0
    lap_s_sum: float = 0.0
    wall_contacts: float = 0.0
    fallbacks: float = 0.0
    missed_ticks: float = 0.0
    ticks: float = 0.0
    inference_errors: float = 0.0
    completion: float = 0.0  # finished laps / laps
    mean_lap_s: float = 0.0  # of the finished laps
    fallback_rate: float = 0.0  # per tick
    missed_rate: float = 0.0
    error_rate: float = 0.0


@dataclass(frozen=True)
class LiveOutcome:
    """What a version's last canary showed, kept on the version (`ModelVersion.live`)."""

    candidate: LiveWindow
    default: LiveWindow
    passed: bool


# -- a rollout's steps ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterFigures:
    """Registering the candidate beside the default, with no traffic."""

    load_s: float = 0.0


@dataclass(frozen=True)
class GateFigures:
    """The gate: each held-out track's pair of laps and both versions' inference p99."""

    laps: list[GatePair] = field(default_factory=list)
    inference_ms_p99: float = 0.0
    default_inference_ms_p99: float = 0.0
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CanaryFigures:
    """The canary: both versions' live windows over the time it ran."""

    candidate: LiveWindow = field(default_factory=LiveWindow)
    default: LiveWindow = field(default_factory=LiveWindow)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DecisionFigures:
    """Promote or roll back: the routing it left, and the version it unregistered."""

    default: str = ""
    previous: str = ""
    unregistered: str = ""


StepFigures = RegisterFigures | GateFigures | CanaryFigures | DecisionFigures
FIGURES_OF_STAGE: dict[str, type[StepFigures]] = {
    "register": RegisterFigures, "gate": GateFigures, "canary": CanaryFigures,
    "promote": DecisionFigures, "rollback": DecisionFigures,
}  # fmt: skip


@dataclass(frozen=True)
class StepResult:
    """What one step of a rollout found: whether the candidate may go on, why, and the figures behind it."""

    ok: bool
    reason: str
    figures: StepFigures


@dataclass
class StepRecord:
    """One step as the deployment record keeps it: written when it starts and again when it ends."""

    stage: str
    started: float
    ended: float | None = None
    seconds: float | None = None
    ok: bool | None = None
    reason: str = ""
    figures: StepFigures | None = None

    @classmethod
    def from_json(cls, data: object) -> StepRecord:
        if not isinstance(data, dict):
            raise FailedPrecondition("a step record must be a JSON object")
        figures = data.get("figures")
        kind = FIGURES_OF_STAGE.get(str(data.get("stage")))
        step = load_record(cls, {k: v for k, v in data.items() if k != "figures"})
        if kind is not None and isinstance(figures, dict):
            step.figures = load_record(kind, figures)
        return step


@dataclass(frozen=True)
class RolloutSettings:
    """The thresholds a rollout was judged by, kept on its record."""

    gate: GateConfig
    canary: CanaryConfig


@dataclass
class DeploymentRecord:
    """One rollout (or `--rollback`), saved after every change: what a deployer started again takes up."""

    id: str
    kind: str  # "rollout" | "first" (an empty store: register, promote) | "rollback"
    candidate: str  # content id of the version rolled out (for a rollback: the version returned to)
    version: str  # its human version
    started: float
    name: str = ""  # model name on the model server
    default: str = ""  # the default version when it started
    state: str = "running"  # "running" | "done"
    stage: str = "register"
    steps: list[StepRecord] = field(default_factory=list)
    decision: str = ""  # "" until decided, then "promote" | "rollback" ("none": nothing to deploy)
    reason: str = ""
    ended: float | None = None
    settings: RolloutSettings | None = None  # none for a --rollback

    def done_stages(self) -> set[str]:
        return {s.stage for s in self.steps if s.ended}

    def step(self, stage: str) -> StepRecord | None:
        return next((s for s in self.steps if s.stage == stage), None)

    def summary(self) -> str:
        """One line: the decision, its reason and each step's time."""
        steps = ", ".join(f"{s.stage} {s.seconds if s.seconds is not None else '-'} s" for s in self.steps)
        return f"{self.decision or '?'} version {self.version or '?'}: {self.reason} ({steps})"
