"""Game server figures: Evaluate over gRPC against the same run in process, and the RSS of 16 rendering sessions."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from game_server.client import GameClient
from game_server.core.episode import run_program
from game_server.core.pilot import drive_lap
from game_server.core.state import TICK_HZ
from game_server.core.tracks import load_track
from plumbing.procs import start_service
from rallyrobopilot.v1 import sim_pb2


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--track", default="oval")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    track = load_track(args.track)
    masks, lap = drive_lap(track)
    ticks = lap.ticks
    server = start_service(["game-server", "--port", "0", "--max-sessions", "32"])
    try:
        with GameClient(server.address) as client:
            client.evaluate(args.track, masks)  # warm the server's track cache
            local_s = median_time(lambda: run_program(track, track.base_state, masks), repeats)
            remote_s = median_time(lambda: client.evaluate(args.track, masks), repeats)
            traj_s = median_time(lambda: client.evaluate(args.track, masks, return_trajectory=True), repeats)
            print(f"Evaluate of one {ticks}-tick lap on {args.track} (median of {repeats}):")
            print(f"  in process            {local_s * 1e3:8.2f} ms  ({ticks / local_s:>10,.0f} ticks/s)")
            print(
                f"  over gRPC             {remote_s * 1e3:8.2f} ms  ({ticks / remote_s:>10,.0f} ticks/s)"
                f"  overhead {100 * (remote_s / local_s - 1):+.1f}%"
            )
            print(f"  over gRPC + trajectory{traj_s * 1e3:8.2f} ms  overhead {100 * (traj_s / local_s - 1):+.1f}%")
            print(
                f"  25 Hz real time       {ticks / TICK_HZ * 1e3:8.0f} ms  -> in process is "
                f"{ticks / TICK_HZ / local_s:,.0f}x real time"
            )

            base_rss = rss_mb(server.pid)
            sessions = []
            opts = sim_pb2.FrameOptions(width_px=128, height_px=96, domain_randomization=True)
            tracks = ["oval", "kidney", "alpine", "gen-1", "gen-2", "gen-3", "gen-4", "gen-5"]
            for i in range(16):
                opts.randomization_seed = i
                sessions.append(client.create_session(tracks[i % len(tracks)], opts).session_id)
            t0 = time.perf_counter()
            frames = 0
            for _ in range(3):
                for i, sid in enumerate(sessions):
                    client.step(sid, masks[: 40 + 30 * i], with_frame=True)
                    frames += 1
            render_s = time.perf_counter() - t0
            peak = rss_mb(server.pid)
            print(
                f"game server RSS: {base_rss:.0f} MB idle -> {peak:.0f} MB with 16 sessions rendering "
                f"{frames} frames on {len(set(tracks))} tracks (target <= 400 MB); "
                f"{frames / render_s:.0f} Step+frame calls/s over gRPC"
            )
            for sid in sessions:
                client.close_session(sid)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
