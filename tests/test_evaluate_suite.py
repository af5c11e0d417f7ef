"""`rrp evaluate --suite`: the same model on the same tracks gives the same report, with its table and grid."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from game_server.core.driver_file import SavedDriver, save_driver
from game_server.core.drivers import default_driver
from pipeline.evaluate import EvalConfig
from pipeline.pools import PoolSpec
from pipeline.suite import SUITE_CONDITIONS, run_suite
from plumbing.procs import ServiceProcess, start_service
from rrp.cli import main
from trainer.vision.model import THROTTLE_FORWARD, VisionConfig, build_model
from trainer.vision.pilot import VisionPilot

TINY = VisionConfig(width=64, height=48, channels=(8, 8, 16, 16), hidden=16, seed=11)
TRACKS = ("oval", "gen-3001", "tech-3001")


@pytest.fixture(scope="module")
def game_server() -> Iterator[ServiceProcess]:
    proc = start_service(["game-server", "--port", "0"])
    yield proc
    proc.stop()


def moving_model() -> torch.nn.Module:
    """An untrained net that presses forward and steers from the pixels: its line depends on every frame."""
    model = build_model(TINY).eval()
    last = model.head[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.bias[THROTTLE_FORWARD] += 20.0
        last.weight[3:] *= 4.0
    return model


def test_suite_is_deterministic_and_reports_every_track_and_condition(
    game_server: ServiceProcess, tmp_path: Path
) -> None:
    pilot = VisionPilot(moving_model(), TINY.width, TINY.height)
    expert = default_driver()
    driver = save_driver(
        tmp_path / "driver.json",
        SavedDriver(kind=expert.kind, track="oval", lap_ticks=0, cost=0.0, generation=0, params=expert.params),
    )
    # ~60 ticks a drive: what matters is that the keys, frames and lines repeat.
    config = EvalConfig(pool=PoolSpec(servers=(game_server.address,)), budget_factor=0.12, seed=4, driver_path=driver)
    first = run_suite(pilot, config, TRACKS, tmp_path / "a")
    second = run_suite(pilot, config, TRACKS, tmp_path / "b")
    assert first.recovery and first.recovery == second.recovery
    assert first == second
    assert (tmp_path / "a" / "suite.json").read_text() == (tmp_path / "b" / "suite.json").read_text()
    rows = first.rows
    assert [(r["track"], r["condition"]) for r in rows] == [(t, c) for t in TRACKS for c, _ in SUITE_CONDITIONS]
    for r in rows:
        assert r["ticks"] > 0 and r["reference_lap_ticks"] > 0 and "driver_lap_ticks" in r
        assert r["progress_fraction"] > 0 and "wall_contacts" in r
    assert [r["builtin"] for r in rows] == [True, True, False, False, False, False]
    assert [r["family"] for r in rows[::2]] == ["built-in", "smooth", "technical"]
    plain = first.summary["plain"]
    assert plain.builtin_tracks == 1 and plain.unseen_tracks == 1 and plain.technical_tracks == 1
    assert json.loads((tmp_path / "a" / "suite.json").read_text()) == json.loads(json.dumps(first.to_json()))
    assert "| oval | randomised |" in (tmp_path / "a" / "suite.md").read_text()
    assert (tmp_path / "a" / "suite_grid.png").stat().st_size > 10_000
    # oval is built in: three pinned and three wrong-way starts, each beside the recovering teacher's drive.
    starts = [r["start"].split("@")[0] for r in first.recovery]
    assert starts == ["pinned", "wrong-way"] * 3 and {r["track"] for r in first.recovery} == {"oval"}
    summary = first.recovery_summary
    assert summary["pinned"].starts == summary["wrong-way"].starts == 3
    # ~60 ticks is too short a budget to finish from there: test_recovery covers the teacher's finishes.
    assert all(isinstance(r["teacher_finished"], bool) and "driver_finished" in r for r in first.recovery)
    assert "From pinned and wrong-way starts" in (tmp_path / "a" / "suite.md").read_text()
    assert (tmp_path / "a" / "recovery_grid.png").stat().st_size > 5_000


def test_cli_evaluate_offers_the_suite(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--suite " in out and "--suite-tracks" in out
