"""`rrp collect`: replay and perturb drivers on a pool of game servers, streaming camera frames into Redis."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from game_server.core.driver_file import SavedDriver, load_driver
from game_server.core.recovery import bend_apexes, pinned_state, wrong_way_state
from game_server.core.state import CarState, SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track, random_state
from game_server.core.trig import PI
from pipeline.pools import PoolSpec, collector_for, open_pool
from pipeline.record_task import Episode, RecordSettings, RecordTask
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import game_pb2
from scheduler.tasks import EvaluationError

log = logging.getLogger(__name__)

SUMMARY = "collect_summary.json"
REDIS_DIR = "redis"


# Of recovery episodes: at rest against a wall (see recovery_start). Off by default: measured, the vision
# student learned to get free from the evolved driver's own slide-out (docs/vision.md, race quality).
PINNED_SHARE = 0.0
# Wrong-way episodes: short, since the turn is what they are for (the teacher turns round in ~15-45 ticks).
WRONG_WAY_TICKS = 60


@dataclass(frozen=True)
class CollectConfig:
    """A collection: which episodes, how they are recorded, and where the frames go."""

    driver_paths: tuple[Path, ...] = setting(
        help="driver files (rrp evolve's best_driver.json), PATH[,PATH]", flag="drivers"
    )
    episodes: int = setting(8, "episodes to record")
    tracks: tuple[str, ...] = setting(("oval",), "tracks to record on, a,b,c")
    out_dir: Path = setting(
        Path("out/collect"), "folder for the summary (and the private Redis data)", flag="out", env="out"
    )
    seed: int = setting(0, "seed of every episode's seeds")
    settings: RecordSettings = nested(RecordSettings)
    pool: PoolSpec = nested(PoolSpec)
    # Neither: a collector and a Redis of its own are started here, the Redis data kept under out_dir/redis.
    collector: str | None = setting(None, "collector host:port; none: one is started here")
    redis_url: str | None = setting(
        None, "Redis URL for a collector started here; none: a private Redis in --out", flag="redis", env="redis_url"
    )
    run_prefix: str = setting("", "run id prefix (default collect-s<seed>)")
    recovery_share: float = setting(
        0.0, "share of each driver/track pair's later episodes that start drifting or pinned (recoveries)"
    )
    recovery_ticks: int = setting(500, "length of a recovery episode, ticks")
    pinned_share: float = setting(
        PINNED_SHARE, "share of recovery episodes that start at rest pinned against a wall; the rest drift"
    )
    wrong_way_episodes: int = setting(
        0, "more episodes, each starting facing the wrong way, labelled by the recovering teacher turning round"
    )
    wrong_way_ticks: int = setting(WRONG_WAY_TICKS, "length of a wrong-way episode, ticks")

    def __post_init__(self) -> None:
        if self.episodes < 1 or not self.driver_paths or not self.tracks:
            raise ValueError("give at least one episode, one driver file and one track")
        if self.collector and self.redis_url:
            raise ValueError("give a collector address or a Redis URL, not both")
        for name in ("recovery_share", "pinned_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share: between 0 and 1, got {getattr(self, name)}")
        if self.recovery_ticks < 1 or self.wrong_way_ticks < 1:
            raise ValueError(f"episode lengths must be positive, got {self.recovery_ticks}, {self.wrong_way_ticks}")
        if self.wrong_way_episodes < 0:
            raise ValueError(f"wrong_way_episodes must be 0 or more, got {self.wrong_way_episodes}")


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
    recovery_starts: str = ""  # e.g. "drift 18, pinned 6, wrong-way 4"

    def describe(self) -> str:
        return (
            f"{self.runs} runs ({self.failed} failed), {self.frames} frames, {self.laps_finished} laps finished, "
            f"{self.seconds:.1f} s, {self.frames_per_s:.0f} frames/s"
        )


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
    pinned_share: float = PINNED_SHARE,
    wrong_way_episodes: int = 0,
    wrong_way_ticks: int = WRONG_WAY_TICKS,
) -> list[Episode]:
    """Round-robin over (driver, track) pairs; an open-loop program only pairs with its own track.

    With `recovery_share` > 0, that share of the closed-loop episodes after each pair's first one start from
    a state a learner must recover from, for `recovery_ticks` ticks: data that laps from the start line never
    show (see `recovery_start`).

    Then `wrong_way_episodes` more, round robin over the closed-loop pairs, start facing the wrong way (see
    `turned_start`) for `wrong_way_ticks`, their driver racing inside the recovering teacher: the one driver that
    turns round. The barriers' colours (red left, blue right) show which way the lap goes; before them no frame
    did, and a run that recorded 25% wrong-way starts lost alpine and 4 of 40 held-out laps."""
    pairs = [(d, t) for d in drivers for t in tracks if d.kind != "program" or d.track == t]
    if not pairs:
        raise ValueError("no driver can run on these tracks: programs replay only on the track they were evolved on")
    plan = []
    for i in range(episodes):
        driver, track = pairs[i % len(pairs)]
        pert, rand = episode_seeds(seed, i)
        rng = np.random.default_rng([seed, i, 0x57A27])
        recovery = i >= len(pairs) and driver.kind != "program" and rng.random() < recovery_share
        kind, start = recovery_start(load_track(track), rng, pinned_share) if recovery else ("", None)
        run_id = f"{prefix}-{track}-{i:04d}" + (f"-recovery-{kind}" if recovery else "")
        plan.append(Episode(run_id, track, driver, pert, rand, start, recovery_ticks if recovery else 0))
    closed = [(d, t) for d, t in pairs if d.kind != "program"]
    if wrong_way_episodes and not closed:
        raise ValueError("wrong-way episodes need a closed-loop driver: a program only replays its own lap")
    for k in range(wrong_way_episodes):
        i = episodes + k
        driver, track = closed[k % len(closed)]
        pert, rand = episode_seeds(seed, i)
        start = turned_start(load_track(track), np.random.default_rng([seed, i, 0x3A7]))
        run_id = f"{prefix}-{track}-{i:04d}-recovery-wrong-way"
        plan.append(Episode(run_id, track, driver, pert, rand, start, wrong_way_ticks, recovering=True))
    return plan


def recovery_start(track: Track, rng: np.random.Generator, pinned_share: float) -> tuple[str, SimState]:
    """A recovery episode's kind and start state: drifting (off the centre line, misaligned, at speed), or with
    probability `pinned_share` at rest pinned against the outer wall (half of them at a hairpin's apex, where a
    fast car overshoots). Never facing the wrong way: both walls look alike, so no frame shows which way the
    lap goes, and a teacher turning round on a road that looks like any other is noise to a student (a run
    that recorded 25% wrong-way starts lost alpine and 4 of 40 held-out laps). The evaluation keeps them."""
    if rng.random() >= pinned_share:
        return "drift", random_state(track, rng)
    apexes = bend_apexes(track)
    point = int(rng.choice(apexes)) if apexes and rng.random() < 0.5 else int(rng.integers(track.n_points))
    return "pinned", pinned_state(track, point, float(rng.uniform(0.5, 1.5)))


def turned_start(track: Track, rng: np.random.Generator) -> SimState:
    """On the centre line anywhere on the lap, facing the wrong way give or take 29 degrees: half of them at
    rest (as the evaluation's wrong-way starts), half already driving the wrong way at up to 10 m/s (where a
    student that did not turn at once finds itself)."""
    start = wrong_way_state(track, int(rng.integers(track.n_points)))
    car = start.car
    heading = car.heading + float(rng.uniform(-0.5, 0.5))
    heading = heading - 2 * PI if heading >= PI else heading + 2 * PI if heading < -PI else heading
    speed = float(rng.uniform(0.0, 10.0)) if rng.random() < 0.5 else 0.0
    return SimState(start.tick, CarState(car.x, car.y, heading, speed), start.lap)


def run_collect(config: CollectConfig) -> CollectSummary:
    """Records every planned episode on the pool, many servers streaming at once; writes collect_summary.json."""
    for track in config.tracks:
        load_track(track)  # an unknown track fails here, before any process starts
    drivers = [load_driver(p) for p in config.driver_paths]
    prefix = config.run_prefix or f"collect-s{config.seed}"
    plan = plan_episodes(
        config.episodes,
        drivers,
        config.tracks,
        config.seed,
        prefix,
        config.recovery_share,
        config.recovery_ticks,
        config.pinned_share,
        config.wrong_way_episodes,
        config.wrong_way_ticks,
    )
    config.out_dir.mkdir(parents=True, exist_ok=True)
    with collector_for(config.collector, config.redis_url, config.out_dir / REDIS_DIR) as (address, redis_dir):
        task = RecordTask(_with_address(config.settings, address))
        with open_pool(config.pool, task.timeout_s) as (pool, where):
            log.info("%d episodes on %s, frames to the collector at %s", len(plan), where, address)
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
        recovery_starts=", ".join(
            f"{kind} {n}"
            for kind in ("drift", "pinned", "wrong-way")
            if (n := sum(e.run_id.endswith(f"-recovery-{kind}") for e in plan))
        ),
    )
    (config.out_dir / SUMMARY).write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _with_address(settings: RecordSettings, address: str) -> RecordSettings:
    return RecordSettings(**{**asdict(settings), "collector_address": address})


def _report(i: int, total: int, episode: Episode, future: Future[game_pb2.RecordResponse]) -> EpisodeReport:
    """Waits for one episode and prints its line."""
    ids = (episode.run_id, episode.track, episode.driver.driver_id)
    try:
        r = future.result()
    except EvaluationError as exc:
        log.warning("%d/%d %s: FAILED %s", i + 1, total, episode.run_id, exc)
        return EpisodeReport(*ids, ok=False, error=str(exc))
    lap = f"lap {r.result.lap_time_s:.2f} s" if r.result.finished else f"{r.result.progress_fraction:.0%} of a lap"
    log.info("%d/%d %s: %d frames, %s, %d perturbed ticks", i + 1, total, episode.run_id, r.frames, lap,
             r.perturbed_ticks)  # fmt: skip
    return EpisodeReport(
        *ids,
        ok=True,
        frames=r.frames,
        finished=r.result.finished,
        lap_ticks=r.result.lap_ticks,
        perturbed_ticks=r.perturbed_ticks,
        resent_frames=r.resent_frames,
    )
