"""Conversions between protobuf messages and core objects, with validation of what arrives."""

from __future__ import annotations

import math

import numpy as np

from game_server.core.state import CarState, Gate, LapState, SimState, mask_of
from game_server.core.track import Track
from plumbing.errors import InvalidArgument
from rallyrobopilot.v1 import sim_pb2

MAX_FRAME_W, MAX_FRAME_H = 640, 480
DEFAULT_FRAME_W, DEFAULT_FRAME_H = 128, 96


def _finite(name: str, *values: float) -> None:
    for v in values:
        if not math.isfinite(v):
            raise InvalidArgument(f"{name} must be finite")


def vec(x: float, y: float) -> sim_pb2.Vec2:
    return sim_pb2.Vec2(x_m=float(x), y_m=float(y))


def gate_to_pb(g: Gate) -> sim_pb2.Gate:
    return sim_pb2.Gate(a=vec(g.ax, g.ay), b=vec(g.bx, g.by))


def gate_from_pb(g: sim_pb2.Gate) -> Gate:
    _finite("gate", g.a.x_m, g.a.y_m, g.b.x_m, g.b.y_m)
    if g.a.x_m == g.b.x_m and g.a.y_m == g.b.y_m:
        raise InvalidArgument("gate end points must differ")
    return Gate(g.a.x_m, g.a.y_m, g.b.x_m, g.b.y_m)


def state_to_pb(s: SimState) -> sim_pb2.SimState:
    c, lap = s.car, s.lap
    return sim_pb2.SimState(
        tick=s.tick,
        car=sim_pb2.CarState(x_m=c.x, y_m=c.y, heading_rad=c.heading, speed_m_per_s=c.speed),
        lap=sim_pb2.LapState(
            next_checkpoint=lap.next_checkpoint,
            checkpoints_passed=lap.checkpoints_passed,
            progress_m=lap.progress_m,
            arc_m=lap.arc_m,
            segment=lap.segment,
            wall_contacts=lap.wall_contacts,
            finished=lap.finished,
            finish_tick=lap.finish_tick,
        ),
    )


def state_from_pb(s: sim_pb2.SimState, *, finite: bool = True) -> SimState:
    """Structural checks only; whether the state fits the track is checked by the core. `finite=False`
    leaves non-finite numbers to the core, for a lap record whose impossible start is a refusal, not an error."""
    c, lap = s.car, s.lap
    if finite:
        _finite("car state", c.x_m, c.y_m, c.heading_rad, c.speed_m_per_s)
        _finite("lap state", lap.progress_m, lap.arc_m)
    return SimState(
        tick=s.tick,
        car=CarState(c.x_m, c.y_m, c.heading_rad, c.speed_m_per_s),
        lap=LapState(
            next_checkpoint=lap.next_checkpoint,
            checkpoints_passed=lap.checkpoints_passed,
            progress_m=lap.progress_m,
            arc_m=lap.arc_m,
            segment=lap.segment,
            wall_contacts=lap.wall_contacts,
            finished=lap.finished,
            finish_tick=lap.finish_tick,
        ),
    )


def controls_to_mask(c: sim_pb2.Controls) -> int:
    return mask_of(c.forward, c.back, c.left, c.right)


def mask_to_controls(mask: int) -> sim_pb2.Controls:
    return sim_pb2.Controls(forward=bool(mask & 1), back=bool(mask & 2), left=bool(mask & 4), right=bool(mask & 8))


def polyline(points: np.ndarray) -> list[sim_pb2.Vec2]:
    return [vec(x, y) for x, y in points.tolist()]


def track_to_pb(t: Track) -> sim_pb2.Track:
    return sim_pb2.Track(
        name=t.name,
        description=t.description,
        centerline=polyline(t.centerline),
        half_width_m=t.half_width.tolist(),
        left_wall=polyline(t.left_wall),
        right_wall=polyline(t.right_wall),
        start_line=gate_to_pb(t.start_line),
        finish_line=gate_to_pb(t.finish_line),
        checkpoints=[gate_to_pb(g) for g in t.checkpoints],
        base_state=state_to_pb(t.base_state),
        length_m=t.length_m,
        difficulty=t.difficulty,
    )


def track_summary(t: Track) -> sim_pb2.TrackSummary:
    return sim_pb2.TrackSummary(name=t.name, description=t.description, difficulty=t.difficulty, length_m=t.length_m)


def frame_size(options: sim_pb2.FrameOptions) -> tuple[int, int]:
    w = options.width_px or DEFAULT_FRAME_W
    h = options.height_px or DEFAULT_FRAME_H
    if not (16 <= w <= MAX_FRAME_W and 16 <= h <= MAX_FRAME_H):
        raise InvalidArgument(f"frame size {w}x{h} outside 16..{MAX_FRAME_W} x 16..{MAX_FRAME_H}")
    return w, h


def frame_to_pb(frame: np.ndarray) -> sim_pb2.Frame:
    h, w, _ = frame.shape
    return sim_pb2.Frame(width_px=w, height_px=h, rgb=np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
