"""Simulation speed: one car (physics only, then with rays); a batched population vs one car at a time."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from game_server.core.batch import run_programs
from game_server.core.episode import run_program
from game_server.core.physics import raycast, step
from game_server.core.pilot import drive_lap
from game_server.core.state import TICK_HZ
from game_server.core.tracks import load_track


def median_rate(work: Callable[[], int], repeats: int) -> float:
    """Median over `repeats` of (units of work done) / (seconds)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        units = work()
        rates.append(units / (time.perf_counter() - t0))
    return statistics.median(rates)


def line(label: str, rate: float, unit: str, baseline: float, baseline_label: str) -> None:
    print(f"{label:<44} {rate:>12,.0f} {unit:<13} {rate / baseline:>9,.1f}x {baseline_label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller population")
    parser.add_argument("--track", default="kidney")
    args = parser.parse_args()
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

    print(f"track {track.name}: {track.length_m:.0f} m, reference lap {len(lap)} ticks; median of {repeats}")
    line("one car, physics only", median_rate(one_car, repeats), "ticks/s", TICK_HZ, "real time (25 Hz)")
    line(
        "one car, physics + 15 rays each tick",
        median_rate(one_car_rays, repeats),
        "ticks/s",
        TICK_HZ,
        "real time",
    )
    single = median_rate(one_at_a_time, max(1, repeats // 2))
    line(f"population of {population}, one car at a time", single, "car-ticks/s", TICK_HZ, "real time")
    line(
        f"population of {population}, batched",
        median_rate(batched, repeats),
        "car-ticks/s",
        single,
        "one at a time",
    )


if __name__ == "__main__":
    main()
