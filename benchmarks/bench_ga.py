"""One GA generation of ray drivers, scored one car at a time (the builtin map) and as populations (the
in-process map over EvaluateBatch's batched path), side by side in one run, with identical fitness; with
--servers, the same through local game servers."""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
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


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} s [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a population of 32 instead of 96")
    parser.add_argument("--tracks", default="kidney,oval,alpine", help="the GA's tracks, the first is its main one")
    parser.add_argument(
        "--servers", type=int, default=0,
        help="also through N local game servers: one evaluation per call (the scalar path) vs batches of drivers",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, help="rounds, each variant once per round (median, range)")
    parser.add_argument("--skip-in-process", action="store_true", help="only the runs through the servers")
    args = parser.parse_args()
    tracks = tuple(args.tracks.split(","))
    population = 32 if args.quick else 96
    config = EvolveConfig(
        track=tracks[0], kind=KIND_DRIVER, population=population, generations=1, seed=0, extra_tracks=tracks[1:]
    )
    reference = Reference.compute(config.tracks)
    expected = timed_generation(config, reference, map_in_process)[0]
    if not args.skip_in_process:
        in_process(config, reference, args.repeat, expected)
    if args.servers:
        through_servers(config, reference, args.servers, args.repeat, expected)


def in_process(config: EvolveConfig, reference: Reference, repeat: int, expected: tuple[Any, ...]) -> None:
    print(
        f"one GA generation: {config.population} ray drivers x {len(config.tracks)} tracks"
        f" ({', '.join(config.tracks)}), one process, {repeat} round(s)"
    )
    variants = (("one car at a time (builtin map)", map), ("populations (in-process batched map)", map_in_process))
    walls: dict[str, list[float]] = {label: [] for label, _ in variants}
    cpus: dict[str, list[float]] = {label: [] for label, _ in variants}
    ticks = 0
    for _ in range(repeat):
        for label, map_fn in variants:
            fitness, ticks, wall, cpu = timed_generation(config, reference, map_fn)
            if fitness != expected:
                raise SystemExit(f"{label}: fitness differs from the in-process batched path")
            walls[label].append(wall)
            cpus[label].append(cpu)
    for label, _ in variants:
        cpu = statistics.median(cpus[label])
        print(
            f"{label:<38} {spread(walls[label])} wall {cpu:7.2f} s CPU {ticks:>9,} car-ticks"
            f" {ticks / cpu:>9,.0f} car-ticks/s per core"
        )
    (scalar, _), (batched, _) = variants
    cpu_ratios = [a / b for a, b in zip(cpus[scalar], cpus[batched], strict=True)]
    print(f"speed-up: {ratios(cpu_ratios)} CPU time (target >= 5x); fitness identical")


def ratios(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}x [{min(values):.1f}-{max(values):.1f}]"


def through_servers(config: EvolveConfig, reference: Reference, n: int, repeat: int, expected: tuple[Any, ...]) -> None:
    """The same generation through the scheduler's pool: one evaluation per call (every driver simulated alone, as
    before batching) against the default batches (drivers of one track as one population on the server), each
    variant once per round on the same servers, so that a shared machine's load falls on both alike."""
    print(f"through {n} local game servers, {repeat} round(s) (wall time: the servers' CPU is not this process's)")
    variants: tuple[tuple[str, dict[str, int]], ...] = (
        ("one evaluation per call", {"max_batch": 1}),
        ("batches of drivers", {}),
    )
    walls: dict[str, list[float]] = {label: [] for label, _ in variants}
    ticks = 0
    with local_game_servers(n) as procs, contextlib.ExitStack() as stack:
        servers = tuple(p.address for p in procs)
        pools = []
        for _, overrides in variants:
            pool = stack.enter_context(EvaluationPool(PoolConfig(servers=servers, **overrides)))
            pool.wait_ready(n, timeout_s=60.0)
            pools.append(pool)
        for _ in range(repeat):
            for (label, _), pool in zip(variants, pools, strict=True):
                fitness, ticks, wall, _ = timed_generation(config, reference, pool.map)
                if fitness != expected:
                    raise SystemExit(f"{label}: fitness differs from the in-process path")
                walls[label].append(wall)
    for label, _ in variants:
        wall = statistics.median(walls[label])
        print(f"{label:<38} {spread(walls[label])} wall {ticks:>9,} car-ticks {ticks / wall:>9,.0f} car-ticks/s")
    (scalar, _), (batched, _) = variants
    speedups = [a / b for a, b in zip(walls[scalar], walls[batched], strict=True)]
    print(f"speed-up through the servers: {ratios(speedups)} wall time, per round (target >= 5x); fitness identical")


if __name__ == "__main__":
    main()
