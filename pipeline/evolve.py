"""`rrp evolve`: run the GA on a pool of game servers (or in process), checkpoint, plot, save the best driver."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from game_server.core import drivers, episode
from game_server.core.driver_file import SavedDriver, save_driver
from game_server.core.state import TICK_HZ
from game_server.core.tracks import load_track
from game_server.trackmap import plot_laps
from pipeline.pools import PoolSpec, open_pool
from plumbing import telemetry
from plumbing.settings import nested, setting
from scheduler.tasks import map_in_process
from trainer.evolve import (
    KIND_PROGRAM,
    Evolution,
    EvolveConfig,
    EvolveState,
    describe,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
BEST_DRIVER = "best_driver.json"


@dataclass(frozen=True)
class EvolveJobConfig:
    """`rrp evolve`: the evolution, where its individuals are evaluated, and where its files go."""

    evolve: EvolveConfig = nested(EvolveConfig)
    pool: PoolSpec = nested(PoolSpec)
    in_process: bool = setting(False, "evaluate in this process (drivers as one population), no servers")
    out_dir: Path = setting(Path("out/evolve"), "folder for checkpoint, plots, driver", flag="out", env="out")
    resume: bool = setting(False, "continue from the checkpoint in --out")


@dataclass(frozen=True)
class EvolveOutcome:
    best: SavedDriver
    baseline_lap_ticks: int
    state: EvolveState
    driver_path: Path


@contextlib.contextmanager
def evaluation_map(spec: PoolSpec, in_process: bool) -> Iterator[tuple[Any, str]]:
    """Yields a `map` for DEAP and a description: in process (a generation's drivers on a track run as
    one population), or the pool's."""
    if in_process:
        yield map_in_process, "in process (batched map)"
        return
    with open_pool(spec) as (pool, where):
        yield pool.map, f"pool of {where}"


def run_evolve_job(job: EvolveJobConfig) -> EvolveOutcome:
    config, out_dir, resume = job.evolve, job.out_dir, job.resume
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT
    telemetry.tracer_provider("rrp-evolve")  # names this process in traces before the pool's channels do
    with evaluation_map(job.pool, job.in_process) as (map_fn, where):
        if resume and checkpoint.exists():
            state = load_checkpoint(checkpoint)
            if _identity(state.config) != _identity(config):
                raise SystemExit(
                    f"{checkpoint} was made with different settings; use another --out or the same settings"
                )
            state.config = config  # may extend the number of generations
            evolution = Evolution(config, map_fn)
            log.info("resumed at generation %d from %s", state.generation, checkpoint)
        else:
            evolution = Evolution(config, map_fn)
            log.info(
                "%s individuals on %s: population %d, %d generations, seed %d, evaluated %s",
                config.kind, ", ".join(config.tracks), config.population, config.generations, config.seed, where,
            )  # fmt: skip
            ref = evolution.reference.lap_ticks[config.track]
            log.info("baseline (reference driver) lap on %s: %d ticks (%.2f s)", config.track, ref, ref / TICK_HZ)
            state = evolution.start()
            log.info(describe(state.history[-1], config.generations, config.kind))
            save_checkpoint(checkpoint, state)
        for state in evolution.run(state):  # noqa: B020 - each generation replaces the last
            log.info(describe(state.history[-1], config.generations, config.kind))
            save_checkpoint(checkpoint, state)
    return _finish(evolution, state, out_dir)


def _identity(c: EvolveConfig) -> tuple[Any, ...]:
    return (c.track, c.kind, c.population, c.seed, c.extra_tracks, c.crossover_prob, c.mutation_prob, c.elite)


def _finish(evolution: Evolution, state: EvolveState, out_dir: Path) -> EvolveOutcome:
    config = state.config
    track = load_track(config.track)
    baseline = evolution.reference.lap_ticks[config.track]
    best = state.best
    lap_ticks = evolution.best_lap_ticks(best)
    saved = SavedDriver(
        kind=KIND_PROGRAM if config.kind == KIND_PROGRAM else drivers.RAYS_V1,
        track=config.track,
        lap_ticks=lap_ticks,
        cost=best.fitness.values[0],
        generation=state.generation,
        masks=bytes(best) if config.kind == KIND_PROGRAM else b"",
        params=tuple(best) if config.kind != KIND_PROGRAM else (),
        baseline_lap_ticks=baseline,
    )
    driver_path = save_driver(out_dir / BEST_DRIVER, saved)
    _plot_fitness(state, baseline, out_dir / "fitness.png")
    laps = []
    if config.kind == KIND_PROGRAM:
        run = episode.run_program(track, track.base_state, saved.masks, record_trajectory=True)
    else:
        run = drivers.run_driver(
            track,
            track.base_state,
            saved.ray_driver(),
            max_ticks=evolution.budgets[config.track],
            record_trajectory=True,
        )
    base_run = episode.run_program(track, track.base_state, evolution.reference.masks, record_trajectory=True)
    for label, r in ((f"GA best ({_secs(lap_ticks)})", run), (f"baseline ({_secs(baseline)})", base_run)):
        assert r.trajectory is not None
        laps.append((label, r.trajectory.x, r.trajectory.y, r.trajectory.speed))
    plot_laps(track, laps, out_dir / "best_lap.png", f"{config.track}: GA best lap vs baseline")
    summary = {
        "track": config.track,
        "kind": config.kind,
        "generations": state.generation,
        "best_lap_ticks": lap_ticks,
        "best_lap_s": lap_ticks / TICK_HZ,
        "baseline_lap_ticks": baseline,
        "baseline_lap_s": baseline / TICK_HZ,
        "beats_baseline": bool(lap_ticks and lap_ticks < baseline),
        "driver_id": saved.driver_id,
        "history": [g.__dict__ for g in state.history],
    }
    (out_dir / "evolve_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    verdict = "faster than" if summary["beats_baseline"] else "NOT faster than"
    log.info(
        "best lap %s vs baseline %s on %s: %s the baseline; driver %s saved to %s",
        _secs(lap_ticks), _secs(baseline), config.track, verdict, saved.driver_id, driver_path,
    )  # fmt: skip
    return EvolveOutcome(saved, baseline, state, driver_path)


def _secs(ticks: int) -> str:
    return f"{ticks} ticks = {ticks / TICK_HZ:.2f} s" if ticks else "no finish"


def _plot_fitness(state: EvolveState, baseline: int, path: Path) -> None:
    gens = [g.generation for g in state.history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(gens, [g.best_cost for g in state.history], marker="o", label="best")
    ax.plot(gens, [g.median_cost for g in state.history], marker=".", label="median")
    if state.config.kind == KIND_PROGRAM:
        ax.axhline(baseline, color="tab:red", ls="--", label=f"baseline lap ({baseline} ticks)")
        ax.set_ylabel("cost (lap ticks; unfinished laps cost more)")
        ax.set_ylim(top=max(np.median([g.median_cost for g in state.history]) * 1.05, baseline * 1.05))
    else:
        ax.axhline(1.0, color="tab:red", ls="--", label="baseline lap")
        ax.set_ylabel("cost (x baseline lap, mean over tracks)")
    ax.set_xlabel("generation")
    ax.set_title(f"{state.config.track}: fitness over generations ({state.config.kind})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
