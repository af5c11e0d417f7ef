"""`rrp play`: drive the game yourself in a window, optionally recording every tick; `rrp watch`: watch a session."""

from __future__ import annotations

import os
import sys
from typing import Any

from rrp.command import Commands


def _config() -> type[Any]:
    from game_server.play_recording import PlayConfig

    return PlayConfig


def play(config: Any) -> int:
    import contextlib

    from game_server.core import physics
    from game_server.core.tracks import load_track
    from game_server.play import run_play

    _no_display("play")
    track = load_track(config.track)
    if not config.record:
        run_play(track, physics.step)
        return 0
    import dataclasses

    from game_server.play_recording import PlayRecorder
    from pipeline.pools import collector_for

    with collector_for(config.recording.collector or None, None, config.out_dir / "redis") as (address, _):
        recorder = PlayRecorder(dataclasses.replace(config.recording, collector=address), config.track)
        try:
            with contextlib.suppress(SystemExit):  # ursina quits with sys.exit when the window closes
                run_play(track, physics.step, record_hook=recorder)
        finally:
            runs = recorder.close()
    for run in runs:
        print(f"recorded {run.run_id}: {run.frames} frames, {run.acked} acknowledged, collector {address}")
    return 0


def _watch_config() -> type[Any]:
    from game_server.watch import WatchConfig

    return WatchConfig


def _no_display(command: str) -> None:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise SystemExit(
            f"rrp {command}: no display to open a window on (DISPLAY is not set); on a headless machine run it "
            f"under a virtual one: xvfb-run -s '-screen 0 1280x720x24' .venv/bin/rrp {command}"
        )


def watch(config: Any) -> int:
    from game_server.watch import run_watch

    _no_display("watch")
    follower = run_watch(config)
    return 1 if follower.error else 0


def register(commands: Commands) -> None:
    commands.add(
        "play",
        lambda: (_config(), play),
        help="drive the game yourself in a window (WASD or arrows, R reset, Esc quit)",
    )
    commands.add(
        "watch",
        lambda: (_watch_config(), watch),
        help="watch a live session of a game server in a window, with a chase camera (Esc quits); "
        "it only reads the session's states and never slows it",
    )
