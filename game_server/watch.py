"""`rrp watch`: a window on a live session of any game server, drawn with a chase camera in its own process.

The window only reads: a thread follows the server's WatchSession stream (which never slows the session) and
keeps the newest state; ursina draws the car between the last two states it received, so the motion is smooth
at any frame rate. Closing the window, or killing this process, leaves the session as it was.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc

from game_server.client import GameClient, WatchStream
from game_server.convert import state_from_pb
from game_server.core.state import TICK_HZ, CarState, SimState
from game_server.core.tracks import load_track
from game_server.play import blend_cars
from game_server.render.scene import DRIVER_RIG, TV_RIG
from plumbing.channels import ClientTLS
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import game_pb2

log = logging.getLogger(__name__)

VIEWS = {"tv": TV_RIG, "driver": DRIVER_RIG}


@dataclass(frozen=True)
class WatchConfig:
    """`rrp watch`: which server and session, the camera, and the window."""

    game: str = setting("127.0.0.1:50051", "game server address host:port", metavar="ADDR")
    session: str = setting("", "session id to watch; empty: the oldest open session (the first car of a race)")
    view: str = setting(
        "tv", "camera: tv (a high chase view) or driver (the model's own view)", choices=("tv", "driver")
    )
    rate_hz: int = setting(25, "states a second asked of the server, 1..60")
    fps: int = setting(30, "window frames a second at most (the window's own CPU, never the race's)")
    width: int = setting(800, "window width in pixels")
    height: int = setting(600, "window height in pixels")
    wait_s: float = setting(30.0, "seconds to wait for a session to open (or for the server) before giving up")
    exit_at_end: bool = setting(False, "close the window when the session ends (otherwise Esc closes it)")
    tls: ClientTLS = nested(ClientTLS)


class Follower:
    """Follows a WatchSession stream on a thread: the last two states received and when the newest came."""

    def __init__(self, stream: WatchStream, first: game_pb2.WatchSessionResponse) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        state = state_from_pb(first.state)
        self.session_id, self.track = first.session_id, first.track
        self.previous, self.latest, self.received_at = state, state, time.monotonic()
        self.progress_fraction = first.progress_fraction
        self.states, self.skipped = 1, 0
        self.ended = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._follow, name="rrp-watch", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for message in self._stream:
                state = state_from_pb(message.state)
                with self._lock:
                    self.previous, self.latest, self.received_at = self.latest, state, time.monotonic()
                    self.progress_fraction = message.progress_fraction
                    self.states += 1
                    self.skipped += message.skipped_states
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.ended = True

    def display(self, gap_s: float) -> tuple[CarState, SimState]:
        """The car between the last two states (as far as the time since the newest allows), and the newest."""
        with self._lock:
            a, b, since = self.previous, self.latest, time.monotonic() - self.received_at
        alpha = 1.0 if self.ended else min(since / gap_s, 1.0)
        return blend_cars(a.car, b.car, alpha), b

    def stop(self) -> None:
        self._stream.cancel()
        self._thread.join(5)


def open_watch(client: GameClient, config: WatchConfig) -> tuple[WatchStream, game_pb2.WatchSessionResponse]:
    """The stream and its first message, waiting up to `wait_s` for the session (or the server) to be there."""
    deadline = time.monotonic() + config.wait_s
    while True:
        stream = client.watch(config.session, config.rate_hz)
        try:
            return stream, next(stream)
        except grpc.RpcError as exc:
            waiting = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
            if not waiting or (exc.code() == grpc.StatusCode.NOT_FOUND and config.session):
                raise  # a named session that does not exist will not appear
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def hud_text(follower: Follower, state: SimState) -> str:
    lap = state.lap
    ticks = lap.finish_tick if lap.finished else state.tick
    status = "session ended" if follower.ended else ("finished" if lap.finished else "live")
    lines = [
        f"{follower.track}  session {follower.session_id}  ({status})",
        f"lap   {ticks / TICK_HZ:6.2f} s" + ("  FINISH" if lap.finished else ""),
        f"track {follower.progress_fraction * 100:5.1f} %",
        f"speed {abs(state.car.speed) * 3.6:5.0f} km/h",
        f"states {follower.states}, skipped {follower.skipped}",
    ]
    if follower.error:
        lines.append(follower.error)
    return "\n".join(lines)


def run_watch(config: WatchConfig) -> Follower:
    """Opens the window and draws the session until it ends (with `exit_at_end`) or the window closes."""
    if not 1 <= config.rate_hz <= 60:
        raise ValueError(f"--rate-hz must be in [1, 60], got {config.rate_hz}")
    with GameClient(config.game, tls=config.tls) as client:
        stream, first = open_watch(client, config)
        follower = Follower(stream, first)
        print(f"watching session {follower.session_id} on {follower.track} at {config.game}", flush=True)
        try:
            _window(follower, config)
        except SystemExit:  # ursina quits with sys.exit when the window closes
            pass
        finally:
            follower.stop()
    print(f"watched {follower.states} states ({follower.skipped} skipped) of session {follower.session_id}", flush=True)
    return follower


def _window(follower: Follower, config: WatchConfig) -> None:
    from panda3d.core import ClockObject, loadPrcFileData
    from ursina import Entity, Text, Ursina, Vec2, application, camera, scene, window

    from game_server.render import scene as track_scene

    track = load_track(follower.track)
    rig = VIEWS[config.view]
    loadPrcFileData("rrp-watch", "audio-library-name null")  # a silent window: no sound device is opened
    app = Ursina(
        title=f"RallyRoboPilot watch: {follower.track} ({follower.session_id})",
        borderless=False,
        development_mode=False,
        size=(config.width, config.height),
    )
    clock = ClockObject.getGlobalClock()
    clock.setMode(ClockObject.MLimited)  # the window's frame rate is capped: it renders only what it needs
    clock.setFrameRate(config.fps)
    look = track_scene.DEFAULT_APPEARANCE
    application.base.setBackgroundColor(*look.sky, 1.0)
    world = scene.attachNewNode("world")
    track_scene.SceneLights(world).apply(look)
    track_root = track_scene.build_track_scene(track)
    track_scene.apply_appearance(track_root, look)
    track_root.reparentTo(world)
    car = track_scene.build_car()
    car.reparentTo(world)
    camera.fov = rig.fov_deg
    camera.clip_plane_near = track_scene.CAMERA_NEAR_M
    camera.clip_plane_far = track_scene.CAMERA_FAR_M
    hud = Text(text="", position=window.top_left + Vec2(0.02, -0.02), origin=(-0.5, 0.5), scale=1.0)
    gap_s = 1.0 / config.rate_hz

    def update() -> None:
        pose, state = follower.display(gap_s)
        car.setMat(track_scene.car_matrix(pose))
        position, target = track_scene.chase_camera(pose, rig=rig)
        camera.setPos(position)
        camera.lookAt(target)
        hud.text = hud_text(follower, state)
        if follower.ended and config.exit_at_end:
            application.quit()

    def on_key(key: str) -> None:
        if key == "escape":
            application.quit()

    Entity(update=update, input=on_key)
    app.run()
