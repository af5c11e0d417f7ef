"""The one episode loop: observe, ask a policy, optionally perturb, call back, step; pure and deterministic.

Evaluate, Record, the trainer's generated data and closed-loop evaluation all drive through `run_episode`,
so a lap means the same thing wherever it is run, and there is one perturbation model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from game_server.core import physics
from game_server.core.physics import RunResult
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, Gate, SimState
from game_server.core.track import Track
from plumbing.errors import Cancelled, InvalidArgument

MAX_START_PROBABILITY = 0.5
MAX_PERTURBATION_TICKS = 100
# What a perturbation holds: swerves, braking, releasing the throttle; never forward and back at once,
# which no person presses and which teaches nothing.
PERTURBATION_MASKS = (0, LEFT, RIGHT, FORWARD | LEFT, FORWARD | RIGHT, BACK, BACK | LEFT, BACK | RIGHT)
# How often a long episode looks whether its caller is still there: 256 driver ticks take ~30 ms.
STOP_CHECK_TICKS = 256


class Policy:
    """Chooses the keys of each tick; `needs_rays` says whether it reads the 15 rays (they cost ~30 us)."""

    needs_rays: bool = True

    def act(self, index: int, state: SimState, rays: Sequence[float]) -> int:
        raise NotImplementedError


class Program(Policy):
    """An open-loop control program: one mask per tick, coasting (0) past its end."""

    needs_rays = False

    def __init__(self, masks: bytes) -> None:
        self.masks = masks

    def act(self, index: int, state: SimState, rays: Sequence[float]) -> int:
        return self.masks[index] if index < len(self.masks) else 0


class SensorPolicy(Policy):
    """A closed-loop controller on the car's own sensors (rays and speed), such as an evolved RayDriver."""

    def __init__(self, act_on: Callable[[Sequence[float], float], int]) -> None:
        self.act_on = act_on

    def act(self, index: int, state: SimState, rays: Sequence[float]) -> int:
        return self.act_on(rays, state.car.speed)


class StatePolicy(Policy):
    """A privileged controller that reads the whole simulation state (the reference pilot, an expert)."""

    needs_rays = False

    def __init__(self, act_on_state: Callable[[Track, SimState], int], track: Track) -> None:
        self.act_on_state = act_on_state
        self.track = track

    def act(self, index: int, state: SimState, rays: Sequence[float]) -> int:
        return self.act_on_state(self.track, state)


@dataclass(frozen=True)
class Perturbation:
    """Seeded disturbances of the applied controls, so that recorded data shows how to recover from mistakes."""

    seed: int
    start_probability: float
    max_duration_ticks: int = 12

    def validate(self) -> None:
        if not 0.0 <= self.start_probability <= MAX_START_PROBABILITY:
            raise InvalidArgument(f"perturbation start_probability must be in [0, {MAX_START_PROBABILITY}]")
        if not 1 <= self.max_duration_ticks <= MAX_PERTURBATION_TICKS:
            raise InvalidArgument(f"perturbation max_duration_ticks must be in [1, {MAX_PERTURBATION_TICKS}]")


class PerturbationSchedule:
    """Per tick: the keys a perturbation holds, or None. Its draws never depend on the car, only on the seed,
    so the same seed perturbs the same ticks in the same way whatever the driver does."""

    def __init__(self, p: Perturbation) -> None:
        self._p = p
        self._rng = np.random.default_rng(p.seed)
        self._left = 0
        self._mask = 0

    def next(self) -> int | None:
        if self._left == 0 and self._rng.random() < self._p.start_probability:
            self._left = int(self._rng.integers(1, self._p.max_duration_ticks + 1))
            self._mask = PERTURBATION_MASKS[int(self._rng.integers(len(PERTURBATION_MASKS)))]
        if self._left == 0:
            return None
        self._left -= 1
        return self._mask


@dataclass(frozen=True)
class Tick:
    """What a per-tick callback sees: the state before the controls, and the controls."""

    index: int
    state: SimState
    rays: Sequence[float]  # empty unless the policy or the caller asked for rays
    contact: bool  # the previous tick touched a barrier
    intended: int  # the policy's keys: the label of recorded data
    applied: int  # what was simulated: the intended keys, or a perturbation's


@dataclass(frozen=True)
class Episode:
    """An episode's outcome: the lap result, every applied mask, and how many ticks were perturbed."""

    result: RunResult
    applied: bytes
    perturbed_ticks: int


class Stop(Exception):
    """Raised by a policy or callback to end the episode early (a stuck car, a caller who left)."""


def run_episode(
    track: Track,
    start: SimState,
    policy: Policy,
    *,
    max_ticks: int,
    gate: Gate | None = None,
    perturbation: Perturbation | None = None,
    on_tick: Callable[[Tick], None] | None = None,
    with_rays: bool = False,
    record_trajectory: bool = False,
    cancelled: Callable[[], bool] | None = None,
) -> Episode:
    """Runs up to `max_ticks` ticks from `start`, stopping at the finish (or when `Stop` is raised).

    Inputs are trusted: validate them at the edge. A start state that is already finished simulates nothing.
    `cancelled`, looked at every STOP_CHECK_TICKS ticks, ends the episode with plumbing.errors.Cancelled
    when it answers True (the caller left, so the work stops and frees its slot).
    """
    schedule = (
        PerturbationSchedule(perturbation) if perturbation is not None and perturbation.start_probability else None
    )
    rays_wanted = with_rays or policy.needs_rays
    recorder = physics.TrajectoryRecorder() if record_trajectory else None
    applied_masks = bytearray()
    perturbed = 0
    state, contact = start, False
    no_rays: tuple[float, ...] = ()
    for index in range(0 if start.lap.finished else max_ticks):
        if cancelled is not None and index % STOP_CHECK_TICKS == 0 and cancelled():
            raise Cancelled(f"stopped after {index} ticks: the caller left")
        rays = physics.raycast(track, state.car, state.lap.segment) if rays_wanted else no_rays
        try:
            intended = policy.act(index, state, rays)
            applied = intended
            if schedule is not None:
                forced = schedule.next()
                if forced is not None:
                    applied, perturbed = forced, perturbed + 1
            if on_tick is not None:
                on_tick(Tick(index, state, rays, contact, intended, applied))
        except Stop:
            break
        applied_masks.append(applied)
        state, contact = physics.step(track, state, applied, gate)
        if recorder is not None:
            recorder.add(state.car, contact)
        if state.lap.finished:
            break
    trajectory = recorder.trajectory() if recorder is not None else None
    return Episode(physics.result_of(track, start, state, trajectory), bytes(applied_masks), perturbed)


def run_program(
    track: Track,
    start: SimState,
    masks: bytes,
    *,
    gate: Gate | None = None,
    max_ticks: int = 0,
    record_trajectory: bool = False,
) -> RunResult:
    """Runs `max_ticks` ticks, stopping at the finish: a longer program is cut off there, a shorter one
    coasts (no keys) past its end; 0 runs the whole program."""
    return run_episode(
        track,
        start,
        Program(masks),
        max_ticks=program_ticks(masks, max_ticks),
        gate=gate,
        record_trajectory=record_trajectory,
    ).result


def program_ticks(masks: bytes, max_ticks: int) -> int:
    """How long a program runs: `max_ticks` when given (cutting it short or coasting past its end), else its length."""
    return max_ticks or len(masks)
