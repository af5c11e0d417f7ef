"""A teacher that recovers: a privileged driver that backs out of walls and turns round, and the pinned starts
that test it.

The evolved and reference drivers only ever press forward, so a car against a wall or facing the wrong way
stays there, and nothing a learner imitates shows how to get out. `RecoveringDriver` races like its base
driver while the car is free, and otherwise reverses with the opposite steering, K-turning when the track
is too narrow to turn round in one go. Its decisions use `+ - * /` and `trig.sincos` only, so it is as
deterministic as the simulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from game_server.core import physics
from game_server.core.episode import Policy
from game_server.core.pilot import ReferenceDriver
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, CarState, LapState, SimState
from game_server.core.track import Track
from game_server.core.trig import PI, sincos

# cos of the heading error beyond which the car is misaligned (~70 degrees off the track direction) and
# turns round at a crawl, and below which a reversal ends (aligned within ~30 degrees).
_COS_MISALIGNED = 0.342
_COS_ALIGNED = 0.866
# cos of the heading error beyond which the car faces the wrong way (more than 120 degrees off) and always turns
# round to the left: near 180 degrees the shorter way round flips with a degree of heading, which a student
# reading the frame cannot see, and which left it dithering left, right, left. Turning left from past 120
# degrees takes the car through 180 to where the shorter way is left too, so the choice never flips back.
_COS_WRONG_WAY = -0.5
_CRAWL_M_PER_S = 4.0
_BRAKE_TO_CRAWL_M_PER_S = 10.0
# A misaligned car with a wall this close ahead (plus 0.1 s of travel) cannot turn round without backing out.
# An aligned one can slide along the wall (contact keeps the heading), so the base driver keeps it.
_PINNED_AHEAD_M = 2.5
# A car slower than _STOPPED_M_PER_S with a wall closer than _STUCK_AHEAD_M ahead is stuck whatever its
# heading (a corner, a wall it slides along).
_STOPPED_M_PER_S = 0.5
_STUCK_AHEAD_M = 1.5
# Moving backwards faster than this is a reversal in progress: the speed's sign is the teacher's only memory,
# so a learner that sees the frame and the speed has everything the teacher decided from.
_REVERSING_M_PER_S = -0.05
# A reversal goes on until the car is aligned with room ahead, or its rear is this close to a wall.
_BEHIND_MARGIN_M = 2.0
# Rays 4..10 cover +-38 degrees around the heading: the car's 2 m width at the distances that matter.
_AHEAD_RAYS = range(4, 11)


def _clearance(track: Track, car: CarState, segment: int, backwards: bool) -> float:
    """Distance to the nearest barrier in a cone ahead of the car (or behind it), from the 15 rays."""
    heading = car.heading
    if backwards:
        heading = heading - PI if heading >= 0.0 else heading + PI
    rays = physics.raycast(track, CarState(car.x, car.y, heading, car.speed), segment)
    return min(rays[i] for i in _AHEAD_RAYS)


class RecoveringDriver:
    """A base driver (the reference pilot by default) plus the way out of pinned and wrong-way states.

    Its decision is a function of the state alone (the speed's sign says whether a reversal is under way),
    so a student that sees the frame and the speed can learn it, and it can label any state a student visits
    (DAgger). While the car is aligned within ~70 degrees of the track and free, it returns exactly the base
    driver's keys, so a free start drives the base driver's lap. `recoveries` counts the reversals started.
    """

    def __init__(self, track: Track, base: Callable[[Track, SimState], int] | None = None) -> None:
        self.track = track
        self.base = base if base is not None else _reference(track)
        self.reset()

    def reset(self) -> None:
        self.recoveries = 0  # reversals started: how often the base driver needed help

    def act(self, state: SimState) -> int:
        """The keys for the next tick."""
        car, seg = state.car, state.lap.segment
        s, c = sincos(car.heading)
        tx, ty = (float(v) for v in self.track.tangent[seg])
        cos_error = c * tx + s * ty
        # The track's direction is to the car's left (the heading must grow), or the car faces the wrong way.
        turn_left = c * ty - s * tx > 0.0 or cos_error < _COS_WRONG_WAY
        # Reversing turns the nose the other way: the right key swings it left.
        reverse = BACK | (RIGHT if turn_left else LEFT)
        speed = car.speed
        misaligned = cos_error < _COS_MISALIGNED
        # The raycast only where a rule reads it: an aligned car at speed, every tick of a free lap, needs none.
        near_rule = speed < _REVERSING_M_PER_S or misaligned or speed < _STOPPED_M_PER_S
        ahead = _clearance(self.track, car, seg, backwards=False) if near_rule else math.inf
        if speed < _REVERSING_M_PER_S:
            room = cos_error > _COS_ALIGNED and ahead >= _PINNED_AHEAD_M
            if not room and _clearance(self.track, car, seg, backwards=True) >= _BEHIND_MARGIN_M:
                return reverse
        pinned = (misaligned and ahead < _PINNED_AHEAD_M + 0.1 * speed) or (
            speed < _STOPPED_M_PER_S and ahead < _STUCK_AHEAD_M
        )
        if pinned and _clearance(self.track, car, seg, backwards=True) >= _BEHIND_MARGIN_M:
            if speed >= _REVERSING_M_PER_S:
                self.recoveries += 1
            return reverse
        if not misaligned:
            return self.base(self.track, state)
        # Turning round: a crawl, so the circle is tight (about 2 m), steering towards the track direction:
        # forward up to the crawl, coasting above it, braking only when far above it. Braking at a crawl taught
        # a student to press back near rest, which starts a reversal.
        keys = LEFT if turn_left else RIGHT
        if speed < _CRAWL_M_PER_S:
            keys |= FORWARD
        elif speed > _BRAKE_TO_CRAWL_M_PER_S:
            keys |= BACK
        return keys


def _reference(track: Track) -> Callable[[Track, SimState], int]:
    driver = ReferenceDriver(track)
    return lambda _track, state: driver.act(state)


class RecoveringPolicy(Policy):
    """`RecoveringDriver` as a policy of the episode loop (it reads the state, not the rays)."""

    needs_rays = False

    def __init__(self, driver: RecoveringDriver) -> None:
        self.driver = driver

    def act(self, index: int, state: SimState, rays: Sequence[float]) -> int:
        if index == 0:
            self.driver.reset()
        return self.driver.act(state)


# -- starts the drivers must get out of ---------------------------------------------------------------------

PINNED_ANGLE_RAD = 1.0  # how far the nose points into the wall (~57 degrees), as a car that overshot a bend
_WALL_GAP_M = 0.01  # beyond the car's radius: it touches on its first tick towards the wall


def _lap_at(track: Track, point: int) -> LapState:
    """The lap state of a car that drove from the start line to `point`: its checkpoints passed and its arc,
    so that the lap finishes at the finish line (what remains of the lap), as after a Reset mid-lap."""
    passed = sum(1 for cp in track.checkpoint_segments if cp <= point)
    arc = float(track.cum_arc[point]) + 0.5 * float(track.seg_len[point])
    return LapState(next_checkpoint=passed, checkpoints_passed=passed, progress_m=arc, arc_m=arc, segment=point)


def outer_side(track: Track, point: int) -> str:
    """ "left" or "right": the barrier on the outside of the bend at `point` (right on a straight)."""
    return "right" if float(track.curvature[point]) >= 0.0 else "left"


def pinned_state(track: Track, point: int, angle_rad: float = PINNED_ANGLE_RAD, side: str | None = None) -> SimState:
    """At rest against the outer barrier (or `side`) halfway along segment `point`, nose `angle_rad` into it.

    A valid Reset state (`physics.validate_state` accepts it): tick 0, on its segment, inside the barriers,
    with the lap's checkpoints and arc as if it had driven there.
    """
    point = point % track.n_points
    side = side or outer_side(track, point)
    k = physics.kernel(track)
    if side == "right":
        wx, wy, nx, ny, wtx, wty = k.rx[point], k.ry[point], k.rnx[point], k.rny[point], k.rtx[point], k.rty[point]
    elif side == "left":
        wx, wy, nx, ny, wtx, wty = k.lx[point], k.ly[point], k.lnx[point], k.lny[point], k.ltx[point], k.lty[point]
    else:
        raise ValueError("side must be 'left' or 'right'")
    half = 0.5 * float(k.a[side[0] + "ex"][point] * wtx + k.a[side[0] + "ey"][point] * wty)
    gap = physics.CAR_RADIUS + _WALL_GAP_M
    x, y = wx + half * wtx + gap * nx, wy + half * wty + gap * ny
    tx, ty = float(track.tangent[point, 0]), float(track.tangent[point, 1])
    # Rotate the track direction towards the barrier: clockwise for the right one, anticlockwise for the left.
    s, c = sincos(angle_rad if side == "left" else -angle_rad)
    heading = _heading_of(tx * c - ty * s, tx * s + ty * c)
    return SimState(0, CarState(x, y, heading, 0.0), _lap_at(track, point))


def wrong_way_state(track: Track, point: int) -> SimState:
    """At rest on the centre line halfway along segment `point`, facing against the direction of the lap."""
    point = point % track.n_points
    tx, ty = float(track.tangent[point, 0]), float(track.tangent[point, 1])
    half = 0.5 * float(track.seg_len[point])
    x = float(track.centerline[point, 0]) + half * tx
    y = float(track.centerline[point, 1]) + half * ty
    return SimState(0, CarState(x, y, _heading_of(-tx, -ty), 0.0), _lap_at(track, point))


def _heading_of(dx: float, dy: float) -> float:
    """The heading (in [-pi, pi)) of a direction: atan2, used only to build a start, never in a tick."""
    h = math.atan2(dy, dx)
    return -PI if h >= PI else h


def bend_apexes(track: Track, share: float = 0.9) -> list[int]:
    """The middle point of each run of points curved at least `share` of the track's tightest curvature, in
    driving order from the start line (a run through the start line is cut there): the apexes of the hairpins,
    where a fast car overshoots."""
    tight = np.abs(track.curvature) >= share * float(np.abs(track.curvature).max())
    n = track.n_points
    apexes = []
    i = 0
    while i < n:
        if tight[i]:
            j = i
            while j + 1 < n and tight[j + 1]:
                j += 1
            apexes.append((i + j) // 2)
            i = j + 1
        else:
            i += 1
    return apexes


def recovery_starts(track: Track, angle_rad: float = PINNED_ANGLE_RAD) -> list[tuple[str, SimState]]:
    """A pinned and a wrong-way start at three places: an eighth of the way round, the first hairpin's (or
    bend's) apex, two thirds of the way round. Labels name the kind and the point ("pinned@40")."""
    n = track.n_points
    apexes = bend_apexes(track)
    out = []
    for point in (n // 8, apexes[0] if apexes else n // 2, 2 * n // 3):
        out.append((f"pinned@{point}", pinned_state(track, point, angle_rad)))
        out.append((f"wrong-way@{point}", wrong_way_state(track, point)))
    return out
