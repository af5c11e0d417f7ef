"""`rrp play` without a window: fixed ticks from frame time, recording, lap times, reset, key mapping."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, TICK_S, SimState
from game_server.core.track import Track, build_track
from game_server.play import MAX_FRAME_S, PlaySession, mask_from_keys

FINISH_TICK = 5


@pytest.fixture
def track() -> Track:
    t = np.linspace(0.0, 2 * math.pi, 100, endpoint=False)
    return build_track("test-oval", "Test oval.", 1, np.stack([120 * np.cos(t), 70 * np.sin(t)], 1), 9.0)


def fake_step(track: Track, state: SimState, mask: int) -> tuple[SimState, bool]:
    """Moves 1 m along +x per tick and finishes the lap at FINISH_TICK."""
    tick = state.tick + 1
    lap = replace(state.lap, progress_m=float(tick), finished=tick >= FINISH_TICK, finish_tick=FINISH_TICK)
    return replace(state, tick=tick, car=replace(state.car, x=state.car.x + 1.0), lap=lap), mask == LEFT


def test_ticks_come_from_accumulated_frame_time(track: Track) -> None:
    session = PlaySession(track, fake_step)
    assert session.advance(TICK_S * 2.5, 0) == 2
    assert session.advance(TICK_S * 0.6, 0) == 1  # the half tick left over is not lost
    assert session.state.tick == 3


def test_long_frames_are_not_caught_up(track: Track) -> None:
    session = PlaySession(track, fake_step)
    assert session.advance(10.0, 0) == round(MAX_FRAME_S / TICK_S)


def test_record_hook_sees_each_tick_with_the_state_it_applied_to(track: Track) -> None:
    records: list[tuple[int, int, bool]] = []
    session = PlaySession(track, fake_step, lambda s, m, w: records.append((s.tick, m, w)))
    session.advance(TICK_S * 2, LEFT)
    assert records == [(0, LEFT, True), (1, LEFT, True)]


def test_lap_times_and_reset(track: Track) -> None:
    session = PlaySession(track, fake_step)
    session.advance(TICK_S * (FINISH_TICK + 2), FORWARD)
    assert session.laps.last_s == session.laps.best_s == pytest.approx(FINISH_TICK * TICK_S)
    assert "100.0 %" in session.hud()
    session.reset()
    assert session.state == track.base_state
    assert session.laps.best_s == pytest.approx(FINISH_TICK * TICK_S)


def test_display_pose_interpolates_between_ticks(track: Track) -> None:
    session = PlaySession(track, fake_step)
    session.advance(TICK_S * 1.5, FORWARD)
    # Halfway between the states before and after the last tick (the view trails physics by a tick).
    assert session.display_car().x == pytest.approx(track.base_state.car.x + 0.5)


def test_keys_map_to_the_control_mask() -> None:
    assert mask_from_keys({"w": 1, "left arrow": 1}) == FORWARD | LEFT
    assert mask_from_keys({"down arrow": 1, "d": 1}) == BACK | RIGHT
    assert mask_from_keys({"w": 0}) == 0


def test_import_opens_no_window_and_loads_no_engine() -> None:
    code = "import sys, game_server.play, game_server.render\nassert not {'ursina', 'panda3d.core'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_play_drives_in_an_offscreen_window(tmp_path: Path) -> None:
    """run_play's ursina wiring, in a software-rendered offscreen window instead of a real one."""
    script = textwrap.dedent(
        """
        import math, time
        from dataclasses import replace
        import numpy as np
        from panda3d.core import loadPrcFileData
        loadPrcFileData("", "load-display p3tinydisplay\\naudio-library-name null")
        import ursina
        from game_server import play
        from game_server.core.track import build_track

        def offscreen(**kwargs):
            app = make_app(window_type="offscreen", size=(160, 120), **kwargs)
            def run():
                ursina.held_keys["w"] = 1
                for _ in range(10):
                    time.sleep(0.05)  # frame time, so that physics ticks happen
                    app.taskMgr.step()
            app.run = run
            return app

        make_app, ursina.Ursina = ursina.Ursina, offscreen
        t = np.linspace(0.0, 2 * math.pi, 100, endpoint=False)
        track = build_track("oval", "", 1, np.stack([120 * np.cos(t), 70 * np.sin(t)], 1), 9.0)
        masks = []
        step = lambda tr, s, m: (replace(s, tick=s.tick + 1), False)
        play.run_play(track, step, record_hook=lambda s, m, w: masks.append(m))
        assert masks and set(masks) == {play.mask_from_keys({"w": 1})}, masks
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_play_without_a_display_says_how_to_get_one() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    rrp = str(Path(sys.executable).with_name("rrp"))
    done = subprocess.run([rrp, "play", "--track", "oval"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no display" in done.stderr and "xvfb-run" in done.stderr and "Traceback" not in done.stderr
