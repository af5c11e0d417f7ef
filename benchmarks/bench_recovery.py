"""Recovery from pinned and wrong-way starts: the recovering teacher beside the reference and evolved drivers.

Prints one row per built-in track and start (and the free start's lap), each driver's lap ticks from that
start (what remains of the lap) or "stuck" with its progress, and a count of the starts each driver got out
of. The teacher is shown on both bases: the reference pilot and the evolved (or default) ray driver.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from game_server.core import drivers, episode, physics
from game_server.core.driver_file import load_driver
from game_server.core.pilot import ReferenceDriver
from game_server.core.recovery import RecoveringDriver, RecoveringPolicy, bend_apexes, pinned_state, wrong_way_state
from game_server.core.state import SimState
from game_server.core.track import Track
from game_server.core.tracks import BUILTIN_TRACKS, load_track


def outcome(track: Track, run: physics.RunResult) -> str:
    return str(run.lap_ticks) if run.finished else f"stuck {physics.progress_fraction(track, run.final_state.lap):.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--driver", type=Path, help="evolved driver file (best_driver.json); default: the default")
    parser.add_argument("--angle", type=float, default=1.5, help="how far the pinned car's nose points into the wall")
    parser.add_argument("--max-ticks", type=int, default=1500)
    args = parser.parse_args()
    ray = load_driver(args.driver).ray_driver() if args.driver else drivers.default_driver()
    evolved = "evolved" if args.driver else "default rays"
    names = ("teacher (reference base)", f"teacher ({evolved} base)", "reference", evolved)
    print(f"| track | start | {' | '.join(names)} |")
    print("| --- | --- |" + " --- |" * len(names))
    freed = dict.fromkeys(names, 0)
    total = 0
    t0 = time.perf_counter()
    for name in BUILTIN_TRACKS:
        track = load_track(name)
        n = track.n_points
        starts: list[tuple[str, SimState]] = [("free (base state)", track.base_state)]
        for point in dict.fromkeys((n // 8, bend_apexes(track)[0], n // 3, 2 * n // 3)):
            starts.append((f"pinned @{point}", pinned_state(track, point, args.angle)))
            starts.append((f"wrong way @{point}", wrong_way_state(track, point)))
        for label, start in starts:
            reference = ReferenceDriver(track)
            runs = (
                episode.run_episode(track, start, RecoveringPolicy(RecoveringDriver(track)), max_ticks=args.max_ticks),
                episode.run_episode(
                    track, start, RecoveringPolicy(RecoveringDriver(track, base=ray.act)), max_ticks=args.max_ticks
                ),
                episode.run_episode(
                    track,
                    start,
                    episode.StatePolicy(lambda _t, s, d=reference: d.act(s), track),
                    max_ticks=args.max_ticks,
                ),
                episode.run_episode(track, start, episode.SensorPolicy(ray.act_on), max_ticks=args.max_ticks),
            )
            if start is not track.base_state:
                total += 1
                for key, run in zip(names, runs, strict=True):
                    freed[key] += run.result.finished
            print(f"| {name} | {label} | " + " | ".join(outcome(track, r.result) for r in runs) + " |")
    print()
    print("starts got out of and finished: " + ", ".join(f"{k} {v}/{total}" for k, v in freed.items()))
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
