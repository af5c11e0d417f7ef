"""A privileged planner: receding-horizon rollouts of the evolved driver on the known, deterministic simulation.

Every few ticks the planner tries each of the nine key combinations held for a short and for a longer time,
each followed by the evolved ray driver (the base policy) to a fixed horizon, all as one numpy population
(`batch.tick_cars`, bit-identical to the scalar step, with the rays and the driver computed per population
here); it keeps the candidate that ends furthest along the track (or first over the finish line), and drives
its keys until the next decision. The base driver's own keys are a candidate, and the plan so far is one
too: the planner only drops its plan for one it predicts better. A lap is a pure function of (track,
start state, settings, driver): reproducible anywhere, and cacheable. It labels data; a student still sees
only frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from game_server.core import batch, episode, physics
from game_server.core.batch import Cars, tick_cars
from game_server.core.drivers import RayDriver, act_cars
from game_server.core.physics import Kernel, RunResult, kernel
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, SimState
from game_server.core.track import Track

# The nine key combinations a driver would press (forward and back together is only coasting).
KEY_COMBINATIONS = tuple(t | s for t in (FORWARD, 0, BACK) for s in (0, LEFT, RIGHT))


@dataclass(frozen=True)
class PlannerConfig:
    """How far and how often the planner looks ahead."""

    holds: tuple[int, ...] = (4, 10)  # ticks a candidate's keys are held before the base driver takes over
    horizon: int = 40  # ticks simulated per candidate
    replan_ticks: int = 4  # ticks driven between decisions
    max_ticks: int = 3000

    def __post_init__(self) -> None:
        if not self.holds or min(self.holds) < 1 or max(self.holds) > self.horizon:
            raise ValueError("holds must be within [1, horizon]")
        if not 1 <= self.replan_ticks <= min(self.holds):
            raise ValueError("replan_ticks must be within [1, the shortest hold]")
        if self.max_ticks < 1:
            raise ValueError("max_ticks must be >= 1")


@dataclass(frozen=True)
class Plan:
    """The planner's keys from the start state and their lap (simulated with the scalar step)."""

    masks: bytes
    result: RunResult
    source: str  # "planner", or "driver" when the base driver's own lap was at least as fast


def raycast_cars(k: Kernel, cars: Cars) -> np.ndarray:
    """(P, 15) ray distances of a population, element for element what `physics.raycast` gives each car."""
    return batch.raycast_cars(k, cars.x, cars.y, cars.h, cars.seg, (cars.sin, cars.cos))


def driver_keys(driver: RayDriver, rays: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """`driver.act_on` for a population, with the same operations in the same order."""
    params = np.broadcast_to(np.asarray(driver.params, dtype=np.float64), (len(speed), len(driver.params)))
    return act_cars(params, rays, speed)


class Planner:
    """Chooses keys for a car on `track` by rollouts of `driver` (see the module's docstring)."""

    def __init__(self, track: Track, driver: RayDriver, config: PlannerConfig | None = None) -> None:
        self.track = track
        self.driver = driver
        self.config = config or PlannerConfig()
        self._kernel = kernel(track)

    def _candidates(self, previous: bytes) -> list[bytes]:
        """Held key prefixes: each combination for each hold, then what is left of the previous plan."""
        out = [bytes([m]) * h for h in self.config.holds for m in KEY_COMBINATIONS]
        if previous:
            out.append(previous)
        return out

    def decide(self, state: SimState, previous: bytes = b"") -> bytes:
        """The best candidate's keys for the next ticks (at least `replan_ticks`), from `state`."""
        prefixes = self._candidates(previous)
        base = self._rollout_first_keys(state)
        prefixes.insert(0, bytes([base]))  # the driver itself: ties go to it
        score = self._score(state, prefixes)
        return prefixes[int(np.argmax(score))]  # the first of equals

    def _rollout_first_keys(self, state: SimState) -> int:
        cars = Cars.of([state])
        return int(driver_keys(self.driver, raycast_cars(self._kernel, cars), cars.v)[0])

    def _score(self, state: SimState, prefixes: Sequence[bytes]) -> np.ndarray:
        """Per candidate: the arc reached at the horizon, or past the lap's end when it finished (earlier
        is further)."""
        p = len(prefixes)
        horizon = self.config.horizon
        cars = Cars.of([state] * p)
        forced = np.zeros((horizon, p), dtype=np.uint8)
        forced_until = np.array([len(x) for x in prefixes])
        for i, prefix in enumerate(prefixes):
            forced[: min(len(prefix), horizon), i] = np.frombuffer(prefix[:horizon], dtype=np.uint8)
        score = np.zeros(p)
        live = np.arange(p)
        for t in range(horizon):
            keys = forced[t, live]
            free = forced_until[live] <= t
            if free.any():
                sub = cars.take(np.nonzero(free)[0])
                keys = keys.copy()
                keys[free] = driver_keys(self.driver, raycast_cars(self._kernel, sub), sub.v)
            tick_cars(self._kernel, cars, keys, None)
            if cars.finished.any():
                done = np.nonzero(cars.finished)[0]
                score[live[done]] = self.track.length_m + physics.TOP_SPEED * physics.TICK_S * (horizon - t)
                keep = np.nonzero(~cars.finished)[0]
                live, cars = live[keep], cars.take(keep)
                if not len(live):
                    return score
        score[live] = cars.arc
        return score

    def keys(self, state: SimState) -> int:
        """The planner's keys for one tick from any state (a label for a state another policy visited)."""
        return self.decide(state)[0]


class PlannerPolicy(episode.Policy):
    """The planner as an episode policy: it drives its plan and decides again every `replan_ticks`, or at
    once when the state is not the one its plan led to (a perturbation took over the keys)."""

    needs_rays = False

    def __init__(self, planner: Planner) -> None:
        self.planner = planner
        self._plan = b""
        self._since = 0
        self._expected: SimState | None = None

    def act(self, index: int, state: SimState, rays: Sequence[float]) -> int:
        on_plan = index > 0 and state == self._expected  # a new episode starts a new plan
        if not on_plan or not self._plan or self._since >= self.planner.config.replan_ticks:
            self._plan = self.planner.decide(state, self._plan if on_plan else b"")
            self._since = 0
        key = self._plan[0]
        self._plan = self._plan[1:]
        self._since += 1
        self._expected, _ = physics.step(self.planner.track, state, key)
        return key


def plan_lap(track: Track, start: SimState, driver: RayDriver, config: PlannerConfig | None = None) -> Plan:
    """The planner's lap from `start`, or the driver's own when that is not slower (never a slower teacher)."""
    planner = Planner(track, driver, config)
    max_ticks = planner.config.max_ticks
    run = episode.run_episode(track, start, PlannerPolicy(planner), max_ticks=max_ticks)
    plan = Plan(run.applied, run.result, "planner")
    own = episode.run_episode(track, start, episode.SensorPolicy(driver.act_on), max_ticks=max_ticks)
    if own.result.finished and (not plan.result.finished or own.result.lap_ticks <= plan.result.lap_ticks):
        plan = Plan(own.applied, own.result, "driver")
    return plan
