"""Offscreen renderer: camera frames of the simulation's state, drawn by Panda3D's software rasteriser."""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any

import numpy as np

from game_server.core.state import SimState
from game_server.core.track import Track
from rrp.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from game_server.render.scene import Appearance

MIN_WIDTH, MAX_WIDTH = 16, 640
MIN_HEIGHT, MAX_HEIGHT = 16, 480
_TRACK_CACHE = 4  # track scenes kept built; a server rarely serves more tracks at once
_TARGET_CACHE = 3  # offscreen buffers kept, one per frame size

_PRC = (
    "load-display p3tinydisplay",
    "window-type offscreen",
    "win-size 128 96",
    "audio-library-name null",
    "sync-video false",
    "coordinate-system y-up-left",  # as ursina, so `rrp play` and frames share the scene code
    "framebuffer-multisample false",
    "notify-level-x11display fatal",  # tinydisplay probes X first; there is none on a server
    "notify-level-display error",
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
    )


def camera_jitter(randomize: bool, seed: int, tick: int) -> tuple[float, float, float, float]:
    """Per-frame camera offsets (right, up, back in m; FOV in degrees), a pure function of (seed, tick)."""
    if not randomize:
        return (0.0, 0.0, 0.0, 0.0)
    r = np.random.default_rng([seed, tick & 0xFFFFFFFFFFFFFFFF, 0x717])
    right, up, back, fov = r.uniform(-1.0, 1.0, 4) * (0.25, 0.2, 0.5, 4.0)
    return (float(right), float(up), float(back), float(fov))


@dataclass
class _Target:
    """One offscreen buffer of one frame size, with its camera and a texture copied to RAM each frame."""

    buffer: Any
    texture: Any
    camera: Any
    lens: Any


@dataclass
class _TrackScene:
    root: Any
    look: Appearance | None = None


_instance_lock = threading.Lock()
_open_instance: Renderer | None = None


class Renderer:
    """The process's one offscreen scene; `render` may be called from any thread and renders one at a time.

    Panda3D objects live on a dedicated render thread (created lazily on the first frame), so gRPC worker
    threads never touch the scene graph; they queue a job and wait for its pixels.
    """

    def __init__(self) -> None:
        global _open_instance
        with _instance_lock:
            if _open_instance is not None:
                raise FailedPrecondition("one Renderer per process: use shared_renderer()")
            _open_instance = self
        self._jobs: queue.SimpleQueue[tuple[Callable[[], np.ndarray], Future[np.ndarray]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._scene: _Scene | None = None

    def render(self, track: Track, state: SimState, spec: FrameSpec) -> np.ndarray:
        """RGB frame (height, width, 3) uint8, row 0 at the top; a pure function of (track, state, spec)."""
        car = state.car
        if not all(math.isfinite(v) for v in (car.x, car.y, car.heading)):
            raise InvalidArgument("car pose must be finite")
        if threading.current_thread() is self._thread:
            return self._draw(track, state, spec)
        future: Future[np.ndarray] = Future()
        self._ensure_thread()
        self._jobs.put((lambda: self._draw(track, state, spec), future))
        return future.result()

    def close(self) -> None:
        """Stops the render thread and frees the scene; later renders fail."""
        global _open_instance
        with self._start_lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            thread.join()
        with _instance_lock:
            if _open_instance is self:
                _open_instance = None

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._closed:
                raise FailedPrecondition("renderer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="rrp-render", daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as exc:  # the caller's thread re-raises it
                future.set_exception(exc)
        if self._scene is not None:
            self._scene.destroy()
            self._scene = None

    def _draw(self, track: Track, state: SimState, spec: FrameSpec) -> np.ndarray:
        if self._scene is None:
            self._scene = _Scene()
        return self._scene.draw(track, state, spec)


def shared_renderer() -> Renderer:
    """The process-wide renderer, created on first use."""
    with _instance_lock:
        existing = _open_instance
    return existing if existing is not None else Renderer()


class _Scene:
    """Panda3D state of the renderer; used only from the render thread."""

    def __init__(self) -> None:
        from panda3d.core import GraphicsEngine, GraphicsPipeSelection, Material, NodePath, loadPrcFileData

        from game_server.render import scene

        for line in _PRC:
            loadPrcFileData("rrp-render", line)
        self._pipe = GraphicsPipeSelection.getGlobalPtr().makeModulePipe("p3tinydisplay")
        if self._pipe is None:
            raise RuntimeError("Panda3D's p3tinydisplay software renderer is not available")
        self._engine = GraphicsEngine(self._pipe)
        self._root = NodePath("rrp-render")
        self._lights = scene.SceneLights(self._root)
        # tinydisplay multiplies lit vertex colours in twice (colours come out squared); a white material
        # makes them count once, as OpenGL does in `rrp play`.
        white = Material("white")
        white.setAmbient((1, 1, 1, 1))
        white.setDiffuse((1, 1, 1, 1))
        self._root.setMaterial(white)
        self._car = scene.build_car()
        self._car.reparentTo(self._root)
        self._tracks: OrderedDict[tuple[str, int], _TrackScene] = OrderedDict()
        self._track_keys: weakref.WeakKeyDictionary[Track, tuple[str, int]] = weakref.WeakKeyDictionary()
        self._targets: OrderedDict[tuple[int, int], _Target] = OrderedDict()
        self._active_track: _TrackScene | None = None
        self._active_target: _Target | None = None
        self._look: Appearance | None = None
        self._dirty = True

    def draw(self, track: Track, state: SimState, spec: FrameSpec) -> np.ndarray:
        from game_server.render import scene

        target = self._target(spec.width, spec.height)
        track_scene = self._track(track)
        look = appearance_for(spec.randomize, spec.seed)
        if look is not self._look:
            self._lights.apply(look)
            self._look = look
        if track_scene.look is not look:
            scene.apply_appearance(track_scene.root, look)
            track_scene.look = look
        target.buffer.setClearColor((*look.sky, 1.0))
        right, up, back, dfov = camera_jitter(spec.randomize, spec.seed, state.tick)
        target.lens.setFov(scene.CAMERA_FOV_DEG + dfov)
        pos, aim = scene.chase_camera(state.car, (right, up, back))
        target.camera.setPos(pos)
        target.camera.lookAt(aim)
        self._car.setMat(scene.car_matrix(state.car))
        # The first frame after the scene or buffer changes can come out empty: draw it twice then.
        for _ in range(2 if self._dirty else 1):
            self._engine.renderFrame()
        self._dirty = False
        image = np.frombuffer(target.texture.getRamImageAs("RGB"), np.uint8)
        return image.reshape(spec.height, spec.width, 3)[::-1].copy()

    def _track(self, track: Track) -> _TrackScene:
        from game_server.render import scene

        key = self._track_keys.get(track)
        if key is None:
            key = (track.name, zlib.crc32(track.centerline.tobytes() + track.half_width.tobytes()))
            self._track_keys[track] = key
        found = self._tracks.get(key)
        if found is None:
            found = _TrackScene(scene.build_track_scene(track))
            self._tracks[key] = found
            if len(self._tracks) > _TRACK_CACHE:
                _, evicted = self._tracks.popitem(last=False)
                evicted.root.removeNode()
        self._tracks.move_to_end(key)
        if found is not self._active_track:
            if self._active_track is not None:
                self._active_track.root.detachNode()
            found.root.reparentTo(self._root)
            self._active_track = found
            self._dirty = True
        return found

    def _target(self, width: int, height: int) -> _Target:
        key = (width, height)
        found = self._targets.get(key)
        if found is None:
            found = self._make_target(width, height)
            self._targets[key] = found
            if len(self._targets) > _TARGET_CACHE:
                _, evicted = self._targets.popitem(last=False)
                self._engine.removeWindow(evicted.buffer)
                evicted.camera.removeNode()
        self._targets.move_to_end(key)
        if found is not self._active_target:
            if self._active_target is not None:
                self._active_target.buffer.setActive(False)
            found.buffer.setActive(True)
            self._active_target = found
            self._dirty = True
        return found

    def _make_target(self, width: int, height: int) -> _Target:
        from panda3d.core import (
            Camera,
            FrameBufferProperties,
            GraphicsOutput,
            GraphicsPipe,
            PerspectiveLens,
            Texture,
            WindowProperties,
        )

        from game_server.render import scene

        fbp = FrameBufferProperties()
        fbp.setRgbColor(True)
        fbp.setColorBits(24)
        fbp.setDepthBits(16)
        buffer = self._engine.makeOutput(
            self._pipe,
            f"frame-{width}x{height}",
            0,
            fbp,
            WindowProperties.size(width, height),
            GraphicsPipe.BFRefuseWindow,
        )
        if buffer is None:
            raise RuntimeError(f"could not create a {width}x{height} offscreen buffer")
        texture = Texture(f"frame-{width}x{height}")
        buffer.addRenderTexture(texture, GraphicsOutput.RTMCopyRam)
        lens = PerspectiveLens()
        lens.setAspectRatio(width / height)
        lens.setNearFar(scene.CAMERA_NEAR_M, scene.CAMERA_FAR_M)
        camera = self._root.attachNewNode(Camera(f"camera-{width}x{height}", lens))
        region = buffer.makeDisplayRegion()
        region.setCamera(camera)
        return _Target(buffer, texture, camera, lens)

    def destroy(self) -> None:
        self._engine.removeAllWindows()
        self._root.removeNode()
