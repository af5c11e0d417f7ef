"""Closed-loop drivers: small parametrised controllers on the car's own sensors (15 rays and speed).

Unlike a control program, a driver can start from any state on any track, and it can label the states
another policy (the vision model) visits. Arithmetic is plain + - * / so every process agrees bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from game_server.core import batch, episode, physics
from game_server.core.physics import N_RAYS, RAY_RANGE, TOP_SPEED, RunResult
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, Gate, SimState
from game_server.core.track import Track
from plumbing.errors import InvalidArgument, quote

RAYS_V1 = "rays-v1"
_PAIRS = N_RAYS // 2  # ray i (left side) pairs with ray 14 - i (right side); ray 7 looks straight ahead

# (name, lower bound, upper bound) of each parameter of "rays-v1", in order.
PARAM_SPEC: tuple[tuple[str, float, float], ...] = (
    *((f"steer_gain_{i}", -4.0, 4.0) for i in range(_PAIRS)),
    ("steer_deadband", 0.0, 0.5),
    ("speed_base_m_per_s", 0.0, 50.0),
    ("speed_per_m_clear", 0.0, 2.0),
    ("speed_margin_m_per_s", 0.0, 10.0),
)
N_PARAMS = len(PARAM_SPEC)
LOWER = np.array([lo for _, lo, _ in PARAM_SPEC])
UPPER = np.array([hi for _, _, hi in PARAM_SPEC])
MIN_TARGET_SPEED = 5.0


@dataclass(frozen=True)
class RayDriver:
    """Steers toward the side with more room (weighted left-right ray differences) and picks a target
    speed from the clearance straight ahead; bang-bang outputs like a person's keys."""

    params: tuple[float, ...]
    kind: str = RAYS_V1
    # Driven inside the recovering teacher (game_server.core.recovery): out of walls and wrong-way states.
    recovering: bool = False

    def __post_init__(self) -> None:
        validate_params(self.kind, self.params)

    def act_on(self, rays: Sequence[float], speed: float) -> int:
        p = self.params
        steer = 0.0
        for i in range(_PAIRS):
            steer += p[i] * (rays[i] - rays[N_RAYS - 1 - i])
        steer = steer / physics.RAY_RANGE
        deadband = p[_PAIRS]
        front = min(rays[_PAIRS - 1], rays[_PAIRS], rays[_PAIRS + 1])
        target = p[_PAIRS + 1] + p[_PAIRS + 2] * front
        target = min(physics.TOP_SPEED, max(MIN_TARGET_SPEED, target))
        mask = 0
        # At a top-speed target the throttle stays on: coasting for a tick and pressing on the next would
        # hold the same speed, but give two look-alike states opposite labels for a learner.
        if speed < target or target >= physics.TOP_SPEED:
            mask |= FORWARD
        elif speed > target + p[_PAIRS + 3]:
            mask |= BACK
        if steer > deadband:
            mask |= LEFT
        elif steer < -deadband:
            mask |= RIGHT
        return mask

    def act(self, track: Track, state: SimState) -> int:
        return self.act_on(physics.raycast(track, state.car, state.lap.segment), state.car.speed)


def validate_params(kind: str, params: Sequence[float]) -> None:
    if kind != RAYS_V1:
        raise InvalidArgument(f"unknown driver kind {quote(kind)}; known: {RAYS_V1}")
    if len(params) != N_PARAMS:
        raise InvalidArgument(f"driver {kind} takes {N_PARAMS} parameters, got {len(params)}")
    for (name, lo, hi), value in zip(PARAM_SPEC, params, strict=True):
        if not math.isfinite(value) or not lo <= value <= hi:
            raise InvalidArgument(f"driver parameter {name}={value} outside [{lo}, {hi}]")


def default_driver() -> RayDriver:
    """A hand-set starting point: cautious, but it gets round the built-in tracks."""
    gains = (0.3, 0.5, 0.8, 1.2, 1.6, 2.0, 2.5)
    return RayDriver((*gains, 0.05, 8.0, 0.45, 3.0))


def run_policy(
    track: Track,
    start: SimState,
    policy: Callable[[Track, SimState], int],
    *,
    max_ticks: int,
    gate: Gate | None = None,
    record_trajectory: bool = False,
) -> tuple[RunResult, bytes]:
    """Runs a privileged policy (it reads the state) until the finish or `max_ticks`; returns the result
    and the masks it chose."""
    run = episode.run_episode(
        track,
        start,
        episode.StatePolicy(policy, track),
        max_ticks=max_ticks,
        gate=gate,
        record_trajectory=record_trajectory,
    )
    return run.result, run.applied


def run_driver(
    track: Track,
    start: SimState,
    driver: RayDriver,
    *,
    max_ticks: int,
    gate: Gate | None = None,
    record_trajectory: bool = False,
) -> RunResult:
    """Runs a sensor driver until the finish or `max_ticks`."""
    return episode.run_episode(
        track,
        start,
        episode.SensorPolicy(driver.act_on),
        max_ticks=max_ticks,
        gate=gate,
        record_trajectory=record_trajectory,
    ).result


def act_cars(params: np.ndarray, rays: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """`RayDriver.act_on` of P cars at once, with its operations in its order: params (P, N_PARAMS),
    rays (P, 15), speed (P,) -> masks (P,) uint8."""
    steer = np.zeros(len(speed))
    for i in range(_PAIRS):
        steer = steer + params[:, i] * (rays[:, i] - rays[:, N_RAYS - 1 - i])
    steer = steer / RAY_RANGE
    deadband = params[:, _PAIRS]
    front = np.minimum(np.minimum(rays[:, _PAIRS - 1], rays[:, _PAIRS]), rays[:, _PAIRS + 1])
    target = params[:, _PAIRS + 1] + params[:, _PAIRS + 2] * front
    target = np.minimum(TOP_SPEED, np.maximum(MIN_TARGET_SPEED, target))
    forward = (speed < target) | (target >= TOP_SPEED)
    back = ~forward & (speed > target + params[:, _PAIRS + 3])
    left = steer > deadband
    right = ~left & (steer < -deadband)
    return np.asarray(forward * FORWARD | back * BACK | left * LEFT | right * RIGHT, dtype=np.uint8)


def run_drivers(
    track: Track,
    starts: Sequence[SimState],
    drivers: Sequence[RayDriver],
    *,
    max_ticks: Sequence[int],
    gate: Gate | None = None,
    record_trajectory: bool = False,
    cancelled: Callable[[], bool] | None = None,
    min_population: int = batch.MIN_POPULATION,
) -> list[RunResult]:
    """`[run_driver(track, s, d, max_ticks=m, ...) for ...]` bit for bit, computed as one population: the
    rays of every car at once (`batch.raycast_cars`), then the drivers, then the physics. The last few
    cars still running (fewer than `min_population`), cheaper alone, finish with the scalar loop.

    Drivers inside the recovering teacher read more than their rays: run those with `run_driver`."""
    if not len(starts) == len(drivers) == len(max_ticks):
        raise ValueError("one start state and one max_ticks per driver")
    if any(d.recovering for d in drivers):
        raise ValueError("recovering drivers are not batched")
    k = physics.kernel(track)
    params = np.array([d.params for d in drivers], dtype=np.float64).reshape(len(drivers), N_PARAMS)

    def choose(ids: np.ndarray, t: int, cars: batch.Cars) -> np.ndarray:
        rays = batch.raycast_cars(k, cars.x, cars.y, cars.h, cars.seg, (cars.sin, cars.cos))
        return act_cars(params[ids], rays, cars.v)

    def finisher(i: int, done: int, state: SimState, left: int) -> RunResult:
        return episode.run_episode(
            track,
            state,
            episode.SensorPolicy(drivers[i].act_on),
            max_ticks=left,
            gate=gate,
            record_trajectory=record_trajectory,
            cancelled=cancelled,
        ).result

    limits = np.array(max_ticks, dtype=np.int64)
    return batch.run_population(
        track,
        starts,
        limits,
        choose,
        gate=gate,
        record_trajectory=record_trajectory,
        cancelled=cancelled,
        finisher=finisher,
        min_population=min_population,
    )
