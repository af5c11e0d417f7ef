"""Benchmark: what watching costs a race, and what a lap video costs.

A game server runs in its own process; the driving client runs here; the watchers (WatchSession streams at
60 states a second, read as fast as they come) run in a third process, as `rrp watch` would. Printed: a lockstep
oval lap over gRPC, unwatched against watched (interleaved rounds, medians), the missed ticks of a watched
real-time drive (target 0), and one alpine lap filmed at 320x240, every 2nd tick (time and size; target < 3 MB).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from game_server.client import GameClient
from game_server.core.pilot import drive_lap
from game_server.core.tracks import load_track
from game_server.video import lap_video
from plumbing.procs import start_service
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, sim_pb2

WATCHERS = 2
REALTIME_TICKS = 100
VIDEO_TARGET_BYTES = 3 * 1024 * 1024

_WATCHERS_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from game_server.client import GameClient
    client = GameClient(sys.argv[1])
    streams = [client.watch(sys.argv[2], 60, timeout_s=600) for _ in range(int(sys.argv[3]))]
    for s in streams:
        next(s)
    print("attached", flush=True)
    threads = [threading.Thread(target=lambda s=s: sum(1 for _ in s)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    """
)


def lockstep_lap_s(client: GameClient, session_id: str, keys: bytes) -> float:
    first = client.reset(session_id)
    t0 = time.perf_counter()
    for _ in client.drive_lockstep(
        session_id, lambda o: keys[o.state.tick] if o.state.tick < len(keys) else None, first
    ):
        pass
    return time.perf_counter() - t0


def watched(address: str, session_id: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WATCHERS_SCRIPT, address, session_id, str(WATCHERS)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
    return proc


def realtime_missed(client: GameClient, session_id: str, keys: bytes) -> int:
    stub = game_pb2_grpc.GameServiceStub(client.channel)

    def requests():  # type: ignore[no-untyped-def]
        start = game_pb2.DriveStart(session_id=session_id, mode=game_pb2.DRIVE_MODE_REALTIME, max_ticks=REALTIME_TICKS)
        yield game_pb2.DriveRequest(start=start)
        for tick in range(REALTIME_TICKS):
            m = keys[tick]
            controls = sim_pb2.Controls(forward=bool(m & 1), back=bool(m & 2), left=bool(m & 4), right=bool(m & 8))
            yield game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=tick, controls=controls))

    client.reset(session_id)
    return int(list(stub.Drive(requests(), timeout=60))[-1].missed_ticks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keys = drive_lap(load_track("oval"))[0]
    server = start_service(["game-server", "--port", "0"])
    plain: list[float] = []
    seen: list[float] = []
    try:
        with GameClient(server.address) as client:
            for _ in range(args.rounds):
                with client.session("oval") as s:
                    plain.append(lockstep_lap_s(client, s.session_id, keys))
                with client.session("oval") as s:
                    proc = watched(server.address, s.session_id)
                    seen.append(lockstep_lap_s(client, s.session_id, keys))
                proc.wait(30)
            with client.session("oval") as s:
                proc = watched(server.address, s.session_id)
                missed = realtime_missed(client, s.session_id, keys)
            proc.wait(30)
    finally:
        server.stop()
    p, w = statistics.median(plain) * 1000, statistics.median(seen) * 1000
    print(f"lockstep oval lap ({len(keys)} ticks) over gRPC, median of {args.rounds}:")
    print(f"  unwatched (baseline) {p:7.0f} ms")
    print(f"  {WATCHERS} watchers at 60 Hz  {w:7.0f} ms  ({w / p:.2f}x)")
    print(f"real-time drive of {REALTIME_TICKS} ticks with {WATCHERS} watchers: {missed} missed ticks (target 0)")
    alpine = drive_lap(load_track("alpine"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = lap_video("alpine", alpine, Path(tmp) / "alpine.webp")
        took, size = time.perf_counter() - t0, path.stat().st_size
    print(
        f"lap video: alpine, {len(alpine)} ticks, 320x240 every 2nd tick: {took:.1f} s, {size / 1e6:.2f} MB "
        f"(target < {VIDEO_TARGET_BYTES / 2**20:.0f} MB; the lap itself lasts {len(alpine) / 25:.1f} s)"
    )
    return 0 if missed == 0 and size < VIDEO_TARGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
