"""`rrp play`: drive a track in an ursina window with the keyboard, on the simulation's fixed 25 Hz ticks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from game_server.core.state import TICK_S, CarState, SimState, mask_of
from game_server.core.track import Track

logger = logging.getLogger(__name__)

StepFn = Callable[[Track, SimState, int], tuple[SimState, bool]]
RecordHook = Callable[[SimState, int, bool], None]

# A frame longer than this (a stall, a dragged window) is not caught up: the game slows down instead.
MAX_FRAME_S = 0.25

_KEYS = {
    "forward": ("w", "up arrow"),
    "back": ("s", "down arrow"),
    "left": ("a", "left arrow"),
    "right": ("d", "right arrow"),
}


def mask_from_keys(held: Mapping[str, float]) -> int:
    """Control mask of the keys held down (WASD or the arrow keys)."""
    pressed = {name: any(held.get(key, 0) for key in keys) for name, keys in _KEYS.items()}
    return mask_of(**pressed)


@dataclass(frozen=True)
class LapTimes:
    """What the HUD shows about laps, in seconds (None until there is one)."""

    last_s: float | None = None
    best_s: float | None = None


def blend_cars(a: CarState, b: CarState, alpha: float) -> CarState:
    """The pose a share `alpha` of the way from `a` to `b`, turning the short way round."""
    turn = math.remainder(b.heading - a.heading, 2 * math.pi)
    return replace(b, x=a.x + (b.x - a.x) * alpha, y=a.y + (b.y - a.y) * alpha, heading=a.heading + turn * alpha)


class PlaySession:
    """The game loop without the window: fixed ticks from accumulated frame time, lap times, reset.

    Physics advances only in whole ticks of `TICK_S`, exactly as on the server, so a lap driven here can be
    recorded and replayed bit for bit; the window only interpolates between the last two states.
    """

    def __init__(self, track: Track, step_fn: StepFn, record_hook: RecordHook | None = None) -> None:
        self.track = track
        self._step = step_fn
        self._record = record_hook
        self.laps = LapTimes()
        self.reset()

    def reset(self) -> None:
        """Back to the track's base state; lap records are kept."""
        self.state = self.track.base_state
        self.previous = self.state
        self._accumulated_s = 0.0

    def advance(self, frame_s: float, mask: int) -> int:
        """Runs as many ticks as the accumulated frame time allows, all with `mask`; returns how many."""
        self._accumulated_s += min(max(frame_s, 0.0), MAX_FRAME_S)
        ticks = 0
        while self._accumulated_s >= TICK_S:
            self._accumulated_s -= TICK_S
            self._tick(mask)
            ticks += 1
        return ticks

    def _tick(self, mask: int) -> None:
        before = self.state
        after, wall_contact = self._step(self.track, before, mask)
        if self._record is not None:
            self._record(before, mask, wall_contact)
        if after.lap.finished and not before.lap.finished:
            lap_s = after.lap.finish_tick * TICK_S
            best = lap_s if self.laps.best_s is None else min(self.laps.best_s, lap_s)
            self.laps = LapTimes(last_s=lap_s, best_s=best)
            logger.info("lap finished in %.2f s", lap_s)
        self.previous, self.state = before, after

    def display_car(self) -> CarState:
        """The car pose between the last two ticks, for smooth motion at any frame rate."""
        return blend_cars(self.previous.car, self.state.car, self._accumulated_s / TICK_S)

    def hud(self) -> str:
        """The lap timer overlay: current, last and best lap, progress along the track, speed."""
        lap = self.state.lap
        current_s = (lap.finish_tick if lap.finished else self.state.tick) * TICK_S
        progress = 100.0 if lap.finished else min(100.0, max(0.0, lap.progress_m / self.track.length_m * 100))

        def fmt(seconds: float | None) -> str:
            return "--" if seconds is None else f"{seconds:6.2f} s"

        lines = [
            f"lap   {current_s:6.2f} s" + ("  finished: R for a new lap" if lap.finished else ""),
            f"last  {fmt(self.laps.last_s)}",
            f"best  {fmt(self.laps.best_s)}",
            f"track {progress:5.1f} %",
            f"speed {self.state.car.speed * 3.6:5.0f} km/h",
        ]
        return "\n".join(lines)


def run_play(track: Track, step_fn: StepFn, *, record_hook: RecordHook | None = None) -> None:
    """Opens a window and lets the user drive `track`: WASD or arrows, R resets, Esc quits.

    `record_hook(state, mask, wall_contact)` is called once per tick with the state the controls were
    applied to. Blocks until the window closes.
    """
    from ursina import Entity, Text, Ursina, Vec2, application, camera, held_keys, scene, time, window

    from game_server.render import scene as track_scene

    app = Ursina(title=f"RallyRoboPilot: {track.name}", borderless=False, development_mode=False)
    look = track_scene.DEFAULT_APPEARANCE
    application.base.setBackgroundColor(*look.sky, 1.0)
    world = scene.attachNewNode("world")
    track_scene.SceneLights(world).apply(look)
    track_root = track_scene.build_track_scene(track)
    track_scene.apply_appearance(track_root, look)
    track_root.reparentTo(world)
    car = track_scene.build_car()
    car.reparentTo(world)
    camera.fov = track_scene.CAMERA_FOV_DEG
    camera.clip_plane_near = track_scene.CAMERA_NEAR_M
    camera.clip_plane_far = track_scene.CAMERA_FAR_M
    hud = Text(text="", position=window.top_left + Vec2(0.02, -0.02), origin=(-0.5, 0.5), scale=1.2)
    session = PlaySession(track, step_fn, record_hook)

    def update() -> None:
        session.advance(time.dt, mask_from_keys(held_keys))
        pose = session.display_car()
        car.setMat(track_scene.car_matrix(pose))
        position, target = track_scene.chase_camera(pose)
        camera.setPos(position)
        camera.lookAt(target)
        hud.text = session.hud()

    def on_key(key: str) -> None:
        if key == "r":
            session.reset()
        elif key == "escape":
            application.quit()

    Entity(update=update, input=on_key)
    app.run()
