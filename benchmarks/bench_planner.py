"""The planner against the evolved driver it rolls out: lap ticks per track, their ratio, and the planner's cost.

One row per track (the built-ins, the 20 held-out technical tracks, a few held-out smooth ones): the evolved
driver's lap from the base state, the planner's (`plan_lap`: never slower, the driver's own lap when it is not
beaten), the ratio, and the planner's wall and CPU seconds for the lap. Then the medians per family. Targets
(issue 22): <= 0.96 on alpine and on the technical median, <= 1.00 on the smooth ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from game_server.core.driver_file import load_driver
from game_server.core.drivers import run_driver
from game_server.core.planner import PlannerConfig, plan_lap
from game_server.core.tracks import BUILTIN_TRACKS, SUITE_TECH_TRACKS, SUITE_UNSEEN_TRACKS, load_track

DEFAULT_DRIVER = Path(__file__).resolve().parent.parent / "tests" / "data" / "evolved_driver.json"


@dataclass(frozen=True)
class Row:
    track: str
    family: str
    driver_ticks: int  # 0: did not finish
    planner_ticks: int
    source: str
    wall_s: float
    cpu_s: float


def measure(job: str) -> str:
    """One track's row; only JSON text crosses to and from the worker processes."""
    name, family, driver_path = json.loads(job)
    driver, config = load_driver(Path(driver_path)).ray_driver(), PlannerConfig()
    track = load_track(name)
    own = run_driver(track, track.base_state, driver, max_ticks=config.max_ticks)
    wall, cpu = time.perf_counter(), time.process_time()
    plan = plan_lap(track, track.base_state, driver, config)
    row = Row(
        name,
        family,
        own.lap_ticks if own.finished else 0,
        plan.result.lap_ticks if plan.result.finished else 0,
        plan.source,
        time.perf_counter() - wall,
        time.process_time() - cpu,
    )
    return json.dumps(asdict(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--driver", type=Path, default=DEFAULT_DRIVER, help="evolved driver file (best_driver.json)")
    parser.add_argument("--smooth", type=int, default=5, help="how many held-out smooth tracks")
    parser.add_argument("--technical", type=int, default=20, help="how many held-out technical tracks")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="tracks measured at once")
    parser.add_argument("--quick", action="store_true", help="5 technical and 2 smooth tracks")
    args = parser.parse_args()
    if args.quick:
        args.technical, args.smooth = min(args.technical, 5), min(args.smooth, 2)
    config, driver = PlannerConfig(), str(args.driver)
    jobs = [
        *(json.dumps([name, "built-in", driver]) for name in BUILTIN_TRACKS),
        *(json.dumps([name, "technical", driver]) for name in SUITE_TECH_TRACKS[: args.technical]),
        *(json.dumps([name, "smooth", driver]) for name in SUITE_UNSEEN_TRACKS[: args.smooth]),
    ]
    print(f"planner {config}; driver {args.driver}; {args.jobs} processes; load average {os.getloadavg()[0]:.1f}")
    print("| track | family | evolved driver | planner | ratio | planner's lap from | planner wall s | planner CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    t0 = time.perf_counter()
    rows: list[Row] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for text in pool.map(measure, jobs):  # in order, printed as they come
            r = Row(**json.loads(text))
            rows.append(r)
            ratio = f"{r.planner_ticks / r.driver_ticks:.3f}" if r.driver_ticks and r.planner_ticks else "-"
            print(
                f"| {r.track} | {r.family} | {r.driver_ticks or 'DNF'} | {r.planner_ticks or 'DNF'} | {ratio} | "
                f"{r.source} | {r.wall_s:.1f} | {r.cpu_s:.1f} |",
                flush=True,
            )
    print()
    print("| family | driver finished | planner finished | median ratio (both finished) | CPU s per lap (median) |")
    print("| --- | --- | --- | --- | --- |")
    for family in ("built-in", "technical", "smooth"):
        mine = [r for r in rows if r.family == family]
        ratios = [r.planner_ticks / r.driver_ticks for r in mine if r.driver_ticks and r.planner_ticks]
        median = f"{statistics.median(ratios):.3f}" if ratios else "-"
        print(
            f"| {family} | {sum(bool(r.driver_ticks) for r in mine)}/{len(mine)} | "
            f"{sum(bool(r.planner_ticks) for r in mine)}/{len(mine)} | {median} | "
            f"{statistics.median(r.cpu_s for r in mine):.1f} |"
        )
    print(f"\n{len(rows)} tracks in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
