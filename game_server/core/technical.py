"""Technical tracks, tech-<seed>: hairpins, chicanes, switchbacks, narrow sections, long straights into tight corners.

A track is a plan of straights and circular arcs, each with its own half width, drawn like a road
surveyor's plan. The arcs' turns sum to one full turn; the lengths of the plain straights are then solved so
that the drawing closes exactly (a small weighted least-squares problem), and the shape is redrawn from a
sub-seed until it passes the same geometry checks as every other track. Arithmetic is `+ - * /`, `sqrt`,
`trig.sincos` and the seeded generator, so a seed gives bytes-equal arrays in any process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from game_server.core.track import Track, build_track, geometry_ok
from game_server.core.trig import PI, TWO_PI, sincos, sincos_array
from plumbing.errors import InvalidArgument

TECH_PREFIX = "tech-"
SPACING_M = 3.0  # centre-line point spacing after resampling, as for every track
_SALT = 0x7EC4  # keeps this family's draws apart from gen-<seed>'s for the same seed
_ATTEMPTS = 200
_DRAW_STEP_M = 0.25
_MIN_LENGTH_M, _MAX_LENGTH_M = 650.0, 1500.0
_FIRST_STRAIGHT_M = 40.0  # the start line sits at the beginning of a straight at least this long
_MIN_STRAIGHT_M = 12.0
_WIDTH_RAMP_POINTS = 7  # ~20 m: width changes are spread over this many points


@dataclass(frozen=True)
class Piece:
    """A straight (turn 0) or a circular arc; a `free` straight's length is solved to close the loop."""

    length_m: float  # straights only
    radius_m: float  # arcs only
    turn_rad: float  # signed, positive to the left; 0 for a straight
    half_width_m: float
    free: bool = False
    min_length_m: float = _MIN_STRAIGHT_M


def _deg(d: float) -> float:
    return d * (PI / 180.0)


def _wrap(h: float) -> float:
    """An angle brought into [-pi, pi), where `trig.sincos` is exact."""
    while h >= PI:
        h -= TWO_PI
    while h < -PI:
        h += TWO_PI
    return h


def _arc_end(x: float, y: float, h: float, radius: float, turn: float) -> tuple[float, float, float]:
    side = 1.0 if turn > 0.0 else -1.0
    s, c = sincos(h)
    cx, cy = x - side * radius * s, y + side * radius * c
    phi = _wrap(h - side * (PI / 2.0) + turn)
    sp, cp = sincos(phi)
    return cx + radius * cp, cy + radius * sp, _wrap(h + turn)


def _plan(rng: np.random.Generator) -> list[Piece]:
    """Corners turning one full turn overall (a few against it), straights between them, chicanes, a
    switchback and narrow stretches; free straights get their drawn length as a first guess."""
    hw = float(rng.uniform(5.5, 7.5))
    r_tight = hw + 4.0  # every radius exceeds the widest half width + 3 m (`radius_fits`) with a metre to spare
    # (degrees, radius): a few corners against the main direction make S-bends and a concave side.
    corners: list[tuple[float, float]] = [
        (-float(rng.uniform(35.0, 90.0)), float(rng.uniform(20.0, 40.0))) for _ in range(int(rng.integers(0, 3)))
    ]
    total = sum(d for d, _ in corners)
    while 360.0 - total > 180.0:
        u = rng.random()
        if u < 0.3:  # hairpin
            deg, r = float(rng.uniform(150.0, 180.0)), float(rng.uniform(r_tight, r_tight + 6.0))
        elif u < 0.65:  # tight corner
            deg, r = float(rng.uniform(70.0, 120.0)), float(rng.uniform(r_tight, 24.0))
        elif u < 0.9:  # medium corner
            deg, r = float(rng.uniform(35.0, 80.0)), float(rng.uniform(24.0, 45.0))
        else:  # fast sweeper
            deg, r = float(rng.uniform(20.0, 50.0)), float(rng.uniform(50.0, 90.0))
        corners.append((deg, r))
        total += deg
    rest = 360.0 - total  # in (0, 180]
    if rest >= 25.0:
        corners.append((rest, float(rng.uniform(r_tight, 24.0) if rest >= 70.0 else rng.uniform(24.0, 45.0))))
    else:
        deg, r = corners[-1]
        corners[-1] = (deg + rest, r)
    order = rng.permutation(len(corners))
    corners = [corners[int(i)] for i in order]
    # Long straights lead into the two tightest corners (a late brake is where a fast lap is won).
    tightness = [abs(d) / r for d, r in corners]
    long_into = set(np.argsort(tightness)[-2:].tolist())
    narrow_hw = float(rng.uniform(4.0, 5.0))
    switchback = int(rng.integers(len(corners))) if rng.random() < 0.6 else -1
    chicanes = set(rng.choice(len(corners), size=int(rng.integers(0, 3)), replace=False).tolist())
    pieces: list[Piece] = []
    for i, (deg, r) in enumerate(corners):
        length = float(rng.uniform(150.0, 260.0) if i in long_into else rng.uniform(20.0, 70.0))
        minimum = _FIRST_STRAIGHT_M if i == 0 else _MIN_STRAIGHT_M
        if i in chicanes:  # a bus stop: in, across, back out onto the same line
            a, rc = _deg(float(rng.uniform(25.0, 45.0))), float(rng.uniform(15.0, 25.0))
            a = a if rng.random() < 0.5 else -a
            gap = float(rng.uniform(0.0, 8.0))
            pieces += [
                Piece(0.5 * length, 0.0, 0.0, hw, free=True, min_length_m=minimum),
                Piece(0.0, rc, a, hw),
                Piece(gap, 0.0, 0.0, hw),
                Piece(0.0, rc, -2.0 * a, hw),
                Piece(gap, 0.0, 0.0, hw),
                Piece(0.0, rc, a, hw),
                Piece(0.5 * length, 0.0, 0.0, hw, free=True),
            ]
        else:
            pieces.append(Piece(length, 0.0, 0.0, hw, free=True, min_length_m=minimum))
        turn = _deg(deg)
        if i == switchback and deg > 0.0:  # zig-zag up a slope: two hairpins, then the corner itself
            rs, leg = float(rng.uniform(r_tight, r_tight + 3.0)), float(rng.uniform(60.0, 150.0))
            pieces += [
                Piece(0.0, rs, PI, hw),
                Piece(leg, 0.0, 0.0, hw),
                Piece(0.0, rs, -PI, hw),
                Piece(leg, 0.0, 0.0, hw),
            ]
        pieces.append(Piece(0.0, r, turn, hw))
    # Narrow stretches: one to three runs of up to three pieces.
    for _ in range(int(rng.integers(1, 4))):
        first, run = int(rng.integers(len(pieces))), int(rng.integers(1, 4))
        for j in range(first, first + run):
            pieces[j % len(pieces)] = replace(pieces[j % len(pieces)], half_width_m=narrow_hw)
    if rng.random() < 0.5:  # clockwise
        pieces = [replace(p, turn_rad=-p.turn_rad) for p in pieces]
    return pieces


def _close(pieces: list[Piece]) -> list[Piece] | None:
    """The plan with its free straights' lengths changed (least change, relative to their length) so the
    drawing ends where it starts; None when no such lengths respect the minimum lengths."""
    x = y = h = 0.0
    heads: list[float] = []
    for p in pieces:
        heads.append(h)
        if p.turn_rad == 0.0:
            s, c = sincos(h)
            x, y = x + p.length_m * c, y + p.length_m * s
        else:
            x, y, h = _arc_end(x, y, h, p.radius_m, p.turn_rad)
    lengths = [p.length_m for p in pieces]
    free = [i for i, p in enumerate(pieces) if p.free]
    gx, gy = -x, -y
    for _ in range(len(free) + 1):
        dirs = {i: sincos(heads[i]) for i in free}  # (sin, cos)
        w2 = {i: lengths[i] * lengths[i] for i in free}
        mxx = math.fsum(w2[i] * dirs[i][1] * dirs[i][1] for i in free)
        mxy = math.fsum(w2[i] * dirs[i][1] * dirs[i][0] for i in free)
        myy = math.fsum(w2[i] * dirs[i][0] * dirs[i][0] for i in free)
        det = mxx * myy - mxy * mxy
        if not det > 1e-6 * (mxx * myy + 1.0):
            return None
        lx, ly = (myy * gx - mxy * gy) / det, (mxx * gy - mxy * gx) / det
        new = {i: lengths[i] + w2[i] * (dirs[i][1] * lx + dirs[i][0] * ly) for i in free}
        short = [i for i in free if new[i] < pieces[i].min_length_m]
        if not short:
            for i in free:
                lengths[i] = new[i]
            return [replace(p, length_m=lengths[i]) for i, p in enumerate(pieces)]
        for i in short:  # pinned at their minimum; the others close the rest of the gap
            s, c = dirs[i]
            d = pieces[i].min_length_m - lengths[i]
            lengths[i] = pieces[i].min_length_m
            gx, gy = gx - d * c, gy - d * s
        free = [i for i in free if i not in short]
        if len(free) < 2:
            return None
    return None


def _draw(pieces: list[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """Dense points (every ~0.25 m) and their half widths, from (0, 0) heading +x; the last point is not
    the first again."""
    x = y = h = 0.0
    xs: list[np.ndarray] = [np.zeros(1)]
    ys: list[np.ndarray] = [np.zeros(1)]
    ws: list[np.ndarray] = [np.full(1, pieces[-1].half_width_m)]
    for p in pieces:
        if p.turn_rad == 0.0:
            n = max(int(p.length_m / _DRAW_STEP_M), 1)
            k = np.arange(1, n + 1) / n
            s, c = sincos(h)
            px, py = x + k * (p.length_m * c), y + k * (p.length_m * s)
        else:
            side = 1.0 if p.turn_rad > 0.0 else -1.0
            n = max(int(abs(p.turn_rad) * p.radius_m / _DRAW_STEP_M), 1)
            s, c = sincos(h)
            cx, cy = x - side * p.radius_m * s, y + side * p.radius_m * c
            phi = h - side * (PI / 2.0) + p.turn_rad * (np.arange(1, n + 1) / n)
            phi = phi - TWO_PI * np.floor((phi + PI) / TWO_PI)
            sp, cp = sincos_array(phi)
            px, py = cx + p.radius_m * cp, cy + p.radius_m * sp
            h = _wrap(h + p.turn_rad)
        xs.append(px)
        ys.append(py)
        ws.append(np.full(n, p.half_width_m))
        x, y = float(px[-1]), float(py[-1])
    pts = np.stack([np.concatenate(xs), np.concatenate(ys)], axis=1)
    # Spread the closing error (rounding only: the plan closes exactly) over the lap.
    frac = np.arange(len(pts)) / (len(pts) - 1)
    pts = pts - frac[:, None] * pts[-1][None, :]
    return np.asarray(pts[:-1]), np.concatenate(ws)[:-1]


def _resample(dense: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points every ~3 m along the closed drawing, with their half widths ramped over ~20 m."""
    closed = np.concatenate([dense, dense[:1]])
    d = np.diff(closed, axis=0)
    cum = np.concatenate([[0.0], np.cumsum(np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]))])
    n = round(float(cum[-1]) / SPACING_M)
    s = np.arange(n) * (cum[-1] / n)
    pts = np.stack([np.interp(s, cum, closed[:, 0]), np.interp(s, cum, closed[:, 1])], axis=1)
    step = np.interp(s, cum, np.concatenate([widths, widths[:1]]))
    half = _WIDTH_RAMP_POINTS // 2
    ramp = sum((np.roll(step, k) for k in range(-half, half + 1)), start=np.zeros(n)) / _WIDTH_RAMP_POINTS
    return pts, ramp


def _candidate(seed: int, attempt: int) -> Track | None:
    rng = np.random.default_rng((_SALT, seed, attempt))
    pieces = _close(_plan(rng))
    if pieces is None:
        return None
    length = sum(p.length_m if p.turn_rad == 0.0 else abs(p.turn_rad) * p.radius_m for p in pieces)
    if not _MIN_LENGTH_M <= length <= _MAX_LENGTH_M:
        return None
    pts, hw = _resample(*_draw(pieces))
    track = build_track(f"{TECH_PREFIX}{seed}", f"Technical track from seed {seed}.", 0, pts, hw)
    return track if geometry_ok(track) else None


def generate_technical_track(seed: int) -> Track:
    """A technical closed track, identical for a seed in any process; bad shapes are redrawn from sub-seeds."""
    if seed < 0:
        raise InvalidArgument("a track seed must be >= 0")
    for attempt in range(_ATTEMPTS):
        track = _candidate(seed, attempt)
        if track is not None:
            return track
    raise InvalidArgument(f"no valid technical track for seed {seed}")  # kept so the loop is bounded
