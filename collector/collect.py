"""`rrp collect`: replay and perturb drivers on a pool of game servers, streaming camera frames into Redis."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from collector.tasks import Episode, RecordSettings, RecordTask
from game_server.core.tracks import load_track, random_state
from plumbing.procs import ServiceProcess, start_service
from rallyrobopilot.v1 import game_pb2
from scheduler.executor import EvaluationPool, PoolConfig
from scheduler.tasks import EvaluationError
from trainer.driver_file import SavedDriver, load_driver
from trainer.evolve_job import PoolSpec

log = logging.getLogger(__name__)

SUMMARY = "collect_summary.json"
REDIS_DIR = "redis"


@dataclass(frozen=True)
class CollectConfig:
    """A collection: which episodes, how they are recorded, and where the frames go."""

    episodes: int
    driver_paths: tuple[Path, ...]
    tracks: tuple[str, ...]
    out_dir: Path
    seed: int = 0
    settings: RecordSettings = field(default_factory=lambda: RecordSettings(collector_address=""))
    # Where the collector is: an address, or a Redis URL for a collector started here; neither: a collector
    # and a Redis of its own are started here, the Redis data kept under out_dir/redis.
    collector: str | None = None
    redis_url: str | None = None
    run_prefix: str = ""
    # Share of the later episodes of each (driver, track) that start from a random state, and their length.
    recovery_share: float = 0.0
    recovery_ticks: int = 500

    def __post_init__(self) -> None:
        if self.episodes < 1 or not self.driver_paths or not self.tracks:
            raise ValueError("give at least one episode, one driver file and one track")
        if self.collector and self.redis_url:
            raise ValueError("give a collector address or a Redis URL, not both")


@dataclass(frozen=True)
class EpisodeReport:
    """How one episode went, a row of the summary."""

    run_id: str
    track: str
    driver_id: str
    ok: bool
    frames: int = 0
    finished: bool = False
    lap_ticks: int = 0
    perturbed_ticks: int = 0
    resent_frames: int = 0
    error: str = ""


@dataclass(frozen=True)
class CollectSummary:
    runs: int
    failed: int
    frames: int
    laps_finished: int
    perturbed_ticks: int
    resent_frames: int
    seconds: float
    frames_per_s: float
    collector: str
    servers: str
    redis_data_dir: str | None
    episodes: list[EpisodeReport]


def episode_seeds(seed: int, index: int) -> tuple[int, int]:
    """The perturbation and randomisation seeds of episode `index`: independent streams, one per episode."""
    pert, rand = np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)
    return int(pert) >> 1, int(rand) >> 1  # both below 2**63, as FrameOptions' seed must be


def plan_episodes(
    episodes: int,
    drivers: Sequence[SavedDriver],
    tracks: Sequence[str],
    seed: int,
    prefix: str,
    recovery_share: float = 0.0,
    recovery_ticks: int = 500,
) -> list[Episode]:
    """Round-robin over (driver, track) pairs; an open-loop program only pairs with its own track.

    With `recovery_share` > 0, that share of the closed-loop episodes after each pair's first one start from
    a random state (off the centre line, misaligned, at some speed) for `recovery_ticks` ticks: data of the
    recoveries a learner needs, which laps from the start line never show."""
    pairs = [(d, t) for d in drivers for t in tracks if d.kind != "program" or d.track == t]
    if not pairs:
        raise ValueError("no driver can run on these tracks: programs replay only on the track they were evolved on")
    plan = []
    for i in range(episodes):
        driver, track = pairs[i % len(pairs)]
        pert, rand = episode_seeds(seed, i)
        rng = np.random.default_rng([seed, i, 0x57A27])
        recovery = i >= len(pairs) and driver.kind != "program" and rng.random() < recovery_share
        start = random_state(load_track(track), rng) if recovery else None
        run_id = f"{prefix}-{track}-{i:04d}" + ("-recovery" if recovery else "")
        plan.append(Episode(run_id, track, driver, pert, rand, start, recovery_ticks if recovery else 0))
    return plan


@contextlib.contextmanager
def collector_for(address: str | None, redis_url: str | None, data_dir: Path) -> Iterator[tuple[str, str | None]]:
    """Yields a collector address and the private Redis data folder (None if there is none), starting a
    collector here unless `address` is given: on `redis_url`, or on a private Redis whose data stays in
    `data_dir`. The URL goes through the environment, never the command line, as it may hold a password."""
    if address:
        yield address, None
        return
    service = start_service(
        ["collector", "--port", "0", "--redis-dir", str(data_dir)], env={"RRP_REDIS_URL": redis_url or ""}
    )
    try:
        yield service.address, None if redis_url else str(data_dir)
    finally:
        service.stop()


@contextlib.contextmanager
def _pool(spec: PoolSpec, timeout_s: float) -> Iterator[tuple[EvaluationPool, str]]:
    procs: list[ServiceProcess] = []
    try:
        if spec.servers or spec.discover:
            servers, where = spec.servers, ",".join(spec.servers) or f"dns:{spec.discover}"
        else:
            procs = [start_service(["game-server", "--port", "0"]) for _ in range(spec.local_servers)]
            servers = tuple(p.address for p in procs)
            where = f"{len(procs)} local game servers ({', '.join(servers)})"
        config = PoolConfig(servers=servers, discover=spec.discover, evaluate_timeout_s=timeout_s)
        with EvaluationPool(config) as pool:
            pool.wait_ready(1, timeout_s=60)
            yield pool, where
    finally:
        for p in procs:
            p.stop()


def run_collect(config: CollectConfig, pool_spec: PoolSpec) -> CollectSummary:
    """Records every planned episode on the pool, many servers streaming at once; writes collect_summary.json."""
    for track in config.tracks:
        load_track(track)  # an unknown track fails here, before any process starts
    drivers = [load_driver(p) for p in config.driver_paths]
    prefix = config.run_prefix or f"collect-s{config.seed}"
    plan = plan_episodes(
        config.episodes, drivers, config.tracks, config.seed, prefix, config.recovery_share, config.recovery_ticks
    )
    config.out_dir.mkdir(parents=True, exist_ok=True)
    with collector_for(config.collector, config.redis_url, config.out_dir / REDIS_DIR) as (address, redis_dir):
        task = RecordTask(_with_address(config.settings, address))
        with _pool(pool_spec, task.timeout_s) as (pool, where):
            print(f"[collect] {len(plan)} episodes on {where}, frames to the collector at {address}", flush=True)
            t0 = time.perf_counter()
            futures = [pool.submit(task, episode) for episode in plan]
            rows = [
                _report(i, len(plan), episode, future)
                for i, (episode, future) in enumerate(zip(plan, futures, strict=True))
            ]
            seconds = time.perf_counter() - t0
    frames = sum(r.frames for r in rows)
    summary = CollectSummary(
        runs=sum(r.ok for r in rows),
        failed=sum(not r.ok for r in rows),
        frames=frames,
        laps_finished=sum(r.finished for r in rows),
        perturbed_ticks=sum(r.perturbed_ticks for r in rows),
        resent_frames=sum(r.resent_frames for r in rows),
        seconds=round(seconds, 3),
        frames_per_s=round(frames / seconds, 1) if seconds > 0 else 0.0,
        collector=address,
        servers=where,
        redis_data_dir=redis_dir,
        episodes=rows,
    )
    (config.out_dir / SUMMARY).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    print(
        f"[collect] {summary.runs} runs ({summary.failed} failed), {summary.frames} frames, "
        f"{summary.laps_finished} laps finished, {summary.seconds:.1f} s, {summary.frames_per_s:.0f} frames/s; "
        f"summary in {config.out_dir / SUMMARY}",
        flush=True,
    )
    return summary


def _with_address(settings: RecordSettings, address: str) -> RecordSettings:
    return RecordSettings(**{**asdict(settings), "collector_address": address})


def _report(i: int, total: int, episode: Episode, future: Future[game_pb2.RecordResponse]) -> EpisodeReport:
    """Waits for one episode and prints its line."""
    ids = (episode.run_id, episode.track, episode.driver.driver_id)
    try:
        r = future.result()
    except EvaluationError as exc:
        print(f"[collect] {i + 1}/{total} {episode.run_id}: FAILED {exc}", flush=True)
        return EpisodeReport(*ids, ok=False, error=str(exc))
    lap = f"lap {r.result.lap_time_s:.2f} s" if r.result.finished else f"{r.result.progress_fraction:.0%} of a lap"
    print(
        f"[collect] {i + 1}/{total} {episode.run_id}: {r.frames} frames, {lap}, {r.perturbed_ticks} perturbed ticks",
        flush=True,
    )
    return EpisodeReport(
        *ids,
        ok=True,
        frames=r.frames,
        finished=r.result.finished,
        lap_ticks=r.result.lap_ticks,
        perturbed_ticks=r.perturbed_ticks,
        resent_frames=r.resent_frames,
    )
