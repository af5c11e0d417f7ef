"""The planner: its population rays and keys are the scalar driver's, it is deterministic, and it is faster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from game_server.core import episode, physics
from game_server.core.batch import Cars
from game_server.core.driver_file import load_driver
from game_server.core.drivers import RayDriver, run_driver
from game_server.core.planner import Planner, PlannerConfig, PlannerPolicy, driver_keys, plan_lap, raycast_cars
from game_server.core.state import SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track, random_state

# The main job's evolved driver (`rrp evolve --kind driver --track kidney --extra-tracks oval,alpine,gen-1,gen-2
# --population 24 --generations 10 --seed 0`): 470 / 466 / 643 ticks on oval / kidney / alpine.
DRIVER_FILE = Path(__file__).parent / "data" / "evolved_driver.json"


@pytest.fixture(scope="module")
def driver() -> RayDriver:
    return load_driver(DRIVER_FILE).ray_driver()


def late_start(track: Track, driver: RayDriver, share: float) -> tuple[SimState, int]:
    """The driver's state `share` of the way through its lap, and the ticks it then needs to finish."""
    lap = run_driver(track, track.base_state, driver, max_ticks=3000).lap_ticks
    ticks = int(lap * share)
    return run_driver(track, track.base_state, driver, max_ticks=ticks).final_state, lap - ticks


@pytest.mark.parametrize("name", ["alpine", "tech-3019"])
def test_population_rays_and_keys_are_the_scalar_drivers(driver: RayDriver, name: str) -> None:
    """The rollouts predict exactly what the scalar simulation of the driver would do."""
    track = load_track(name)
    rng = np.random.default_rng(0)
    states = [random_state(track, rng) for _ in range(40)]
    cars = Cars.of(states)
    rays = raycast_cars(physics.kernel(track), cars)
    keys = driver_keys(driver, rays, cars.v)
    for i, state in enumerate(states):
        scalar = physics.raycast(track, state.car, state.lap.segment)
        assert tuple(rays[i].tolist()) == scalar
        assert int(keys[i]) == driver.act_on(scalar, state.car.speed)


def test_planner_is_deterministic_and_beats_the_evolved_driver_on_a_technical_track(driver: RayDriver) -> None:
    track = load_track("tech-3019")  # 668 m; the evolved driver's lap: 425 ticks
    start, driver_ticks = late_start(track, driver, 0.75)
    first, second = plan_lap(track, start, driver), plan_lap(track, start, driver)
    assert first == second
    assert first.source == "planner" and first.result.finished
    assert first.result.lap_ticks <= 0.95 * driver_ticks  # measured: 94 against 107
    replay = episode.run_program(track, start, first.masks)
    assert replay.finished and replay.lap_ticks == first.result.lap_ticks == len(first.masks)
    # One decision is a pure function of the state: fresh planners agree.
    assert Planner(track, driver).keys(start) == Planner(track, driver).keys(start)


def test_a_perturbed_planner_decides_again_and_still_finishes(driver: RayDriver) -> None:
    track = load_track("tech-3019")
    start, driver_ticks = late_start(track, driver, 0.8)
    perturbation = episode.Perturbation(seed=3, start_probability=0.1, max_duration_ticks=6)

    def run() -> episode.Episode:
        policy = PlannerPolicy(Planner(track, driver))
        return episode.run_episode(track, start, policy, max_ticks=400, perturbation=perturbation)

    a, b = run(), run()
    assert a.perturbed_ticks > 0 and a.result.finished
    assert a.applied == b.applied and a.result == b.result
    assert a.result.lap_ticks < 2 * driver_ticks


def test_never_slower_than_the_driver_on_a_smooth_track(driver: RayDriver) -> None:
    track = load_track("kidney")
    start, driver_ticks = late_start(track, driver, 0.85)
    plan = plan_lap(track, start, driver)
    assert plan.result.finished and plan.result.lap_ticks <= driver_ticks


def test_config_is_checked() -> None:
    for bad in (
        {"holds": ()},
        {"holds": (0,)},
        {"holds": (50,), "horizon": 40},
        {"replan_ticks": 5, "holds": (4, 10)},
        {"max_ticks": 0},
    ):
        with pytest.raises(ValueError):
            PlannerConfig(**bad)
