"""`rrp evolve` and `rrp collect`: the genetic algorithm, and recording its drivers into Redis."""

from __future__ import annotations

from typing import Any

from rrp.command import Commands


def _evolve() -> tuple[type[Any], Any]:
    from pipeline.evolve import EvolveJobConfig, run_evolve_job

    def run(config: EvolveJobConfig) -> int:
        return 0 if run_evolve_job(config).best.lap_ticks else 1

    return EvolveJobConfig, run


def _collect() -> tuple[type[Any], Any]:
    from pipeline.collect import SUMMARY, CollectConfig, run_collect

    def run(config: CollectConfig) -> int:
        summary = run_collect(config)
        print(f"{summary.describe()}; summary in {config.out_dir / SUMMARY}", flush=True)
        return 0 if summary.failed == 0 else 1

    return CollectConfig, run


def register(commands: Commands) -> None:
    commands.add(
        "evolve",
        _evolve,
        help="evolve a fast lap (open-loop program) or a closed-loop driver with DEAP",
        description="Runs the GA on a pool of game servers (--servers, --discover, or --local-servers started "
        "here) or --in-process; checkpoints every generation in --out (--resume continues), plots, and saves "
        "best_driver.json.",
    )
    commands.add(
        "collect",
        _collect,
        help="record camera frames of drivers on a pool of game servers into Redis",
        description="Spreads recording episodes (Record calls) over game servers, round-robin over driver files x "
        "tracks, each with its own perturbation and randomisation seed derived from --seed; writes "
        "collect_summary.json to --out. Run ids are PREFIX-TRACK-NNNN, so collecting again stores nothing twice.",
    )
