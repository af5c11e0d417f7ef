"""The track catalogue: hand-made built-in circuits, seeded smooth (gen-<seed>) and technical (tech-<seed>) ones."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from game_server.core.state import CarState, LapState, SimState
from game_server.core.technical import TECH_PREFIX, generate_technical_track
from game_server.core.track import Track, build_track, curvature_of, geometry_ok
from game_server.core.trig import PI, TWO_PI, sincos_array
from plumbing.errors import InvalidArgument, NotFound

SPACING_M = 3.0  # centre-line point spacing after resampling
_GEN_NAME = re.compile(r"gen-(\d{1,18})")
_TECH_NAME = re.compile(TECH_PREFIX + r"(\d{1,18})")
_GEN_ATTEMPTS = 200


def _resample_closed(dense: np.ndarray, spacing: float = SPACING_M) -> np.ndarray:
    """Evenly spaced points along a closed polyline (the closing segment included)."""
    closed = np.concatenate([dense, dense[:1]])
    d = np.diff(closed, axis=0)
    cum = np.concatenate([[0.0], np.cumsum(np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]))])
    n = max(round(float(cum[-1]) / spacing), 16)
    s = np.arange(n) * (cum[-1] / n)
    return np.stack([np.interp(s, cum, closed[:, 0]), np.interp(s, cum, closed[:, 1])], axis=1)


def _angles(n: int) -> np.ndarray:
    """n angles covering [-pi, pi) evenly, starting at -pi."""
    return np.asarray(-PI + np.arange(n) * (TWO_PI / n))


def _oval() -> Track:
    theta = _angles(4000)
    s, c = sincos_array(theta)
    # Start at the bottom of the ellipse (theta = -pi/2), on its flattest part, driving counter-clockwise.
    pts = np.roll(np.stack([190.0 * c, 95.0 * s], axis=1), -1000, axis=0)
    return build_track(
        "oval", "Wide ellipse: two long fast sweepers and two gentle ends.", 1, _resample_closed(pts), 9.0
    )


def _kidney() -> Track:
    theta = _angles(4000)
    s, c = sincos_array(theta)
    s2 = 2.0 * s * c
    c2 = c * c - s * s
    c3 = c * c2 - s * s2
    # A dimpled limacon: the dimple is a concave bend; the 2nd and 3rd harmonics tighten two corners.
    r = 130.0 * (1.0 + 0.6 * c + 0.05 * s2 + 0.05 * c3)
    pts = np.stack([r * c, r * s], axis=1)
    pts = np.roll(pts, -1000, axis=0)
    return build_track(
        "kidney",
        "Kidney bean: a concave bend, fast sweepers and two medium corners.",
        2,
        _resample_closed(pts),
        7.0,
    )


def _turtle(commands: Sequence[tuple[float, float]], step_m: float = 0.25) -> np.ndarray:
    """A closed drawing from (0, 0) heading +x: (length, 0) is a straight, (radius, degrees) an arc."""
    x, y, heading = 0.0, 0.0, 0.0
    out = []
    for length_or_radius, degrees in commands:
        if degrees == 0.0:
            n = max(int(length_or_radius / step_m), 1)
            k = np.arange(1, n + 1) / n
            sh, ch = sincos_array(np.array([heading]))
            xs = x + k * length_or_radius * ch[0]
            ys = y + k * length_or_radius * sh[0]
            heading_after = heading
        else:
            radius = length_or_radius
            turn = degrees / 180.0 * PI
            n = max(int(abs(turn) * radius / step_m), 1)
            side = 1.0 if turn > 0 else -1.0
            sh, ch = sincos_array(np.array([heading]))
            cx, cy = x - side * radius * sh[0], y + side * radius * ch[0]
            phi = heading - side * PI / 2 + turn * np.arange(1, n + 1) / n
            phi = phi - TWO_PI * np.floor((phi + PI) / TWO_PI)
            sp, cp = sincos_array(phi)
            xs, ys = cx + radius * cp, cy + radius * sp
            heading_after = heading + turn
        out.append(np.stack([xs, ys], axis=1))
        x, y, heading = float(xs[-1]), float(ys[-1]), heading_after
    pts = np.concatenate([np.zeros((1, 2)), *out])
    # Spread the (tiny) closing error of the drawing over the whole lap; the last point is the first again.
    frac = np.arange(len(pts)) / (len(pts) - 1)
    return np.asarray(pts - frac[:, None] * pts[-1][None, :])[:-1]


def _alpine() -> Track:
    hairpin, bend = 15.0, 30.0
    commands = [
        (100.0, 0.0),
        (hairpin, 180.0),
        (160.0, 0.0),
        (hairpin, -180.0),
        (160.0, 0.0),
        (hairpin, 180.0),
        (200.0, 0.0),
        (bend, 90.0),
        (30.0, 0.0),
        (bend, 90.0),
        (100.0, 0.0),
    ]
    return build_track(
        "alpine",
        "Mountain pass: three hairpins on narrow switchbacks, then a fast descent.",
        3,
        _resample_closed(_turtle(commands)),
        5.5,
    )


_BUILTINS: dict[str, Callable[[], Track]] = {"oval": _oval, "kidney": _kidney, "alpine": _alpine}

# Named track sets, defined here once. Models train and drivers evolve on TRAINING_TRACKS only; UNSEEN_TRACKS
# are never trained on, so a lap there measures generalisation. EVOLVE_TRACKS is the GA's smaller set.
TRAINING_TRACKS: tuple[str, ...] = ("kidney", "oval", "alpine", *(f"gen-{i}" for i in range(1, 10)))
EVOLVE_TRACKS: tuple[str, ...] = ("kidney", "oval", "alpine", "gen-1", "gen-2")
DAGGER_TRACKS: tuple[str, ...] = ("kidney", "oval", "alpine", "gen-1", "gen-2", "gen-3")
UNSEEN_TRACKS: tuple[str, ...] = tuple(f"gen-{i}" for i in range(1001, 1006))
# The closed-loop suite's fixed, named held-out set (`rrp evaluate --suite`): in no other set, so nothing is
# ever trained, evolved, DAgger-labelled or model-selected on it.
SUITE_UNSEEN_TRACKS: tuple[str, ...] = tuple(f"gen-{i}" for i in range(3001, 3021))
# Technical tracks (hairpins, chicanes, narrow stretches): a training set, and the suite's 20 held-out ones,
# which, like SUITE_UNSEEN_TRACKS, are in no other set.
TECH_TRAINING_TRACKS: tuple[str, ...] = tuple(f"{TECH_PREFIX}{i}" for i in range(1, 10))
SUITE_TECH_TRACKS: tuple[str, ...] = tuple(f"{TECH_PREFIX}{i}" for i in range(3001, 3021))
BUILTIN_TRACKS: tuple[str, ...] = tuple(_BUILTINS)


def _bspline_closed(ctrl: np.ndarray, per_span: int = 64) -> np.ndarray:
    """Uniform periodic cubic B-spline through control polygon `ctrl` (C2-smooth, closed)."""
    u = np.arange(per_span) / per_span
    u2, u3 = u * u, u * u * u
    w = np.stack([(1 - u) ** 3, 3 * u3 - 6 * u2 + 4, -3 * u3 + 3 * u2 + 3 * u + 1, u3], axis=1) / 6.0
    spans = [w @ np.roll(ctrl, 1 - k, axis=0)[:4] for k in range(len(ctrl))]
    return np.concatenate(spans)


def _candidate(seed: int, attempt: int) -> Track:
    rng = np.random.default_rng((seed, attempt))
    k = int(rng.integers(9, 15))
    theta = _angles(k) + rng.uniform(-0.3, 0.3, k) * (TWO_PI / k)
    radius = rng.uniform(0.45, 1.0, k)
    s, c = sincos_array(theta)
    dense = _bspline_closed(np.stack([radius * c, radius * s], axis=1))
    if rng.random() < 0.5:
        dense = dense[::-1].copy()  # clockwise
    d = np.diff(np.concatenate([dense, dense[:1]]), axis=0)
    unit_len = float(np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]).sum())
    pts = _resample_closed(dense * (rng.uniform(650.0, 1300.0) / unit_len))
    half_width = float(rng.uniform(5.5, 8.5))
    # Start on the straightest stretch (least curvature over about 60 m) so the start line is not in a bend.
    window = 21
    bend = np.convolve(np.abs(np.concatenate([curvature_of(pts)[-window:], curvature_of(pts)])), np.ones(window))
    start = (int(np.argmin(bend[window : window + len(pts)])) - window // 2) % len(pts)
    pts = np.roll(pts, -start, axis=0)
    return build_track(f"gen-{seed}", f"Generated from seed {seed}.", 0, pts, half_width)


def generate_track(seed: int) -> Track:
    """A random closed track, identical for a seed in any process; bad shapes are redrawn from sub-seeds."""
    if seed < 0:
        raise InvalidArgument("a track seed must be >= 0")
    for attempt in range(_GEN_ATTEMPTS):
        track = _candidate(seed, attempt)
        if geometry_ok(track):
            return track
    raise InvalidArgument(f"no valid track for seed {seed}")  # never observed; kept so the loop is bounded


@functools.lru_cache(maxsize=64)
def load_track(name: str) -> Track:
    """A built-in track by name, or a generated one for "gen-<seed>" or "tech-<seed>"; cached, tracks are
    immutable."""
    if not name:
        raise InvalidArgument("a track name is required")
    if len(name) > 64:
        raise InvalidArgument("track names are at most 64 characters")
    if name in _BUILTINS:
        return _BUILTINS[name]()
    if name.startswith("gen-"):
        match = _GEN_NAME.fullmatch(name)
        if match is None:
            raise InvalidArgument(f"generated track names are gen-<seed> with a decimal seed >= 0, got {name!r}")
        return generate_track(int(match.group(1)))
    if name.startswith(TECH_PREFIX):
        match = _TECH_NAME.fullmatch(name)
        if match is None:
            raise InvalidArgument(f"technical track names are tech-<seed> with a decimal seed >= 0, got {name!r}")
        return generate_technical_track(int(match.group(1)))
    raise NotFound(f"unknown track {name!r}; built-ins are {', '.join(_BUILTINS)}, gen-<seed> or tech-<seed>")


def builtin_tracks() -> list[Track]:
    """The built-in tracks, easiest first."""
    return [load_track(name) for name in _BUILTINS]


def random_state(track: Track, rng: np.random.Generator) -> SimState:
    """A state somewhere on the track, off the centre line, misaligned and at some speed: the situations a
    learner drifts into and must recover from, which an expert's own laps never show."""
    seg = int(rng.integers(track.n_points))
    tx, ty = (float(v) for v in track.tangent[seg])
    offset = float(rng.uniform(-0.5, 0.5)) * float(track.half_width[seg])
    x = float(track.centerline[seg, 0]) + 0.5 * float(track.seg_len[seg]) * tx - offset * ty
    y = float(track.centerline[seg, 1]) + 0.5 * float(track.seg_len[seg]) * ty + offset * tx
    heading = math.atan2(ty, tx) + float(rng.uniform(-0.3, 0.3))
    heading = (heading + math.pi) % (2 * math.pi) - math.pi
    return SimState(0, CarState(x, y, heading, float(rng.uniform(0.0, 30.0))), LapState(segment=seg))
