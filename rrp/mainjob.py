"""The main job (`rrp run`): start the services, race, check, and write the report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from game_server import convert
from game_server.client import GameClient, frame_array
from game_server.core.pilot import ReferenceDriver
from game_server.core.state import TICK_HZ
from game_server.core.tracks import load_track
from game_server.trackmap import plot_laps, save_frame_strip
from rallyrobopilot.v1 import sim_pb2
from rrp.procs import start_service

log = logging.getLogger(__name__)

MAX_LAP_TICKS = 5_000


@dataclass(frozen=True)
class MainJobConfig:
    track: str = "kidney"
    out_dir: Path = Path("out/run")
    frames: int = 12


def run_main_job(config: MainJobConfig) -> int:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    track = load_track(config.track)
    t0 = time.monotonic()
    server = start_service(["game-server", "--port", "0"])
    print(f"[run] game server on {server.address} (pid {server.pid})", flush=True)
    try:
        with GameClient(server.address) as client:
            summary = _race(client, config, track)
    finally:
        server.stop()
    summary["wall_time_s"] = round(time.monotonic() - t0, 2)
    (config.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[run] wrote {config.out_dir}/lap.png, frames.png, summary.json", flush=True)
    return 0 if summary["finished"] else 1


def _race(client: GameClient, config: MainJobConfig, track) -> dict[str, object]:  # type: ignore[no-untyped-def]
    driver = ReferenceDriver(track)
    created = client.create_session(config.track, sim_pb2.FrameOptions(width_px=128, height_px=96))
    masks = bytearray()
    states: list[sim_pb2.SimState] = []

    def policy(obs: sim_pb2.Observation) -> int | None:
        if obs.state.lap.finished or obs.state.tick >= MAX_LAP_TICKS:
            return None
        mask = driver.act(convert.state_from_pb(obs.state))
        masks.append(mask)
        return mask

    t_drive = time.monotonic()
    for response in client.drive_lockstep(created.session_id, policy, created.observation):
        states.append(response.observation.state)
    drive_s = time.monotonic() - t_drive
    final = states[-1]
    finished = final.lap.finished
    lap_ticks = final.lap.finish_tick if finished else 0
    print(
        f"[run] reference driver on {config.track}: "
        + (f"lap {lap_ticks} ticks = {lap_ticks / TICK_HZ:.2f} s" if finished else "did not finish")
        + f", {final.lap.wall_contacts} wall-contact ticks, driven over Drive in {drive_s:.1f} s",
        flush=True,
    )

    evaluated = client.evaluate(config.track, bytes(masks), return_trajectory=True)
    identical = evaluated.result.final_state == final and list(evaluated.trajectory.x_m) == [
        s.car.x_m for s in states
    ]
    print(
        f"[run] Evaluate of the same {len(masks)} controls on the server: "
        f"{evaluated.result.lap_ticks} ticks, bit-identical trajectory: {identical}",
        flush=True,
    )

    # Camera frames along the lap: replay the controls with Step, asking for a frame at each stop.
    client.reset(created.session_id)
    n = max(1, config.frames)
    cuts = np.linspace(0, len(masks), n + 1).astype(int)[1:]
    frames, captions, prev = [], [], 0
    for cut in cuts:
        if cut <= prev:
            continue
        obs = client.step(created.session_id, bytes(masks[prev:cut]), with_frame=True)
        frames.append(frame_array(obs.frame))
        captions.append(f"t={obs.state.tick / TICK_HZ:.1f}s v={obs.state.car.speed_m_per_s:.0f}")
        prev = cut
    client.close_session(created.session_id)

    x = np.array([s.car.x_m for s in states])
    y = np.array([s.car.y_m for s in states])
    v = np.array([s.car.speed_m_per_s for s in states])
    title = f"{config.track}: reference driver " + (
        f"{lap_ticks / TICK_HZ:.2f} s" if finished else "(no finish)"
    )
    plot_laps(track, [("reference driver", x, y, v)], config.out_dir / "lap.png", title)
    save_frame_strip(frames, captions, config.out_dir / "frames.png")
    return {
        "track": config.track,
        "finished": finished,
        "lap_ticks": lap_ticks,
        "lap_time_s": lap_ticks / TICK_HZ,
        "wall_contact_ticks": final.lap.wall_contacts,
        "evaluate_identical": identical,
        "top_speed_m_per_s": float(v.max()),
        "drive_stream_s": round(drive_s, 2),
    }
