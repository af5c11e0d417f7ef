"""Determinism: the same track, start state and controls give bit-identical results, however they are run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from game_server.core.batch import BatchSimulation, run_programs
from game_server.core.episode import run_program
from game_server.core.physics import RunResult, step
from game_server.core.pilot import drive_lap
from game_server.core.state import FORWARD, SimState
from game_server.core.tracks import load_track

TRACKS = ["oval", "alpine", "gen-3"]
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Programs biased towards the throttle, so cars get fast and reach barriers; every key combination can occur.
masks_strategy = st.lists(
    st.one_of(st.sampled_from([1, 1, 5, 9, 0, 2]), st.integers(0, 15)), min_size=1, max_size=400
).map(bytes)


def same_result(a: RunResult, b: RunResult) -> None:
    """Equal field by field; floats compared with == and by repr (bit-identical, sign of zero included)."""
    assert repr(a.final_state) == repr(b.final_state)
    for field in (
        "finished",
        "lap_ticks",
        "progress_m",
        "progress_fraction",
        "checkpoints_passed",
        "wall_contacts",
    ):
        assert getattr(a, field) == getattr(b, field), field
    assert a.ticks == b.ticks
    if a.trajectory is not None or b.trajectory is not None:
        assert a.trajectory is not None and b.trajectory is not None
        for field in ("x", "y", "heading", "speed"):
            assert getattr(a.trajectory, field).tobytes() == getattr(b.trajectory, field).tobytes()
        assert a.trajectory.wall_contact_ticks == b.trajectory.wall_contact_ticks


@SETTINGS
@given(name=st.sampled_from(TRACKS), masks=masks_strategy)
def test_same_program_same_result(name: str, masks: bytes) -> None:
    track = load_track(name)
    same_result(
        run_program(track, track.base_state, masks, record_trajectory=True),
        run_program(track, track.base_state, masks, record_trajectory=True),
    )


@SETTINGS
@given(name=st.sampled_from(TRACKS), masks=masks_strategy)
def test_tick_by_tick_equals_run_program(name: str, masks: bytes) -> None:
    track = load_track(name)
    state = track.base_state
    for m in masks:
        state, _ = step(track, state, m)
    assert repr(state) == repr(run_program(track, track.base_state, masks).final_state)


@SETTINGS
@given(name=st.sampled_from(TRACKS), masks=masks_strategy, data=st.data())
def test_split_and_resume_equals_one_run(name: str, masks: bytes, data: st.DataObject) -> None:
    track = load_track(name)
    cut = data.draw(st.integers(0, len(masks)))
    first = run_program(track, track.base_state, masks[:cut])
    second = run_program(track, first.final_state, masks[cut:])
    whole = run_program(track, track.base_state, masks)
    assert repr(second.final_state) == repr(whole.final_state)


@SETTINGS
@given(
    name=st.sampled_from(TRACKS),
    programs=st.lists(masks_strategy, min_size=1, max_size=12),
    max_ticks=st.integers(0, 450),
)
def test_batched_equals_scalar(name: str, programs: list[bytes], max_ticks: int) -> None:
    track = load_track(name)
    starts = [track.base_state] * len(programs)
    batched = run_programs(track, starts, programs, max_ticks=max_ticks, record_trajectory=True)
    for program, b in zip(programs, batched, strict=True):
        same_result(run_program(track, track.base_state, program, max_ticks=max_ticks, record_trajectory=True), b)


def test_batched_equals_scalar_on_finished_laps_and_odd_starts() -> None:
    programs, starts = [], []
    for name in ("oval", "kidney", "alpine"):
        track = load_track(name)
        masks, _ = drive_lap(track)
        rng = np.random.default_rng(len(name))
        noisy = bytes(m ^ int(f) for m, f in zip(masks, rng.choice([0, 0, 0, 4, 8], size=len(masks)), strict=True))
        mid = run_program(track, track.base_state, masks[:300]).final_state
        programs = [masks, noisy, masks[300:], b""]
        starts = [track.base_state, track.base_state, mid, mid]
        budget = max(len(p) for p in programs) + 50  # max_ticks cuts programs short: leave them room
        batched = run_programs(track, starts, programs, max_ticks=budget, record_trajectory=True)
        scalar = [
            run_program(track, s, p, max_ticks=budget, record_trajectory=True)
            for s, p in zip(starts, programs, strict=True)
        ]
        for a, b in zip(scalar, batched, strict=True):
            same_result(a, b)
        assert batched[0].finished and batched[2].finished


@SETTINGS
@given(name=st.sampled_from(TRACKS), data=st.data())
def test_batch_simulation_steps_like_scalar(name: str, data: st.DataObject) -> None:
    track = load_track(name)
    p = data.draw(st.integers(1, 8))
    ticks = data.draw(st.integers(1, 200))
    raw = np.frombuffer(data.draw(st.binary(min_size=p * ticks, max_size=p * ticks)), np.uint8)
    program = ((raw & 0x0F) | ((raw >> 4) & FORWARD)).reshape(ticks, p)  # forward on about half more ticks
    sim = BatchSimulation(track, [track.base_state] * p)
    states: list[SimState] = [track.base_state] * p
    for t in range(ticks):
        contacts = sim.step(program[t])
        stepped = [step(track, s, int(m)) for s, m in zip(states, program[t], strict=True)]
        states = [s for s, _ in stepped]
        assert contacts.tolist() == [c for _, c in stepped]
    assert [repr(s) for s in sim.states()] == [repr(s) for s in states]


def test_fresh_process_reproduces_the_run() -> None:
    code = (
        "from game_server.core.tracks import load_track\n"
        "from game_server.core.episode import run_program\n"
        "import numpy as np\n"
        "for name in ('alpine', 'gen-11'):\n"
        "    t = load_track(name)\n"
        "    masks = bytes(np.random.default_rng(5).choice([1, 1, 5, 9, 0, 2], size=1200).tolist())\n"
        "    r = run_program(t, t.base_state, masks)\n"
        "    print(repr((r.final_state, r.lap_ticks, r.progress_m)))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    expected = []
    for name in ("alpine", "gen-11"):
        track = load_track(name)
        masks = bytes(np.random.default_rng(5).choice([1, 1, 5, 9, 0, 2], size=1200).tolist())
        r = run_program(track, track.base_state, masks)
        expected.append(repr((r.final_state, r.lap_ticks, r.progress_m)))
    assert out.splitlines() == expected
