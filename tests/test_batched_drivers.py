"""Ray drivers run as one population equal the scalar episode bit for bit: rays, trajectories, laps, fitness."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from game_server.core import physics
from game_server.core.batch import Cars, raycast_cars
from game_server.core.drivers import LOWER, N_PARAMS, UPPER, RayDriver, default_driver, run_driver, run_drivers
from game_server.core.episode import run_program
from game_server.core.state import CarState, LapState, SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track
from game_server.evaluation import evaluate_batch, evaluate_in_process, result_to_pb
from rallyrobopilot.v1 import game_pb2, sim_pb2
from scheduler.tasks import map_in_process
from tests.test_core_determinism import same_result
from trainer.evolve import Evolution, EvolveConfig, Reference
from trainer.fitness import relative_cost

TRACKS = ["oval", "kidney", "alpine", "gen-3"]
FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _driver(data: st.DataObject) -> RayDriver:
    """The default driver with some parameters redrawn anywhere in their bounds: some fast, some crashing."""
    params = list(default_driver().params)
    for i in data.draw(st.lists(st.integers(0, N_PARAMS - 1), max_size=4)):
        params[i] = data.draw(st.floats(float(LOWER[i]), float(UPPER[i])))
    return RayDriver(tuple(params))


def _start(track: Track, data: st.DataObject) -> SimState:
    """The base state, or where a random program (throttle-heavy: walls, spins, reversing) left the car."""
    if data.draw(st.booleans()):
        return track.base_state
    masks = data.draw(st.lists(st.sampled_from([1, 1, 5, 9, 0, 2, 6, 10]), min_size=1, max_size=200).map(bytes))
    return run_program(track, track.base_state, masks).final_state


@FEW
@given(name=st.sampled_from(TRACKS), data=st.data())
def test_population_equals_scalar_drivers(name: str, data: st.DataObject) -> None:
    track = load_track(name)
    p = data.draw(st.integers(1, 6))
    drivers = [_driver(data) for _ in range(p)]
    starts = [_start(track, data) for _ in range(p)]
    budgets = [data.draw(st.integers(0, 200)) for _ in range(p)]
    gate = (
        track.checkpoints[data.draw(st.integers(0, len(track.checkpoints) - 1))] if data.draw(st.booleans()) else None
    )
    # 1: every tick batched; more: the last cars finish alone, their trajectories joined to the batched part.
    least = data.draw(st.sampled_from([1, 1, 2, 4]))
    batched = run_drivers(
        track, starts, drivers, max_ticks=budgets, gate=gate, record_trajectory=True, min_population=least
    )
    for s, d, m, b in zip(starts, drivers, budgets, batched, strict=True):
        same_result(run_driver(track, s, d, max_ticks=m, gate=gate, record_trajectory=True), b)


def test_full_laps_and_fitness_equal_on_several_tracks() -> None:
    rng = np.random.default_rng(21)
    base = np.array(default_driver().params)
    drivers = [default_driver()] + [
        RayDriver(tuple(np.clip(base + rng.normal(0.0, 0.1, N_PARAMS) * (UPPER - LOWER), LOWER, UPPER).tolist()))
        for _ in range(2)
    ]
    finished = 0
    for name, budget in (("oval", 1000), ("gen-3", 1300)):
        track = load_track(name)
        scalar = [run_driver(track, track.base_state, d, max_ticks=budget, record_trajectory=True) for d in drivers]
        for least in (1, 3):  # batched to the end; handed to the scalar loop once the first car stops
            batched = run_drivers(
                track,
                [track.base_state] * 3,
                drivers,
                max_ticks=[budget] * 3,
                record_trajectory=True,
                min_population=least,
            )
            for a, b in zip(scalar, batched, strict=True):
                same_result(a, b)
        finished += sum(r.finished for r in batched)
        # Through the EvaluateBatch path: each item's LapResult is the scalar run's, so is its fitness.
        requests = [
            game_pb2.EvaluateRequest(
                track=name, driver=sim_pb2.DriverParams(kind=d.kind, params=d.params), max_ticks=budget
            )
            for d in drivers
        ]
        for result, item in zip(scalar, evaluate_batch(requests, 1 << 30).items, strict=True):
            assert item.response.result == result_to_pb(result)
            assert relative_cost(item.response.result, 700, budget) == relative_cost(result_to_pb(result), 700, budget)
    assert finished >= 3  # full laps, finish-line crossings included


def _state_at(track: Track, seg: int, along: float, lateral: float, heading: float, speed: float) -> SimState:
    """A car on segment `seg`, `lateral` in [-1, 1] of the way from the centre to the left (1) or right wall."""
    x0, y0 = track.centerline[seg]
    x1, y1 = track.centerline[(seg + 1) % track.n_points]
    cx, cy = x0 + along * (x1 - x0), y0 + along * (y1 - y0)
    wall = track.left_wall if lateral >= 0 else track.right_wall
    wx, wy = wall[seg] + along * (wall[(seg + 1) % track.n_points] - wall[seg])
    x, y = cx + abs(lateral) * (wx - cx), cy + abs(lateral) * (wy - cy)
    k = physics.kernel(track)
    return SimState(0, CarState(float(x), float(y), heading, speed), LapState(segment=physics.locate(k, x, y, seg)))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(TRACKS), data=st.data())
def test_rays_of_a_population_equal_the_scalar_rays(name: str, data: st.DataObject) -> None:
    """Anywhere on the track, against the walls and on their vertices included, facing any way."""
    track = load_track(name)
    states = [
        _state_at(
            track,
            data.draw(st.integers(0, track.n_points - 1)),
            data.draw(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0)),
            data.draw(st.sampled_from([-1.0, 1.0, 0.0, -0.97, 0.97]) | st.floats(-1.0, 1.0)),
            data.draw(st.floats(-math.pi, math.pi, exclude_max=True)),
            0.0,
        )
        for _ in range(data.draw(st.integers(1, 8)))
    ]
    cars = Cars.of(states)
    rays = raycast_cars(physics.kernel(track), cars.x, cars.y, cars.h, cars.seg)
    for state, row in zip(states, rays, strict=True):
        assert tuple(row.tolist()) == physics.raycast(track, state.car, state.lap.segment)


def test_in_process_map_gives_the_builtin_maps_fitness() -> None:
    config = EvolveConfig(kind="driver", population=6, generations=1, seed=4, extra_tracks=("oval",))
    reference = Reference.compute(config.tracks)
    fitness = []
    for map_fn in (map, map_in_process):
        state = Evolution(config, map_fn, reference).start()  # seeds the run, then scores the first generation
        fitness.append([ind.fitness.values for ind in state.population])
    assert fitness[0] == fitness[1]


def test_a_bad_driver_item_fails_alone() -> None:
    good = game_pb2.EvaluateRequest(
        track="oval", driver=sim_pb2.DriverParams(kind="rays-v1", params=default_driver().params), max_ticks=50
    )
    bad_params = game_pb2.EvaluateRequest(
        track="oval", driver=sim_pb2.DriverParams(kind="rays-v1", params=[9.0] * N_PARAMS), max_ticks=50
    )
    no_budget = game_pb2.EvaluateRequest(
        track="oval", driver=sim_pb2.DriverParams(kind="rays-v1", params=default_driver().params)
    )
    items = evaluate_batch([good, bad_params, no_budget, good], 1 << 30).items
    assert [i.WhichOneof("outcome") for i in items] == ["response", "error", "error", "response"]
    assert items[0].response == items[3].response == evaluate_in_process(good)
    assert "outside" in items[1].error.message and "max_ticks" in items[2].error.message


def test_drivers_that_want_trajectories_in_a_batch() -> None:
    """They run one by one (a population would hold every trajectory at once); the others together."""
    rng = np.random.default_rng(5)
    base = np.array(default_driver().params)
    requests = [
        game_pb2.EvaluateRequest(
            track="alpine",
            driver=sim_pb2.DriverParams(
                kind="rays-v1",
                params=np.clip(base + rng.normal(0.0, 0.05, N_PARAMS) * (UPPER - LOWER), LOWER, UPPER).tolist(),
            ),
            max_ticks=150,
            return_trajectory=i % 3 == 0,
        )
        for i in range(12)
    ]
    for request, item in zip(requests, evaluate_batch(requests, 1 << 30).items, strict=True):
        assert item.response == evaluate_in_process(request)
        assert len(item.response.trajectory.x_m) == (150 if request.return_trajectory else 0)
