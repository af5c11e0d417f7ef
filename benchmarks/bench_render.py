"""Benchmark: offscreen 128x96 frames per second, drawn by ursina, along a track, beside 25 Hz real time."""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from game_server.core.state import CarState, SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track
from game_server.render import FrameSpec, shared_renderer

REAL_TIME_HZ = 25.0
TARGET_FPS = 1000.0


def lap_states(track: Track, frames: int) -> list[SimState]:
    """The car driving once around the centre line, one state per frame."""
    idx = np.linspace(0, track.n_points, frames, endpoint=False).astype(int)
    return [
        SimState(
            tick=i,
            car=CarState(
                float(track.centerline[k, 0]),
                float(track.centerline[k, 1]),
                math.atan2(float(track.tangent[k, 1]), float(track.tangent[k, 0])),
                20.0,
            ),
        )
        for i, k in enumerate(idx)
    ]


def frames_per_second(track: Track, states: list[SimState], spec: FrameSpec, repeats: int) -> tuple[float, float]:
    """Median frames per wall-clock second and per CPU second (all threads: the per-core rate)."""
    renderer = shared_renderer()
    renderer.render(track, states[0], spec)  # build the scene and buffer outside the timing
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for state in states:
            renderer.render(track, state, spec)
        wall.append(len(states) / (time.perf_counter() - start))
        cpu.append(len(states) / (time.process_time() - start_cpu))
    return statistics.median(wall), statistics.median(cpu)


def rss_mb() -> float:
    """Resident memory now (Linux), not the peak: what the renderer keeps."""
    with open("/proc/self/status") as status:
        rss_kb = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
    return int(rss_kb) / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats (a smoke run)")
    parser.add_argument("--track", default="oval", help="track name, as `rrp play --track` (default: oval)")
    args = parser.parse_args(argv)
    frames, repeats = (200, 3) if args.quick else (2000, 7)
    track = load_track(args.track)
    states = lap_states(track, frames)
    plain = frames_per_second(track, states, FrameSpec(), repeats)
    randomized = frames_per_second(track, states, FrameSpec(randomize=True, seed=7), repeats)

    def row(label: str, rates: tuple[float, float], note: str = "") -> None:
        print(f"{label:<38}{rates[0]:7.0f} frames/s, {rates[1]:7.0f} per CPU-second{note}")

    print(f"track {track.name}: {track.n_points} points, {track.length_m:.0f} m")
    row("rendered frames 128x96, track scene:", plain, f"  (target >= {TARGET_FPS:.0f} per core)")
    row("  with domain randomisation:", randomized)
    print(f"{'  baseline, real time:':<38}{REAL_TIME_HZ:7.0f} frames/s  ({plain[0] / REAL_TIME_HZ:.0f}x)")
    print(f"{'process RSS after rendering:':<38}{rss_mb():7.0f} MB")
    shared_renderer().close()


if __name__ == "__main__":
    main()
