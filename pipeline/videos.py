"""The report's lap videos: the model's suite laps on alpine and on technical tracks, replayed and filmed."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from game_server.core.state import TICK_HZ
from game_server.core.technical import TECH_PREFIX
from game_server.video import VideoSpec, lap_video
from pipeline.suite import SuiteReport

log = logging.getLogger(__name__)

SHOWCASE_TRACK = "alpine"  # the one technical built-in circuit
SHOWCASE_TECH_TRACKS = 2


@dataclass(frozen=True)
class LapVideo:
    """A filmed lap: its track, the file, and the lap's ticks (0 when the car did not finish)."""

    track: str
    path: Path
    lap_ticks: int


def showcase_tracks(tracks: Sequence[str]) -> list[str]:
    """Alpine (when the suite drove it) and the first two technical tracks the suite drove, in suite order."""
    tech = [t for t in tracks if t.startswith(TECH_PREFIX)][:SHOWCASE_TECH_TRACKS]
    return ([SHOWCASE_TRACK] if SHOWCASE_TRACK in tracks else []) + tech


def suite_lap_videos(
    suite: SuiteReport,
    out_dir: Path,
    tracks: Sequence[str] | None = None,
    spec: VideoSpec | None = None,
) -> list[LapVideo]:
    """Films the model's plain-frame suite laps (`showcase_tracks` unless `tracks` is given) into `out_dir`,
    one `<track>.webp` each, by replaying the keys the suite recorded from the track's base state."""
    videos = []
    for track in showcase_tracks(suite.tracks) if tracks is None else tracks:
        keys = suite.lap_keys.get(track)
        if keys is None:
            log.warning("no suite lap recorded on %s: no video", track)
            continue
        row = suite.row(track, "plain") or {}
        lap_ticks = int(row.get("lap_ticks") or 0) if row.get("finished") else 0
        path = lap_video(track, keys, out_dir / f"{track}.webp", spec=spec)
        videos.append(LapVideo(track, path, lap_ticks))
    return videos


def videos_markdown(videos: Sequence[LapVideo], report_dir: Path) -> str:
    """The videos as Markdown images (animated WebP plays inline in browsers), paths relative to the report."""
    lines = []
    for v in videos:
        lap = f"{v.lap_ticks / TICK_HZ:.2f} s ({v.lap_ticks} ticks)" if v.lap_ticks else "did not finish"
        rel = Path(os.path.relpath(v.path, report_dir)).as_posix()
        lines.append(f"**{v.track}**: {lap}\n\n![{v.track} lap]({rel})\n")
    return "\n".join(lines)
