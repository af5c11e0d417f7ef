"""Scheduler figures: a GA generation in process, through the pool on 1 and 2 servers, and multiprocessing."""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from game_server.client import GameClient
from game_server.core.pilot import drive_lap
from game_server.core.tracks import load_track
from plumbing.procs import ServiceProcess, start_service
from rallyrobopilot.v1 import sim_pb2
from scheduler.executor import EvaluationPool, PoolConfig
from scheduler.tasks import LapTask, evaluate_locally

_worker_task: LapTask | None = None


def _init_worker(track: str, ticks: int) -> None:
    global _worker_task
    _worker_task = LapTask(track, max_ticks=ticks)


def _evaluate_in_worker(masks: bytes) -> bytes:
    # multiprocessing is the baseline the pool replaces; only bytes cross to and from its workers here.
    assert _worker_task is not None
    return evaluate_locally(_worker_task.request(masks)).result.SerializeToString()


def generation(track: str, population: int, ticks: int, seed: int = 7) -> list[bytes]:
    """A GA-like population: the pilot's lap with a few per cent of its ticks mutated, `ticks` long."""
    lap, _ = drive_lap(load_track(track), max_ticks=ticks)
    base = np.frombuffer(lap.ljust(ticks, b"\x01")[:ticks], dtype=np.uint8)
    rng = np.random.default_rng(seed)
    programs = []
    for _ in range(population):
        masks = base.copy()
        flips = rng.random(ticks) < 0.03
        masks[flips] = rng.choice(np.array([1, 5, 9, 0, 2], dtype=np.uint8), size=int(flips.sum()))
        programs.append(masks.tobytes())
    return programs


def median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def through_pool(
    servers: Sequence[ServiceProcess], task: LapTask, programs: list[bytes], repeats: int
) -> tuple[float, list[sim_pb2.LapResult]]:
    config = PoolConfig(servers=tuple(s.address for s in servers), health_interval_s=0.5)
    with EvaluationPool(config) as pool:
        pool.wait_ready(len(servers))
        results = list(pool.map(task, programs))  # warms channels and the servers' track caches
        return median_s(lambda: list(pool.map(task, programs)), repeats), results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller generation")
    parser.add_argument("--population", type=int, default=None, help="evaluations per generation (64)")
    parser.add_argument("--ticks", type=int, default=1000, help="ticks per control program")
    parser.add_argument("--track", default="oval")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per variant (5)")
    args = parser.parse_args()
    population = args.population or (32 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 5)
    programs = generation(args.track, population, args.ticks)
    task = LapTask(args.track, max_ticks=args.ticks)

    expected = list(map(task, programs))
    local_s = median_s(lambda: list(map(task, programs)), repeats)

    single = start_service(["game-server", "--port", "0", "--evaluate-slots", "1"])
    servers = [start_service(["game-server", "--port", "0", "--evaluate-slots", "2"]) for _ in range(2)]
    try:
        with GameClient(single.address) as client:  # the transport's floor: blocking calls, no pool
            requests = [task.request(p) for p in programs]
            raw_results = [client.stub.Evaluate(r, timeout=60).result for r in requests]
            raw_s = median_s(lambda: [client.stub.Evaluate(r, timeout=60) for r in requests], repeats)
        single_s, single_results = through_pool([single], task, programs, repeats)
        one_s, one_results = through_pool(servers[:1], task, programs, repeats)
        two_s, two_results = through_pool(servers, task, programs, repeats)
    finally:
        for s in [single, *servers]:
            s.stop()

    with multiprocessing.Pool(2, initializer=_init_worker, initargs=(args.track, args.ticks)) as mp:
        mp_results = [sim_pb2.LapResult.FromString(b) for b in mp.map(_evaluate_in_worker, programs)]
        mp_s = median_s(lambda: mp.map(_evaluate_in_worker, programs), repeats)

    same = all(r == expected for r in (raw_results, single_results, one_results, two_results, mp_results))
    mean_ticks = statistics.mean(r.ticks for r in expected)
    finished = sum(r.finished for r in expected)

    def row(name: str, seconds: float, note: str = "") -> None:
        print(f"  {name:<34}{seconds * 1e3:9.1f} ms {population / seconds:9.1f} eval/s  {note}")

    print(f"One generation: {population} evaluations of programs of up to {args.ticks} ticks on {args.track}")
    print(f"  ({finished} finish the lap; {mean_ticks:.0f} ticks simulated on average; median of {repeats} runs)")
    row("in process (builtin map, baseline)", local_s, f"{population * mean_ticks / local_s:,.0f} ticks/s")
    row("raw gRPC loop, 1 server x 1 slot", raw_s, f"overhead {100 * (raw_s / local_s - 1):+.1f}% (no pool)")
    row("pool, 1 server x 1 slot", single_s, f"overhead {100 * (single_s / local_s - 1):+.1f}% (target <= 5%)")
    row("pool, 1 server x 2 slots", one_s, f"overhead {100 * (one_s / local_s - 1):+.1f}% (target <= 5%)")
    row("pool, 2 servers x 2 slots", two_s, f"speed-up vs 1 server {one_s / two_s:.2f}x (target >= 1.8x)")
    row("multiprocessing.Pool(2).map", mp_s, f"speed-up vs in process {local_s / mp_s:.2f}x")
    print(f"  results identical in every variant: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
