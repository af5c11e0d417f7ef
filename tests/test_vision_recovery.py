"""The vision model the main job trains gets free from a pinned start on every built-in track.

Training it takes minutes, so the model under test is a snapshot of a seeded main-job run (`rrp run`, seed 0;
weights and model card in tests/data/main-job-model/, 1.8 MB; retake it when the model changes shape). Driving
from frames alone through a real game server, placed by Reset against the outer wall at three places on each
track, it must get free and finish the lap (it slides out, steering away as the evolved driver it imitates).
The snapshot decides with its stored decision offset, as every model trained with the defaults does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from game_server.core.pilot import drive_lap
from game_server.core.recovery import recovery_starts
from game_server.core.tracks import BUILTIN_TRACKS, load_track
from pipeline.evaluate import drive_on_server, load_pilot
from plumbing.procs import ServiceProcess, start_service

MODEL = Path(__file__).parent / "data" / "main-job-model"


@pytest.fixture(scope="module")
def game_server() -> Iterator[ServiceProcess]:
    proc = start_service(["game-server", "--port", "0"])
    yield proc
    proc.stop()


def test_the_snapshot_is_a_main_job_model() -> None:
    card = json.loads((MODEL / "model_card.json").read_text())
    assert card["model"] == "rrp-vision DrivingNet" and card["data"]["source"].startswith("redis")
    assert card["settings"]["seed"] == 0
    assert card["settings"]["decision_prior"] == 1.0 and any(card["decision_offset"])  # decides as the default


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN_TRACKS)
def test_the_main_job_model_backs_out_of_every_pinned_start(game_server: ServiceProcess, name: str) -> None:
    pilot = load_pilot(MODEL / "model.safetensors")
    track = load_track(name)
    budget = int(1.5 * drive_lap(track)[1].lap_ticks)
    for label, start in recovery_starts(track):
        if not label.startswith("pinned"):
            continue
        record = drive_on_server(game_server.address, name, pilot, budget, start=start)
        assert record.finished, f"{name} {label}: {record.stop_reason} at {record.progress_fraction:.0%}"


@pytest.mark.slow
def test_the_main_job_model_turns_round_from_wrong_way_starts(game_server: ServiceProcess) -> None:
    """At rest facing the wrong way, at three places on each built-in track: the barriers' colours show which way
    the lap goes, and the model turns round and finishes the lap. Issue 22 asks for 7 of the 8 distinct starts;
    this snapshot finishes all 8, alpine's included, where the narrow road needs a K-turn: it backs out of the
    barrier as the recovering teacher it was recorded with does."""
    pilot = load_pilot(MODEL / "model.safetensors", "onnx")
    finished, failed = 0, []
    for name in BUILTIN_TRACKS:
        track = load_track(name)
        budget = int(1.5 * drive_lap(track)[1].lap_ticks)
        starts = dict(recovery_starts(track))
        for label in sorted(k for k in starts if k.startswith("wrong-way")):
            record = drive_on_server(game_server.address, name, pilot, budget, start=starts[label])
            if record.finished:
                finished += 1
            else:
                failed.append(f"{name} {label}: {record.stop_reason} at {record.progress_fraction:.0%}")
    assert finished >= 7, failed


@pytest.mark.slow
def test_the_onnx_runtime_drives_the_main_job_models_lap_key_for_key(
    game_server: ServiceProcess, tmp_path: Path
) -> None:
    """The suite's default runtime: the model exported to ONNX and run by onnxruntime decides every tick of a
    closed-loop lap as eager PyTorch does, so it drives the very same lap; the export lands where it is asked."""
    from plumbing.errors import InvalidArgument

    budget = int(1.5 * drive_lap(load_track("kidney"))[1].lap_ticks)
    laps = {
        runtime: drive_on_server(
            game_server.address, "kidney", load_pilot(MODEL / "model.safetensors", runtime, onnx), budget
        )
        for runtime, onnx in (("eager", None), ("onnx", tmp_path / "model.onnx"))
    }
    assert laps["eager"].finished and laps["eager"].applied == laps["onnx"].applied
    assert laps["eager"].lap_ticks == laps["onnx"].lap_ticks and (tmp_path / "model.onnx").is_file()
    with pytest.raises(InvalidArgument, match="runtime"):
        load_pilot(MODEL / "model.safetensors", "tensorrt")


def test_every_lap_the_suite_finishes_verifies_and_lands_on_the_leaderboard(
    game_server: ServiceProcess, tmp_path: Path
) -> None:
    from game_server.leaderboard import Leaderboard
    from pipeline.evaluate import EvalConfig
    from pipeline.pools import PoolSpec
    from pipeline.suite import run_suite
    from plumbing.redis_local import LocalRedis

    pilot = load_pilot(MODEL / "model.safetensors")
    config = EvalConfig(pool=PoolSpec(servers=(game_server.address,)), budget_factor=1.5)
    with LocalRedis(tmp_path / "redis") as redis:
        board = Leaderboard(redis.client())
        suite = run_suite(pilot, config, ("oval",), recovery=False, board=board, model_version="snapshot")
        finished = [r for r in suite.rows if r["finished"]]
        assert len(finished) == 2  # plain and randomised frames
        top = board.top("oval", 10)
        # Each finished lap was replayed from its keys and stored with the time the suite measured (two equal
        # laps driven within the same second are one record).
        assert 1 <= len(top) <= 2 and {e.lap_ticks for e in top} == {r["lap_ticks"] for r in finished}
        assert all(e.driven_by == "model snapshot" for e in top)
        again = board.record(top[0].record_id)
        assert again is not None and again.claimed_lap_ticks == top[0].lap_ticks


@pytest.mark.slow
def test_a_real_time_lap_goes_to_the_leaderboard_from_the_controls_the_server_applied(
    game_server: ServiceProcess, tmp_path: Path
) -> None:
    """25 Hz wall clock: what the server applied (fallbacks and late commands included) is what gets verified."""
    from game_server.leaderboard import Leaderboard
    from plumbing.redis_local import LocalRedis
    from serving.autopilot import AutopilotConfig, run_autopilot
    from serving.inprocess import InProcessClient

    with LocalRedis(tmp_path / "redis") as redis:
        config = AutopilotConfig(track="oval", mode="realtime", max_ticks=900, leaderboard=redis.url)
        weights = MODEL / "model.safetensors"
        result = run_autopilot(config, (game_server.address,), lambda: InProcessClient.load(weights))
        (lap,) = result.laps
        assert lap.finished and lap.missed_ticks == 0
        assert len(lap.applied) >= lap.lap_ticks  # every answer's applied controls, the skipped frames' too
        (entry,) = Leaderboard(redis.client()).top("oval", 5)
        assert entry.lap_ticks == lap.lap_ticks and entry.wall_contacts == lap.wall_contacts
        assert entry.driven_by == "model in-process:default"
