"""Invariant 1 end to end: the same controls give bit-identical trajectories on any server and through any RPC."""

from __future__ import annotations

from collections.abc import Iterator

from game_server.client import GameClient
from game_server.core.episode import run_program
from game_server.core.pilot import drive_lap
from game_server.core.tracks import load_track
from plumbing.procs import ServiceProcess
from rallyrobopilot.v1 import sim_pb2
from tests.test_game_service import random_program


def _trajectory_via_step(client: GameClient, track: str, masks: bytes) -> list[sim_pb2.SimState]:
    sid = client.create_session(track).session_id
    try:
        return [client.step(sid, bytes([m])).state for m in masks]
    finally:
        client.close_session(sid)


def _trajectory_via_drive(client: GameClient, track: str, masks: bytes) -> list[sim_pb2.SimState]:
    created = client.create_session(track)
    it: Iterator[int] = iter(masks)
    try:
        responses = client.drive_lockstep(created.session_id, lambda _obs: next(it, None), created.observation)
        return [r.observation.state for r in responses]
    finally:
        client.close_session(created.session_id)


def test_same_program_same_lap_everywhere(game_server_processes: list[ServiceProcess]) -> None:
    track = "kidney" if "kidney" in {t.name for t in _tracks(game_server_processes[0])} else "oval"
    masks, _ = drive_lap(load_track(track))
    local = run_program(load_track(track), load_track(track).base_state, masks, record_trajectory=True)
    assert local.finished and local.trajectory is not None
    results = []
    for proc in game_server_processes:
        with GameClient(proc.address) as c:
            results.append(c.evaluate(track, masks, return_trajectory=True))
    a, b = results
    assert a == b
    assert a.result.finished and a.result.lap_ticks == local.lap_ticks
    assert list(a.trajectory.x_m) == local.trajectory.x.tolist()  # bit-identical to the in-process run


def _tracks(proc: ServiceProcess) -> list[sim_pb2.TrackSummary]:
    with GameClient(proc.address) as c:
        return c.list_tracks()


def test_step_drive_evaluate_agree(game_server_processes: list[ServiceProcess]) -> None:
    masks = random_program(11, 300)
    p0, p1 = game_server_processes
    with GameClient(p0.address) as c0, GameClient(p1.address) as c1:
        via_step = _trajectory_via_step(c0, "oval", masks)
        via_drive = _trajectory_via_drive(c1, "oval", masks)
        evaluated = c1.evaluate("oval", masks, return_trajectory=True)
    assert via_step == via_drive
    tr = evaluated.trajectory
    assert [s.car.x_m for s in via_step] == list(tr.x_m)
    assert [s.car.y_m for s in via_step] == list(tr.y_m)
    assert [s.car.heading_rad for s in via_step] == list(tr.heading_rad)
    assert [s.car.speed_m_per_s for s in via_step] == list(tr.speed_m_per_s)
    assert via_step[-1] == evaluated.result.final_state
    local = run_program(load_track("oval"), load_track("oval").base_state, masks)
    assert local.final_state.car.x == via_step[-1].car.x_m


def test_evaluate_from_midpoint_state_continues_identically(
    game_server_processes: list[ServiceProcess],
) -> None:
    masks = random_program(5, 400)
    with GameClient(game_server_processes[0].address) as c:
        whole = c.evaluate("oval", masks).result
        first = c.evaluate("oval", masks[:170]).result
        rest = c.evaluate("oval", masks[170:], start_state=first.final_state).result
    assert rest.final_state == whole.final_state
