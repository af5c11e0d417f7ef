"""Lap videos: frame count and size, the car moves, the same lap gives the same file; the suite's showcase."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from game_server.core.pilot import drive_lap
from game_server.core.tracks import load_track
from game_server.video import VideoSpec, lap_video, replay
from pipeline.suite import SuiteReport
from pipeline.videos import showcase_tracks, suite_lap_videos, videos_markdown
from plumbing.errors import InvalidArgument

TICKS = 40
SPEC = VideoSpec(width=160, height=120)


@pytest.fixture(scope="module")
def keys() -> bytes:
    masks, _ = drive_lap(load_track("oval"))
    return masks[:TICKS]


def frames_of(path: Path) -> list[np.ndarray]:
    with Image.open(path) as image:
        out = []
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            out.append(np.asarray(image.convert("RGB")))
        return out


def test_a_short_lap_video_has_its_frames_and_the_car_moves(tmp_path: Path, keys: bytes) -> None:
    path = lap_video("oval", keys, tmp_path / "oval.webp", spec=SPEC)
    frames = frames_of(path)
    assert len(frames) == TICKS // SPEC.every_ticks + 1  # states 0, 2, ..., 40
    assert all(f.shape == (120, 160, 3) for f in frames)
    # The car drives on: the view changes from frame to frame, and far more from first to last.
    changes = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in itertools.pairwise(frames)]
    assert min(changes) > 0.5
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 10
    assert path.stat().st_size < 300_000
    with Image.open(path) as image:
        assert image.info["loop"] == 0  # loops forever


def test_the_same_lap_gives_the_same_video_from_keys_or_states(tmp_path: Path, keys: bytes) -> None:
    a = lap_video("oval", keys, tmp_path / "a.webp", spec=SPEC)
    b = lap_video("oval", list(keys), tmp_path / "b.webp", spec=SPEC)
    c = lap_video("oval", replay(load_track("oval"), keys), tmp_path / "c.webp", spec=SPEC)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()


def test_gif_and_a_kept_last_frame(tmp_path: Path, keys: bytes) -> None:
    spec = VideoSpec(width=96, height=72, every_ticks=3, overlay=False)
    path = lap_video("oval", keys[:10], tmp_path / "short.gif", spec=spec)
    frames = frames_of(path)
    assert len(frames) == 5  # states 0, 3, 6, 9 and the last one, 10
    assert frames[0].shape == (72, 96, 3)
    with Image.open(path) as image:
        assert image.info["duration"] == 120  # 3 ticks of 40 ms: the lap plays in real time


def test_bad_inputs_are_refused(tmp_path: Path, keys: bytes) -> None:
    with pytest.raises(InvalidArgument, match="webp"):
        lap_video("oval", keys, tmp_path / "lap.mp4", spec=SPEC)
    with pytest.raises(InvalidArgument):
        lap_video("oval", bytes([0xFF]), tmp_path / "lap.webp", spec=SPEC)
    with pytest.raises(InvalidArgument, match="mixture"):
        lap_video("oval", [1, load_track("oval").base_state], tmp_path / "lap.webp", spec=SPEC)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        VideoSpec(width=4000)
    with pytest.raises(InvalidArgument):
        VideoSpec(every_ticks=0)


def test_the_suite_films_alpine_and_two_technical_tracks(tmp_path: Path) -> None:
    tracks = ["oval", "alpine", "gen-3001", "tech-3001", "tech-3002", "tech-3003"]
    assert showcase_tracks(tracks) == ["alpine", "tech-3001", "tech-3002"]
    laps = {t: drive_lap(load_track(t))[0][:12] for t in tracks}
    suite = SuiteReport(
        settings={}, tracks=tracks, rows=[{"track": "alpine", "condition": "plain", "finished": True,
                                           "lap_ticks": 800}],
        summary={}, recovery=[], recovery_summary={}, lap_keys=laps,
    )  # fmt: skip
    assert "lap_keys" not in suite.to_json()
    videos = suite_lap_videos(suite, tmp_path / "evaluation" / "videos", spec=VideoSpec(width=96, height=72))
    assert [v.track for v in videos] == ["alpine", "tech-3001", "tech-3002"]
    assert [v.lap_ticks for v in videos] == [800, 0, 0]
    assert all(v.path.is_file() and len(frames_of(v.path)) == 7 for v in videos)
    text = videos_markdown(videos, tmp_path)
    assert "![alpine lap](evaluation/videos/alpine.webp)" in text and "did not finish" in text
