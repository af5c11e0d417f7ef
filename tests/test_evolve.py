"""The genetic algorithm: beats the baseline, same results in process and through the pool, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from game_server.core.driver_file import SavedDriver, load_driver, save_driver
from pipeline.evolve import EvolveJobConfig, run_evolve_job
from plumbing.procs import ServiceProcess
from scheduler.executor import EvaluationPool, PoolConfig
from trainer.evolve import Evolution, EvolveConfig, load_checkpoint, save_checkpoint

SMALL = EvolveConfig(track="kidney", population=12, generations=3, seed=7)


def _history(evolution: Evolution, generations: int) -> list[tuple[float, float]]:
    state = evolution.start()
    for generation in evolution.run(state, until=generations):
        state = generation
    return [(g.best_cost, g.median_cost) for g in state.history] + [(float(len(state.population)), 0.0)]


def test_program_ga_beats_the_baseline(tmp_path: Path) -> None:
    config = EvolveConfig(track="kidney", population=24, generations=8, seed=0)
    outcome = run_evolve_job(EvolveJobConfig(evolve=config, in_process=True, out_dir=tmp_path))
    assert 0 < outcome.best.lap_ticks < outcome.baseline_lap_ticks
    summary = json.loads((tmp_path / "evolve_summary.json").read_text())
    assert summary["beats_baseline"] is True
    for name in ("fitness.png", "best_lap.png", "best_driver.json", "checkpoint.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert load_driver(tmp_path / "best_driver.json").masks == outcome.best.masks


def test_pool_gives_the_in_process_results(game_server_processes: list[ServiceProcess]) -> None:
    for config in (SMALL, EvolveConfig(kind="driver", population=8, generations=2, seed=3, extra_tracks=("oval",))):
        local = _history(Evolution(config, map), config.generations)
        addresses = tuple(p.address for p in game_server_processes)
        with EvaluationPool(PoolConfig(servers=addresses)) as pool:
            pool.wait_ready(2)
            remote = _history(Evolution(config, pool.map), config.generations)
        assert remote == local


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    config = EvolveConfig(track="alpine", population=10, generations=4, seed=11)
    straight = _history(Evolution(config, map), 4)
    evolution = Evolution(config, map)
    state = evolution.start()
    for generation in evolution.run(state, until=2):
        state = generation
    save_checkpoint(tmp_path / "c.json", state)
    import random

    random.seed(12345)  # whatever happens between the stop and the resume must not matter
    resumed = load_checkpoint(tmp_path / "c.json")
    for generation in Evolution(config, map).run(resumed, until=4):
        resumed = generation
    again = [(g.best_cost, g.median_cost) for g in resumed.history] + [(float(len(resumed.population)), 0.0)]
    assert again == straight


def test_driver_file_round_trip_and_tamper(tmp_path: Path) -> None:
    saved = SavedDriver(kind="program", track="oval", lap_ticks=500, cost=500.0, generation=3, masks=b"\x01\x05")
    path = save_driver(tmp_path / "d.json", saved)
    assert load_driver(path) == saved
    doc = json.loads(path.read_text())
    doc["masks_b64"] = "AQE="
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="driver_id"):
        load_driver(path)
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="version"):
        load_driver(path)


def test_evolve_cli_resume(tmp_path: Path) -> None:
    rrp = str(Path(sys.executable).parent / "rrp")
    base = [rrp, "evolve", "--in-process", "--track", "oval", "--population", "8", "--seed", "2"]
    full = subprocess.run([*base, "--generations", "3", "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    part = subprocess.run([*base, "--generations", "1", "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert part.returncode == 0, part.stderr
    rest = subprocess.run(
        [*base, "--generations", "3", "--out", str(tmp_path / "b"), "--resume"], capture_output=True, text=True
    )
    assert rest.returncode == 0, rest.stderr
    assert "resumed at generation 1" in rest.stderr
    a = json.loads((tmp_path / "a" / "evolve_summary.json").read_text())
    b = json.loads((tmp_path / "b" / "evolve_summary.json").read_text())
    for run in (a, b):
        for g in run["history"]:
            g.pop("seconds")
    assert a["history"] == b["history"] and a["driver_id"] == b["driver_id"]
