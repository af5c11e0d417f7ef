"""Car physics, sensors and lap timing: a pure, deterministic function of track, state and controls."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from game_server.core.state import (
    BACK,
    FORWARD,
    LEFT,
    RIGHT,
    TICK_S,
    VALID_MASK_BITS,
    CarState,
    Gate,
    LapState,
    SimState,
)
from game_server.core.track import Track
from game_server.core.trig import HALF_PI, PI, TWO_PI, sincos, sincos_array
from plumbing.errors import InvalidArgument

# The car model (units: m, s, rad). Speed changes are applied per tick, so they are precomputed per tick.
TOP_SPEED = 50.0
REVERSE_SPEED = -15.0
ACCEL = 25.0  # forward throttle, and reverse throttle from rest
COAST_DECEL = 7.5
BRAKE_DECEL = 50.0
ACCEL_DV = ACCEL * TICK_S
COAST_DV = COAST_DECEL * TICK_S
BRAKE_DV = BRAKE_DECEL * TICK_S
MIN_TURN_RADIUS = 1.5
TURN_RADIUS_GAIN = 23.5
CAR_RADIUS = 1.0  # the car is a circle against the barriers

# Sensors.
N_RAYS = 15
RAY_RANGE = 100.0
RAY_WINDOW_M = 130.0  # arc length either side of the car whose barrier segments the rays test

# Segment tracking: a car moves at most 2 m a tick and points are ~3 m apart, so a few steps suffice.
MAX_SEGMENT_STEPS = 8


def turn_radius(speed: float) -> float:
    """The model's turning radius r(|v|) in metres; the car yaws at |v| / (2 r)."""
    a = abs(speed) / TOP_SPEED
    return MIN_TURN_RADIUS + a * math.sqrt(a) * TURN_RADIUS_GAIN


class Kernel:
    """Per-track constants the tick reads: Python lists for the scalar step, arrays for the batched one."""

    def __init__(self, track: Track) -> None:
        pts = track.centerline
        n = track.n_points
        self.n = n
        self.length = track.length_m
        self.half_length = 0.5 * track.length_m

        def chords(wall: np.ndarray, inward_sign: float) -> tuple[np.ndarray, ...]:
            d = np.roll(wall, -1, axis=0) - wall
            length = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
            tx, ty = d[:, 0] / length, d[:, 1] / length
            # Inward normal: right of the left barrier's direction, left of the right barrier's.
            return wall[:, 0], wall[:, 1], inward_sign * ty, -inward_sign * tx, tx, ty, d[:, 0], d[:, 1]

        arrays: dict[str, np.ndarray] = {
            "cx": pts[:, 0],
            "cy": pts[:, 1],
            "ptx": track.point_tangent[:, 0],
            "pty": track.point_tangent[:, 1],
            "tx": track.tangent[:, 0],
            "ty": track.tangent[:, 1],
            "seg_len": track.seg_len,
            "cum_arc": track.cum_arc,
        }
        for prefix, wall, sign in (("l", track.left_wall, 1.0), ("r", track.right_wall, -1.0)):
            for key, arr in zip(("x", "y", "nx", "ny", "tx", "ty", "ex", "ey"), chords(wall, sign), strict=True):
                arrays[prefix + key] = np.ascontiguousarray(arr, dtype=np.float64)
        self.a = arrays
        self.nxt = (np.arange(n) + 1) % n
        self.prv = (np.arange(n) - 1) % n
        # Plain lists of Python floats: indexing them is several times faster than indexing arrays.
        (self.cx, self.cy, self.ptx, self.pty, self.tx, self.ty, self.seg_len, self.cum_arc) = (
            arrays[k].tolist() for k in ("cx", "cy", "ptx", "pty", "tx", "ty", "seg_len", "cum_arc")
        )
        (self.lx, self.ly, self.lnx, self.lny, self.ltx, self.lty) = (
            arrays[k].tolist() for k in ("lx", "ly", "lnx", "lny", "ltx", "lty")
        )
        (self.rx, self.ry, self.rnx, self.rny, self.rtx, self.rty) = (
            arrays[k].tolist() for k in ("rx", "ry", "rnx", "rny", "rtx", "rty")
        )
        self.checkpoints = tuple(gate_params(g) for g in track.checkpoints)
        self.finish = gate_params(track.finish_line)
        window = math.ceil(RAY_WINDOW_M / float(track.seg_len.min()))
        self.ray_offsets = np.arange(-window, window + 1) if 2 * window + 1 < n else np.arange(n)


GateParams = tuple[float, float, float, float]


def gate_params(gate: Gate) -> GateParams:
    """(ax, ay, bx - ax, by - ay): what the crossing test needs."""
    return gate.ax, gate.ay, gate.bx - gate.ax, gate.by - gate.ay


@functools.lru_cache(maxsize=128)
def kernel(track: Track) -> Kernel:
    """The cached tick constants of a track (tracks are immutable and hashed by identity)."""
    return Kernel(track)


def locate(k: Kernel, x: float, y: float, seg: int) -> int:
    """The segment whose bisector slab holds (x, y), searched a few steps from `seg` (never a full scan)."""
    n = k.n
    for _ in range(MAX_SEGMENT_STEPS):
        j = seg + 1 if seg + 1 < n else 0
        if (x - k.cx[j]) * k.ptx[j] + (y - k.cy[j]) * k.pty[j] >= 0.0:
            seg = j
        else:
            break
    for _ in range(MAX_SEGMENT_STEPS):
        if (x - k.cx[seg]) * k.ptx[seg] + (y - k.cy[seg]) * k.pty[seg] < 0.0:
            seg = seg - 1 if seg > 0 else n - 1
        else:
            break
    return seg


def local_arc(k: Kernel, x: float, y: float, seg: int) -> float:
    """Arc length (wrapped, 0..length) of the projection of (x, y) on segment `seg`."""
    along = (x - k.cx[seg]) * k.tx[seg] + (y - k.cy[seg]) * k.ty[seg]
    seg_len = k.seg_len[seg]
    along = 0.0 if along < 0.0 else (seg_len if along > seg_len else along)
    return k.cum_arc[seg] + along


def crosses(g: GateParams, x0: float, y0: float, x1: float, y1: float) -> bool:
    """True when the move (x0, y0) -> (x1, y1) passes the gate from its right side to its left side."""
    ax, ay, gx, gy = g
    if not gx * (y0 - ay) - gy * (x0 - ax) < 0.0 <= gx * (y1 - ay) - gy * (x1 - ax):
        return False
    mx, my = x1 - x0, y1 - y0
    ca = mx * (ay - y0) - my * (ax - x0)
    cb = mx * (ay + gy - y0) - my * (ax + gx - x0)
    return ca * cb <= 0.0


def step(track: Track, state: SimState, mask: int, gate: Gate | None = None) -> tuple[SimState, bool]:
    """Advances one tick of 1/25 s; returns the new state and whether the car touched a barrier.

    A finished car stays where it is: only the tick counter advances. `gate`, when given, replaces the
    finish line (and the checkpoints are then not required). The mask is trusted (see validate_masks).
    """
    lap = state.lap
    if lap.finished:
        return SimState(state.tick + 1, state.car, lap), False
    k = kernel(track)
    car = state.car
    x, y, h, v = car.x, car.y, car.heading, car.speed

    fwd, back = mask & FORWARD, mask & BACK
    if fwd and not back:
        if v >= 0.0:
            v = v + ACCEL_DV
            v = TOP_SPEED if v > TOP_SPEED else v
        else:
            v = v + BRAKE_DV
            v = 0.0 if v > 0.0 else v
    elif back and not fwd:
        if v > 0.0:
            v = v - BRAKE_DV
            v = 0.0 if v < 0.0 else v
        else:
            v = v - ACCEL_DV
            v = REVERSE_SPEED if v < REVERSE_SPEED else v
    elif v > 0.0:
        v = v - COAST_DV
        v = 0.0 if v < 0.0 else v
    elif v < 0.0:
        v = v + COAST_DV
        v = 0.0 if v > 0.0 else v

    dist = v * TICK_S
    left, right = mask & LEFT, mask & RIGHT
    if (left and not right) or (right and not left):
        a = (v if v >= 0.0 else -v) / TOP_SPEED
        r = MIN_TURN_RADIUS + a * math.sqrt(a) * TURN_RADIUS_GAIN
        dh = dist / (r + r)
        h = h + dh if left else h - dh
        if h >= PI:
            h = h - TWO_PI
        elif h < -PI:
            h = h + TWO_PI
    s, c = sincos(h)
    ddx, ddy = dist * c, dist * s
    x1, y1 = x + ddx, y + ddy

    seg = locate(k, x1, y1, lap.segment)
    d_left = (x1 - k.lx[seg]) * k.lnx[seg] + (y1 - k.ly[seg]) * k.lny[seg]
    d_right = (x1 - k.rx[seg]) * k.rnx[seg] + (y1 - k.ry[seg]) * k.rny[seg]
    contact = d_left < CAR_RADIUS or d_right < CAR_RADIUS
    if contact:
        if d_left < d_right:
            wtx, wty = k.ltx[seg], k.lty[seg]
        else:
            wtx, wty = k.rtx[seg], k.rty[seg]
        cos_wall = c * wtx + s * wty
        cos_wall = cos_wall if cos_wall >= 0.0 else -cos_wall
        v = v * (0.5 + 0.5 * cos_wall)
        along = ddx * wtx + ddy * wty
        x1, y1 = x + along * wtx, y + along * wty
        seg = locate(k, x1, y1, seg)
        d_left = (x1 - k.lx[seg]) * k.lnx[seg] + (y1 - k.ly[seg]) * k.lny[seg]
        if d_left < CAR_RADIUS:
            push = CAR_RADIUS - d_left
            x1, y1 = x1 + push * k.lnx[seg], y1 + push * k.lny[seg]
        d_right = (x1 - k.rx[seg]) * k.rnx[seg] + (y1 - k.ry[seg]) * k.rny[seg]
        if d_right < CAR_RADIUS:
            push = CAR_RADIUS - d_right
            x1, y1 = x1 + push * k.rnx[seg], y1 + push * k.rny[seg]
        seg = locate(k, x1, y1, seg)

    delta = local_arc(k, x1, y1, seg) - local_arc(k, x, y, lap.segment)
    if delta > k.half_length:
        delta = delta - k.length
    elif delta < -k.half_length:
        delta = delta + k.length
    arc = lap.arc_m + delta
    progress = arc if arc > lap.progress_m else lap.progress_m

    next_cp, passed = lap.next_checkpoint, lap.checkpoints_passed
    if next_cp < len(k.checkpoints) and crosses(k.checkpoints[next_cp], x, y, x1, y1):
        next_cp += 1
        passed += 1
    tick = state.tick + 1
    if gate is None:
        finished = next_cp == len(k.checkpoints) and crosses(k.finish, x, y, x1, y1)
    else:
        finished = crosses(gate_params(gate), x, y, x1, y1)
    new_lap = LapState(
        next_cp,
        passed,
        progress,
        arc,
        seg,
        lap.wall_contacts + 1 if contact else lap.wall_contacts,
        finished,
        tick if finished else 0,
    )
    return SimState(tick, CarState(x1, y1, h, v), new_lap), contact


def progress_fraction(track: Track, lap: LapState) -> float:
    """Share of a lap covered: furthest forward progress over the lap length, 1 once finished."""
    if lap.finished:
        return 1.0
    return min(1.0, max(0.0, lap.progress_m / track.length_m))


# Ray directions relative to the heading, +90 degrees (left) first, as (cos, sin) pairs.
RAY_ANGLES = np.array([HALF_PI - i * (PI / (N_RAYS - 1)) for i in range(N_RAYS)])
RAY_SIN, RAY_COS = sincos_array(RAY_ANGLES)


def raycast(track: Track, car: CarState, segment: int | None = None) -> tuple[float, ...]:
    """Distances (m, capped at 100) from the car's centre to the nearest barrier along 15 rays, left to right.

    Only barrier segments within ~130 m of arc of the car's segment are tested; `segment` is the car's
    segment when known (LapState.segment), otherwise it is found by a scan of the centre line.
    """
    k = kernel(track)
    a = k.a
    if segment is None:
        dx, dy = a["cx"] - car.x, a["cy"] - car.y
        segment = locate(k, car.x, car.y, int(np.argmin(dx * dx + dy * dy)))
    idx = (k.ray_offsets + segment) % k.n
    qx = np.concatenate([a["lx"][idx], a["rx"][idx]]) - car.x
    qy = np.concatenate([a["ly"][idx], a["ry"][idx]]) - car.y
    ex = np.concatenate([a["lex"][idx], a["rex"][idx]])
    ey = np.concatenate([a["ley"][idx], a["rey"][idx]])
    s, c = sincos(car.heading)
    dx = (c * RAY_COS - s * RAY_SIN)[:, None]
    dy = (s * RAY_COS + c * RAY_SIN)[:, None]
    denom = dx * ey - dy * ex
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (qx * ey - qy * ex) / denom
        u = (qx * dy - qy * dx) / denom
    hit = (denom != 0.0) & (t >= 0.0) & (u >= 0.0) & (u <= 1.0)
    dist = np.where(hit, t, RAY_RANGE).min(axis=1)
    # + 0.0: a zero distance is +0.0 whichever way the minimum was taken (so batched rays match bit for bit).
    return tuple(float(d) + 0.0 if d < RAY_RANGE else RAY_RANGE for d in dist)


def validate_masks(masks: bytes) -> None:
    """Rejects a control program with any byte using bits beyond forward/back/left/right."""
    if masks.translate(None, bytes(range(VALID_MASK_BITS + 1))):
        bad = next(i for i, m in enumerate(masks) if m & ~VALID_MASK_BITS)
        raise InvalidArgument(f"control mask at tick {bad} is {masks[bad]:#04x}; only the low 4 bits are valid")


# The largest tick a restored state may carry (~1,400 years at 25 Hz): every later tick, lap time and
# stream ID derived from it still fits the 64-bit fields that carry it.
MAX_STATE_TICK = 2**40
# The largest count (wall contacts, checkpoints) a state may carry: uint32 fields with room to grow.
MAX_STATE_COUNT = 2**31


def validate_state(track: Track, state: SimState) -> None:
    """Rejects a state that the simulation could not have produced on this track."""
    car, lap = state.car, state.lap
    numbers = (car.x, car.y, car.heading, car.speed, lap.progress_m, lap.arc_m)
    if not all(math.isfinite(v) for v in numbers):
        raise InvalidArgument("state holds a non-finite number")
    if not REVERSE_SPEED <= car.speed <= TOP_SPEED:
        raise InvalidArgument(f"speed must be within [{REVERSE_SPEED}, {TOP_SPEED}] m/s")
    if not -PI <= car.heading < PI:
        raise InvalidArgument("heading must be within [-pi, pi)")
    if not 0 <= lap.segment < track.n_points:
        raise InvalidArgument(f"segment must be within [0, {track.n_points})")
    if not 0 <= state.tick <= MAX_STATE_TICK:
        raise InvalidArgument(f"tick must be within [0, {MAX_STATE_TICK}]")
    if not 0 <= lap.wall_contacts <= min(state.tick, MAX_STATE_COUNT):
        raise InvalidArgument("wall_contacts must be within [0, tick]: at most one contact a tick")
    if lap.finished:
        if not 1 <= lap.finish_tick <= state.tick:
            raise InvalidArgument("a finished lap's finish_tick must be within [1, tick]")
    elif lap.finish_tick != 0:
        raise InvalidArgument("finish_tick must be 0 unless the lap is finished")
    n_cp = len(track.checkpoints)
    if not 0 <= lap.next_checkpoint <= n_cp or not 0 <= lap.checkpoints_passed <= n_cp:
        raise InvalidArgument(f"next_checkpoint and checkpoints_passed must be within [0, {n_cp}]")
    # The car covers at most TOP_SPEED * TICK_S metres a tick, forwards or back, from the base state.
    reach = (state.tick + 1) * TOP_SPEED * TICK_S + track.length_m
    if not 0.0 <= lap.progress_m <= reach:
        raise InvalidArgument(f"progress_m must be within [0, {reach:g}] m at tick {state.tick}")
    if not -reach <= lap.arc_m <= lap.progress_m:
        raise InvalidArgument("arc_m must be within [-reach, progress_m]: progress is the furthest arc reached")
    k = kernel(track)
    seg = lap.segment
    if locate(k, car.x, car.y, seg) != seg:
        raise InvalidArgument("the car is not on the segment its lap state names")
    d_left = (car.x - k.lx[seg]) * k.lnx[seg] + (car.y - k.ly[seg]) * k.lny[seg]
    d_right = (car.x - k.rx[seg]) * k.rnx[seg] + (car.y - k.ry[seg]) * k.rny[seg]
    if d_left < 0.0 or d_right < 0.0:
        raise InvalidArgument("the car is outside the track's barriers")


@dataclass(frozen=True, eq=False)
class Trajectory:
    """The car after each simulated tick (index i is after tick i + 1), as float64 arrays."""

    x: np.ndarray
    y: np.ndarray
    heading: np.ndarray
    speed: np.ndarray
    wall_contact_ticks: tuple[int, ...]  # 1-based tick indices with a barrier contact


class TrajectoryRecorder:
    """Collects the car after each tick of a run; shared by open-loop programs and closed-loop drivers."""

    def __init__(self) -> None:
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.hs: list[float] = []
        self.vs: list[float] = []
        self.contacts: list[int] = []

    def add(self, car: CarState, contact: bool) -> None:
        self.xs.append(car.x)
        self.ys.append(car.y)
        self.hs.append(car.heading)
        self.vs.append(car.speed)
        if contact:
            self.contacts.append(len(self.xs))

    def trajectory(self) -> Trajectory:
        def arr(values: list[float]) -> np.ndarray:
            return np.array(values, dtype=np.float64)

        return Trajectory(arr(self.xs), arr(self.ys), arr(self.hs), arr(self.vs), tuple(self.contacts))


@dataclass(frozen=True)
class RunResult:
    """The outcome of running a control program from a start state."""

    finished: bool
    lap_ticks: int  # ticks from the start state to the finish; 0 when not finished
    progress_m: float
    progress_fraction: float
    checkpoints_passed: int
    wall_contacts: int
    ticks: int  # ticks simulated
    final_state: SimState
    trajectory: Trajectory | None = None


def result_of(track: Track, start: SimState, final: SimState, trajectory: Trajectory | None) -> RunResult:
    """Summarises a run; shared by the scalar and batched runners so their results compare equal."""
    lap = final.lap
    finished_here = lap.finished and not start.lap.finished
    return RunResult(
        finished=lap.finished,
        lap_ticks=lap.finish_tick - start.tick if finished_here else 0,
        progress_m=lap.progress_m,
        progress_fraction=progress_fraction(track, lap),
        checkpoints_passed=lap.checkpoints_passed,
        wall_contacts=lap.wall_contacts - start.lap.wall_contacts,  # this run's, as in its trajectory
        ticks=final.tick - start.tick,
        final_state=final,
        trajectory=trajectory,
    )
