"""Faults cost time, not results: a GA run and a collection run, undisturbed and under each fault.

Three game servers, a collector and a Redis run as separate processes. Each scenario runs the same
work through a fresh pool while one fault strikes shortly after it starts:

- one of the three game servers SIGKILLed (and replaced after the scenario);
- one game server SIGSTOPped for 20 s (then SIGCONT);
- the collector restarted on the same port;
- Redis restarted (its append-only file replayed).

For each it prints whether the results are identical to the undisturbed run (GA: every generation's
statistics; collection: every episode's result and every stored frame) and the extra seconds.
The GA uses neither the collector nor Redis, so those two faults are run for the collection only.

Then stragglers (issue 21): a longer GA, undisturbed and with one of the three servers frozen (SIGSTOP)
for `--freeze-s` seconds from a few seconds in; it prints every generation's time side by side, the
slowest frozen generation against the median undisturbed one (target: at most 2x), the extra seconds
of the whole run, and whether every generation's statistics are identical.

    python benchmarks/bench_faults.py [--quick] [--only table|stragglers] [--freeze-s 70]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.store import FrameStore, RedisConfig
from game_server.core.driver_file import SavedDriver
from game_server.core.drivers import default_driver
from pipeline.record_task import Episode, RecordSettings, RecordTask
from plumbing.procs import ServiceProcess, start_service
from plumbing.redis_local import LocalRedis, free_port
from scheduler.executor import EvaluationPool, PoolConfig
from trainer.evolve import Evolution, EvolveConfig

STOP_S = 20.0
FAULT_AFTER_S = 1.0
FREEZE_AFTER_S = 20.0  # a few generations in: the first one, which scores every individual, is longer
AFTER_RESUME = 3  # generations run after the frozen server resumed
MAX_GENERATIONS = 1000


class Rig:
    """The processes under test; faults act on them."""

    def __init__(self, root: Path) -> None:
        self.redis = LocalRedis(root / "redis").start()
        self.collector_port = free_port()
        self.collector = self._start_collector()
        self.games = [start_service(["game-server", "--port", "0"]) for _ in range(3)]

    def _start_collector(self) -> ServiceProcess:
        return start_service(["collector", "--port", str(self.collector_port), "--redis", self.redis.url])

    @property
    def collector_address(self) -> str:
        return f"127.0.0.1:{self.collector_port}"

    def pool(self) -> EvaluationPool:
        pool = EvaluationPool(PoolConfig(servers=tuple(g.address for g in self.games)))
        pool.wait_ready(3, timeout_s=60)
        return pool

    # -- faults -----------------------------------------------------------------------------
    def kill_game(self) -> None:
        os.kill(self.games[0].pid, signal.SIGKILL)

    def stop_game(self) -> None:
        os.kill(self.games[1].pid, signal.SIGSTOP)
        time.sleep(STOP_S)
        os.kill(self.games[1].pid, signal.SIGCONT)

    def restart_collector(self) -> None:
        self.collector.stop()
        self.collector = self._start_collector()

    def restart_redis(self) -> None:
        self.redis.stop()
        self.redis.start()

    def heal(self) -> None:
        """After a scenario: a killed game server is replaced, so that every scenario starts with three."""
        if self.games[0].proc.poll() is not None:
            self.games[0] = start_service(["game-server", "--port", "0"])

    def close(self) -> None:
        for g in self.games:
            g.stop()
        self.collector.stop()
        self.redis.stop()


def with_fault(fault: Callable[[], None] | None, work: Callable[[], Any]) -> tuple[Any, float]:
    """Runs `work`, with `fault` striking FAULT_AFTER_S into it; returns the result and the seconds taken."""
    thread = None
    if fault is not None:

        def strike() -> None:
            time.sleep(FAULT_AFTER_S)
            fault()

        thread = threading.Thread(target=strike, daemon=True)
    t0 = time.perf_counter()
    if thread is not None:
        thread.start()
    result = work()
    seconds = time.perf_counter() - t0
    if thread is not None:
        thread.join()
    return result, seconds


def ga_work(rig: Rig, quick: bool) -> Callable[[], Any]:
    config = EvolveConfig(
        track="oval", kind="driver", population=8 if quick else 16, generations=2 if quick else 4, seed=3
    )

    def work() -> Any:
        with rig.pool() as pool:
            evolution = Evolution(config, pool.map)
            first = evolution.start()
            last = first
            for last in evolution.run(first):  # noqa: B007 - the last state is the result
                pass
        return [(g.best_cost, g.median_cost, g.worst_cost, g.best_lap_ticks) for g in last.history]

    return work


def collection_work(rig: Rig, quick: bool, tag: str) -> Callable[[], Any]:
    driver = SavedDriver(
        kind="rays-v1", track="oval", lap_ticks=0, cost=0.0, generation=0, params=default_driver().params
    )
    episodes = 6 if quick else 12
    settings = RecordSettings(collector_address=rig.collector_address, max_ticks=300 if quick else 600)
    plan = [Episode(f"faults-{tag}-{i:02d}", "oval", driver, 1000 + i, 2000 + i) for i in range(episodes)]

    def work() -> Any:
        task = RecordTask(settings)
        with rig.pool() as pool:
            results = [f.result() for f in [pool.submit(task, e) for e in plan]]
        store = FrameStore.connect(RedisConfig(url=rig.redis.url))
        frames = []
        for episode in plan:
            digest = hashlib.sha256()
            for record in store.iter_frames(episode.run_id):
                record.run_id = ""
                digest.update(record.SerializeToString())
            frames.append((store.frame_count(episode.run_id), digest.hexdigest()))
        laps = [(r.frames, r.result.SerializeToString()) for r in results]
        return laps, frames

    return work


@dataclass
class GaRun:
    """A GA's statistics per generation, each generation's seconds and end (seconds from the start), and when
    the server was frozen and resumed (None: it was not)."""

    stats: list[Any]
    seconds: list[float]
    ends: list[float]
    frozen_at: float | None = None
    resumed_at: float | None = None


def straggler_ga(rig: Rig, population: int, freeze_s: float, generations: int | None = None) -> GaRun:
    """A GA on the three servers, one of them frozen for `freeze_s` (0: none) from FREEZE_AFTER_S in; it runs
    `generations` generations, or (None) until AFTER_RESUME generations have run since the server resumed."""
    config = EvolveConfig(
        track="oval", kind="driver", population=population, generations=MAX_GENERATIONS, seed=5,
        extra_tracks=("kidney", "alpine"),
    )  # fmt: skip
    ended = threading.Event()
    victim = rig.games[1]
    run = GaRun([], [], [])

    def freeze() -> None:
        if ended.wait(FREEZE_AFTER_S):
            return
        os.kill(victim.pid, signal.SIGSTOP)
        run.frozen_at = time.perf_counter() - t0
        ended.wait(freeze_s)
        os.kill(victim.pid, signal.SIGCONT)
        run.resumed_at = time.perf_counter() - t0

    thread = threading.Thread(target=freeze, daemon=True) if freeze_s > 0 else None
    with rig.pool() as pool:
        evolution = Evolution(config, pool.map)
        t0 = time.perf_counter()
        if thread is not None:
            thread.start()
        try:
            state = evolution.start()
            run.ends.append(time.perf_counter() - t0)
            for generation in evolution.run(state):
                state = generation
                run.ends.append(time.perf_counter() - t0)
                if generations is not None and state.generation >= generations:
                    break
                resumed = run.resumed_at
                if generations is None and resumed is not None and sum(e > resumed for e in run.ends) > AFTER_RESUME:
                    break
        finally:
            ended.set()
            if thread is not None:
                thread.join()
    run.stats = [(g.best_cost, g.median_cost, g.worst_cost, g.best_lap_ticks) for g in state.history]
    run.seconds = [g.seconds for g in state.history]
    return run


def stragglers(rig: Rig, quick: bool, freeze_s: float) -> None:
    population = 16 if quick else 32
    print(f"Stragglers: a driver GA of {population} drivers x 3 tracks on 3 servers, one frozen {freeze_s:g} s")
    frozen = straggler_ga(rig, population, freeze_s)
    calm = straggler_ga(rig, population, 0, generations=len(frozen.seconds) - 1)
    assert frozen.frozen_at is not None and frozen.resumed_at is not None
    struck = next(i for i, end in enumerate(frozen.ends) if end > frozen.frozen_at)
    back = next((i for i, end in enumerate(frozen.ends) if end > frozen.resumed_at), len(frozen.ends) - 1)
    print(f"  frozen at {frozen.frozen_at:.1f} s (generation {struck}), resumed at {frozen.resumed_at:.1f} s")
    print(f"  {'generation':>10} {'undisturbed s':>14} {f'1 frozen {freeze_s:g} s':>16}")
    for i, (a, b) in enumerate(zip(calm.seconds, frozen.seconds, strict=True)):
        note = " <- frozen during it" if i == struck else " <- resumed during it" if i == back else ""
        print(f"  {i:>10} {a:>14.2f} {b:>16.2f}{note}")
    # The load of a shared machine drifts between runs: a normal generation is the struck run's own, just before.
    normal = statistics.median(frozen.seconds[max(1, struck - 3) : struck] or frozen.seconds[:1])
    hit = frozen.seconds[struck]
    print(f"  normal generation (median of the 3 before the freeze, same run): {normal:.2f} s")
    print(f"  the generation the freeze struck: {hit:.2f} s = {hit / normal:.2f}x a normal one (target <= 2x)")
    print(
        f"  whole run: {sum(calm.seconds):.1f} s undisturbed, {sum(frozen.seconds):.1f} s frozen"
        f" ({sum(frozen.seconds) - sum(calm.seconds):+.1f} s; the machine's load drifts between runs)"
    )
    print(f"  fitness identical in every generation: {'yes' if frozen.stats == calm.stats else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller GA and collection")
    parser.add_argument("--only", choices=("table", "stragglers"), help="run one part only")
    parser.add_argument("--freeze-s", type=float, default=70.0, help="how long the stragglers part freezes a server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rrp-faults-") as tmp:
        rig = Rig(Path(tmp))
        try:
            if args.only != "table":
                stragglers(rig, args.quick, args.freeze_s)
            if args.only == "stragglers":
                return
            collection_work(rig, True, "warmup")()  # every server's renderer started before anything is timed
            faults: dict[str, Callable[[], None] | None] = {
                "undisturbed": None,
                "1 of 3 game servers SIGKILLed": rig.kill_game,
                f"1 game server SIGSTOPped {STOP_S:g} s": rig.stop_game,
                "collector restarted": rig.restart_collector,
                "Redis restarted": rig.restart_redis,
            }
            rows = []
            base: dict[str, tuple[Any, float]] = {}
            for name, fault in faults.items():
                for job in ("GA", "collection"):
                    if job == "GA" and name in ("collector restarted", "Redis restarted"):
                        rows.append((job, name, "n/a (not used)", ""))
                        continue
                    tag = name.split()[0].lower() + name.split()[-1].lower().strip(".")
                    work = ga_work(rig, args.quick) if job == "GA" else collection_work(rig, args.quick, tag)
                    try:
                        result, seconds = with_fault(fault, work)
                    except Exception as exc:  # a failed run is the finding, not the end of the benchmark
                        rows.append((job, name, f"no: failed ({type(exc).__name__}: {str(exc)[:80]})", ""))
                        rig.heal()
                        continue
                    rig.heal()
                    if fault is None:
                        base[job] = (result, seconds)
                        rows.append((job, name, "(reference)", f"{seconds:.1f} s"))
                    else:
                        same = "yes" if result == base[job][0] else "NO"
                        rows.append((job, name, same, f"{seconds - base[job][1]:+.1f} s"))
                    print(f"  {job:<10} {name:<34} {rows[-1][2]:<14} {rows[-1][3]}", flush=True)
            print()
            print(f"{'run':<10} | {'fault':<34} | {'results identical':<24} | extra seconds")
            print(f"{'-' * 10} | {'-' * 34} | {'-' * 24} | {'-' * 13}")
            for job, name, same, extra in sorted(rows, key=lambda r: r[0] != "GA"):
                print(f"{job:<10} | {name:<34} | {same:<24} | {extra}")
        finally:
            rig.close()


if __name__ == "__main__":
    main()
