"""Offscreen renderer: frame shape, content, determinism (in-process and across processes), threading, ursina."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from game_server.core.state import CarState, SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track
from game_server.render import FrameSpec, Renderer, shared_renderer
from game_server.render.renderer import _worker as render_thread
from plumbing.errors import InvalidArgument

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def track() -> Track:
    return load_track("oval")


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return shared_renderer()


def moved(state: SimState, dx: float = 0.0, dy: float = 0.0, tick: int = 0) -> SimState:
    car = state.car
    return replace(state, tick=state.tick + tick, car=replace(car, x=car.x + dx, y=car.y + dy))


def digest(frame: np.ndarray) -> str:
    return hashlib.sha256(frame.tobytes()).hexdigest()


@pytest.mark.parametrize(("width", "height"), [(128, 96), (200, 150)])
def test_frame_shape_and_content(renderer: Renderer, track: Track, width: int, height: int) -> None:
    frame = renderer.render(track, track.base_state, FrameSpec(width=width, height=height))
    assert frame.shape == (height, width, 3)
    assert frame.dtype == np.uint8
    assert frame.std() > 20
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) >= 10


def test_sky_is_on_top(renderer: Renderer, track: Track) -> None:
    frame = renderer.render(track, track.base_state, FrameSpec()).astype(int)
    sky = frame[0].mean(axis=0)
    assert sky[2] > sky[0] + 30  # blue above the horizon: row 0 is the top, not the road


def test_frame_changes_when_the_car_moves(renderer: Renderer, track: Track) -> None:
    a = renderer.render(track, track.base_state, FrameSpec())
    b = renderer.render(track, moved(track.base_state, dy=4.0), FrameSpec())
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0


def test_same_state_gives_identical_pixels_in_any_order(renderer: Renderer, track: Track) -> None:
    spec = FrameSpec()
    other = moved(track.base_state, dx=-3.0, dy=10.0, tick=9)
    first = renderer.render(track, track.base_state, spec)
    again = renderer.render(track, track.base_state, spec)
    renderer.render(track, other, FrameSpec(width=64, height=48, randomize=True, seed=5))
    renderer.render(track, other, spec)
    after_others = renderer.render(track, track.base_state, spec)
    assert digest(first) == digest(again) == digest(after_others)


def test_frames_drawn_in_one_job_equal_frames_drawn_one_by_one(renderer: Renderer, track: Track) -> None:
    kidney = load_track("kidney")
    views = [
        (track, track.base_state, FrameSpec()),
        (kidney, moved(kidney.base_state, dy=2.0, tick=3), FrameSpec()),
        (track, moved(track.base_state, dx=-3.0, dy=10.0, tick=9), FrameSpec(randomize=True, seed=5)),
        (track, track.base_state, FrameSpec(width=64, height=48)),
    ]
    together = renderer.render_many(views)
    alone = [renderer.render(*view) for view in reversed(views)][::-1]
    assert [digest(f) for f in together] == [digest(f) for f in alone]
    assert len({digest(f) for f in together}) == 4
    bad = replace(track.base_state, car=replace(track.base_state.car, x=math.nan))
    with pytest.raises(InvalidArgument):
        renderer.render_many([views[0], (track, bad, FrameSpec())])


def test_randomisation_is_seeded(renderer: Renderer, track: Track) -> None:
    state = track.base_state
    plain = renderer.render(track, state, FrameSpec())
    seed1 = renderer.render(track, state, FrameSpec(randomize=True, seed=1))
    seed2 = renderer.render(track, state, FrameSpec(randomize=True, seed=2))
    seed1_again = renderer.render(track, state, FrameSpec(randomize=True, seed=1))
    assert digest(seed1) == digest(seed1_again)
    assert len({digest(plain), digest(seed1), digest(seed2)}) == 3


def _barrier_pixels(frame: np.ndarray) -> dict[str, tuple[int, int]]:
    """Red and blue barrier pixels in the frame's (left, right) halves."""
    f = frame.astype(int)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    masks = {"red": (r > g + 60) & (r > b + 60) & (g < 90), "blue": (b > r + 60) & (r < 90)}
    half = f.shape[1] // 2
    return {k: (int(m[:, :half].sum()), int(m[:, half:].sum())) for k, m in masks.items()}


@pytest.mark.parametrize("name", ["oval", "kidney", "alpine"])
def test_the_barriers_show_which_way_the_lap_goes(renderer: Renderer, name: str) -> None:
    """The direction cue: red stripes on the left barrier, blue on the right, so a car facing the wrong way
    sees them swapped (without it, no frame tells a learner which way to turn round)."""
    from game_server.core.recovery import wrong_way_state

    track = load_track(name)
    ahead = _barrier_pixels(renderer.render(track, track.base_state, FrameSpec()))
    behind = _barrier_pixels(renderer.render(track, wrong_way_state(track, 0), FrameSpec()))
    assert ahead["red"][0] > 5 * ahead["red"][1] and ahead["blue"][1] > 5 * ahead["blue"][0]
    assert behind["red"][1] > 5 * behind["red"][0] and behind["blue"][0] > 5 * behind["blue"][1]


def test_camera_jitter_follows_the_tick(renderer: Renderer, track: Track) -> None:
    spec = FrameSpec(randomize=True, seed=3)
    a = renderer.render(track, track.base_state, spec)
    b = renderer.render(track, moved(track.base_state, tick=1), spec)
    assert digest(a) != digest(b)


def test_concurrent_renders_from_threads(renderer: Renderer, track: Track) -> None:
    states = [moved(track.base_state, dy=float(k)) for k in range(6)]
    expected = [digest(renderer.render(track, s, FrameSpec())) for s in states]
    results: dict[int, list[str]] = {}

    def worker(index: int) -> None:
        results[index] = [digest(renderer.render(track, s, FrameSpec())) for s in states for _ in range(5)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(results[i] == [d for d in expected for _ in range(5)] for i in range(4))


def test_another_process_renders_the_same_bytes(renderer: Renderer, track: Track) -> None:
    """Same bytes in a fresh process with a different history (another size first, specs reversed)."""
    state = SimState(tick=17, car=CarState(60.0, 60.0, 2.7, 15.0))
    specs = [FrameSpec(), FrameSpec(randomize=True, seed=11), FrameSpec(width=96, height=72)]
    local = [digest(renderer.render(track, state, spec)) for spec in specs]
    script = textwrap.dedent(
        """
        import hashlib
        from game_server.core.state import CarState, SimState
        from game_server.core.tracks import load_track
        from game_server.render import FrameSpec, shared_renderer
        track, renderer = load_track("oval"), shared_renderer()
        state = SimState(tick=17, car=CarState(60.0, 60.0, 2.7, 15.0))
        renderer.render(track, track.base_state, FrameSpec(width=200, height=150, randomize=True, seed=4))
        specs = [FrameSpec(), FrameSpec(randomize=True, seed=11), FrameSpec(width=96, height=72)]
        frames = {spec: renderer.render(track, state, spec) for spec in reversed(specs)}
        for spec in specs:
            print(hashlib.sha256(frames[spec].tobytes()).hexdigest())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == local


def test_frames_come_from_the_ursina_app_on_the_render_thread(renderer: Renderer, track: Track) -> None:
    renderer.render(track, track.base_state, FrameSpec())
    import ursina

    def inspect() -> tuple[str, bool, list[str]]:
        base = ursina.application.base
        names = [e.name for e in ursina.scene.entities]
        return threading.current_thread().name, ursina.camera.isAncestorOf(base.cam), names

    thread_name, camera_is_ursinas, names = render_thread().call(inspect)
    assert thread_name == "rrp-render"
    assert camera_is_ursinas
    assert {"rrp-world", "rrp-car", f"rrp-track:{track.name}"} <= set(names)


def test_poses_do_not_accumulate_cached_states(renderer: Renderer, track: Track) -> None:
    """Without ShowBase's task loop the renderer frees unused transform states itself."""
    from panda3d.core import TransformState

    renderer.render(track, track.base_state, FrameSpec())
    before = render_thread().call(TransformState.getNumStates)
    for k in range(300):
        renderer.render(track, moved(track.base_state, dx=0.01 * k, tick=k), FrameSpec(randomize=True, seed=2))
    assert render_thread().call(TransformState.getNumStates) < before + 100


def test_closed_renderer_is_replaced_in_the_same_app() -> None:
    """close() frees the scene; a new Renderer reuses the process's render thread and ursina app."""
    script = textwrap.dedent(
        """
        import hashlib, threading
        import ursina
        from game_server.core.tracks import load_track
        from game_server.render import FrameSpec, Renderer
        from plumbing.errors import FailedPrecondition
        track, first = load_track("oval"), Renderer()
        before = first.render(track, track.base_state, FrameSpec(width=64, height=48))
        app = ursina.application.base
        first.close()
        try:
            first.render(track, track.base_state, FrameSpec())
            raise SystemExit("a closed renderer rendered")
        except FailedPrecondition:
            pass
        second = Renderer()
        after = second.render(track, track.base_state, FrameSpec(width=64, height=48))
        assert ursina.application.base is app
        assert [t.name for t in threading.enumerate()].count("rrp-render") == 1
        assert hashlib.sha256(before).digest() == hashlib.sha256(after).digest()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout == "ok\n"  # ursina's start-up prints go to the log, not stdout


@pytest.mark.parametrize("kwargs", [{"width": 8}, {"height": 481}, {"width": 64.0}, {"width": True}, {"seed": -1}])
def test_frame_spec_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        FrameSpec(**kwargs)  # type: ignore[arg-type]


def test_non_finite_pose_is_rejected(renderer: Renderer, track: Track) -> None:
    with pytest.raises(InvalidArgument):
        renderer.render(track, SimState(tick=0, car=CarState(math.nan, 0.0, 0.0)), FrameSpec())


def test_one_renderer_per_process(renderer: Renderer) -> None:
    assert shared_renderer() is renderer
    with pytest.raises(Exception, match="one Renderer per process"):
        Renderer()
