"""`rrp play --record` for real: a window on Xvfb, keys pressed with xdotool, the lap's frames arriving in Redis."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collector.server import CollectorConfig, create_collector_server
from collector.store import FrameStore, RedisConfig
from game_server.core.state import FORWARD
from plumbing.bootstrap import ServerConfig
from plumbing.procs import rrp_command
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1 import collector_pb2

pytestmark = pytest.mark.skipif(
    shutil.which("Xvfb") is None or shutil.which("xdotool") is None, reason="needs Xvfb and xdotool"
)


@pytest.fixture()
def display() -> Iterator[str]:
    """A private X server; the test starts and stops it."""
    number = next(n for n in range(91, 200) if not Path(f"/tmp/.X{n}-lock").exists())
    name = f":{number}"
    xvfb = subprocess.Popen(
        ["Xvfb", name, "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {**os.environ, "DISPLAY": name}
    deadline = time.monotonic() + 20
    while subprocess.run(["xdotool", "getdisplaygeometry"], env=env, capture_output=True).returncode != 0:
        assert time.monotonic() < deadline and xvfb.poll() is None, "Xvfb did not start"
        time.sleep(0.1)
    try:
        yield name
    finally:
        xvfb.terminate()
        xvfb.wait(10)


def test_keyboard_lap_is_recorded(display: str, tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "redis", die_with_parent=True) as redis:
        collector = create_collector_server(
            CollectorConfig(redis=RedisConfig(url=redis.url), server=ServerConfig(port=0, service_name="collector-t"))
        )
        env = {**os.environ, "DISPLAY": display}
        play = subprocess.Popen(
            [*rrp_command(), "play", "--record", "--track", "oval", "--collector", collector.address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:

            def xdotool(*args: str) -> None:
                subprocess.run(["xdotool", *args], env=env, check=True, timeout=60)

            # No window manager on Xvfb: focus the window directly (windowactivate needs one).
            xdotool("search", "--sync", "--name", "RallyRoboPilot", "windowfocus", "--sync")
            time.sleep(1.0)
            xdotool("keydown", "w")
            time.sleep(2.0)
            xdotool("keyup", "w")
            xdotool("key", "Escape")
            output, _ = play.communicate(timeout=60)
        finally:
            if play.poll() is None:
                play.kill()
            collector.stop(0.5)
        assert play.returncode == 0, output
        assert "recorded human-oval-" in output

        store = FrameStore(redis.client())
        runs = store.list_runs(track="oval")
        assert len(runs) == 1
        run = runs[0]
        assert run.start.source == collector_pb2.RUN_SOURCE_HUMAN and run.start.driver_id == "keyboard"
        assert run.stored_frames > 25 and run.end is not None and run.end.frames == run.stored_frames
        records = list(store.iter_frames(run.start.run_id))
        assert [r.tick for r in records] == list(range(len(records)))
        assert all(r.applied_mask == r.label_mask for r in records)  # a person's keys are their own labels
        forward = [r for r in records if r.label_mask & FORWARD]
        assert len(forward) > 25  # about 2 s of 25 Hz ticks with W held
        assert records[-1].state.car.speed_m_per_s > 5.0
        image = np.asarray(Image.open(io.BytesIO(records[-1].image)))
        assert image.shape == (96, 128, 3) and image.std() > 10  # a rendered scene, not a blank frame
