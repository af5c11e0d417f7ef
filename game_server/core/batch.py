"""A population of cars on one track stepped together with numpy, bit-identical to the scalar `step`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from game_server.core.physics import (
    ACCEL_DV,
    BRAKE_DV,
    CAR_RADIUS,
    COAST_DV,
    MAX_SEGMENT_STEPS,
    MIN_TURN_RADIUS,
    N_RAYS,
    RAY_COS,
    RAY_RANGE,
    RAY_SIN,
    REVERSE_SPEED,
    TOP_SPEED,
    TURN_RADIUS_GAIN,
    GateParams,
    Kernel,
    RunResult,
    Trajectory,
    gate_params,
    kernel,
    result_of,
)
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, TICK_S, CarState, Gate, LapState, SimState
from game_server.core.track import Track
from game_server.core.trig import HALF_PI, PI, TWO_PI, sincos_array
from plumbing.errors import Cancelled

_FIELDS = (
    "tick",
    "x",
    "y",
    "h",
    "v",
    "next_cp",
    "passed",
    "progress",
    "arc",
    "seg",
    "contacts",
    "finished",
    "finish",
    "sin",
    "cos",
)


@dataclass
class Cars:
    """Struct of arrays: one entry per car, the fields of SimState."""

    tick: np.ndarray  # int64
    x: np.ndarray
    y: np.ndarray
    h: np.ndarray
    v: np.ndarray
    next_cp: np.ndarray  # int64
    passed: np.ndarray  # int64
    progress: np.ndarray
    arc: np.ndarray
    seg: np.ndarray  # int64
    contacts: np.ndarray  # int64
    finished: np.ndarray  # bool
    finish: np.ndarray  # int64
    # sincos of h, kept beside it: the next tick's rays look along the heading the last tick computed.
    sin: np.ndarray
    cos: np.ndarray

    @classmethod
    def of(cls, states: Sequence[SimState]) -> Cars:
        col = np.array
        heading = np.array([s.car.heading for s in states], np.float64)
        return cls(
            col([s.tick for s in states], np.int64),
            col([s.car.x for s in states], np.float64),
            col([s.car.y for s in states], np.float64),
            heading,
            col([s.car.speed for s in states], np.float64),
            col([s.lap.next_checkpoint for s in states], np.int64),
            col([s.lap.checkpoints_passed for s in states], np.int64),
            col([s.lap.progress_m for s in states], np.float64),
            col([s.lap.arc_m for s in states], np.float64),
            col([s.lap.segment for s in states], np.int64),
            col([s.lap.wall_contacts for s in states], np.int64),
            col([s.lap.finished for s in states], np.bool_),
            col([s.lap.finish_tick for s in states], np.int64),
            *sincos_array(heading),
        )

    def take(self, idx: np.ndarray) -> Cars:
        return Cars(*(getattr(self, f)[idx] for f in _FIELDS))

    def put(self, idx: np.ndarray, other: Cars) -> None:
        for f in _FIELDS:
            getattr(self, f)[idx] = getattr(other, f)

    def state(self, i: int) -> SimState:
        car = CarState(float(self.x[i]), float(self.y[i]), float(self.h[i]), float(self.v[i]))
        lap = LapState(
            int(self.next_cp[i]),
            int(self.passed[i]),
            float(self.progress[i]),
            float(self.arc[i]),
            int(self.seg[i]),
            int(self.contacts[i]),
            bool(self.finished[i]),
            int(self.finish[i]),
        )
        return SimState(int(self.tick[i]), car, lap)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _locate(k: Kernel, x: np.ndarray, y: np.ndarray, seg: np.ndarray) -> np.ndarray:
    a = k.a
    cx, cy, ptx, pty = a["cx"], a["cy"], a["ptx"], a["pty"]
    for _ in range(MAX_SEGMENT_STEPS):
        j = k.nxt[seg]
        move = (x - cx[j]) * ptx[j] + (y - cy[j]) * pty[j] >= 0.0
        if not move.any():
            break
        seg = np.where(move, j, seg)
    for _ in range(MAX_SEGMENT_STEPS):
        move = (x - cx[seg]) * ptx[seg] + (y - cy[seg]) * pty[seg] < 0.0
        if not move.any():
            break
        seg = np.where(move, k.prv[seg], seg)
    return seg


def _local_arc(k: Kernel, x: np.ndarray, y: np.ndarray, seg: np.ndarray) -> np.ndarray:
    a = k.a
    along = (x - a["cx"][seg]) * a["tx"][seg] + (y - a["cy"][seg]) * a["ty"][seg]
    seg_len = a["seg_len"][seg]
    along = np.where(along < 0.0, 0.0, np.where(along > seg_len, seg_len, along))
    return np.asarray(a["cum_arc"][seg] + along)


def _wall_distance(k: Kernel, side: str, x: np.ndarray, y: np.ndarray, seg: np.ndarray) -> np.ndarray:
    a = k.a
    return np.asarray((x - a[side + "x"][seg]) * a[side + "nx"][seg] + (y - a[side + "y"][seg]) * a[side + "ny"][seg])


@functools.lru_cache(maxsize=128)
def _checkpoint_table(k: Kernel) -> np.ndarray:
    """(4, checkpoints): the GateParams of every checkpoint, as rows."""
    return np.array(k.checkpoints, dtype=np.float64).reshape(-1, 4).T.copy()


def _crosses(
    g: GateParams | tuple[np.ndarray, ...], x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
) -> np.ndarray:
    ax, ay, gx, gy = g
    side_ok = (gx * (y0 - ay) - gy * (x0 - ax) < 0.0) & (gx * (y1 - ay) - gy * (x1 - ax) >= 0.0)
    mx, my = x1 - x0, y1 - y0
    ca = mx * (ay - y0) - my * (ax - x0)
    cb = mx * (ay + gy - y0) - my * (ax + gx - x0)
    return np.asarray(side_ok & (ca * cb <= 0.0))


def tick_cars(k: Kernel, cars: Cars, masks: np.ndarray, finish: GateParams | None) -> np.ndarray:
    """Advances unfinished `cars` one tick in place with the scalar step's exact operations.

    Returns which cars touched a barrier.
    """
    x, y, h, v = cars.x, cars.y, cars.h, cars.v
    fwd = (masks & FORWARD) != 0
    back = (masks & BACK) != 0
    throttle = fwd & ~back
    reverse = back & ~fwd
    moving_fwd = v > 0.0
    up = np.where(v >= 0.0, v + ACCEL_DV, v + BRAKE_DV)
    up = np.where(v >= 0.0, np.where(up > TOP_SPEED, TOP_SPEED, up), np.where(up > 0.0, 0.0, up))
    down = np.where(moving_fwd, v - BRAKE_DV, v - ACCEL_DV)
    down = np.where(moving_fwd, np.where(down < 0.0, 0.0, down), np.where(down < REVERSE_SPEED, REVERSE_SPEED, down))
    coast_fwd = v - COAST_DV
    coast_back = v + COAST_DV
    coast = np.where(
        moving_fwd,
        np.where(coast_fwd < 0.0, 0.0, coast_fwd),
        np.where(v < 0.0, np.where(coast_back > 0.0, 0.0, coast_back), v),
    )
    v = np.where(throttle, up, np.where(reverse, down, coast))

    dist = v * TICK_S
    left = (masks & LEFT) != 0
    right = (masks & RIGHT) != 0
    steer_left = left & ~right
    steer_right = right & ~left
    a = np.where(v >= 0.0, v, -v) / TOP_SPEED
    r = MIN_TURN_RADIUS + a * np.sqrt(a) * TURN_RADIUS_GAIN
    dh = dist / (r + r)
    turned = np.where(steer_left, h + dh, h - dh)
    turned = np.where(turned >= PI, turned - TWO_PI, np.where(turned < -PI, turned + TWO_PI, turned))
    h = np.where(steer_left | steer_right, turned, h)
    s, c = sincos_array(h)
    ddx, ddy = dist * c, dist * s
    x1, y1 = x + ddx, y + ddy

    seg = _locate(k, x1, y1, cars.seg)
    d_left = _wall_distance(k, "l", x1, y1, seg)
    d_right = _wall_distance(k, "r", x1, y1, seg)
    contact = (d_left < CAR_RADIUS) | (d_right < CAR_RADIUS)
    if contact.any():
        i = np.nonzero(contact)[0]
        a_ = k.a
        si = seg[i]
        use_left = d_left[i] < d_right[i]
        wtx = np.where(use_left, a_["ltx"][si], a_["rtx"][si])
        wty = np.where(use_left, a_["lty"][si], a_["rty"][si])
        cos_wall = c[i] * wtx + s[i] * wty
        cos_wall = np.where(cos_wall >= 0.0, cos_wall, -cos_wall)
        v[i] = v[i] * (0.5 + 0.5 * cos_wall)
        along = ddx[i] * wtx + ddy[i] * wty
        xi, yi = x[i] + along * wtx, y[i] + along * wty
        si = _locate(k, xi, yi, si)
        for side in ("l", "r"):
            d = _wall_distance(k, side, xi, yi, si)
            push = np.where(d < CAR_RADIUS, CAR_RADIUS - d, 0.0)
            pushed = d < CAR_RADIUS
            xi = np.where(pushed, xi + push * a_[side + "nx"][si], xi)
            yi = np.where(pushed, yi + push * a_[side + "ny"][si], yi)
        x1[i], y1[i] = xi, yi
        seg = seg.copy()  # _locate may hand back cars.seg itself, which is still needed below
        seg[i] = _locate(k, xi, yi, si)

    delta = _local_arc(k, x1, y1, seg) - _local_arc(k, x, y, cars.seg)
    delta = np.where(delta > k.half_length, delta - k.length, np.where(delta < -k.half_length, delta + k.length, delta))
    arc = cars.arc + delta
    cars.progress = np.where(arc > cars.progress, arc, cars.progress)
    cars.arc = arc

    n_cp = len(k.checkpoints)
    next_cp = cars.next_cp
    if n_cp:
        # Each car's next checkpoint at once: its gate's numbers gathered, then the scalar test element-wise.
        gates = _checkpoint_table(k)[:, np.minimum(next_cp, n_cp - 1)]
        passed_cp = (next_cp < n_cp) & _crosses((gates[0], gates[1], gates[2], gates[3]), x, y, x1, y1)
    else:
        passed_cp = np.zeros(len(cars), dtype=np.bool_)
    cars.next_cp = next_cp + passed_cp
    cars.passed = cars.passed + passed_cp
    cars.tick = cars.tick + 1
    if finish is None:
        done = (cars.next_cp == n_cp) & _crosses(k.finish, x, y, x1, y1)
    else:
        done = _crosses(finish, x, y, x1, y1)
    cars.finished = done
    cars.finish = np.where(done, cars.tick, 0)
    cars.contacts = cars.contacts + contact
    cars.x, cars.y, cars.h, cars.v, cars.seg = x1, y1, h, v, seg
    cars.sin, cars.cos = s, c
    return contact


class BatchSimulation:
    """P cars on one track advanced together; car i always equals the scalar `step` applied to it."""

    def __init__(self, track: Track, states: Sequence[SimState], gate: Gate | None = None) -> None:
        self.track = track
        self._kernel = kernel(track)
        self._gate = None if gate is None else gate_params(gate)
        self.cars = Cars.of(states)

    def step(self, masks: np.ndarray | bytes) -> np.ndarray:
        """One tick for every car (mask i drives car i); returns which cars touched a barrier."""
        m = np.frombuffer(masks, dtype=np.uint8) if isinstance(masks, bytes) else np.asarray(masks, dtype=np.uint8)
        cars = self.cars
        if not cars.finished.any():
            return tick_cars(self._kernel, cars, m, self._gate)
        # Finished cars stay put, as in the scalar step: only their tick advances.
        contact = np.zeros(len(cars), dtype=np.bool_)
        was_finished = cars.finished.copy()
        live = np.nonzero(~was_finished)[0]
        sub = cars.take(live)
        contact[live] = tick_cars(self._kernel, sub, m[live], self._gate)
        cars.put(live, sub)
        cars.tick[was_finished] += 1
        return contact

    def states(self) -> list[SimState]:
        return [self.cars.state(i) for i in range(len(self.cars))]


# Chooses the keys of the live cars at one tick: (index into the run's cars of each live car, tick
# index, the live cars) -> one mask per live car.
Chooser = Callable[[np.ndarray, int, Cars], np.ndarray]
# Runs car i on alone, with the scalar loop: (i, ticks done, its state, ticks left) -> its result.
Finisher = Callable[[int, int, SimState, int], RunResult]
# Below this many live cars, a tick of the population costs more than the scalar loop (numpy's per-call
# overhead, ~0.4 ms a tick): a finisher, when given, runs them on one by one.
MIN_POPULATION = 8


def run_population(
    track: Track,
    starts: Sequence[SimState],
    limits: np.ndarray,
    choose: Chooser,
    *,
    gate: Gate | None = None,
    record_trajectory: bool = False,
    cancelled: Callable[[], bool] | None = None,
    finisher: Finisher | None = None,
    min_population: int = MIN_POPULATION,
) -> list[RunResult]:
    """The episode loop for a population: car i runs up to `limits[i]` ticks, stopping at the finish, and
    its result equals `episode.run_episode` with the same policy (a finished start simulates nothing).

    `cancelled` is looked at every tick (ending the run with Cancelled). With a `finisher`,
    the last few live cars (fewer than `min_population`) are handed to it."""
    k = kernel(track)
    finish = None if gate is None else gate_params(gate)
    p = len(starts)
    limits = np.where([s.lap.finished for s in starts], 0, limits).astype(np.int64)
    horizon = int(limits.max(initial=0))
    all_cars = Cars.of(starts)
    ids = np.nonzero(limits > 0)[0]
    cars = all_cars.take(ids)
    record = np.zeros((4, horizon, p)) if record_trajectory else None
    contact_log = np.zeros((horizon, p), dtype=np.bool_) if record_trajectory else None
    handed: dict[int, tuple[int, RunResult]] = {}  # car -> (ticks done here, the finisher's result)
    for t in range(horizon):
        if len(ids) == 0:
            break
        if finisher is not None and len(ids) < min_population:
            handed = {int(i): (t, finisher(int(i), t, cars.state(j), int(limits[i]) - t)) for j, i in enumerate(ids)}
            break
        # Every tick: a tick of a population is ~as long as a few hundred scalar ticks.
        if cancelled is not None and cancelled():
            raise Cancelled(f"stopped after {t} ticks: the caller left")
        contact = tick_cars(k, cars, choose(ids, t, cars), finish)
        if record is not None and contact_log is not None:
            record[0, t, ids], record[1, t, ids], record[2, t, ids], record[3, t, ids] = (
                cars.x,
                cars.y,
                cars.h,
                cars.v,
            )
            contact_log[t, ids] = contact
        stop = cars.finished | (t + 1 >= limits[ids])
        if stop.any():
            done = np.nonzero(stop)[0]
            all_cars.put(ids[done], cars.take(done))
            keep = np.nonzero(~stop)[0]
            ids = ids[keep]
            cars = cars.take(keep)
    results = []
    for i, start in enumerate(starts):
        done_here, rest = handed.get(i, (0, None))
        final = all_cars.state(i) if rest is None else rest.final_state
        trajectory = None
        if record is not None and contact_log is not None:
            n = final.tick - start.tick if rest is None else done_here
            trajectory = Trajectory(
                record[0, :n, i].copy(),
                record[1, :n, i].copy(),
                record[2, :n, i].copy(),
                record[3, :n, i].copy(),
                tuple(int(t) + 1 for t in np.nonzero(contact_log[:n, i])[0]),
            )
            if rest is not None and rest.trajectory is not None:
                trajectory = _joined(trajectory, rest.trajectory)
        results.append(result_of(track, start, final, trajectory))
    return results


def _joined(a: Trajectory, b: Trajectory) -> Trajectory:
    """Trajectory `a`, then `b` (which started where `a` ended)."""
    n = len(a.x)
    return Trajectory(
        np.concatenate([a.x, b.x]),
        np.concatenate([a.y, b.y]),
        np.concatenate([a.heading, b.heading]),
        np.concatenate([a.speed, b.speed]),
        a.wall_contact_ticks + tuple(n + t for t in b.wall_contact_ticks),
    )


def run_programs(
    track: Track,
    starts: Sequence[SimState],
    masks_list: Sequence[bytes],
    *,
    gate: Gate | None = None,
    max_ticks: int = 0,
    record_trajectory: bool = False,
) -> list[RunResult]:
    """`[run_program(track, s, m, ...) for s, m in zip(starts, masks_list)]`, computed as one population."""
    if len(starts) != len(masks_list):
        raise ValueError("one start state per program")
    limits = np.array([max_ticks or len(m) for m in masks_list], dtype=np.int64)
    horizon = int(limits.max(initial=0))
    program = np.zeros((len(starts), horizon), dtype=np.uint8)
    for i, m in enumerate(masks_list):
        program[i, : min(len(m), horizon)] = np.frombuffer(m, dtype=np.uint8)[:horizon]

    def choose(ids: np.ndarray, t: int, cars: Cars) -> np.ndarray:
        return program[ids, t]

    return run_population(track, starts, limits, choose, gate=gate, record_trajectory=record_trajectory)


# -- rays for a population ---------------------------------------------------------------------------
# Each car's 15 rays are tested against the barrier segments of its window, as the scalar raycast does,
# but only in the (ray, segment) pairs that can meet. A cheap, conservative angular test in float32
# picks them: a pair it leaves out misses by a wide margin, so the nearest hit, computed for the kept
# pairs with the scalar raycast's own float64 operations, is the scalar's bit for bit. About 32 pairs
# of a car's 15 x 178 are kept.

# Angles are measured in ray steps (pi / 14) from the leftmost ray: ray i sits at i, straight behind at
# -7 = 21. Coordinates are rounded to float32 for this test, so a point's direction is off by up to
# ~2 ulp(coordinate) / distance; a segment's span is widened by more than that (RayTable.margin), and a
# segment with an end nearer than _NEAR_M has every ray tested against it, as has one whose span, in
# whole steps, reaches _WIDE_STEPS: any span over half a turn (14 steps) does, as it passes behind the car.
_STEPS_PER_RAD = (N_RAYS - 1) / PI
_NEAR_M = 0.5
# Added to a too-near point's steps: its segments' spans then exceed _WIDE_STEPS (and every step count
# below stays within int8).
_NEAR_STEPS = 60
_WIDE_STEPS = 12
_TURN_STEPS = 2 * (N_RAYS - 1)


class RayTable:
    """Per-track arrays for the batched rays: each car's window of barrier points is one row copy."""

    def __init__(self, k: Kernel) -> None:
        a = k.a
        n = k.n
        self.first = int(k.ray_offsets[0])
        self.span = span = len(k.ray_offsets)  # segments per barrier in a window
        wrap = np.arange(n + span + 1) % n
        px = np.stack([a["lx"][wrap], a["rx"][wrap]]).astype(np.float32)
        py = np.stack([a["ly"][wrap], a["ry"][wrap]]).astype(np.float32)
        # (2, n + 1, span + 1) views: [w, start] is barrier w's window of span segments (span + 1 points).
        self.win_x = sliding_window_view(px, span + 1, axis=1)
        self.win_y = sliding_window_view(py, span + 1, axis=1)
        self.wx = np.concatenate([a["lx"], a["rx"]])
        self.wy = np.concatenate([a["ly"], a["ry"]])
        self.wex = np.concatenate([a["lex"], a["rex"]])
        self.wey = np.concatenate([a["ley"], a["rey"]])
        longest = float(np.sqrt(self.wex * self.wex + self.wey * self.wey).max())
        # A segment whose first point is this far (m^2) lies wholly beyond the rays' range.
        self.far2 = np.float32((RAY_RANGE + longest + 1.0) ** 2)
        # The widest error of a float32 direction (a point and the car each rounded, then their difference),
        # at least _NEAR_M away, plus float32 arctan2 and heading, ten times over.
        reach = float(max(np.abs(px).max(), np.abs(py).max())) + RAY_RANGE + 2 * longest
        error_rad = 4.0 * float(np.spacing(np.float32(reach))) / _NEAR_M + 1e-6
        self.margin = np.float32(10.0 * error_rad * _STEPS_PER_RAD)


@functools.lru_cache(maxsize=128)
def ray_table(k: Kernel) -> RayTable:
    return RayTable(k)


def _candidates(
    table: RayTable, x: np.ndarray, y: np.ndarray, h: np.ndarray, start: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per barrier, car and window segment ((2, P, span) int8 arrays): how many rays may hit it, and the
    first of them."""
    f32 = np.float32
    qx = table.win_x[:, start] - x.astype(f32)[:, None]
    qy = table.win_y[:, start] - y.astype(f32)[:, None]
    # Ray steps of each point from the leftmost ray, wrapped into [-7, 21).
    steps = np.arctan2(qy, qx) * f32(-_STEPS_PER_RAD) + ((h + HALF_PI) * _STEPS_PER_RAD).astype(f32)[:, None]
    steps -= f32(_TURN_STEPS) * np.floor((steps + f32(7.0)) * f32(1.0 / _TURN_STEPS))
    q2 = qx * qx + qy * qy
    # A point too near to have a direction makes both its segments wide (every ray).
    steps += (q2 < f32(_NEAR_M * _NEAR_M)) * f32(_NEAR_STEPS)
    # The rays each point's direction may round to, widened by the margin, as small integers: the ray
    # range of a segment is then [min of its ends' lows, max of its ends' highs] (ceil, floor are monotone).
    low = np.ceil(steps - table.margin).astype(np.int8)
    high = np.floor(steps + table.margin).astype(np.int8)
    first = np.minimum(low[..., :-1], low[..., 1:])
    last = np.maximum(high[..., :-1], high[..., 1:])
    # Spans of half a turn or more pass behind the car (or come from a point too near): every ray. The
    # test is loose by up to 2 steps, which only sends a few near segments to every ray.
    wide = (last - first) >= np.int8(_WIDE_STEPS)
    first = np.where(wide, np.int8(0), np.maximum(first, np.int8(0)))
    last = np.where(wide, np.int8(N_RAYS - 1), np.minimum(last, np.int8(N_RAYS - 1)))
    count = np.maximum(last - first + np.int8(1), np.int8(0)) * (q2[..., :-1] <= table.far2)
    return count, first


def raycast_cars(
    k: Kernel,
    x: np.ndarray,
    y: np.ndarray,
    h: np.ndarray,
    seg: np.ndarray,
    sincos: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """(P, 15) ray distances of P cars, each row bit-identical to `physics.raycast` of that car and segment.

    `sincos`: `trig.sincos_array(h)` when already known (Cars.sin, Cars.cos)."""
    table = ray_table(k)
    p = len(x)
    n, span = k.n, table.span
    start = (seg + table.first) % n
    counts, first_ray = _candidates(table, x, y, h, start)
    # The kept (segment, ray) pairs, flattened: pair -> (barrier w, car i, window segment j, ray r).
    kept = np.flatnonzero(counts)
    n_rays = counts.ravel()[kept].astype(np.intp)
    before = np.cumsum(n_rays) - n_rays  # pairs ahead of each kept segment's first
    pair_seg = np.repeat(kept, n_rays)
    ray = np.repeat(first_ray.ravel()[kept] - before, n_rays) + np.arange(len(pair_seg))
    w, rest = np.divmod(pair_seg, p * span)
    car, j = np.divmod(rest, span)
    g = w * n + (start[car] + j) % n
    # The scalar raycast's operations, pair by pair.
    s, c = sincos_array(h) if sincos is None else sincos
    cc, ss = c[:, None], s[:, None]
    b = car * N_RAYS + ray
    dx = (cc * RAY_COS - ss * RAY_SIN).ravel()[b]
    dy = (ss * RAY_COS + cc * RAY_SIN).ravel()[b]
    qx = table.wx[g] - x[car]
    qy = table.wy[g] - y[car]
    ex, ey = table.wex[g], table.wey[g]
    denom = dx * ey - dy * ex
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (qx * ey - qy * ex) / denom
        u = (qx * dy - qy * dx) / denom
    hit = (denom != 0.0) & (t >= 0.0) & (u >= 0.0) & (u <= 1.0)
    out = np.full(p * N_RAYS, RAY_RANGE)
    np.minimum.at(out, b[hit], t[hit])
    return (out + 0.0).reshape(p, N_RAYS)  # + 0.0: a zero is +0.0, whichever order the minimum took
