"""The track catalogue: valid shapes, distinct difficulties, seeded generation and the reference driver."""

from __future__ import annotations

import math

import numpy as np
import pytest

from game_server.core.episode import run_program
from game_server.core.physics import crosses, gate_params
from game_server.core.pilot import drive_lap
from game_server.core.state import Gate
from game_server.core.technical import generate_technical_track
from game_server.core.track import Track, geometry_ok, min_radius_m, radius_fits, stretches_clear, walls_intersect
from game_server.core.tracks import (
    BUILTIN_TRACKS,
    DAGGER_TRACKS,
    EVOLVE_TRACKS,
    SUITE_TECH_TRACKS,
    SUITE_UNSEEN_TRACKS,
    TECH_TRAINING_TRACKS,
    TRAINING_TRACKS,
    UNSEEN_TRACKS,
    builtin_tracks,
    generate_track,
    load_track,
)
from plumbing.errors import InvalidArgument, NotFound

GENERATED = [f"gen-{i}" for i in range(20)]
TECHNICAL = [*SUITE_TECH_TRACKS, *TECH_TRAINING_TRACKS]
BUILTIN = ["oval", "kidney", "alpine"]


def total_turning(track: Track) -> float:
    return float(np.sum(np.abs(track.curvature) * track.seg_len))


@pytest.mark.parametrize("name", BUILTIN + GENERATED + TECHNICAL)
def test_track_is_closed_smooth_and_without_crossing_walls(name: str) -> None:
    track = load_track(name)
    gaps = track.seg_len
    assert gaps.max() < 4.0 and gaps.min() > 2.0  # evenly resampled, including the closing segment
    assert 500.0 <= track.length_m <= 1500.0
    assert min_radius_m(track) > float(track.half_width.max())
    assert radius_fits(track) and stretches_clear(track)
    assert not walls_intersect(track)
    # The signed turning of a closed, simple loop is one full turn.
    assert abs(abs(float(np.sum(track.curvature * track.seg_len))) - 2 * math.pi) < 0.05
    assert len(track.checkpoints) == 15 and track.finish_line == track.start_line


def test_builtins_are_ordered_by_difficulty() -> None:
    tracks = builtin_tracks()
    assert [t.name for t in tracks] == BUILTIN
    assert [t.difficulty for t in tracks] == [1, 2, 3]
    radii = [min_radius_m(t) for t in tracks]
    widths = [float(t.half_width.min()) for t in tracks]
    turning = [total_turning(t) for t in tracks]
    assert radii == sorted(radii, reverse=True)
    assert widths == sorted(widths, reverse=True)
    assert turning == sorted(turning)


def test_generation_is_deterministic_per_seed() -> None:
    a, b = generate_track(7), generate_track(7)
    assert a is not b
    for field in ("centerline", "half_width", "left_wall", "right_wall"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes()
    assert a.base_state == b.base_state and a.checkpoints == b.checkpoints
    assert generate_track(8).centerline.tobytes() != a.centerline.tobytes()
    assert load_track("gen-7") is load_track("gen-7")


def test_unknown_and_malformed_names() -> None:
    with pytest.raises(NotFound):
        load_track("nurburgring")
    for bad in ("gen-", "gen-x", "gen--1", "gen-1.5", "gen-1 ", "tech-", "tech-x", "tech--1", "tech-1 ", "tech-0x1"):
        with pytest.raises(InvalidArgument):
            load_track(bad)
    with pytest.raises(InvalidArgument):
        generate_track(-1)
    with pytest.raises(InvalidArgument):
        generate_technical_track(-1)


def test_gates_are_crossed_right_to_left_when_driving_forward() -> None:
    track = load_track("oval")
    g = gate_params(track.start_line)
    car = track.base_state.car
    tx, ty = track.tangent[0]
    assert crosses(g, car.x - tx, car.y - ty, car.x + tx, car.y + ty)
    assert not crosses(g, car.x + tx, car.y + ty, car.x - tx, car.y - ty)
    assert not crosses(g, car.x, car.y, car.x + tx, car.y + ty)  # leaving the start line is not a crossing


@pytest.mark.parametrize("name", BUILTIN)
def test_reference_driver_finishes_builtin_tracks(name: str) -> None:
    track = load_track(name)
    masks, result = drive_lap(track)
    assert result.finished and result.checkpoints_passed == len(track.checkpoints)
    assert result.lap_ticks == len(masks) and 400 < result.lap_ticks < 1500
    assert result.progress_fraction == 1.0
    assert result.wall_contacts <= 10


def test_reference_driver_finishes_generated_tracks() -> None:
    results = [drive_lap(load_track(name))[1] for name in GENERATED[:10]]
    assert sum(r.finished for r in results) >= 9


def test_custom_gate_ends_the_run_without_checkpoints() -> None:
    track = load_track("kidney")
    masks, full = drive_lap(track)
    i = track.n_points // 3
    c, n = track.centerline[i], np.array([-track.point_tangent[i, 1], track.point_tangent[i, 0]])
    w = 2.0 * float(track.half_width[i])
    gate = Gate(*(c + n * w), *(c - n * w))
    result = run_program(track, track.base_state, masks, gate=gate)
    assert result.finished and 0 < result.lap_ticks < full.lap_ticks
    assert result.checkpoints_passed < len(track.checkpoints)
    assert result.ticks == result.lap_ticks and result.progress_fraction == 1.0


def test_suite_tracks_are_held_out_from_every_other_set() -> None:
    """The suite measures generalisation only while no training, evolution, DAgger or model choice saw it."""
    suite = set(SUITE_UNSEEN_TRACKS)
    assert len(suite) == len(SUITE_UNSEEN_TRACKS) == 20
    tech = set(SUITE_TECH_TRACKS)
    assert len(tech) == len(SUITE_TECH_TRACKS) == 20 and tech.isdisjoint(TECH_TRAINING_TRACKS)
    for other in (TRAINING_TRACKS, EVOLVE_TRACKS, DAGGER_TRACKS, UNSEEN_TRACKS, BUILTIN_TRACKS, TECH_TRAINING_TRACKS):
        assert suite.isdisjoint(other) and tech.isdisjoint(other)
    for name in (*SUITE_UNSEEN_TRACKS, *SUITE_TECH_TRACKS):
        load_track(name)  # a valid generated track


def test_technical_tracks_are_deterministic_and_apart_from_generated_ones() -> None:
    a, b = generate_technical_track(7), generate_technical_track(7)
    assert a is not b and a.name == "tech-7"
    for field in ("centerline", "half_width", "left_wall", "right_wall"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes()
    assert a.base_state == b.base_state and a.checkpoints == b.checkpoints
    assert generate_technical_track(8).centerline.tobytes() != a.centerline.tobytes()
    # Same seed, other family: another shape under another name.
    assert load_track("gen-7").centerline.tobytes() != load_track("tech-7").centerline.tobytes()
    assert load_track("tech-7") is load_track("tech-7")


def test_technical_tracks_are_technical() -> None:
    """Tighter, narrower and more varied than the smooth family: hairpins, narrow stretches, long straights."""
    tech = [load_track(name) for name in SUITE_TECH_TRACKS]
    smooth = [load_track(name) for name in SUITE_UNSEEN_TRACKS]
    assert all(geometry_ok(t) for t in tech)
    assert np.median([min_radius_m(t) for t in tech]) < 0.7 * np.median([min_radius_m(t) for t in smooth])
    assert sum(min_radius_m(t) < 16.0 for t in tech) >= 15  # hairpins and tight corners
    assert all(float(t.half_width.min()) <= 5.0 < float(t.half_width.max()) for t in tech)  # narrow stretches

    # A straight: the longest run of points with (almost) no curvature is at least 100 m on most tracks.
    def longest_straight_m(t: Track) -> float:
        straight = np.abs(t.curvature) < 1e-4
        best = run = 0
        for flag in np.concatenate([straight, straight]):
            run = run + 1 if flag else 0
            best = max(best, run)
        return min(best, t.n_points) * float(np.mean(t.seg_len))

    assert sum(longest_straight_m(t) >= 100.0 for t in tech) >= 15
    assert np.median([total_turning(t) for t in tech]) > np.median([total_turning(t) for t in smooth])


def test_reference_driver_finishes_technical_tracks() -> None:
    results = [drive_lap(load_track(name))[1] for name in SUITE_TECH_TRACKS[:6]]
    assert all(r.finished for r in results)
