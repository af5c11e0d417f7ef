"""`rrp run`: the main job, on embedded defaults."""

from __future__ import annotations

from typing import Any

from rrp.command import Commands


def _main_job() -> tuple[type[Any], Any]:
    from pipeline.main_job import MainJobConfig, run_main_job

    return MainJobConfig, run_main_job


def register(commands: Commands) -> None:
    commands.add(
        "run",
        _main_job,
        help="the main job: local services, evolve, collect, train, race, report",
        description="Starts a private Redis, a collector and game servers; evolves a driver, collects frames, "
        "validates them, trains the vision model, races it on seen and unseen tracks and writes report.md.",
    )
