"""Offscreen renderer: camera frames of the simulation's state, rendered by an ursina app.

One ursina application per process runs offscreen on Panda3D's software rasteriser (p3tinydisplay) on a
dedicated thread, `rrp-render`, which owns every ursina and Panda3D object. Track scenes and the car are
ursina Entities under ursina's `scene`, seen through ursina's `camera` (its FOV and clip planes); a frame is
one `graphicsEngine.renderFrame()` (no task loop, so no `update` runs) read back from a RAM texture of
ursina's offscreen window, or of a buffer beside it for other frame sizes.
"""

from __future__ import annotations

import atexit
import logging
import math
import queue
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from game_server.core.state import SimState
from game_server.core.track import Track
from plumbing.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from game_server.render.scene import Appearance, ChaseRig

logger = logging.getLogger(__name__)

MIN_WIDTH, MAX_WIDTH = 16, 640
MIN_HEIGHT, MAX_HEIGHT = 16, 480
_TRACK_CACHE = 4  # track scenes kept built; a server rarely serves more tracks at once
_TARGET_CACHE = 3  # offscreen buffers kept beside ursina's window, one per other frame size

_PRC = (
    "load-display p3tinydisplay",
    "window-type offscreen",
    "audio-library-name null",
    "sync-video false",
    "coordinate-system y-up-left",  # as ursina, so `rrp play` and frames share the scene code
    "framebuffer-multisample false",
    "notify-level-x11display fatal",  # tinydisplay probes X first; there is none on a server
    "notify-level-display error",
    "print-pipe-types false",
    "notify-level-device fatal",  # ShowBase watches /dev/input for gamepads; a server has none
    "notify-level-pnmimage error",  # ursina's editor icons carry a harmless sRGB-profile warning
)


@dataclass(frozen=True)
class FrameSpec:
    """What a frame looks like: its size in pixels and, for domain randomisation, a seed."""

    width: int = 128
    height: int = 96
    randomize: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, lo, hi in (
            ("width", self.width, MIN_WIDTH, MAX_WIDTH),
            ("height", self.height, MIN_HEIGHT, MAX_HEIGHT),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise InvalidArgument(f"frame {name} must be an integer in [{lo}, {hi}], got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InvalidArgument(f"frame seed must be an integer in [0, 2**63), got {self.seed!r}")


@lru_cache(maxsize=64)
def appearance_for(randomize: bool, seed: int) -> Appearance:
    """The look of every frame of a seed: light, sky and surface colours; the default if not randomised."""
    from game_server.render.scene import DEFAULT_APPEARANCE, Appearance

    if not randomize:
        return DEFAULT_APPEARANCE
    rng = np.random.default_rng([seed, 0xA11CE])
    d = DEFAULT_APPEARANCE

    def tint(rgb: tuple[float, float, float], spread: float) -> tuple[float, float, float]:
        r, g, b = np.clip(np.asarray(rgb) * rng.uniform(1 - spread, 1 + spread, 3), 0.0, 1.0)
        return (float(r), float(g), float(b))

    azimuth = rng.uniform(0.0, 2 * math.pi)
    elevation = rng.uniform(math.radians(20), math.radians(80))
    light_dir = (
        -math.cos(elevation) * math.cos(azimuth),
        -math.sin(elevation),
        -math.cos(elevation) * math.sin(azimuth),
    )
    return Appearance(
        sky=tint(d.sky, 0.25),
        ground=tint(d.ground, 0.4),
        road=tint(d.road, 0.4),
        wall_a=tint(d.wall_a, 0.4),
        wall_b=tint(d.wall_b, 0.3),
        props=tint(d.props, 0.25),
        light_dir=light_dir,
        light=float(rng.uniform(0.45, 1.0)),
        ambient=float(rng.uniform(0.25, 0.6)),
        wall_c=tint(d.wall_c, 0.4),  # drawn last: the other colours of a seed are what they were before it
    )


def camera_jitter(randomize: bool, seed: int, tick: int) -> tuple[float, float, float, float]:
    """Per-frame camera offsets (right, up, back in m; FOV in degrees), a pure function of (seed, tick)."""
    if not randomize:
        return (0.0, 0.0, 0.0, 0.0)
    r = np.random.default_rng([seed, tick & 0xFFFFFFFFFFFFFFFF, 0x717])
    right, up, back, fov = r.uniform(-1.0, 1.0, 4) * (0.25, 0.2, 0.5, 4.0)
    return (float(right), float(up), float(back), float(fov))


_T = TypeVar("_T")


@dataclass
class _Target:
    """Where frames of one size are drawn, through ursina's camera: ursina's window, or a buffer beside it."""

    output: Any
    texture: Any  # bound with RTMCopyRam: a copy of each frame in RAM


@dataclass
class _App:
    """The process's ursina application, on the render thread, with the RAM texture of its window."""

    base: Any  # the `Ursina` instance (a ShowBase), also `ursina.application.base`
    window: _Target


@dataclass
class _TrackScene:
    entity: Any  # an ursina Entity under `scene` whose model is the built track root
    root: Any
    look: Appearance | None = None


class _RenderThread:
    """The process's one render thread, `rrp-render`: it starts the ursina app and owns every Panda3D object.

    It lives as long as the process (ursina's app is a per-process singleton), so renderers closed and
    opened again reuse it; at interpreter exit it destroys the app on this thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self.thread = threading.Thread(target=self._serve, name="rrp-render", daemon=True)
        self.thread.start()

    def call(self, work: Callable[[], _T]) -> _T:
        """Runs `work` on the render thread and returns its result (or raises its exception) here."""
        if threading.current_thread() is self.thread:
            return work()
        future: Future[_T] = Future()
        with self._lock:
            if self._stopped:
                raise FailedPrecondition("the render thread has stopped (interpreter exit)")
            self._jobs.put((work, future))
        return future.result()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._jobs.put(None)
        self.thread.join(timeout=10.0)

    def _serve(self) -> None:
        global _app
        while (job := self._jobs.get()) is not None:
            work, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as exc:  # the caller's thread re-raises it
                future.set_exception(exc)
        if _app is not None:
            _app.base.destroy()  # else ShowBase's own atexit hook would do it from the main thread
            _app = None


_thread_lock = threading.Lock()
_render_thread: _RenderThread | None = None
_app: _App | None = None  # used only on the render thread


def _worker() -> _RenderThread:
    global _render_thread
    with _thread_lock:
        if _render_thread is None:
            _render_thread = _RenderThread()
        return _render_thread


def _stop_worker() -> None:
    """At interpreter exit (registered after ShowBase's hook, so it runs first): app destroyed on its thread."""
    with _thread_lock:
        worker = _render_thread
    if worker is not None:
        worker.stop()


def _ursina_app() -> _App:
    """The ursina app, started on first use; render thread only."""
    global _app
    if _app is None:
        _app = _start_ursina()
    return _app


def _start_ursina() -> _App:
    from panda3d.core import GraphicsOutput, Texture, loadPrcFileData

    for line in _PRC:
        loadPrcFileData("rrp-render", line)
    from ursina import Ursina, application, string_utilities
    from ursina import main as ursina_main

    if application.base is not None:
        raise FailedPrecondition("this process already runs an ursina app; the renderer needs its own")
    # Ursina() prints its asset folders and a missing monitor to stdout, and would exec a settings.py found
    # next to the program's script: send the prints to the log and load no settings while it starts.
    load_settings = application.load_settings
    ursina_main.print = string_utilities.print = _log_print
    application.load_settings = lambda *args, **kwargs: None
    try:
        width, height = FrameSpec().width, FrameSpec().height
        base = Ursina(
            title="rrp-render",
            window_type="offscreen",
            size=(width, height),
            vsync=False,
            development_mode=False,  # hot reloader off, editor UI hidden
            editor_ui_enabled=False,
            borderless=False,
        )
    finally:
        application.load_settings = load_settings
        del ursina_main.print, string_utilities.print
    # Only the 3D camera's region draws: ursina's 2D and UI overlays hold nothing visible in these frames.
    for region in base.win.getDisplayRegions():
        if region.getCamera() != base.cam:
            region.setActive(False)
    texture = Texture("rrp-frame")
    base.win.addRenderTexture(texture, GraphicsOutput.RTMCopyRam)
    atexit.register(_stop_worker)
    return _App(base, _Target(base.win, texture))


def _log_print(*args: object, **_: object) -> None:
    logger.debug("ursina: %s", " ".join(str(arg) for arg in args))


_instance_lock = threading.Lock()
_open_instance: Renderer | None = None


class Renderer:
    """The process's one offscreen scene; `render` may be called from any thread and renders one at a time.

    Frames are drawn by an ursina app on the process's render thread (started with the first frame), so
    gRPC worker threads never touch the scene graph; they queue a job and wait for its pixels.
    """

    def __init__(self) -> None:
        global _open_instance
        with _instance_lock:
            if _open_instance is not None:
                raise FailedPrecondition("one Renderer per process: use shared_renderer()")
            _open_instance = self
        self._lock = threading.Lock()
        self._closed = False  # no new frames are accepted
        self._released = False  # the scene is gone: frames queued before close() have been drawn
        self._scene: _Scene | None = None

    def render(self, track: Track, state: SimState, spec: FrameSpec, rig: ChaseRig | None = None) -> np.ndarray:
        """RGB frame (height, width, 3) uint8, row 0 at the top; a pure function of (track, state, spec, rig).

        `rig` places the chase camera; the game's own (the model's view) unless given."""
        car = state.car
        if not all(math.isfinite(v) for v in (car.x, car.y, car.heading)):
            raise InvalidArgument("car pose must be finite")
        with self._lock:
            if self._closed:
                raise FailedPrecondition("renderer is closed")
        return _worker().call(lambda: self._draw(track, state, spec, rig))

    def render_many(self, views: list[tuple[Track, SimState, FrameSpec]]) -> list[np.ndarray]:
        """`render` of each (track, state, spec), in one job of the render thread: one hand-off, not one a frame
        (under load each hand-off waits for the scheduler twice)."""
        for _, state, _ in views:
            if not all(math.isfinite(v) for v in (state.car.x, state.car.y, state.car.heading)):
                raise InvalidArgument("car pose must be finite")
        with self._lock:
            if self._closed:
                raise FailedPrecondition("renderer is closed")
        return _worker().call(lambda: [self._draw(track, state, spec, None) for track, state, spec in views])

    def close(self) -> None:
        """Frees this renderer's scene, after the frames already queued; later renders fail.

        The render thread and ursina's app stay for the process (ursina starts once per process) and are
        reused by the next `Renderer`.
        """
        global _open_instance
        with self._lock:
            was_closed, self._closed = self._closed, True
        if not was_closed:
            with _thread_lock:
                worker = _render_thread
            if worker is not None:
                worker.call(self._release)
        with _instance_lock:
            if _open_instance is self:
                _open_instance = None

    def _draw(self, track: Track, state: SimState, spec: FrameSpec, rig: ChaseRig | None) -> np.ndarray:
        if self._released:
            raise FailedPrecondition("renderer is closed")
        if self._scene is None:
            self._scene = _Scene(_ursina_app())
        return self._scene.draw(track, state, spec, rig)

    def _release(self) -> None:
        self._released = True
        if self._scene is not None:
            self._scene.destroy()
            self._scene = None


def shared_renderer() -> Renderer:
    """The process-wide renderer, created on first use."""
    with _instance_lock:
        existing = _open_instance
    return existing if existing is not None else Renderer()


def _model_entity(name: str, parent: Any, model: Any) -> Any:
    """An ursina Entity showing a built NodePath as its model."""
    from ursina import Entity

    entity = Entity(name=name, parent=parent, model=model)
    # Entity turns on dual transparency for its model: an extra alpha-tested pass that costs time and
    # changes which of two equal-depth pixels wins. The scene is opaque.
    model.clearTransparency()
    return entity


class _Scene:
    """A renderer's entities in ursina's scene, its extra buffers and caches; used only on the render thread."""

    def __init__(self, app: _App) -> None:
        from panda3d.core import Material, RenderState, TransformState
        from ursina import Entity, camera

        from game_server.render import scene

        self._app = app
        self._camera = camera
        self._transform_states, self._render_states = TransformState, RenderState
        self._world = Entity(name="rrp-world")  # under ursina's `scene`
        self._lights = scene.SceneLights(self._world)
        # tinydisplay multiplies lit vertex colours in twice (colours come out squared); a white material
        # makes them count once, as OpenGL does in `rrp play`.
        white = Material("white")
        white.setAmbient((1, 1, 1, 1))
        white.setDiffuse((1, 1, 1, 1))
        self._world.setMaterial(white)
        self._car = _model_entity("rrp-car", self._world, scene.build_car())
        camera.clip_plane_near = scene.CAMERA_NEAR_M
        camera.clip_plane_far = scene.CAMERA_FAR_M
        self._tracks: OrderedDict[tuple[str, int], _TrackScene] = OrderedDict()
        self._track_keys: weakref.WeakKeyDictionary[Track, tuple[str, int]] = weakref.WeakKeyDictionary()
        window = app.window.output
        self._window_size = (window.getXSize(), window.getYSize())
        self._buffers: OrderedDict[tuple[int, int], _Target] = OrderedDict()
        self._active_track: _TrackScene | None = None
        self._active_target: _Target | None = None
        self._look: Appearance | None = None
        self._dirty = True

    def draw(self, track: Track, state: SimState, spec: FrameSpec, rig: ChaseRig | None = None) -> np.ndarray:
        from game_server.render import scene

        rig = scene.DRIVER_RIG if rig is None else rig
        target = self._target(spec.width, spec.height)
        track_scene = self._track(track)
        look = appearance_for(spec.randomize, spec.seed)
        if look is not self._look:
            self._lights.apply(look)
            self._look = look
        if track_scene.look is not look:
            scene.apply_appearance(track_scene.root, look)
            track_scene.look = look
        target.output.setClearColor((*look.sky, 1.0))  # as `window.color`, on whichever output draws
        right, up, back, dfov = camera_jitter(spec.randomize, spec.seed, state.tick)
        camera = self._camera
        camera.fov = rig.fov_deg + dfov
        pos, aim = scene.chase_camera(state.car, (right, up, back), rig)
        camera.setPos(pos)
        camera.lookAt(aim)
        self._car.setMat(scene.car_matrix(state.car))
        # The first frame after the scene or output changes can come out empty: draw it twice then.
        engine = self._app.base.graphicsEngine
        for _ in range(2 if self._dirty else 1):
            engine.renderFrame()
        self._dirty = False
        # ShowBase's task loop, which does not run here, frees unused transform and render states each frame;
        # without it every camera and car pose would stay cached (about 4 KB a frame).
        self._transform_states.garbageCollect()
        self._render_states.garbageCollect()
        image = np.frombuffer(target.texture.getRamImageAs("RGB"), np.uint8)
        return image.reshape(spec.height, spec.width, 3)[::-1].copy()

    def _track(self, track: Track) -> _TrackScene:
        from ursina import destroy

        from game_server.render import scene

        key = self._track_keys.get(track)
        if key is None:
            key = (track.name, zlib.crc32(track.centerline.tobytes() + track.half_width.tobytes()))
            self._track_keys[track] = key
        found = self._tracks.get(key)
        if found is None:
            root = scene.build_track_scene(track)
            entity = _model_entity(f"rrp-track:{track.name}", self._world, root)
            entity.enabled = False
            found = _TrackScene(entity, root)
            self._tracks[key] = found
            if len(self._tracks) > _TRACK_CACHE:
                _, evicted = self._tracks.popitem(last=False)
                destroy(evicted.entity)
        self._tracks.move_to_end(key)
        if found is not self._active_track:
            if self._active_track is not None and self._active_track.entity:
                self._active_track.entity.enabled = False
            found.entity.enabled = True
            self._active_track = found
            self._dirty = True
        return found

    def _target(self, width: int, height: int) -> _Target:
        key = (width, height)
        if key == self._window_size:
            found = self._app.window
        else:
            found = self._buffers.get(key) or self._make_buffer(width, height)
            self._buffers[key] = found
            self._buffers.move_to_end(key)
            if len(self._buffers) > _TARGET_CACHE:
                _, evicted = self._buffers.popitem(last=False)
                self._app.base.graphicsEngine.removeWindow(evicted.output)
        if found is not self._active_target:
            if self._active_target is not None:
                self._active_target.output.setActive(False)
            found.output.setActive(True)
            # One camera for every size: its lens takes the aspect ratio of the output that draws.
            self._camera.perspective_lens.setAspectRatio(width / height)
            self._active_target = found
            self._dirty = True
        return found

    def _make_buffer(self, width: int, height: int) -> _Target:
        """An offscreen buffer beside ursina's window (same pipe and GSG), drawn through ursina's camera."""
        from panda3d.core import FrameBufferProperties, GraphicsOutput, GraphicsPipe, Texture, WindowProperties

        base = self._app.base
        fbp = FrameBufferProperties()
        fbp.setRgbColor(True)
        fbp.setColorBits(24)
        fbp.setDepthBits(16)
        buffer = base.graphicsEngine.makeOutput(
            base.pipe,
            f"rrp-frame-{width}x{height}",
            0,
            fbp,
            WindowProperties.size(width, height),
            GraphicsPipe.BFRefuseWindow,
            base.win.getGsg(),
            base.win,
        )
        if buffer is None:
            raise RuntimeError(f"could not create a {width}x{height} offscreen buffer")
        buffer.setActive(False)
        texture = Texture(f"rrp-frame-{width}x{height}")
        buffer.addRenderTexture(texture, GraphicsOutput.RTMCopyRam)
        buffer.makeDisplayRegion().setCamera(base.cam)  # ursina's camera: `camera` entity, its lens
        return _Target(buffer, texture)

    def destroy(self) -> None:
        from ursina import destroy

        engine = self._app.base.graphicsEngine
        for target in self._buffers.values():
            engine.removeWindow(target.output)
        self._buffers.clear()
        self._app.window.output.setActive(True)
        destroy(self._world)  # with the car and track entities under it
        self._tracks.clear()
