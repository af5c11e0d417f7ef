"""The leaderboard in a real redis-server: verified laps only, once each, ranked, and kept across a restart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from game_server import convert
from game_server.core import episode
from game_server.core.drivers import default_driver
from game_server.core.pilot import drive_lap
from game_server.core.tracks import load_track
from game_server.laps import write_record
from game_server.leaderboard import Leaderboard, drive_lap_record, lap_record, leaderboard_markdown, submit_lap
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1 import lap_pb2
from rrp.cli import main


def _laps() -> tuple[lap_pb2.LapRecord, lap_pb2.LapRecord]:
    """A fast lap (the reference pilot's) and a slower one (the hand-set driver's) of the oval."""
    t = load_track("oval")
    keys, result = drive_lap(t)
    fast = lap_record("oval", None, keys, result, model_version="v1-abc", data_source="redis run-7")
    run = episode.run_episode(t, t.base_state, episode.SensorPolicy(default_driver().act_on), max_ticks=3000)
    slow = lap_record("oval", None, run.applied, run.result, driver_id="default", driven_at="2026-12-07T09:00:00Z")
    return fast, slow


def test_the_leaderboard_keeps_verified_laps_once_and_survives_a_restart(tmp_path: Path) -> None:
    fast, slow = _laps()
    server = LocalRedis(tmp_path / "redis").start()
    try:
        board = Leaderboard(server.client(), keep_per_track=5)
        first = board.submit(slow)
        assert first.stored and first.new and first.rank == 1
        assert board.submit(fast).rank == 1
        again = board.submit(fast)  # the same record twice is one entry
        assert again.stored and not again.new and again.record_id == board.top("oval")[0].record_id
        forged = lap_pb2.LapRecord()
        forged.CopyFrom(fast)
        forged.claimed_lap_ticks -= 10
        refused = board.submit(forged)
        assert not refused.stored and "claimed lap time" in refused.reason
        oval = load_track("oval")
        later = dataclasses.replace(oval.base_state, tick=1)  # a valid start, but not the base state
        elsewhere = lap_record("oval", later, fast.keys, episode.run_program(oval, later, fast.keys), driver_id="x")
        assert not board.submit(elsewhere).stored  # only laps from the base state rank
        assert submit_lap(None, fast) is None
        assert submit_lap(board, forged) is not None  # refused, logged, never raised
        top = board.top("oval")
        assert [e.lap_ticks for e in top] == [fast.claimed_lap_ticks, slow.claimed_lap_ticks]
        assert top[0].driven_by == "model v1-abc" and top[0].data_source == "redis run-7"
        assert top[1].driven_by == "driver default" and top[1].driven_at == "2026-12-07T09:00:00Z"

        server.kill()  # SIGKILL: only what the append-only file (fsync always) holds comes back
        server.start()
        after = Leaderboard(server.client())
        assert after.top("oval") == top
        assert after.tracks() == ["oval"]
        assert after.record(top[0].record_id) == fast  # stored as the record's bytes, verifiable again
        assert "model v1-abc" in leaderboard_markdown(after)
    finally:
        server.stop()


def test_the_board_keeps_only_the_best_laps_of_a_track(tmp_path: Path) -> None:
    fast, slow = _laps()
    with LocalRedis(tmp_path / "redis") as server:
        board = Leaderboard(server.client(), prefix="t:", keep_per_track=1)
        board.submit(slow)
        board.submit(fast)
        assert [e.lap_ticks for e in board.top("oval", 10)] == [fast.claimed_lap_ticks]
        assert len(server.client().keys("t:lap:*")) == 1  # the dropped lap's entry went with it


def test_rrp_lap_submit_and_rrp_leaderboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fast, _ = _laps()
    write_record(fast, tmp_path / "fast.json")
    with LocalRedis(tmp_path / "redis") as server:
        assert main(["lap", "submit", str(tmp_path / "fast.json"), "--redis", server.url]) == 0
        assert main(["lap", "submit", str(tmp_path / "fast.json"), "--redis", server.url]) == 0
        assert "already on the board" in capsys.readouterr().out
        assert main(["leaderboard", "--redis", server.url, "--track", "oval"]) == 0
        out = capsys.readouterr().out
        assert "model v1-abc" in out and f"| {fast.claimed_lap_ticks} |" in out
    assert main(["leaderboard"]) == 1  # no Redis given: a clear error, not a private empty one


def test_a_lap_recorded_from_what_a_driving_loop_keeps_verifies_and_ranks(tmp_path: Path) -> None:
    """The integrator's path: keys as a list (one more chosen at the finish), the loop's time and contacts."""
    t = load_track("kidney")
    run = episode.run_episode(t, t.base_state, episode.SensorPolicy(default_driver().act_on), max_ticks=3000)
    keys = [*run.applied, 1]
    r = run.result
    replayed = drive_lap_record("kidney", keys, r.lap_ticks, r.wall_contacts, model_version="v2")
    observed = drive_lap_record(
        "kidney", keys, r.lap_ticks, r.wall_contacts, convert.state_to_pb(r.final_state), model_version="v2"
    )
    assert replayed.keys == run.applied and replayed.claimed_final_state == observed.claimed_final_state
    with LocalRedis(tmp_path / "redis") as server:
        board = Leaderboard(server.client())
        submission = submit_lap(board, observed)
        assert submission is not None and submission.stored and submission.rank == 1
        wrong = drive_lap_record("kidney", keys, r.lap_ticks, r.wall_contacts + 1, model_version="v2")
        refused = submit_lap(board, wrong)
        assert refused is not None and not refused.stored and "wall contacts" in refused.reason
        assert len(board.top("kidney")) == 1
