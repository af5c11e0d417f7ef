"""The car model: speeds, turning circles, barrier response and the deterministic sine/cosine."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from game_server.core import physics
from game_server.core.physics import CAR_RADIUS, raycast, step, turn_radius, validate_masks, validate_state
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, TICK_S, CarState, LapState, SimState
from game_server.core.track import Track, build_track
from game_server.core.trig import sincos, sincos_array
from plumbing.errors import InvalidArgument


@functools.cache
def ring(radius: float, half_width: float) -> Track:
    """A circle of big radius: locally almost straight, and as wide as a test needs."""
    n = int(2 * math.pi * radius / 3.0)
    theta = -math.pi / 2 + np.arange(n) * (2 * math.pi / n)
    pts = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    return build_track("ring", "test ring", 1, pts, half_width)


def at_start(track: Track, speed: float = 0.0, heading: float = 0.0, y: float | None = None) -> SimState:
    base = track.base_state
    y0 = base.car.y if y is None else y
    return SimState(0, CarState(base.car.x, y0, heading, speed), LapState())


def run(track: Track, state: SimState, mask: int, ticks: int) -> list[SimState]:
    out = []
    for _ in range(ticks):
        state, _ = step(track, state, mask)
        out.append(state)
    return out


def test_rest_to_top_speed_takes_exactly_the_model_ticks() -> None:
    track = ring(1000.0, 30.0)
    expected = math.ceil(physics.TOP_SPEED / (physics.ACCEL * TICK_S))
    speeds = [s.car.speed for s in run(track, track.base_state, FORWARD, expected + 10)]
    assert expected == 50
    assert speeds[expected - 2] < physics.TOP_SPEED
    assert speeds[expected - 1] == physics.TOP_SPEED
    assert all(v == physics.TOP_SPEED for v in speeds[expected:])


def test_coasting_decelerates_to_rest_and_stops_there() -> None:
    track = ring(1000.0, 30.0)
    speeds = [s.car.speed for s in run(track, at_start(track, 50.0), 0, 200)]
    assert speeds[0] == pytest.approx(50.0 - 7.5 * TICK_S, abs=1e-12)
    assert speeds[9] == pytest.approx(50.0 - 10 * 7.5 * TICK_S, abs=1e-9)
    stop = math.ceil(50.0 / (7.5 * TICK_S))
    assert speeds[stop - 2] > 0.0
    assert all(v == 0.0 for v in speeds[stop - 1 :])


def test_braking_then_reversing_capped() -> None:
    track = ring(1000.0, 30.0)
    speeds = [s.car.speed for s in run(track, at_start(track, 50.0), BACK, 60)]
    assert speeds[0] == pytest.approx(50.0 - 50.0 * TICK_S)
    assert speeds[24] == 0.0  # 50 m/s at 50 m/s^2: 1 s = 25 ticks
    assert speeds[25] == pytest.approx(-25.0 * TICK_S)
    assert speeds[39] == pytest.approx(-15.0)
    assert min(speeds) == -15.0 and speeds[-1] == -15.0


def test_forward_while_reversing_brakes() -> None:
    track = ring(1000.0, 30.0)
    speeds = [s.car.speed for s in run(track, at_start(track, -15.0), FORWARD, 12)]
    assert speeds[0] == pytest.approx(-15.0 + 50.0 * TICK_S)
    assert speeds[7] == 0.0  # 15 / 2 per tick -> 8 ticks
    assert speeds[8] == pytest.approx(25.0 * TICK_S)


def circle_radius(xs: np.ndarray, ys: np.ndarray) -> float:
    """Least-squares circle fit (Kasa)."""
    a = np.stack([xs, ys, np.ones_like(xs)], axis=1)
    b = xs * xs + ys * ys
    cx2, cy2, c = np.linalg.lstsq(a, b, rcond=None)[0]
    return float(math.sqrt(c + (cx2 / 2) ** 2 + (cy2 / 2) ** 2))


@pytest.mark.parametrize(("speed", "mask"), [(50.0, FORWARD | LEFT), (50.0, FORWARD | RIGHT), (-15.0, BACK | LEFT)])
def test_driven_circle_has_twice_the_turning_radius(speed: float, mask: int) -> None:
    # Yaw rate |v| / (2 r) makes the driven circle's radius 2 r(v).
    track = ring(3000.0, 150.0)
    states = run(track, at_start(track, speed, y=track.base_state.car.y + 20.0), mask, 200)
    xs = np.array([s.car.x for s in states])
    ys = np.array([s.car.y for s in states])
    assert all(s.car.speed == speed for s in states)
    assert circle_radius(xs, ys) == pytest.approx(2.0 * turn_radius(speed), rel=2e-3)
    turned = states[1].car.heading - states[0].car.heading
    assert (turned > 0) == (bool(mask & LEFT) == (speed > 0))  # steering flips when reversing


@pytest.mark.parametrize("speed", [5.0, 15.0, 25.0, 40.0])
def test_turning_radius_at_intermediate_speeds(speed: float) -> None:
    track = ring(3000.0, 150.0)
    s0 = at_start(track, speed)
    s1, _ = step(track, s0, LEFT)  # coasting: the radius follows the new speed
    v = s1.car.speed
    assert s1.car.heading - s0.car.heading == pytest.approx(v * TICK_S / (2.0 * turn_radius(v)), rel=1e-12)
    assert turn_radius(speed) == pytest.approx(1.5 + (speed / 50.0) ** 1.5 * 23.5)


def wall_distance(track: Track, state: SimState) -> float:
    k = physics.kernel(track)
    seg, car = state.lap.segment, state.car
    return min(
        (car.x - k.lx[seg]) * k.lnx[seg] + (car.y - k.ly[seg]) * k.lny[seg],
        (car.x - k.rx[seg]) * k.rnx[seg] + (car.y - k.ry[seg]) * k.rny[seg],
    )


@pytest.mark.parametrize("degrees", [5.0, 20.0, 45.0, 70.0, 90.0])
def test_wall_keeps_the_car_inside_and_takes_the_stated_speed(degrees: float) -> None:
    track = ring(1000.0, 10.0)
    heading = math.radians(degrees)  # the track runs along +x at the start; turn towards the left barrier
    state = at_start(track, 50.0, heading)
    for _ in range(200):
        before = state
        state, contact = step(track, state, FORWARD)
        if contact:
            break
    assert contact
    k = physics.kernel(track)
    seg = state.lap.segment
    cos_wall = abs(math.cos(heading) * k.ltx[seg] + math.sin(heading) * k.lty[seg])
    assert state.car.speed == pytest.approx(50.0 * (0.5 + 0.5 * cos_wall), rel=2e-3)
    assert state.car.heading == before.car.heading
    for _ in range(100):  # keep pushing into the barrier
        state, _ = step(track, state, FORWARD)
        validate_state(track, state)
        assert wall_distance(track, state) > 0.9 * CAR_RADIUS


def test_wall_contacts_are_counted() -> None:
    track = ring(1000.0, 10.0)
    state = at_start(track, 50.0, math.radians(90.0))
    contacts = 0
    for _ in range(30):
        state, contact = step(track, state, FORWARD)
        contacts += contact
    assert contacts > 0 and state.lap.wall_contacts == contacts


def test_finished_car_is_frozen() -> None:
    track = ring(1000.0, 10.0)
    state = at_start(track)
    done = SimState(7, state.car, LapState(finished=True, finish_tick=7))
    after, contact = step(track, done, FORWARD | LEFT)
    assert after == SimState(8, done.car, done.lap) and not contact


def test_sincos_matches_libm_within_1e12_and_arrays_match_scalars() -> None:
    theta = np.concatenate([np.linspace(-math.pi, math.pi, 20001), [-math.pi, 0.0, math.pi / 2, -math.pi / 2]])
    s, c = sincos_array(theta)
    for t, sa, ca in zip(theta.tolist(), s.tolist(), c.tolist(), strict=True):
        ss, cs = sincos(t)
        assert (ss, cs) == (sa, ca)
        assert abs(ss - math.sin(t)) < 1e-12 and abs(cs - math.cos(t)) < 1e-12


def test_reversing_across_the_start_line_gains_no_progress() -> None:
    track = ring(1000.0, 10.0)
    states = run(track, track.base_state, BACK, 150)
    assert states[-1].lap.arc_m < -20.0 and states[-1].lap.progress_m == 0.0
    forward = run(track, states[-1], FORWARD, 150)
    assert forward[-1].lap.progress_m == forward[-1].lap.arc_m > 0.0
    assert all(s.lap.progress_m == 0.0 for s in forward if s.lap.arc_m <= 0.0)


def test_rays_measure_the_barriers_left_to_right() -> None:
    track = ring(1000.0, 10.0)
    car = track.base_state.car
    rays = raycast(track, car, 0)
    assert len(rays) == 15 and rays == raycast(track, car)
    assert rays[0] == pytest.approx(10.0, abs=0.05) and rays[14] == pytest.approx(10.0, abs=0.05)
    assert rays[7] == physics.RAY_RANGE  # the outer barrier ahead is ~140 m away on this ring
    near_left = SimState(0, CarState(car.x, car.y + 6.0, car.heading, 0.0), LapState())
    shifted = raycast(track, near_left.car, 0)
    assert shifted[0] == pytest.approx(4.0, abs=0.05) and shifted[14] == pytest.approx(16.0, abs=0.05)


def test_validation_rejects_bad_programs_and_states() -> None:
    track = ring(1000.0, 10.0)
    validate_masks(bytes(range(16)))
    with pytest.raises(InvalidArgument):
        validate_masks(b"\x01\x10")
    car = track.base_state.car
    bad_cars = [
        CarState(math.nan, car.y, 0.0, 0.0),
        CarState(car.x, car.y, 0.0, 50.5),
        CarState(car.x, car.y, 0.0, -15.5),
        CarState(car.x, car.y, math.pi, 0.0),
        CarState(car.x, car.y + 10.5, 0.0, 0.0),  # beyond the left barrier
    ]
    for bad in bad_cars:
        with pytest.raises(InvalidArgument):
            validate_state(track, SimState(0, bad, LapState()))
    with pytest.raises(InvalidArgument):
        validate_state(track, SimState(0, car, LapState(segment=track.n_points)))
    validate_state(track, track.base_state)
