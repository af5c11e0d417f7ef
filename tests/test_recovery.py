"""The recovering teacher: out of any pinned or wrong-way start on every built-in track, and unchanged when free."""

from __future__ import annotations

import pytest

from game_server import convert
from game_server.client import GameClient
from game_server.core import drivers, episode, physics
from game_server.core.pilot import drive_lap
from game_server.core.recovery import (
    RecoveringDriver,
    RecoveringPolicy,
    bend_apexes,
    pinned_state,
    recovery_starts,
)
from game_server.core.state import FORWARD, SimState
from game_server.core.tracks import BUILTIN_TRACKS, load_track

# Nose ~86 degrees into the wall: the evolved default driver stays there on alpine (see docs/drivers.md).
HARD_PIN_RAD = 1.5


def starts(name: str) -> list[tuple[str, SimState]]:
    """The evaluation's recovery starts (pinned and wrong-way at three places), with the nose harder in."""
    return recovery_starts(load_track(name), HARD_PIN_RAD)


def run_teacher(name: str, start: SimState, max_ticks: int) -> tuple[episode.Episode, RecoveringDriver]:
    track = load_track(name)
    driver = RecoveringDriver(track)
    return episode.run_episode(track, start, RecoveringPolicy(driver), max_ticks=max_ticks), driver


@pytest.mark.parametrize("name", BUILTIN_TRACKS)
def test_teacher_gets_free_and_finishes_from_every_pinned_and_wrong_way_start(name: str) -> None:
    track = load_track(name)
    budget = int(1.5 * drive_lap(track)[1].lap_ticks)  # a lap and a half of the reference driver's
    for label, start in starts(name):
        run, _ = run_teacher(name, start, budget)
        progress = physics.progress_fraction(track, run.result.final_state.lap)
        assert run.result.finished, f"{name} {label}: stuck at {progress:.0%}"
        assert run.result.lap_ticks < budget
        if label.startswith("wrong-way"):
            assert run.applied.count(FORWARD) < len(run.applied), "turned round without a key other than forward"


@pytest.mark.parametrize("name", BUILTIN_TRACKS)
def test_free_start_drives_the_reference_lap_exactly(name: str) -> None:
    """Recovery never fires on a clean lap, so the teacher is exactly as fast as the reference driver."""
    track = load_track(name)
    program, reference = drive_lap(track)
    run, driver = run_teacher(name, track.base_state, 3000)
    assert run.applied == program
    assert run.result.lap_ticks == reference.lap_ticks
    assert driver.recoveries == 0


def test_starts_are_valid_reset_states_touching_the_wall() -> None:
    for name in BUILTIN_TRACKS:
        track = load_track(name)
        for label, start in starts(name):
            physics.validate_state(track, start)  # what the game service's Reset checks
            assert start.tick == 0 and start.car.speed == 0.0
            if label.startswith("pinned"):
                _, contact = physics.step(track, start, FORWARD)
                assert contact, f"{name} {label}: the first tick forward does not touch the wall"


def test_alpine_hairpin_pin_backs_out_and_is_deterministic() -> None:
    track = load_track("alpine")
    start = pinned_state(track, bend_apexes(track)[0], HARD_PIN_RAD)
    first, driver = run_teacher("alpine", start, 1500)
    again, _ = run_teacher("alpine", start, 1500)
    assert driver.recoveries >= 1
    assert first.applied == again.applied and repr(first.result.final_state) == repr(again.result.final_state)
    # One instance drives the next episode afresh: the policy resets it on the first tick.
    policy = RecoveringPolicy(driver)
    assert episode.run_episode(track, start, policy, max_ticks=1500).applied == first.applied


@pytest.mark.parametrize("name", BUILTIN_TRACKS)
def test_teacher_on_a_ray_driver_base_recovers_and_keeps_its_free_lap(name: str) -> None:
    """On the evolved kind of driver (here the default parameters) the teacher frees every start too."""
    track = load_track(name)
    ray = drivers.default_driver()
    free = drivers.run_driver(track, track.base_state, ray, max_ticks=3000)
    budget = int(1.5 * free.lap_ticks)
    teacher = RecoveringDriver(track, base=ray.act)
    assert episode.run_episode(track, track.base_state, RecoveringPolicy(teacher), max_ticks=3000).result == free
    for label, start in starts(name):
        run = episode.run_episode(track, start, RecoveringPolicy(teacher), max_ticks=budget)
        assert run.result.finished, f"{name} {label}"


def test_reset_places_a_pinned_car_that_the_teachers_keys_free_on_a_server(client: GameClient) -> None:
    """The game service's Reset takes the pinned state as it is; the teacher's keys replay there to the finish."""
    track = load_track("alpine")
    start = pinned_state(track, bend_apexes(track)[0], HARD_PIN_RAD)
    run, _ = run_teacher("alpine", start, 1500)
    sid = client.create_session("alpine").session_id
    try:
        placed = client.reset(sid, convert.state_to_pb(start))
        assert convert.state_from_pb(placed.state) == start
        done = client.step(sid, run.applied)
        assert done.state.lap.finished and done.lap_ticks == run.result.lap_ticks
    finally:
        client.close_session(sid)


def test_evaluate_with_a_recovering_driver_finishes_from_a_pin_where_the_bare_driver_stays(client: GameClient) -> None:
    """DriverParams.recovering puts the request's driver inside the teacher, on the server, bit for bit."""
    from rallyrobopilot.v1 import game_pb2, sim_pb2

    track = load_track("alpine")
    start = pinned_state(track, bend_apexes(track)[0], HARD_PIN_RAD)
    ray = drivers.default_driver()
    results = {}
    for recovering in (False, True):
        request = game_pb2.EvaluateRequest(
            track="alpine",
            start_state=convert.state_to_pb(start),
            driver=sim_pb2.DriverParams(kind=ray.kind, params=ray.params, recovering=recovering),
            max_ticks=2000,
        )
        results[recovering] = client.stub.Evaluate(request, timeout=60).result
    assert not results[False].finished
    assert results[True].finished
    local = episode.run_episode(track, start, RecoveringPolicy(RecoveringDriver(track, base=ray.act)), max_ticks=2000)
    assert results[True].lap_ticks == local.result.lap_ticks
