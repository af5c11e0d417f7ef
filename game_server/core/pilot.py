"""Reference driver: a non-learned, privileged pure-pursuit controller on a racing line, with the binary keys."""

from __future__ import annotations

import functools
import math

import numpy as np

from game_server.core.drivers import run_policy
from game_server.core.physics import (
    BRAKE_DECEL,
    MIN_TURN_RADIUS,
    TOP_SPEED,
    TURN_RADIUS_GAIN,
    RunResult,
    turn_radius,
)
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, SimState
from game_server.core.track import Track, curvature_of
from game_server.core.trig import sincos

# The car drives circles of radius 2 r(v); aim for this share of that radius limit so bang-bang steering
# has room to correct, and brake a little below the car's 50 m/s^2.
_RADIUS_SHARE = 0.75
_BRAKE_PLAN = 0.7 * BRAKE_DECEL
_MIN_SPEED = 4.0
# Distance kept between the racing line and the barriers: the car's radius and room to correct.
_LINE_MARGIN_M = 2.5
CENTRE = "centre"
RACING = "racing"


@functools.lru_cache(maxsize=32)
def racing_line(track: Track, margin_m: float = _LINE_MARGIN_M, iterations: int = 3000) -> np.ndarray:
    """A minimum-curvature line: centre-line points moved along their normals, within the barriers.

    Projected gradient descent on the sum of squared second differences of the path (a discrete
    curvature energy), each point clipped to |offset| <= half width - margin.
    """
    centre = track.centerline
    tangent = track.point_tangent
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    bound = np.maximum(track.half_width - margin_m, 0.0)
    offset = np.zeros(track.n_points)
    step_size = 1.0 / 40.0  # below 2 / the largest eigenvalue (16) of the squared second difference
    for _ in range(iterations):
        path = centre + normal * offset[:, None]
        second = np.roll(path, 1, axis=0) - 2.0 * path + np.roll(path, -1, axis=0)
        force = np.roll(second, 1, axis=0) - 2.0 * second + np.roll(second, -1, axis=0)
        offset = np.clip(offset - step_size * 2.0 * np.sum(force * normal, axis=1), -bound, bound)
    line = np.asarray(centre + normal * offset[:, None])
    line.setflags(write=False)  # cached and shared
    return line


class ReferenceDriver:
    """Pure pursuit on a line (the racing line by default, or the centre line) plus a speed profile derived
    from the car's turning law: the fastest speed whose turning circle fits the line's curvature, braking
    in time for the next corner."""

    def __init__(self, track: Track, look_ahead_s: float = 0.35, dead_band: float = 0.3, line: str = RACING) -> None:
        self.track = track
        self.look_ahead_s = look_ahead_s
        self.dead_band = dead_band
        n = track.n_points
        if line == RACING:
            path = racing_line(track)
        elif line == CENTRE:
            path = track.centerline
        else:
            raise ValueError(f"line must be {RACING!r} or {CENTRE!r}")
        # Curvature seen by the car: the tightest within a few points either side.
        kappa = np.abs(curvature_of(path))
        tight = np.max(np.stack([np.roll(kappa, s) for s in range(-3, 4)]), axis=0)
        radius_budget = np.maximum(_RADIUS_SHARE / (2.0 * np.maximum(tight, 1e-9)) - MIN_TURN_RADIUS, 0.0)
        corner = TOP_SPEED * np.minimum(radius_budget / TURN_RADIUS_GAIN, 1.0) ** (2.0 / 3.0)
        limit = np.maximum(corner, _MIN_SPEED)
        # Backward pass (twice round the loop): never arrive at a point faster than braking allows.
        seg_len = track.seg_len
        for _ in range(2):
            for i in range(n - 1, -1, -1):
                nxt = limit[(i + 1) % n]
                limit[i] = min(limit[i], math.sqrt(nxt * nxt + 2.0 * _BRAKE_PLAN * seg_len[i]))
        self.speed_limit = limit.tolist()
        self.cum_arc = track.cum_arc
        self.cx = path[:, 0]
        self.cy = path[:, 1]

    def _point_at(self, arc: float) -> tuple[float, float]:
        arc = arc % self.track.length_m
        i = int(np.searchsorted(self.cum_arc, arc, side="right")) - 1
        j = (i + 1) % self.track.n_points
        f = (arc - self.cum_arc[i]) / self.track.seg_len[i]
        return self.cx[i] + f * (self.cx[j] - self.cx[i]), self.cy[i] + f * (self.cy[j] - self.cy[i])

    def act(self, state: SimState) -> int:
        """The keys for the next tick."""
        car, seg = state.car, state.lap.segment
        v = car.speed
        n = self.track.n_points
        # Speed: the tightest limit over the next ~0.25 s of travel.
        reach = max(2, int(abs(v) * 0.25 / 3.0) + 2)
        target = min(self.speed_limit[(seg + k) % n] for k in range(reach))
        keys = 0
        if v < target - 0.3:
            keys |= FORWARD
        elif v > target + 1.0:
            keys |= BACK
        # Steering: pure pursuit towards a centre-line point a speed-proportional distance ahead.
        along = (car.x - self.cx[seg]) * self.track.tangent[seg, 0] + (car.y - self.cy[seg]) * self.track.tangent[
            seg, 1
        ]
        look = 4.0 + self.look_ahead_s * abs(v)
        px, py = self._point_at(float(self.cum_arc[seg]) + along + look)
        s, c = sincos(car.heading)
        dx, dy = px - car.x, py - car.y
        lateral = -s * dx + c * dy
        wanted = 2.0 * lateral / (dx * dx + dy * dy)  # curvature of the arc through the target point
        available = 1.0 / (2.0 * turn_radius(v))
        if wanted > self.dead_band * available:
            keys |= LEFT
        elif wanted < -self.dead_band * available:
            keys |= RIGHT
        return keys


def drive_lap(track: Track, max_ticks: int = 3000, line: str = RACING) -> tuple[bytes, RunResult]:
    """Drives one lap from the base state; returns the control program and its evaluation."""
    driver = ReferenceDriver(track, line=line)
    result, program = run_policy(track, track.base_state, lambda _track, state: driver.act(state), max_ticks=max_ticks)
    return program, result
