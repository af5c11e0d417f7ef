"""Scheduler figures: a GA generation in process, through the pool on 1 and 2 servers, and multiprocessing.

Every variant runs once per round, round robin, so that a shared machine's drifting load falls on all of
them alike; each prints its median and best wall time and its CPU seconds (this process's plus those of
the servers or workers it uses), which the load inflates far less than the wall time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
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


def cpu_s(pid: int) -> float:
    """CPU seconds a process's threads have run so far, to the nanosecond (/proc/PID/stat counts 10 ms clock
    ticks: +-3% of a 300 ms generation). The servers' and workers' threads live as long as they do."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return total / 1e9


@dataclass
class Variant:
    """One way of running the generation; its helper processes' CPU counts towards its own."""

    name: str
    run: Callable[[], object]
    pids: Callable[[], Sequence[int]] = tuple
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    def time_once(self) -> None:
        pids = list(self.pids())
        c0, p0, t0 = time.process_time(), [cpu_s(p) for p in pids], time.perf_counter()
        self.run()
        self.walls.append(time.perf_counter() - t0)
        self.cpus.append(time.process_time() - c0 + sum(cpu_s(p) - c for p, c in zip(pids, p0, strict=True)))

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)


def pool_over(stack: ExitStack, servers: Sequence[ServiceProcess]) -> EvaluationPool:
    pool = stack.enter_context(EvaluationPool(PoolConfig(servers=tuple(s.address for s in servers))))
    pool.wait_ready(len(servers))
    return pool


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller generation")
    parser.add_argument("--population", type=int, default=None, help="evaluations per generation (64)")
    parser.add_argument("--ticks", type=int, default=1000, help="ticks per control program")
    parser.add_argument("--track", default="oval")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per variant (9)")
    args = parser.parse_args()
    population = args.population or (32 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 9)
    programs = generation(args.track, population, args.ticks)
    task = LapTask(args.track, max_ticks=args.ticks)
    expected = list(map(task, programs))

    with ExitStack() as stack:
        single = start_service(["game-server", "--port", "0", "--evaluate-slots", "1"])
        stack.callback(single.stop)
        servers = [start_service(["game-server", "--port", "0", "--evaluate-slots", "2"]) for _ in range(2)]
        for s in servers:
            stack.callback(s.stop)
        client = stack.enter_context(GameClient(single.address))  # the transport's floor: blocking calls, no pool
        requests = [task.request(p) for p in programs]
        pool_single, pool_one, pool_two = (
            pool_over(stack, [single]),
            pool_over(stack, servers[:1]),
            pool_over(stack, servers),
        )
        mp = stack.enter_context(multiprocessing.Pool(2, initializer=_init_worker, initargs=(args.track, args.ticks)))
        mp_pids = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
        results: dict[str, list[sim_pb2.LapResult]] = {}
        variants = [
            Variant("in process (builtin map, baseline)", lambda: results.update(local=list(map(task, programs)))),
            Variant(
                "raw gRPC loop, 1 server x 1 slot",
                lambda: results.update(raw=[client.stub.Evaluate(r, timeout=60).result for r in requests]),
                lambda: [single.pid],
            ),
            Variant(
                "pool, 1 server x 1 slot",
                lambda: results.update(single=list(pool_single.map(task, programs))),
                lambda: [single.pid],
            ),
            Variant(
                "pool, 1 server x 2 slots",
                lambda: results.update(one=list(pool_one.map(task, programs))),
                lambda: [servers[0].pid],
            ),
            Variant(
                "pool, 2 servers x 2 slots",
                lambda: results.update(two=list(pool_two.map(task, programs))),
                lambda: [s.pid for s in servers],
            ),
            Variant(
                "multiprocessing.Pool(2).map",
                lambda: results.update(
                    mp=[sim_pb2.LapResult.FromString(b) for b in mp.map(_evaluate_in_worker, programs)]
                ),
                lambda: mp_pids,
            ),
        ]
        for variant in variants:  # warms channels, the servers' track caches and the workers
            variant.run()
        # Round robin: on a shared machine the load drifts, and each variant sees the same drift.
        for _ in range(repeats):
            for variant in variants:
                variant.time_once()
    same = all(r == expected for r in results.values())
    mean_ticks = statistics.mean(r.ticks for r in expected)
    finished = sum(r.finished for r in expected)
    local, raw, single_v, one, two, mp_v = variants

    def row(v: Variant, note: str) -> None:
        print(
            f"  {v.name:<36}{v.wall * 1e3:8.1f} ms {min(v.walls) * 1e3:8.1f} ms {v.cpu * 1e3:8.1f} ms"
            f" {population / v.wall:8.1f}/s  {note}"
        )

    def overhead(v: Variant) -> str:
        # Each round's variant against the same round's baseline: the load drifts less within a round.
        walls = [100 * (w / b - 1) for w, b in zip(v.walls, local.walls, strict=True)]
        cpus = [100 * (c / b - 1) for c, b in zip(v.cpus, local.cpus, strict=True)]
        return (
            f"overhead {statistics.median(walls):+.1f}% wall [{min(walls):+.0f}..{max(walls):+.0f}],"
            f" {statistics.median(cpus):+.1f}% CPU [{min(cpus):+.1f}..{max(cpus):+.1f}]"
        )

    print(f"One generation: {population} evaluations of programs of up to {args.ticks} ticks on {args.track}")
    print(f"  ({finished} finish the lap; {mean_ticks:.0f} ticks simulated on average; {repeats} rounds, round robin)")
    print(f"  {'variant':<36}{'median':>11}{'min':>12}{'CPU':>12}{'evals':>11}")
    row(local, f"{population * mean_ticks / local.wall:,.0f} ticks/s")
    row(raw, overhead(raw) + " (no pool)")
    row(single_v, overhead(single_v) + " (target <= 5%)")
    row(one, overhead(one) + " (target <= 5%)")
    row(two, f"speed-up vs 1 server {one.wall / two.wall:.2f}x (target >= 1.8x)")
    row(mp_v, f"speed-up vs in process {local.wall / mp_v.wall:.2f}x")
    print(f"  pool, 2 servers vs multiprocessing.Pool(2): {mp_v.wall / two.wall:.2f}x (target >= 1.0x)")
    print(
        "  (CPU: this process's and its servers' or workers' CPU seconds; overheads: the median [range] of each"
        " round's ratio to the same round's baseline; the wall times drift with the load)"
    )
    print(f"  results identical in every variant: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
