"""Simulation speed: one car (physics only, then with rays); batched populations of programs and of ray
drivers vs one car at a time."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from game_server.core.batch import run_programs
from game_server.core.drivers import LOWER, N_PARAMS, UPPER, RayDriver, default_driver, run_drivers
from game_server.core.episode import run_program
from game_server.core.physics import raycast, step
from game_server.core.pilot import drive_lap
from game_server.core.state import TICK_HZ
from game_server.core.tracks import load_track


def median_rate(work: Callable[[], int], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median over `repeats` of (units of work done) / (seconds of `clock`)."""
    rates = []
    for _ in range(repeats):
        t0 = clock()
        units = work()
        rates.append(units / (clock() - t0))
    return statistics.median(rates)


def line(label: str, rate: float, unit: str, baseline: float, baseline_label: str) -> None:
    print(f"{label:<44} {rate:>12,.0f} {unit:<13} {rate / baseline:>9,.1f}x {baseline_label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller population")
    parser.add_argument("--track", default="kidney")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="rates per second of this process's CPU time (a busy machine's other work left out), not wall time",
    )
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter

    def rate(work: Callable[[], int], times: int) -> float:
        return median_rate(work, times, clock)

    repeats = 3 if args.quick else 7
    population = 64 if args.quick else 256
    track = load_track(args.track)
    lap, _ = drive_lap(track)
    # Population: the reference lap with seeded steering noise, like a GA generation of similar drivers.
    rng = np.random.default_rng(0)
    programs = [
        bytes(m ^ int(f) for m, f in zip(lap, rng.choice([0, 0, 0, 0, 4, 8], size=len(lap)), strict=True))
        for _ in range(population)
    ]

    # Ray drivers: the default driver and seeded variations of it, like a GA generation (some finish the lap,
    # some crash and crawl), each with a budget of 1.6 reference laps.
    base = np.array(default_driver().params)
    drivers = [default_driver()] + [
        RayDriver(tuple(np.clip(base + rng.normal(0.0, 0.05, N_PARAMS) * (UPPER - LOWER), LOWER, UPPER).tolist()))
        for _ in range(population - 1)
    ]
    budget = int(1.6 * len(lap))

    def one_car() -> int:
        return run_program(track, track.base_state, lap).ticks

    def one_car_rays() -> int:
        state = track.base_state
        for m in lap:
            state, _ = step(track, state, m)
            raycast(track, state.car, state.lap.segment)
        return len(lap)

    def one_at_a_time() -> int:
        return sum(run_program(track, track.base_state, p).ticks for p in programs)

    def batched() -> int:
        return sum(r.ticks for r in run_programs(track, [track.base_state] * population, programs))

    def ray_drivers() -> int:
        starts = [track.base_state] * population
        return sum(r.ticks for r in run_drivers(track, starts, drivers, max_ticks=[budget] * population))

    print(
        f"track {track.name}: {track.length_m:.0f} m, reference lap {len(lap)} ticks; median of {repeats}; "
        f"per second of {'CPU' if args.cpu_time else 'wall'} time, one process (one core)"
    )
    line("one car, physics only", rate(one_car, repeats), "ticks/s", TICK_HZ, "real time (25 Hz)")
    with_rays = rate(one_car_rays, repeats)
    line("one car, physics + 15 rays each tick", with_rays, "ticks/s", TICK_HZ, "real time")
    single = rate(one_at_a_time, max(1, repeats // 2))
    line(f"population of {population}, one car at a time", single, "car-ticks/s", TICK_HZ, "real time")
    line(
        f"population of {population}, batched",
        rate(batched, repeats),
        "car-ticks/s",
        single,
        "one at a time",
    )

    line(
        f"{population} ray drivers (15 rays each tick), batched",
        rate(ray_drivers, max(1, repeats // 2)),
        "car-ticks/s",
        with_rays,
        "one car with rays",
    )


if __name__ == "__main__":
    main()
