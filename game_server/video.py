"""Lap videos: a lap replayed on the deterministic simulation and drawn by the game's renderer as an animation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from game_server.core import physics
from game_server.core.state import TICK_HZ, SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track
from game_server.render.renderer import FrameSpec, shared_renderer
from game_server.render.scene import TV_RIG, ChaseRig
from plumbing.errors import InvalidArgument

log = logging.getLogger(__name__)

# A lap of the slowest track takes ~1,500 ticks; anything far longer is a mistake, not a lap to show.
MAX_VIDEO_TICKS = 20_000
FORMATS = (".webp", ".gif")
_END_HOLD_MS = 1500  # the last frame (the finish) stays on screen a little before the video loops


@dataclass(frozen=True)
class VideoSpec:
    """How a lap video looks: frame size, every how many ticks a frame is kept, the camera, the overlay."""

    width: int = 320
    height: int = 240
    every_ticks: int = 2  # 12.5 frames/s at the simulation's 25 Hz: the lap plays in real time
    rig: ChaseRig = TV_RIG
    overlay: bool = True  # track, lap time and speed in the top-left corner
    quality: int = 55  # lossy WebP quality (0-100); ignored for GIF

    def __post_init__(self) -> None:
        FrameSpec(self.width, self.height)  # the renderer's size limits
        if not 1 <= self.every_ticks <= TICK_HZ:
            raise InvalidArgument(f"every_ticks must be in [1, {TICK_HZ}], got {self.every_ticks}")
        if not 0 <= self.quality <= 100:
            raise InvalidArgument(f"quality must be in [0, 100], got {self.quality}")

    @property
    def frame_ms(self) -> int:
        return round(1000 * self.every_ticks / TICK_HZ)


def replay(track: Track, keys: bytes | Sequence[int], start: SimState | None = None) -> list[SimState]:
    """The states of a lap: `start` (the base state unless given), then one per key, ending at the finish."""
    masks = bytes(keys)
    if len(masks) > MAX_VIDEO_TICKS:
        raise InvalidArgument(f"a lap video holds at most {MAX_VIDEO_TICKS} ticks, got {len(masks)}")
    physics.validate_masks(masks)
    state = track.base_state if start is None else start
    if start is not None:
        physics.validate_state(track, start)
    states = [state]
    for mask in masks:
        if state.lap.finished:
            break
        state, _ = physics.step(track, state, mask)
        states.append(state)
    return states


def _states(
    track: Track, keys_or_states: bytes | Sequence[int] | Sequence[SimState], start: SimState | None
) -> list[SimState]:
    if isinstance(keys_or_states, bytes | bytearray):
        return replay(track, bytes(keys_or_states), start)
    items = list(keys_or_states)
    if items and all(isinstance(item, SimState) for item in items):
        return cast(list[SimState], items)
    if all(isinstance(item, int) and 0 <= item < 256 for item in items):
        return replay(track, bytes(cast(list[int], items)), start)
    raise InvalidArgument("keys_or_states holds key masks (ints in [0, 255]) or SimState objects, not a mixture")


def video_frames(track: Track, states: Sequence[SimState], spec: VideoSpec) -> list[np.ndarray]:
    """The kept frames, RGB (height, width, 3): every `every_ticks`-th state and always the last one."""
    if not states:
        raise InvalidArgument("a lap video needs at least one state")
    if len(states) > MAX_VIDEO_TICKS + 1:
        raise InvalidArgument(f"a lap video holds at most {MAX_VIDEO_TICKS} ticks, got {len(states) - 1}")
    picked = list(range(0, len(states), spec.every_ticks))
    if picked[-1] != len(states) - 1:
        picked.append(len(states) - 1)
    renderer = shared_renderer()
    frame = FrameSpec(spec.width, spec.height)
    frames = []
    for i in picked:
        image = renderer.render(track, states[i], frame, spec.rig)
        frames.append(_overlay(image, track, states[i]) if spec.overlay else image)
    return frames


def _overlay(image: np.ndarray, track: Track, state: SimState) -> np.ndarray:
    """Track name, lap clock and speed, as a TV graphic: white text on a dark band."""
    from PIL import Image, ImageDraw

    ticks = state.lap.finish_tick if state.lap.finished else state.tick
    text = f"{track.name}  {ticks / TICK_HZ:6.2f} s  {abs(state.car.speed) * 3.6:3.0f} km/h"
    if state.lap.finished:
        text += "  FINISH"
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = draw.textbbox((6, 4), text)
    draw.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=(20, 20, 24))
    draw.text((6, 4), text, fill=(255, 255, 255))
    return np.asarray(picture)


def write_animation(frames: Sequence[np.ndarray], out_path: Path, spec: VideoSpec) -> Path:
    """Writes frames as an animated WebP or GIF (by `out_path`'s suffix), looping, the last frame held."""
    from PIL import Image

    suffix = out_path.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidArgument(f"a lap video is one of {', '.join(FORMATS)}, got {out_path.name!r}")
    pictures = [Image.fromarray(f) for f in frames]
    durations = [spec.frame_ms] * len(pictures)
    durations[-1] = max(spec.frame_ms, _END_HOLD_MS)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".webp":
        # method 2 encodes a lap ~3x faster than the slower methods for ~5% more bytes.
        options: dict[str, Any] = {"quality": spec.quality, "method": 2}
    else:
        # One adaptive palette per frame (dithering off: it makes every frame differ, and the file large).
        pictures = [p.quantize(colors=128, dither=Image.Dither.NONE) for p in pictures]
        options = {"optimize": True, "disposal": 1}
    pictures[0].save(out_path, save_all=True, append_images=pictures[1:], duration=durations, loop=0, **options)
    return out_path


def lap_video(
    track_name: str,
    keys_or_states: bytes | Sequence[int] | Sequence[SimState],
    out_path: Path | str,
    *,
    start: SimState | None = None,
    spec: VideoSpec | None = None,
) -> Path:
    """Renders a lap as a short looping video (animated WebP or GIF, by the suffix) with a chase camera.

    `keys_or_states` is either the lap's per-tick key masks, replayed from `start` (the track's base state
    unless given) on the deterministic simulation, or the lap's states themselves. The same input gives the
    same frames. Returns `out_path`.
    """
    spec = spec or VideoSpec()
    track = load_track(track_name)
    states = _states(track, keys_or_states, start)
    path = write_animation(video_frames(track, states, spec), Path(out_path), spec)
    log.info("lap video %s: %d ticks, %d KB", path, len(states) - 1, path.stat().st_size // 1024)
    return path
