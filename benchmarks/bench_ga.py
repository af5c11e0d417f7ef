"""One GA generation of ray drivers, scored one car at a time (the builtin map) and as populations (the
in-process map over EvaluateBatch's batched path), side by side in one run, with identical fitness."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.pools import local_game_servers
from scheduler.executor import EvaluationPool, PoolConfig
from scheduler.tasks import map_in_process
from trainer.evolve import KIND_DRIVER, Evolution, EvolveConfig, Reference


def timed_generation(config: EvolveConfig, reference: Reference, map_fn: Callable[..., Any]) -> tuple[Any, ...]:
    """Scores a fresh generation (the seeded initial population) through `map_fn`: (fitness values,
    car-ticks simulated, wall seconds, CPU seconds of this process)."""
    ticks = 0

    def counting_map(fn: Any, *iterables: Iterable[Any]) -> list[Any]:
        nonlocal ticks
        results = list(map_fn(fn, *iterables))
        ticks += sum(r.ticks for r in results)
        return results

    evolution = Evolution(config, counting_map, reference)
    random.seed(config.seed)
    population = evolution.initial_population()
    wall, cpu = time.perf_counter(), time.process_time()
    evolution.evaluate(population)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return tuple(ind.fitness.values for ind in population), ticks, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a population of 32 instead of 96")
    parser.add_argument("--tracks", default="kidney,oval,alpine", help="the GA's tracks, the first is its main one")
    parser.add_argument(
        "--servers", type=int, default=0,
        help="also through N local game servers: one evaluation per call (the scalar path) vs batches of drivers",
    )  # fmt: skip
    args = parser.parse_args()
    tracks = tuple(args.tracks.split(","))
    population = 32 if args.quick else 96
    config = EvolveConfig(
        track=tracks[0], kind=KIND_DRIVER, population=population, generations=1, seed=0, extra_tracks=tracks[1:]
    )
    reference = Reference.compute(config.tracks)
    print(f"one GA generation: {population} ray drivers x {len(tracks)} tracks ({', '.join(tracks)}), one process")
    rows = []
    for label, map_fn in (
        ("one car at a time (builtin map)", map),
        ("populations (in-process batched map)", map_in_process),
    ):
        fitness, ticks, wall, cpu = timed_generation(config, reference, map_fn)
        rows.append((label, fitness, ticks, wall, cpu))
        print(
            f"{label:<38} {wall:7.2f} s wall {cpu:7.2f} s CPU {ticks:>9,} car-ticks "
            f"{ticks / cpu:>9,.0f} car-ticks/s per core"
        )
    (_, f_scalar, _, w_scalar, c_scalar), (_, f_batched, _, w_batched, c_batched) = rows
    print(f"speed-up: {c_scalar / c_batched:.1f}x CPU time, {w_scalar / w_batched:.1f}x wall time (target >= 5x)")
    print(f"fitness identical: {f_scalar == f_batched}")
    if f_scalar != f_batched:
        raise SystemExit("the batched path gave different fitness values")
    if args.servers:
        through_servers(config, reference, args.servers, f_scalar)


def through_servers(config: EvolveConfig, reference: Reference, n: int, expected: tuple[Any, ...]) -> None:
    """The same generation through the scheduler's pool: one evaluation per call (every driver simulated alone, as
    before batching) against the default batches (drivers of one track as one population on the server)."""
    print(f"through {n} local game servers (wall time: the servers' CPU is not this process's)")
    with local_game_servers(n) as procs:
        servers = tuple(p.address for p in procs)
        walls = []
        for label, max_batch in (
            ("one evaluation per call", 1),
            ("batches of drivers", PoolConfig(servers=servers).max_batch),
        ):
            with EvaluationPool(PoolConfig(servers=servers, max_batch=max_batch)) as pool:
                pool.wait_ready(n, timeout_s=60.0)
                fitness, ticks, wall, _ = timed_generation(config, reference, pool.map)
            walls.append(wall)
            print(f"{label:<38} {wall:7.2f} s wall {ticks:>9,} car-ticks {ticks / wall:>9,.0f} car-ticks/s")
            if fitness != expected:
                raise SystemExit(f"{label}: fitness differs from the in-process scalar path")
        print(f"speed-up through the servers: {walls[0] / walls[1]:.1f}x wall time (target >= 5x); fitness identical")


if __name__ == "__main__":
    main()
