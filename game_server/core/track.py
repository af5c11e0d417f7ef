"""Track geometry: a closed centre line with a width, barriers either side, start/finish and checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from game_server.core.state import CarState, Gate, LapState, SimState

# Extra room required beyond the half width: the curvature radius must exceed half_width + this, so the
# barriers (offset curves) stay smooth and a car pushed past a barrier still projects onto the right segment.
RADIUS_MARGIN_M = 3.0
# Least gap between the barriers of two different stretches of the track.
CLEARANCE_M = 3.0


@dataclass(frozen=True, eq=False)
class Track:
    """A closed circuit. Arrays are float64 and read-only; index i of every array is centre-line point i."""

    name: str
    description: str
    difficulty: int
    centerline: np.ndarray  # (N, 2) closed polyline, driving order; point N-1 connects to point 0
    half_width: np.ndarray  # (N,) metres
    left_wall: np.ndarray  # (N, 2)
    right_wall: np.ndarray  # (N, 2)
    start_line: Gate
    finish_line: Gate
    checkpoints: tuple[Gate, ...]
    checkpoint_segments: tuple[int, ...]  # centre-line index each checkpoint gate sits on
    length_m: float
    base_state: SimState
    # Derived per segment i (point i -> point i+1): length, unit tangent, cumulative arc at point i.
    seg_len: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    tangent: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 2)))
    cum_arc: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    # Derived per point i: unit tangent of the corner bisector (mean of the adjoining segments) and the
    # signed curvature (1/m, positive turning left) of the circle through points i-1, i, i+1.
    point_tangent: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 2)))
    curvature: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @property
    def n_points(self) -> int:
        return int(self.centerline.shape[0])


def _norm(v: np.ndarray) -> np.ndarray:
    # sqrt of a sum of squares, not np.hypot: correctly rounded everywhere, so geometry is portable.
    return np.asarray(np.sqrt(v[:, 0] * v[:, 0] + v[:, 1] * v[:, 1]))


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0])


def _gate_across(left: np.ndarray, right: np.ndarray, centerline: np.ndarray, i: int) -> Gate:
    # From the left barrier to the right one (5% beyond each): a car driving forward passes from the
    # gate's right-hand side to its left-hand side, as sim.proto defines a crossing.
    c = centerline[i]
    a = c + (left[i] - c) * 1.05
    b = c + (right[i] - c) * 1.05
    return Gate(float(a[0]), float(a[1]), float(b[0]), float(b[1]))


def curvature_of(pts: np.ndarray) -> np.ndarray:
    """Signed Menger curvature at each point of a closed polyline (1/m, positive to the left)."""
    prev = np.roll(pts, 1, axis=0)
    nxt = np.roll(pts, -1, axis=0)
    a, b, c = pts - prev, nxt - pts, nxt - prev
    return np.asarray(2.0 * _cross(a, b) / (_norm(a) * _norm(b) * _norm(c)))


def build_track(
    name: str,
    description: str,
    difficulty: int,
    centerline: np.ndarray,
    half_width: np.ndarray | float,
    n_checkpoints: int = 16,
) -> Track:
    """Derives barriers, gates and the base state from a closed centre line."""
    pts = np.ascontiguousarray(centerline, dtype=np.float64)
    n = pts.shape[0]
    hw = np.broadcast_to(np.asarray(half_width, dtype=np.float64), (n,)).copy()
    d = np.roll(pts, -1, axis=0) - pts
    seg_len = _norm(d)
    tangent = d / seg_len[:, None]
    # Point tangent: mean of the incoming and outgoing segments, so barriers join smoothly and the
    # barrier vertices lie on the bisectors that separate consecutive segments.
    pt_tan = tangent + np.roll(tangent, 1, axis=0)
    pt_tan /= _norm(pt_tan)[:, None]
    normal = np.stack([-pt_tan[:, 1], pt_tan[:, 0]], axis=1)  # left of the direction of travel
    left = pts + normal * hw[:, None]
    right = pts - normal * hw[:, None]
    cum = np.cumsum(seg_len)
    cum_arc = np.concatenate([[0.0], cum[:-1]])
    length = float(cum[-1])
    start = _gate_across(left, right, pts, 0)
    cp_idx = tuple(round(k * n / n_checkpoints) % n for k in range(1, n_checkpoints))
    checkpoints = tuple(_gate_across(left, right, pts, i) for i in cp_idx)
    heading = math.atan2(float(tangent[0, 1]), float(tangent[0, 0]))
    if heading >= math.pi:
        heading = -math.pi
    base = SimState(tick=0, car=CarState(float(pts[0, 0]), float(pts[0, 1]), heading, 0.0), lap=LapState())
    curvature = curvature_of(pts)
    for arr in (pts, hw, left, right, seg_len, tangent, cum_arc, pt_tan, curvature):
        arr.setflags(write=False)
    return Track(
        name=name,
        description=description,
        difficulty=difficulty,
        centerline=pts,
        half_width=hw,
        left_wall=left,
        right_wall=right,
        start_line=start,
        finish_line=start,
        checkpoints=checkpoints,
        checkpoint_segments=cp_idx,
        length_m=length,
        base_state=base,
        seg_len=seg_len,
        tangent=tangent,
        cum_arc=cum_arc,
        point_tangent=pt_tan,
        curvature=curvature,
    )


def min_radius_m(track: Track) -> float:
    """Tightest curvature radius of the centre line."""
    return float(1.0 / np.abs(track.curvature).max())


def radius_fits(track: Track) -> bool:
    """Every curvature radius exceeds the local half width plus a margin (the inner barrier stays smooth)."""
    return bool(np.all(np.abs(track.curvature) * (track.half_width + RADIUS_MARGIN_M) < 1.0))


def stretches_clear(track: Track) -> bool:
    """Points far apart along the track are far apart in the plane: different stretches never touch."""
    pts, hw, cum = track.centerline, track.half_width, track.cum_arc
    sep = np.abs(cum[:, None] - cum[None, :])
    sep = np.minimum(sep, track.length_m - sep)
    far = sep > math.pi * (float(hw.max()) + RADIUS_MARGIN_M)
    diff = pts[:, None, :] - pts[None, :, :]
    dist2 = diff[..., 0] ** 2 + diff[..., 1] ** 2
    need = hw[:, None] + hw[None, :] + CLEARANCE_M
    return bool(np.all(dist2[far] > (need * need)[far]))


def walls_intersect(track: Track) -> bool:
    """True if any two barrier segments (left or right, not neighbours) cross each other."""
    walls = [track.left_wall, track.right_wall]
    a = np.concatenate(walls)
    b = np.concatenate([np.roll(w, -1, axis=0) for w in walls])
    n = track.n_points
    idx = np.arange(2 * n)
    side, pos = idx // n, idx % n
    gap = np.abs(pos[:, None] - pos[None, :])
    neighbours = (side[:, None] == side[None, :]) & ((gap <= 1) | (gap == n - 1))

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return _cross(q - p, r - p)

    a1, b1, a2, b2 = a[:, None, :], b[:, None, :], a[None, :, :], b[None, :, :]
    crosses = (orient(a1, b1, a2) * orient(a1, b1, b2) < 0) & (orient(a2, b2, a1) * orient(a2, b2, b1) < 0)
    return bool(np.any(crosses & ~neighbours))


def geometry_ok(track: Track) -> bool:
    """All the shape rules a playable track must meet (checked for every generated track)."""
    return radius_fits(track) and stretches_clear(track) and not walls_intersect(track)
